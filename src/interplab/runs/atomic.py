"""Atomic file writes: a reader sees the old file or the complete new one, never half.

Everything is written to a temporary file in the destination's directory (so the final
rename stays on one filesystem), flushed to disk with fsync, and moved into place with
`os.replace`, which POSIX and Windows both make atomic. If writing fails, the temporary
file is removed and whatever was at the destination is left untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from interplab.config import to_jsonable

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_json", "atomic_write_text"]


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is moved onto `path`.

    The temporary name keeps the destination's suffix, so writers that look at the
    extension (`np.save`, `fig.savefig`) behave as for `path`. It already exists (empty)
    when yielded; write to it by name, e.g. `safetensors.torch.save_file(t, tmp)`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp(path)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def _create_temp(path: Path) -> Path:
    """A new empty file `.<stem>.<random>.tmp<suffix>` beside `path`, with normal permissions.

    `os.open` with mode 0o666 lets the umask decide permissions as for any new file
    (tempfile.mkstemp would make it 0o600, and the rename would keep that).
    """
    for _ in range(100):
        tmp = path.with_name(f".{path.stem}.{secrets.token_hex(4)}.tmp{path.suffix}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"could not create a temporary file beside {path}")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX); directories cannot be opened on Windows."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically; returns `path`."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically; returns `path`."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    """Write `obj` as JSON (indent 2, keys in their own order) to `path` atomically.

    Dataclasses, numpy/torch scalars and arrays, `Path` and the other types handled by
    `interplab.config.to_jsonable` are converted first; anything else raises TypeError
    before the destination is touched.
    """
    text = json.dumps(to_jsonable(obj), indent=indent, ensure_ascii=False)
    return atomic_write_text(path, text + "\n")
