"""interplab.runs: atomic writes, run folders, metrics, reports and running recipes."""

from __future__ import annotations

import base64
import json
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from interplab import recipes  # noqa: E402
from interplab.errors import InterplabError  # noqa: E402
from interplab.runs import (  # noqa: E402
    Report,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    folders,
    recipe_help,
    run_recipe,
    start_run,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if ".tmp" in p.name]


# ----------------------------------------------------------------------------- atomic writes


def test_atomic_writes_round_trip(tmp_path):
    atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01")
    atomic_write_text(tmp_path / "sub" / "b.txt", "héllo")
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "sub" / "b.txt").read_text(encoding="utf-8") == "héllo"
    atomic_write_text(tmp_path / "a.bin", "replaced")
    assert (tmp_path / "a.bin").read_text() == "replaced"
    assert _leftovers(tmp_path) == []


def test_atomic_write_json_converts_and_keeps_key_order(tmp_path):
    @dataclass
    class Point:
        x: float
        path: Path

    obj = {"z": np.float64(1.5), "a": torch.tensor(3), "p": Point(np.float32(0.25), Path("q")),
           "arr": np.eye(2, dtype=np.int32)}  # fmt: skip
    path = atomic_write_json(tmp_path / "o.json", obj)
    text = path.read_text()
    assert json.loads(text) == {
        "z": 1.5,
        "a": 3,
        "p": {"x": 0.25, "path": "q"},
        "arr": [[1, 0], [0, 1]],
    }
    assert text.index('"z"') < text.index('"a"')  # not sorted
    assert '\n  "z": 1.5' in text  # indent 2


def test_atomic_write_json_failure_leaves_old_file(tmp_path):
    path = tmp_path / "o.json"
    path.write_text("old")
    with pytest.raises(TypeError, match="cannot convert object"):
        atomic_write_json(path, {"bad": object()})
    assert path.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_atomic_path_failure_removes_temp_and_keeps_existing(tmp_path):
    path = tmp_path / "weights.npy"
    np.save(path, np.arange(3))
    original = path.read_bytes()
    seen = []
    with pytest.raises(RuntimeError, match="disk on fire"), atomic_path(path) as tmp:
        seen.append(tmp)
        assert tmp.parent == path.parent and tmp.suffix == ".npy" and tmp != path
        tmp.write_bytes(b"half a file")
        raise RuntimeError("disk on fire")
    assert path.read_bytes() == original
    assert not seen[0].exists() and _leftovers(tmp_path) == []


