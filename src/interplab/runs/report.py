"""Reports: one self-contained HTML page per run, plus the same content as JSON.

A `Report` is built from blocks (sections, text, tables, figures, metrics, code) and
renders to a single offline file: inline CSS, no scripts, no external URLs, figures
embedded as base64 PNG data URIs, so it can be mailed or archived as is. The structured
content (text, table cells as numbers, figure captions) is kept and written beside the
HTML as `report.json`, so nobody ever has to parse numbers back out of the page.

    report = Report("Sparse autoencoder on blocks.2.hook_resid_post")
    report.section("Reconstruction").metrics({"fvu": 0.08, "l0": 31.7})
    report.table([{"k": 16, "fvu": 0.12}, {"k": 32, "fvu": 0.08}], caption="FVU vs k")
    report.figure(fig, caption="L0 histogram")
    report.write(run.dir / "report.html")
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from pathlib import Path
from typing import Any

from interplab.config import to_jsonable
from interplab.errors import InterplabError
from interplab.runs.atomic import atomic_write_json, atomic_write_text
from interplab.runs.folders import figure_png

__all__ = ["Report"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class Report:
    """A document of sections, paragraphs, tables and figures; see the module docstring.

    Every adding method returns the report, so calls can be chained.
    """

    def __init__(self, title: str, subtitle: str | None = None):
        self.title = title
        self.subtitle = subtitle
        # blocks before the first section() go into an untitled leading section
        self._sections: list[dict[str, Any]] = [{"title": None, "blocks": []}]
        self._figures: list[bytes] = []

    def _add(self, block: dict[str, Any]) -> Report:
        self._sections[-1]["blocks"].append(block)
        return self

    # ------------------------------------------------------------------ content

    def section(self, title: str) -> Report:
        """Start a new section (a heading, listed in the table of contents)."""
        self._sections.append({"title": str(title), "blocks": []})
        return self

    def text(self, text: str) -> Report:
        """Paragraphs separated by blank lines; `**bold**`, `` `code` `` and "- " bullet lists."""
        return self._add({"type": "text", "text": str(text)})

    def table(
        self,
        rows: list[dict[str, Any]] | list[list[Any]],
        columns: list[str] | None = None,
        caption: str | None = None,
        float_format: str = "{:.4g}",
    ) -> Report:
        """A table from dict rows (columns default to the keys, in first-seen order) or list rows.

        List rows without `columns` get no header. Floats are shown with `float_format`;
        the stored data (`to_dict`) keeps full precision.
        """
        rows = list(rows)
        try:
            float_format.format(1.5)
        except (ValueError, IndexError, KeyError) as e:
            raise InterplabError(f"bad float_format {float_format!r}: {e}") from None
        if "{" not in float_format:
            raise InterplabError(f"float_format {float_format!r} has no {{}} placeholder")
        if rows and all(isinstance(r, dict) for r in rows):
            if columns is None:
                columns = list(dict.fromkeys(k for r in rows for k in r))
            cells = [[r.get(c) for c in columns] for r in rows]
        elif all(isinstance(r, list | tuple) for r in rows):
            cells = [list(r) for r in rows]
            width = len(columns) if columns is not None else len(cells[0]) if cells else 0
            for i, r in enumerate(cells):
                if len(r) != width:
                    raise InterplabError(
                        f"table row {i} has {len(r)} cells, expected {width} (like the "
                        f"{'columns' if columns is not None else 'first row'})"
                    )
        else:
            kinds = sorted({type(r).__name__ for r in rows})
            raise InterplabError(
                f"table rows must be all dicts or all lists, got {', '.join(kinds)}"
            )
        return self._add(
            {
                "type": "table",
                "columns": None if columns is None else [str(c) for c in columns],
                "rows": to_jsonable(cells),
                "caption": caption,
                "_float_format": float_format,
            }
        )

    def metrics(self, values: dict[str, Any], caption: str | None = None) -> Report:
        """A two-column (metric, value) table of a flat dict of numbers or strings."""
        if not isinstance(values, dict):
            raise InterplabError(
                f"metrics must be a dict of name -> value, got {type(values).__name__}"
            )
        return self._add({"type": "metrics", "values": to_jsonable(values), "caption": caption})

    def figure(self, figure: Any, caption: str | None = None) -> Report:
        """Embed a matplotlib Figure (rendered to PNG and closed), PNG bytes, or a PNG file path."""
        if isinstance(figure, str | Path):
            path = Path(figure)
            if not path.is_file():
                raise InterplabError(f"figure file {str(path)!r} does not exist")
            png = path.read_bytes()
        elif isinstance(figure, bytes | bytearray | memoryview):
            png = bytes(figure)
        else:
            png = figure_png(figure)
        if not png.startswith(PNG_SIGNATURE):
            raise InterplabError(f"figure data is not a PNG image (starts with {png[:8]!r})")
        self._figures.append(png)
        width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
        return self._add(
            {
                "type": "figure",
                "caption": caption,
                "number": len(self._figures),
                "width_px": width,
                "height_px": height,
            }
        )

    def code(self, text: str) -> Report:
        """A preformatted block (monospace, whitespace kept)."""
        return self._add({"type": "code", "text": str(text)})

    def html(self, raw: str) -> Report:
        """Insert trusted HTML as is (it must not reference external resources)."""
        return self._add({"type": "html", "html": str(raw)})

    # ------------------------------------------------------------------ output

    def to_dict(self) -> dict[str, Any]:
        """The report's content as JSON-able data (figures by caption and size, not pixels)."""
        sections = []
        for section in self._sections:
            if section["title"] is None and not section["blocks"]:
                continue
            blocks = [
                {k: v for k, v in b.items() if not k.startswith("_")} for b in section["blocks"]
            ]
            sections.append({"title": section["title"], "blocks": blocks})
        return {"title": self.title, "subtitle": self.subtitle, "sections": sections}

    def render(self) -> str:
        """The report as one self-contained HTML document."""
        from interplab import __version__

        parts = [f"<header><h1>{_esc(self.title)}</h1>"]
        if self.subtitle:
            parts.append(f'<p class="subtitle">{_inline(self.subtitle)}</p>')
        parts.append("</header>")
        titled = [s for s in self._sections if s["title"] is not None]
        if titled:
            parts.append('<nav class="toc"><strong>Contents</strong><ol>')
            for i, s in enumerate(titled, 1):
                parts.append(f'<li><a href="#sec-{i}">{_esc(s["title"])}</a></li>')
            parts.append("</ol></nav>")
        number = 0
        for section in self._sections:
            if section["title"] is None and not section["blocks"]:
                continue
            if section["title"] is not None:
                number += 1
                parts.append(f'<section id="sec-{number}"><h2>{_esc(section["title"])}</h2>')
            else:
                parts.append("<section>")
            parts.extend(self._render_block(b) for b in section["blocks"])
            parts.append("</section>")
        parts.append(f"<footer>Generated by interplab {_esc(__version__)}.</footer>")
        body = "\n".join(parts)
        return (
            "<!DOCTYPE html>\n"
            '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{_esc(self.title)}</title>\n<style>{_CSS}</style>\n</head>\n"
            f"<body>\n<main>\n{body}\n</main>\n</body>\n</html>\n"
        )

    def write(self, path: str | Path) -> Path:
        """Write the HTML to `path` (must end in .html) and `to_dict()` beside it as .json.

        Both writes are atomic. Returns the HTML path.
        """
        path = Path(path)
        if path.suffix.lower() not in (".html", ".htm"):
            raise InterplabError(f"report path {str(path)!r} must end in .html")
        atomic_write_json(path.with_suffix(".json"), self.to_dict())
        atomic_write_text(path, self.render())
        return path

    def _render_block(self, block: dict[str, Any]) -> str:
        kind = block["type"]
        if kind == "text":
            return _render_text(block["text"])
        if kind == "table":
            return _render_table(
                block["columns"], block["rows"], block["caption"], block["_float_format"]
            )
        if kind == "metrics":
            rows = [[k, v] for k, v in block["values"].items()]
            return _render_table(["metric", "value"], rows, block["caption"], "{:.4g}")
        if kind == "figure":
            data = base64.b64encode(self._figures[block["number"] - 1]).decode("ascii")
            caption = block["caption"]
            alt = _esc(caption or f"Figure {block['number']}")
            label = f"<b>Figure {block['number']}.</b>"
            text = f"{label} {_inline(caption)}" if caption else label
            return (
                f'<figure><img src="data:image/png;base64,{data}" alt="{alt}">'
                f"<figcaption>{text}</figcaption></figure>"
            )
        if kind == "code":
            return f"<pre><code>{_esc(block['text'])}</code></pre>"
        if kind == "html":
            return block["html"]
        raise AssertionError(f"unknown block type {kind}")  # pragma: no cover


