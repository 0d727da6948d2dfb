"""Copy-detection edits in the style of the VSC22 challenge, as ffmpeg filter chains.

Used to make demo queries and the retrieval benchmark's queries from library videos. The
benchmark adds a few more (:data:`EXTRA_EDITS`) and *insertion*, which is no filter: the
copy is placed between two pieces of another video.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Edit:
    name: str
    vf: str | None = None
    crf: int = 23
    fps: float | None = None


EDITS: dict[str, Edit] = {
    e.name: e
    for e in (
        Edit("reencode_low_quality", "scale=trunc(iw/4)*2:trunc(ih/4)*2", crf=40),
        Edit("crop", "crop=iw*0.75:ih*0.75:iw*0.1:ih*0.15"),
        Edit("hflip", "hflip"),
        Edit("brightness_contrast", "eq=brightness=0.18:contrast=1.3:saturation=1.4"),
        Edit("grayscale", "hue=s=0"),
        Edit("blur", "gblur=sigma=4"),
        Edit("noise", "noise=alls=25:allf=t"),
        Edit("overlay_shapes", "drawbox=x=iw*0.05:y=ih*0.6:w=iw*0.5:h=ih*0.25:color=red@0.8:t=fill,"
             "drawbox=x=iw*0.7:y=ih*0.05:w=iw*0.2:h=ih*0.2:color=yellow@0.7:t=fill"),
        Edit("letterbox", "scale=trunc(iw*0.7/2)*2:trunc(ih*0.7/2)*2,"
             "pad=trunc(iw/0.7/2)*2:trunc(ih/0.7/2)*2:(ow-iw)/2:(oh-ih)/2:black"),
        Edit("rotate", "rotate=0.12:fillcolor=black"),
        Edit("speed_up", "setpts=0.75*PTS"),
        Edit("frame_rate", None, fps=8),
        Edit("combined", "crop=iw*0.85:ih*0.85,hflip,eq=brightness=0.1:saturation=0.6", crf=32),
    )
}  # fmt: skip


# Edits the benchmark adds to EDITS (VSC22 has them; the demo does not need them).
EXTRA_EDITS: dict[str, Edit] = {
    e.name: e
    for e in (
        Edit("resize", "scale=trunc(iw*0.5/2)*2:trunc(ih*0.35/2)*2"),  # smaller, squashed
        Edit("vflip", "vflip"),
        Edit("slow_down", "setpts=1.5*PTS"),
    )
}
INSERTION = "insertion"
# Every edit a benchmark query can have. Each is its own edit family in reports.
DEFAULT_EDITS: tuple[str, ...] = (*EDITS, *EXTRA_EDITS, INSERTION)

# The augmentation of training (an app.learn.augment.ClipAugment parameter) that teaches the
# encoder each edit's invariance. The others are held out of training: their scores say
# how far the invariances it learned carry to edits it never saw (reports mark them). The
# zoom-out is on in the cpu-small preset only (TrainConfig.zoom_out_p).
TRAINED_BY: dict[str, str] = {
    "crop": "scale",  # random resized crop
    "resize": "ratio",  # crops of another aspect ratio, resized to the square frame
    "hflip": "flip_p",
    "brightness_contrast": "brightness",  # colour jitter (brightness, contrast, saturation)
    "grayscale": "grayscale_p",
    "blur": "blur_p",
    "letterbox": "zoom_out_p",  # the frame shrunk onto a plain canvas
    "combined": "scale",  # a crop, a flip and colour: each trained
}
HELD_OUT_EDITS: tuple[str, ...] = tuple(e for e in DEFAULT_EDITS if e not in TRAINED_BY)


def combine_edits(names: Iterable[str]) -> Edit:
    """One filter chain applying the named edits in turn (insertion left out: it is done
    apart), at the worst of their qualities and the lowest of their frame rates."""
    parts = [EDITS.get(n) or EXTRA_EDITS[n] for n in names if n != INSERTION]
    vf = ",".join(e.vf for e in parts if e.vf) or None
    rates = [e.fps for e in parts if e.fps]
    return Edit(
        "+".join(e.name for e in parts),
        vf,
        max((e.crf for e in parts), default=23),
        min(rates, default=None),
    )
