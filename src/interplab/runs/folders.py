"""Run folders: one directory per experiment, holding its config, metrics and artifacts.

Layout of `runs/<YYYYmmdd-HHMMSS>-<name>/`:
- `config.json`: the config the run was started with (never rewritten);
- `metrics.jsonl`: one JSON object per `run.log(...)` call, each with a `time` field;
- `status.json`: {"status": "running" | "done" | "failed", "error": ...};
- `figures/*.png`, `report.html`, `report.json` and any artifacts the run saves.

Every file except the append-only metrics log is written atomically. A folder is never
reused for a new run; `resume=` reopens an existing one after checking its config.
"""

from __future__ import annotations

import io
import json
import re
import sys
import time
import traceback
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from interplab.config import config_to_dict, to_jsonable
from interplab.errors import InterplabError
from interplab.runs.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text

__all__ = ["Run", "start_run"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
FIGURE_DPI = 150
"""Resolution of saved figures: sharp on screens, a few hundred kB for a typical plot."""


class Run:
    """An open run folder. Create one with `start_run`; use it as a context manager.

    Attributes: `dir` (the folder), `name` (the name it was started with), `config`
    (the saved config as a dict).
    """

    def __init__(self, directory: Path, name: str, config: dict[str, Any]):
        self.dir = Path(directory)
        self.name = name
        self.config = config
        self._metrics_file: IO[str] | None = None

    def __repr__(self) -> str:
        return f"Run({str(self.dir)!r})"

    # -------------------------------------------------------------- metrics

    def log(self, step: int | None = None, **metrics: Any) -> None:
        """Append one line `{"step": step, "time": <unix seconds>, **metrics}` to metrics.jsonl.

        Values may be numbers, strings, numpy or torch scalars, lists, dicts. Each line is
        flushed at once, so a killed job leaves every logged line readable.
        """
        if "time" in metrics:
            raise InterplabError(
                "'time' is reserved in run.log (it records when the line was written)"
            )
        record: dict[str, Any] = {} if step is None else {"step": _as_int(step)}
        record["time"] = round(time.time(), 3)
        record.update(to_jsonable(metrics))
        line = json.dumps(record, ensure_ascii=False)
        if self._metrics_file is None:
            self._metrics_file = _open_append(self.dir / "metrics.jsonl")
        self._metrics_file.write(line + "\n")
        self._metrics_file.flush()

    def metrics(self) -> list[dict[str, Any]]:
        """Every line of metrics.jsonl as a dict, skipping a truncated last line."""
        return read_metrics(self.dir / "metrics.jsonl")

    def last_step(self) -> int | None:
        """The largest `step` logged so far (for resuming a loop), or None."""
        steps = [m["step"] for m in self.metrics() if isinstance(m.get("step"), int)]
        return max(steps) if steps else None

    # -------------------------------------------------------------- artifacts

    def path(self, relative: str | Path) -> Path:
        """The path of `relative` inside the run folder, with its parent folders created."""
        relative = Path(relative)
        target = (self.dir / relative).resolve()
        if relative.is_absolute() or not target.is_relative_to(self.dir.resolve()):
            raise InterplabError(f"run artifact path {str(relative)!r} must stay inside {self.dir}")
        target.parent.mkdir(parents=True, exist_ok=True)
        return self.dir / relative

    def save_json(self, name: str | Path, obj: Any) -> Path:
        """Write `obj` as JSON to `name` (".json" added when missing), atomically."""
        name = Path(name)
        if name.suffix != ".json":
            name = name.with_name(name.name + ".json")
        return atomic_write_json(self.path(name), obj)

    def save_text(self, name: str | Path, text: str) -> Path:
        """Write `text` to `name` inside the run folder, atomically."""
        return atomic_write_text(self.path(name), text)

    def save_figure(self, name: str, fig: Any, dpi: int = FIGURE_DPI) -> Path:
        """Save a matplotlib Figure as `figures/<name>.png` (atomically) and close it."""
        name = name.removesuffix(".png")
        path = self.path(Path("figures") / f"{name}.png")
        atomic_write_bytes(path, figure_png(fig, dpi=dpi))
        return path

    # -------------------------------------------------------------- status

    def status(self) -> dict[str, Any]:
        """The contents of status.json ({"status": ...}), or {} if it is missing."""
        path = self.dir / "status.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def finish(self, error: BaseException | None = None) -> None:
        """Close the metrics log and mark the run done, or failed with `error`."""
        self._close_metrics()
        if error is None:
            atomic_write_json(self.dir / "status.json", {"status": "done"})
            return
        message = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        atomic_write_json(self.dir / "status.json", {"status": "failed", "error": message})
        trace = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        atomic_write_text(self.dir / "traceback.txt", trace)

    def _close_metrics(self) -> None:
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None

    def __enter__(self) -> Run:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.finish(exc)


def start_run(
    name: str,
    config: object | dict | None = None,
    root: str | Path = "runs",
    resume: str | Path | None = None,
) -> Run:
    """Create `root/<YYYYmmdd-HHMMSS>-<name>/` with config.json and return its `Run`.

    Two runs started in the same second get distinct folders (`...-<name>-2`); an
    existing folder is never reused. With `resume=<run folder>`, that folder is reopened
    instead: metrics are appended, and `config` (when given) must equal the saved
    config.json, else InterplabError names the differing keys.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise InterplabError(
            f"run name {name!r} must start with a letter or digit and use only letters, "
            "digits, '.', '_' and '-'"
        )
    config_dict = {} if config is None else config_to_dict(config)
    if resume is not None:
        return _resume(Path(resume), name, config_dict if config is not None else None)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    stem = f"{_timestamp()}-{name}"
    for attempt in range(1, 10_000):
        directory = root / (stem if attempt == 1 else f"{stem}-{attempt}")
        try:
            directory.mkdir()  # fails if it exists: the check and the claim are one step
        except FileExistsError:
            continue
        break
    else:  # pragma: no cover - ten thousand runs of one name in one second
        raise InterplabError(f"could not create a fresh run folder for {stem!r} in {root}")
    atomic_write_json(directory / "config.json", config_dict)
    atomic_write_json(directory / "status.json", {"status": "running"})
    return Run(directory, name, config_dict)


def _timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def _resume(directory: Path, name: str, config: dict[str, Any] | None) -> Run:
    saved_path = directory / "config.json"
    if not saved_path.is_file():
        raise InterplabError(f"cannot resume {directory}: it is not a run folder (no config.json)")
    saved = json.loads(saved_path.read_text())
    if config is not None:
        # compare as JSON would store them, so tuples equal lists and 1.0 equals 1.0
        given = json.loads(json.dumps(config))
        differing = _differing_keys(saved, given)
        if differing:
            details = ", ".join(
                f"{k} (saved {_lookup(saved, k)!r}, given {_lookup(given, k)!r})" for k in differing
            )
            raise InterplabError(f"cannot resume {directory}: config differs in {details}")
    atomic_write_json(directory / "status.json", {"status": "running"})
    return Run(directory, name, saved)


def _differing_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = list(a) + [k for k in b if k not in a]
        out = []
        for k in keys:
            out.extend(_differing_keys(a.get(k, _ABSENT), b.get(k, _ABSENT), f"{prefix}{k}."))
        return out
    return [] if a == b and type(a) is type(b) else [prefix.rstrip(".")]


class _Absent:
    def __repr__(self) -> str:
        return "<absent>"


_ABSENT = _Absent()


def _lookup(d: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return _ABSENT
        d = d[part]
    return d


def _as_int(step: Any) -> int:
    step = to_jsonable(step)
    if isinstance(step, bool) or not isinstance(step, int):
        raise InterplabError(f"run.log step must be an integer, got {step!r}")
    return step


def _open_append(path: Path) -> IO[str]:
    """Open metrics.jsonl for appending, first cutting off a partial last line.

    A job killed mid-write can leave a line without its newline; appending after it would
    glue the next record onto the fragment and corrupt both.
    """
    if path.exists():
        with open(path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)
    return open(path, "a", encoding="utf-8", buffering=1)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file; a truncated last line is skipped.

    A malformed line anywhere else means the file was damaged, and raises InterplabError.
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # no newline after it: the writer was killed mid-line
                break
            raise InterplabError(f"{path}: line {i + 1} is not valid JSON: {line[:80]!r}") from None
    return records


def figure_png(fig: Any, dpi: int = FIGURE_DPI, close: bool = True) -> bytes:
    """A matplotlib Figure rendered to PNG bytes (tight bounding box); closes it by default."""
    if not hasattr(fig, "savefig"):
        raise InterplabError(f"expected a matplotlib Figure, got {type(fig).__qualname__}")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    if close and "matplotlib.pyplot" in sys.modules:
        # only pyplot keeps figures alive; a Figure built without pyplot needs no closing
        sys.modules["matplotlib.pyplot"].close(fig)
    return buffer.getvalue()