# ---------------------------------------------------------------------- rendering helpers


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


_CODE_SPAN = re.compile(r"`([^`]+)`")
_BOLD = re.compile(r"\*\*(.+?)\*\*")


def _inline(text: str) -> str:
    """Escape `text`, then turn `code` spans and **bold** into tags (never inside code)."""
    out = []
    for i, piece in enumerate(_CODE_SPAN.split(text)):
        if i % 2:
            out.append(f"<code>{_esc(piece)}</code>")
        else:
            out.append(_BOLD.sub(r"<strong>\1</strong>", _esc(piece)))
    return "".join(out)


def _render_text(text: str) -> str:
    """Paragraphs at blank lines; runs of "- " lines become a bullet list."""
    # groups of consecutive lines: ("p", [lines]) or ("ul", [items]); a blank line ends a group
    groups: list[tuple[str, list[str]]] = []
    for line in text.strip().splitlines():
        stripped = line.strip()
        kind = groups[-1][0] if groups else None
        if not stripped:
            groups.append(("blank", []))
        elif stripped.startswith(("- ", "* ")):
            if kind == "ul":
                groups[-1][1].append(stripped[2:].strip())
            else:
                groups.append(("ul", [stripped[2:].strip()]))
        elif kind == "ul" and line[:1].isspace():  # indented continuation of a bullet
            groups[-1][1][-1] += " " + stripped
        elif kind == "p":
            groups[-1][1].append(stripped)
        else:
            groups.append(("p", [stripped]))
    out = []
    for kind, lines in groups:
        if kind == "p":
            out.append(f"<p>{_inline(' '.join(lines))}</p>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in lines) + "</ul>")
    return "\n".join(out)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _format_cell(value: Any, float_format: str) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return float_format.format(value) if math.isfinite(value) else str(value)
    if isinstance(value, list | dict):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _render_table(
    columns: list[str] | None, rows: list[list[Any]], caption: str | None, float_format: str
) -> str:
    n_cols = len(columns) if columns is not None else max((len(r) for r in rows), default=0)
    numeric = [
        all(_is_number(r[j]) or r[j] is None for r in rows) and any(_is_number(r[j]) for r in rows)
        for j in range(n_cols)
    ]
    parts = ['<div class="table-wrap"><table>']
    if caption:
        parts.append(f"<caption>{_inline(caption)}</caption>")
    if columns is not None:
        head = "".join(
            f"<th{' class=num' if numeric[j] else ''}>{_esc(c)}</th>" for j, c in enumerate(columns)
        )
        parts.append(f"<thead><tr>{head}</tr></thead>")
    parts.append("<tbody>")
    for row in rows:
        cells = "".join(
            f"<td{' class=num' if _is_number(v) else ''}>{_esc(_format_cell(v, float_format))}</td>"
            for v in row
        )
        parts.append(f"<tr>{cells}</tr>")
    parts.append("</tbody></table></div>")
    return "".join(parts)


_CSS = """
:root { --fg: #1f2328; --muted: #59636e; --border: #d1d9e0; --zebra: #f6f8fa; --accent: #0969da; }
* { box-sizing: border-box; }
body { margin: 0; background: #fff; color: var(--fg);
  font: 16px/1.55 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 940px; margin: 0 auto; padding: 2rem 1.25rem 3rem; }
h1 { font-size: 1.9rem; line-height: 1.2; margin: 0 0 .3rem; }
h2 { font-size: 1.35rem; margin: 2.2rem 0 .7rem; padding-bottom: .3rem; border-bottom: 1px solid var(--border); }
.subtitle { color: var(--muted); font-size: 1.1rem; margin: 0 0 1.2rem; }
nav.toc { display: inline-block; min-width: 40%; margin: .5rem 0 1rem; padding: .6rem 1.2rem;
  background: var(--zebra); border: 1px solid var(--border); border-radius: 6px; font-size: .95rem; }
nav.toc ol { margin: .3rem 0 0; padding-left: 1.3rem; }
a { color: var(--accent); text-decoration: none; }
a:hover { text-decoration: underline; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "Liberation Mono", monospace;
  font-size: .88em; }
p code, li code, figcaption code, caption code { background: #eff1f3; padding: .1em .35em; border-radius: 4px; }
pre { background: var(--zebra); border: 1px solid var(--border); border-radius: 6px;
  padding: .8rem 1rem; overflow-x: auto; line-height: 1.4; }
.table-wrap { overflow-x: auto; margin: 1rem 0; }
table { border-collapse: collapse; font-size: .92rem; font-variant-numeric: tabular-nums; }
th, td { padding: .35rem .8rem; text-align: left; vertical-align: top; border-bottom: 1px solid var(--border); }
th { font-weight: 600; border-bottom: 2px solid var(--border); white-space: nowrap; }
tbody tr:nth-child(even) { background: var(--zebra); }
th.num, td.num { text-align: right; }
caption { caption-side: bottom; text-align: left; color: var(--muted); font-size: .88rem; padding-top: .4rem; }
figure { margin: 1.4rem 0; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid var(--border); border-radius: 4px; }
figcaption { color: var(--muted); font-size: .9rem; margin-top: .4rem; }
footer { margin-top: 3rem; padding-top: .8rem; border-top: 1px solid var(--border); color: var(--muted); font-size: .85rem; }
@media print { main { max-width: none; } h2 { break-after: avoid; } figure, table { break-inside: avoid; } }
"""
