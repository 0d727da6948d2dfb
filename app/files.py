"""Files that readers never see half-written: write to a temporary name beside the
target, then rename it into place (``os.replace`` is atomic on one filesystem)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: Path, *, suffix: str | None = None) -> Iterator[Path]:
    """Yields a fresh temporary path in ``path``'s folder; when the block succeeds it is
    renamed to ``path``, when it fails it is removed. ``suffix`` (default: the target's)
    keeps tools that pick a format by file name (ffmpeg, matplotlib) working."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=(path.suffix if suffix is None else suffix)
    )
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, data: bytes | str) -> Path:
    """Writes ``data`` (text as UTF-8) to ``path`` through a temporary file."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)