def test_atomic_path_success_with_extension_sensitive_writer(tmp_path):
    path = tmp_path / "w.npy"
    with atomic_path(path) as tmp:
        np.save(tmp, np.arange(4))  # np.save would append .npy if the suffix were different
    np.testing.assert_array_equal(np.load(path), np.arange(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.npy"]


# ----------------------------------------------------------------------------- run folders


@dataclass
class RunCfg:
    lr: float = 0.1
    """Learning rate."""
    layers: tuple[int, ...] = (1, 2)
    """Layers."""


def test_start_run_layout_and_unique_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(folders, "_timestamp", lambda: "20240102-030405")
    a = start_run("sweep", RunCfg(), root=tmp_path)
    b = start_run("sweep", {"x": 1}, root=tmp_path)  # same second, same name
    c = start_run("sweep", root=tmp_path)
    assert [r.dir.name for r in (a, b, c)] == [
        "20240102-030405-sweep",
        "20240102-030405-sweep-2",
        "20240102-030405-sweep-3",
    ]
    assert json.loads((a.dir / "config.json").read_text()) == {"lr": 0.1, "layers": [1, 2]}
    assert json.loads((b.dir / "config.json").read_text()) == {"x": 1}
    assert json.loads((c.dir / "config.json").read_text()) == {}
    assert a.name == "sweep" and a.status() == {"status": "running"}


def test_start_run_rejects_non_config(tmp_path):
    with pytest.raises(
        InterplabError, match="expected a dataclass instance or a dict as config, got int"
    ):
        start_run("x", 42, root=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_real_timestamp_format(tmp_path):
    run = start_run("t", root=tmp_path)
    assert re.fullmatch(r"\d{8}-\d{6}-t", run.dir.name)


@pytest.mark.parametrize("name", ["", "a/b", "../x", "-flag", "sp ace"])
def test_bad_run_names(tmp_path, name):
    with pytest.raises(InterplabError, match="run name"):
        start_run(name, root=tmp_path)


def test_log_and_metrics_round_trip(tmp_path):
    run = start_run("m", root=tmp_path)
    run.log(step=0, loss=np.float32(2.0), l0=torch.tensor(31.5))
    run.log(note="no step", hist=[1, 2])
    run.log(step=np.int64(2), loss=1.0)
    records = run.metrics()
    assert [{k: v for k, v in r.items() if k != "time"} for r in records] == [
        {"step": 0, "loss": 2.0, "l0": 31.5},
        {"note": "no step", "hist": [1, 2]},
        {"step": 2, "loss": 1.0},
    ]
    assert all(isinstance(r["time"], float) for r in records)
    assert records[0]["time"] <= records[-1]["time"]
    assert run.last_step() == 2
    # each line is on disk already (flushed), before the run is closed
    assert len((run.dir / "metrics.jsonl").read_text().splitlines()) == 3
    with pytest.raises(InterplabError, match="'time' is reserved"):
        run.log(time=1)
    with pytest.raises(InterplabError, match="step must be an integer, got 1.5"):
        run.log(step=1.5, loss=1)


def test_truncated_last_line_is_skipped_and_cut_on_resume(tmp_path):
    run = start_run("k", RunCfg(), root=tmp_path)
    run.log(step=1, loss=1.0)
    run.finish()
    with open(run.dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "lo')  # killed mid-line
    assert [r["step"] for r in run.metrics()] == [1]
    resumed = start_run("k", RunCfg(), root=tmp_path, resume=run.dir)
    resumed.log(step=2, loss=0.5)
    assert [r["step"] for r in resumed.metrics()] == [1, 2]
    assert resumed.last_step() == 2


def test_corrupt_middle_line_is_an_error(tmp_path):
    run = start_run("c", root=tmp_path)
    (run.dir / "metrics.jsonl").write_text('{"a": 1}\nnot json\n{"a": 2}\n')
    with pytest.raises(InterplabError, match="line 2 is not valid JSON"):
        run.metrics()


def test_resume_checks_config(tmp_path):
    run = start_run("r", RunCfg(), root=tmp_path)
    run.log(step=0, loss=1.0)
    run.finish()
    again = start_run("r", RunCfg(layers=[1, 2]), root=tmp_path, resume=run.dir)  # list == tuple
    assert again.dir == run.dir and again.status() == {"status": "running"}
    assert again.config == {"lr": 0.1, "layers": [1, 2]}
    assert start_run("r", None, root=tmp_path, resume=run.dir).config == again.config
    with pytest.raises(InterplabError, match=r"config differs in lr \(saved 0.1, given 0.2\)"):
        start_run("r", RunCfg(lr=0.2), root=tmp_path, resume=run.dir)
    with pytest.raises(
        InterplabError, match=r"differs in layers .*, extra \(saved <absent>, given 1\)"
    ):
        start_run("r", {"lr": 0.1, "layers": [3], "extra": 1}, root=tmp_path, resume=run.dir)
    with pytest.raises(InterplabError, match="not a run folder"):
        start_run("r", root=tmp_path, resume=tmp_path / "nope")
    assert len(list(tmp_path.iterdir())) == 1  # resuming never creates folders


def test_context_manager_marks_status(tmp_path):
    with start_run("ok", root=tmp_path) as run:
        run.log(step=0, x=1)
    assert run.status() == {"status": "done"}
    with pytest.raises(KeyError), start_run("bad", root=tmp_path) as failed:
        raise KeyError("missing thing")
    assert failed.status() == {"status": "failed", "error": "KeyError: 'missing thing'"}
    assert "raise KeyError" in (failed.dir / "traceback.txt").read_text()


def test_artifacts(tmp_path):
    run = start_run("a", root=tmp_path)
    p = run.path("deep/er/file.bin")
    assert p == run.dir / "deep/er/file.bin" and p.parent.is_dir()
    assert json.loads(run.save_json("stats", {"n": np.int32(4)}).read_text()) == {"n": 4}
    assert run.save_json("sub/x.json", [1]).name == "x.json"
    assert run.save_text("notes.md", "# hi").read_text() == "# hi"
    for bad in ("../outside.txt", "/abs/path", "a/../../b"):
        with pytest.raises(InterplabError, match="must stay inside"):
            run.path(bad)


def test_save_figure_writes_png_and_closes(tmp_path):
    run = start_run("f", root=tmp_path)
    fig = plt.figure(figsize=(2, 1.5))
    ax = fig.add_axes((0, 0, 1, 1))  # fills the figure, so the tight box is the figure + padding
    ax.plot([0, 1], [1, 0])
    ax.set_axis_off()
    path = run.save_figure("curve", fig)
    assert path == run.dir / "figures" / "curve.png"
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    # (2 in + 2 * 0.1 in tight padding) * 150 dpi, and (1.5 + 0.2) * 150
    assert abs(width - 330) <= 2 and abs(height - 255) <= 2
    assert not plt.fignum_exists(fig.number)
    with pytest.raises(InterplabError, match="expected a matplotlib Figure"):
        run.save_figure("x", "not a figure")


# ----------------------------------------------------------------------------- reports


def _png_bytes() -> bytes:
    fig, ax = plt.subplots(figsize=(1, 1))
    ax.imshow(np.eye(3))
    from interplab.runs import figure_png

    return figure_png(fig, dpi=40)


def _example_report() -> Report:
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([1, 2, 3])
    report = Report("Sweep <results>", subtitle="k in {16, 32}")
    report.text("Intro with **bold**, `W_enc` and <script>.\n\n- first item\n- second `x**2**`")
    report.section("Numbers")
    report.table(
        [{"k": 16, "fvu": 0.123456, "ok": True}, {"k": 32, "fvu": 0.0625, "name": "b&c"}],
        caption="FVU by k",
    )
    report.table([[1, 2.5], [3, None]], columns=["a", "b"], float_format="{:.2f}")
    report.metrics({"l0": 31.25, "dead": 0})
    report.section("Pictures")
    report.figure(fig, caption="a **line**")
    report.figure(_png_bytes())
    report.code("for i in range(3):\n    print(i < 2)")
    report.html('<p class="raw">trusted</p>')
    return report


def test_report_html_structure():
    html = _example_report().render()
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    assert (
        "<title>Sweep &lt;results&gt;</title>" in html and "<h1>Sweep &lt;results&gt;</h1>" in html
    )
    assert '<p class="subtitle">k in {16, 32}</p>' in html
    # table of contents links to both sections
    assert '<a href="#sec-1">Numbers</a>' in html and '<a href="#sec-2">Pictures</a>' in html
    assert '<section id="sec-2"><h2>Pictures</h2>' in html
    # inline markup, escaping, bullets
    assert "<p>Intro with <strong>bold</strong>, <code>W_enc</code> and &lt;script&gt;.</p>" in html
    assert "<ul><li>first item</li><li>second <code>x**2**</code></li></ul>" in html
    assert "<script" not in html
    # table cells: dict-row columns in first-seen order, floats formatted, numbers right-aligned
    assert "<th class=num>k</th><th class=num>fvu</th><th>ok</th><th>name</th>" in html
    assert "<td class=num>16</td><td class=num>0.1235</td><td>True</td><td></td>" in html
    assert "<td>b&amp;c</td>" in html
    assert "<td class=num>2.50</td>" in html and "<caption>FVU by k</caption>" in html
    assert "<td>l0</td><td class=num>31.25</td>" in html
    assert "<pre><code>for i in range(3):\n    print(i &lt; 2)</code></pre>" in html
    assert '<p class="raw">trusted</p>' in html
    # figures are embedded PNG data URIs
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)" alt="([^"]*)">', html)
    assert len(images) == 2
    for data, _ in images:
        assert base64.b64decode(data).startswith(PNG_SIGNATURE)
    assert images[0][1] == "a **line**" and images[1][1] == "Figure 2"
    assert "<b>Figure 1.</b> a <strong>line</strong>" in html
    # self-contained: inline CSS, no scripts, no external resources
    assert "<style>" in html and "tbody tr:nth-child(even)" in html
    assert "http://" not in html and "https://" not in html and "<link" not in html


def test_report_to_dict_keeps_data():
    d = _example_report().to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["title"] == "Sweep <results>"
    intro, numbers, pictures = d["sections"]
    assert intro["title"] is None and intro["blocks"][0]["type"] == "text"
    table = numbers["blocks"][0]
    assert table == {
        "type": "table",
        "columns": ["k", "fvu", "ok", "name"],
        "rows": [[16, 0.123456, True, None], [32, 0.0625, None, "b&c"]],  # full precision
        "caption": "FVU by k",
    }
    assert numbers["blocks"][2] == {
        "type": "metrics",
        "values": {"l0": 31.25, "dead": 0},
        "caption": None,
    }
    figure = pictures["blocks"][0]
    assert (
        figure["type"] == "figure" and figure["caption"] == "a **line**" and figure["number"] == 1
    )
    assert figure["width_px"] > 0 and "png" not in json.dumps(figure).lower()
    assert [b["type"] for b in pictures["blocks"]] == ["figure", "figure", "code", "html"]


def test_report_write_html_and_json(tmp_path):
    report = _example_report()
    path = report.write(tmp_path / "out" / "report.html")
    assert path.read_text() == report.render()
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == report.to_dict()
    with pytest.raises(InterplabError, match="must end in .html"):
        report.write(tmp_path / "report.txt")


def test_report_figure_from_file_and_errors(tmp_path):
    png = tmp_path / "p.png"
    png.write_bytes(_png_bytes())
    report = Report("r").figure(png, caption="from file")
    assert report.to_dict()["sections"][0]["blocks"][0]["caption"] == "from file"
    with pytest.raises(InterplabError, match="does not exist"):
        report.figure(tmp_path / "missing.png")
    with pytest.raises(InterplabError, match="not a PNG image"):
        report.figure(b"GIF89a....")
    with pytest.raises(InterplabError, match="expected a matplotlib Figure"):
        report.figure(42)


def test_report_table_errors():
    report = Report("r")
    with pytest.raises(InterplabError, match="row 1 has 1 cells, expected 2"):
        report.table([[1, 2], [3]], columns=["a", "b"])
    with pytest.raises(InterplabError, match="all dicts or all lists, got dict, list"):
        report.table([{"a": 1}, [2]])
    with pytest.raises(InterplabError, match="no {} placeholder"):
        report.table([[1.0]], float_format="%.3f")
    with pytest.raises(InterplabError, match="bad float_format"):
        report.table([[1.0]], float_format="{:.3q}")
    with pytest.raises(InterplabError, match="metrics must be a dict"):
        report.metrics([1, 2])


def test_report_list_rows_without_header():
    html = Report("r").table([["x", 1]]).render()
    assert "<thead>" not in html and "<td>x</td><td class=num>1</td>" in html
    assert "<nav" not in html  # no sections, no table of contents
    assert html.count("<section") == 1


def test_report_without_leading_content_has_no_empty_section():
    report = Report("r").section("Only").text("x")
    assert report.render().count("<section") == 1
    assert [s["title"] for s in report.to_dict()["sections"]] == ["Only"]


# ----------------------------------------------------------------------------- recipes


@dataclass
class FakeConfig:
    n: int = 3
    """How many steps."""
    fail: bool = False
    """Raise inside run()."""


def _fake_run(config: FakeConfig, run) -> Report:
    for step in range(config.n):
        run.log(step=step, value=step * step)
    if config.fail:
        raise RuntimeError("recipe broke")
    values = [m["value"] for m in run.metrics()]
    return Report("Fake").metrics({"sum": sum(values)})


@pytest.fixture
def fake_recipe(monkeypatch):
    module = types.ModuleType("interplab_test_fake_recipe")
    module.Config = FakeConfig
    module.DESCRIPTION = "Sums squares."
    module.run = _fake_run
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(recipes.RECIPES, "fake", module.__name__)
    return module


def test_run_recipe_end_to_end(tmp_path, fake_recipe):
    result = run_recipe("fake", ["--n", "4"], root=tmp_path)
    assert result.config == FakeConfig(n=4)
    assert result.run_dir.parent == tmp_path and result.run_dir.name.endswith("-fake")
    assert result.report_path == result.run_dir / "report.html" and result.report_path.exists()
    saved = json.loads((result.run_dir / "report.json").read_text())
    assert saved["sections"][0]["blocks"][0]["values"] == {"sum": 0 + 1 + 4 + 9}
    assert json.loads((result.run_dir / "config.json").read_text()) == {"n": 4, "fail": False}
    assert json.loads((result.run_dir / "status.json").read_text()) == {"status": "done"}
    # a base config plus overrides
    assert run_recipe("fake", {"n": "2"}, root=tmp_path, config=FakeConfig(n=9)).config.n == 2


def test_run_recipe_failure_is_recorded(tmp_path, fake_recipe):
    with pytest.raises(RuntimeError, match="recipe broke"):
        run_recipe("fake", ["--fail"], root=tmp_path)
    (run_dir,) = tmp_path.iterdir()
    assert json.loads((run_dir / "status.json").read_text()) == {
        "status": "failed",
        "error": "RuntimeError: recipe broke",
    }
    assert not (run_dir / "report.html").exists()


def test_run_recipe_errors(tmp_path, fake_recipe, monkeypatch):
    with pytest.raises(InterplabError, match="unknown recipe 'nope'"):
        run_recipe("nope", root=tmp_path)
    with pytest.raises(InterplabError, match="unknown flag '--m'"):
        run_recipe("fake", ["--m", "1"], root=tmp_path)
    with pytest.raises(
        InterplabError, match="must be a interplab_test_fake_recipe.Config, got RunCfg"
    ):
        run_recipe("fake", config=RunCfg(), root=tmp_path)
    monkeypatch.setattr(fake_recipe, "run", lambda config, run: "not a report")
    with pytest.raises(InterplabError, match="returned str, expected an interplab.runs.Report"):
        run_recipe("fake", root=tmp_path)
    monkeypatch.delattr(fake_recipe, "run")
    with pytest.raises(InterplabError, match="lacks run"):
        run_recipe("fake", root=tmp_path)


def test_recipe_help(fake_recipe):
    text = recipe_help("fake")
    assert text.startswith("fake: Sums squares.")
    assert "--n int" in text and "How many steps." in text and "--[no-]fail" in text
