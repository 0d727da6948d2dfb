"""Geometry before embedding: which way up a video is shown, and where its picture is.

Runs only inside the decoding child (:mod:`app.media.decode`), with the PyAV container
the probe opened. Two things make the frames a model sees differ between copies of one
video although the picture is the same:

- **rotation metadata** (a display matrix, as phones write): decord turns frames upright
  itself, but the probe's width and height are the stored ones, so the resize must know
  the rotation to keep the displayed aspect ratio;
- **borders**: letterbox, pillarbox or padding of any flat colour, and the blurred
  side-bars of phone videos posted in landscape. :func:`find_picture` finds them on a
  handful of small grey frames spread over the whole video (keyframes, which decode on
  their own), as rows and columns that are flat over space *and* time (a dark scene
  moves; a border does not), or far smoother than the picture (blurred bars, accepted
  only in symmetric pairs as phones make them).

The probe's open PyAV container is handed in: PyAV is never imported here, so the parent
imports this module (for :class:`Box`) for free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

# Frames looked at, spread over [5 %, 95 %] of the video: enough for time to tell a
# border from a still dark region, few enough to cost a fraction of the sample's decode.
DETECT_FRAMES = 8
MIN_DETECT_FRAMES = 3  # with fewer distinct frames, time tells nothing: no border found
DETECT_LONG_SIDE = 320  # grey frames are looked at with this long side (or native, if smaller)
# A video with too few keyframes is looked at over the frames its start holds, up to this
# many (decoded from the first one: 5 s at 25 fps, about a twelfth of a 60-s sample).
MAX_FALLBACK_FRAMES = 125

FLAT_TIME_STD = 3.0  # grey levels (0-255): a border pixel's spread over the frames
FLAT_SPACE_RANGE = 8.0  # grey levels: a border line's spread (5th-95th percentile) along itself
# The picture next to a border must move (this spread over time, in its first lines): a
# still region at the edge (a static colour bar, a dark corner) is not told from padding.
MOVING_TIME_STD = 12.0
MOVING_LINES = 6
BLUR_RATIO = 0.2  # a blurred bar's gradient (90th percentile along it), relative to the centre's
# Lines just inside a blurred bar, between it and the picture (the encoder's ringing at the
# picture's sharp edge), are still bar below this ratio: up to BLUR_EDGE_LINES of them.
BLUR_EDGE_RATIO = 0.5
BLUR_EDGE_LINES = 3
MIN_CENTRE_GRADIENT = 2.0  # below this the picture itself is smooth: blur cannot be judged
BLUR_SYMMETRY = 0.04  # blurred bars on both sides, equal within this fraction of the width
MIN_BORDER = 0.025  # borders thinner than this fraction of the side are left alone
MAX_BORDER = 0.45  # a "border" wider than this is picture we cannot tell apart: kept


@dataclass(frozen=True)
class Box:
    """A rectangle of the upright picture, in its pixels (x, y from the top left)."""

    x: int
    y: int
    width: int
    height: int


@dataclass(frozen=True)
class Geometry:
    """How to turn a stream's stored frames into the picture: ``rotation`` (degrees
    counter-clockwise, 0/90/180/270, as decord applies it) and ``crop`` (the picture
    inside any borders, as fractions (left, top, right, bottom) of the upright frame;
    (0, 0, 1, 1) when there are none or they were not looked for)."""

    rotation: int = 0
    crop: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)


def read_geometry(container: Any, stream: Any, *, duration_s: float, fps: float, find_borders: bool) -> Geometry:
    """The stream's rotation and, with ``find_borders``, its picture inside any borders.

    Decodes keyframes only (one, without ``find_borders``), reduced to small grey frames;
    a video with too few keyframes is looked at over its first MAX_FALLBACK_FRAMES frames.
    """
    times = _detect_times(duration_s, DETECT_FRAMES if find_borders else 1)
    frames, rotation = _grey_keyframes(container, stream, times)
    if find_borders and len(frames) < MIN_DETECT_FRAMES:
        span = min(duration_s, MAX_FALLBACK_FRAMES / fps) if fps > 0 else duration_s
        frames, rotation = _grey_frames_in_order(container, stream, _detect_times(span, DETECT_FRAMES))
    quarter_turns = round(rotation / 90) % 4
    if not find_borders or len(frames) < MIN_DETECT_FRAMES:
        return Geometry(rotation=quarter_turns * 90)
    grey = np.rot90(np.stack(frames), k=quarter_turns, axes=(1, 2))  # (K, h, w) upright, like decord's
    return Geometry(rotation=quarter_turns * 90, crop=find_picture(grey))


def find_picture(grey: np.ndarray) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) fractions of the picture inside the borders of ``grey``.

    ``grey``: (K, h, w) frames of one video spread over time, 0-255. A line (row or
    column) is border if it is flat (each pixel still over time, the line uniform), or,
    for blurred bars, far smoother than the centre of the picture. A border runs from the
    frame's edge to the first two picture lines; one line more goes too (the line where
    border and picture blend). Borders under MIN_BORDER or over MAX_BORDER are kept.
    """
    g = np.asarray(grey, dtype=np.float32)
    _k, h, w = g.shape
    still = g.std(axis=0)  # (h, w) each pixel's spread over time
    level = np.median(g, axis=0)  # (h, w) a caption or logo shown now and then drops out
    # Gradient energy per pixel, averaged over time: low in a blurred bar.
    energy = np.zeros((h, w), np.float32)
    energy[:, 1:] += np.abs(np.diff(g, axis=2)).mean(axis=0)
    energy[1:, :] += np.abs(np.diff(g, axis=1)).mean(axis=0)
    maps = np.stack([still, level, energy])  # (3, h, w)
    top, bottom, left, right = 0, 0, 0, 0
    # Rows are judged over the columns inside the side borders and the other way round
    # (twice: a wide border of one axis would dilute the other axis's lines).
    for _ in range(2):
        top, bottom = _borders(maps[:, :, left : w - right].transpose(0, 2, 1))
        left, right = _borders(maps[:, top : h - bottom, :])
    return left / w, top / h, (w - right) / w, (h - bottom) / h


def _borders(maps: np.ndarray) -> tuple[int, int]:
    """Border widths, in columns, at the left and right of ``maps``: (3, rows, cols) of
    each pixel's spread over time, its median level and its gradient energy."""
    still, level, energy = maps
    rows, cols = still.shape
    low, high = np.percentile(level, [5, 95], axis=0)  # (cols,) each
    moves = np.median(still, axis=0)  # (cols,)
    flat = (moves < FLAT_TIME_STD) & (high - low < FLAT_SPACE_RANGE)
    # A blurred line is smooth all along (a line through the picture has sharp parts even
    # where it crosses the other axis's bars), compared with the centre's alike.
    centre = float(np.percentile(energy[rows // 4 : rows - rows // 4, cols // 4 : cols - cols // 4], 90))
    line_energy = np.percentile(energy, 90, axis=0)  # (cols,)
    if centre >= MIN_CENTRE_GRADIENT:
        smooth, soft = line_energy < BLUR_RATIO * centre, line_energy < BLUR_EDGE_RATIO * centre
    else:
        smooth = soft = np.zeros(cols, bool)
    start, end = _pair(flat, smooth, soft, moves >= MOVING_TIME_STD)
    if not (start and end):
        # Padding is centred (letterbox, pillarbox, a windowbox): flat lines of one level
        # at both ends, as wide within BLUR_SYMMETRY, are padding even where the picture
        # next to them is still (a static shot), where one end alone is not told from a
        # still region of the picture.
        still_start, still_end = _border(flat, None), _border(flat[::-1], None)
        if still_start and still_end and abs(still_start - still_end) <= BLUR_SYMMETRY * cols + 1:
            levels = np.median(level[:, :still_start]), np.median(level[:, cols - still_end :])
            if abs(float(levels[0]) - float(levels[1])) < FLAT_SPACE_RANGE:
                return still_start, still_end
    return start, end


def crop_box(geometry: Geometry, width: int, height: int) -> Box:
    """The crop in pixels of the upright ``width`` x ``height`` frame."""
    left, top, right, bottom = geometry.crop
    x0, y0 = round(left * width), round(top * height)
    return Box(x=x0, y=y0, width=round(right * width) - x0, height=round(bottom * height) - y0)


def _pair(flat: np.ndarray, smooth: np.ndarray, soft: np.ndarray, moving: np.ndarray) -> tuple[int, int]:
    """Border widths at both ends of one axis, in lines: flat borders each on its own,
    smooth (blurred) ones only where both ends have one of about the same width."""
    n = len(flat)
    start, end = _border(flat, moving), _border(flat[::-1], moving[::-1])
    blurred = flat | smooth
    blur_start, blur_end = _border(blurred, None), _border(blurred[::-1], None)
    wider = blur_start > start or blur_end > end
    if wider and blur_start and blur_end and abs(blur_start - blur_end) <= BLUR_SYMMETRY * n:
        blur_start, blur_end = _edge(blur_start, soft), _edge(blur_end, soft[::-1])
        # The picture must move past the bar's soft edge lines, not at them: a blurred bar
        # is a copy of the picture and moves too, just under MOVING_TIME_STD at its edge.
        if _moves(moving, blur_start) and _moves(moving[::-1], blur_end):
            start, end = blur_start, blur_end
    return start, end


def _edge(width: int, soft: np.ndarray) -> int:
    """A blurred bar's width with the soft lines between it and the picture."""
    extra = 0
    while extra < BLUR_EDGE_LINES and width + extra < len(soft) and soft[width + extra]:
        extra += 1
    return width + extra


def _border(line_is_border: np.ndarray, moving: np.ndarray | None) -> int:
    """Lines of border from index 0: up to the first two picture lines, plus the line
    where the two blend; 0 if under MIN_BORDER or over MAX_BORDER of the axis, or if the
    picture after it does not move (``moving``; None: not asked)."""
    n = len(line_is_border)
    picture = ~line_is_border
    both = picture[:-1] & picture[1:]  # (n-1,) two picture lines in a row start here
    first = int(np.argmax(both)) if both.any() else n
    width = first + 1 if first else 0
    if width < MIN_BORDER * n or width > MAX_BORDER * n:
        return 0
    if moving is not None and not _moves(moving, width):
        return 0
    return width


def _moves(moving: np.ndarray, width: int) -> bool:
    """Whether most of the MOVING_LINES lines after a border of ``width`` lines move."""
    return bool(np.mean(moving[width : width + MOVING_LINES]) >= 0.5)


def _detect_times(duration_s: float, count: int) -> list[float]:
    """Seconds from the start, spread over [5 %, 95 %] of the video."""
    if count == 1 or duration_s <= 0:
        return [0.0]
    return [duration_s * (0.05 + 0.9 * i / (count - 1)) for i in range(count)]


def _grey_size(stream: Any) -> tuple[int, int]:
    ctx = stream.codec_context
    width, height = int(ctx.width), int(ctx.height)
    scale = min(1.0, DETECT_LONG_SIDE / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _grey(frame: Any, size: tuple[int, int]) -> np.ndarray:
    """(h, w) uint8 luma of a decoded frame, scaled down (stored orientation)."""
    small = frame.reformat(width=size[0], height=size[1], format="gray")
    return np.asarray(small.to_ndarray())[: size[1], : size[0]]


def _grey_keyframes(container: Any, stream: Any, times: list[float]) -> tuple[list[np.ndarray], float]:
    """The keyframe at or before each time (distinct ones only), and the rotation."""
    size = _grey_size(stream)
    ctx = stream.codec_context
    ctx.skip_frame = "NONKEY"  # the decoder drops every other frame unread
    base = stream.time_base
    start = stream.start_time or 0
    frames: dict[int, np.ndarray] = {}
    rotation = 0.0
    try:
        for t in times:
            container.seek(start + math.floor(t / base), stream=stream, backward=True)
            for frame in container.decode(stream):
                rotation = float(frame.rotation or 0)
                pts = frame.pts if frame.pts is not None else len(frames)
                frames.setdefault(pts, _grey(frame, size))
                break
    finally:
        ctx.skip_frame = "DEFAULT"
    return list(frames.values()), rotation


def _grey_frames_in_order(container: Any, stream: Any, times: list[float]) -> tuple[list[np.ndarray], float]:
    """The frame shown at each time, decoding from the start (for videos with too few
    keyframes), up to MAX_FALLBACK_FRAMES frames (the last one then stands for the rest)."""
    size = _grey_size(stream)
    base = stream.time_base
    start = stream.start_time or 0
    container.seek(start, stream=stream, backward=True)
    frames: list[np.ndarray] = []
    rotation = 0.0
    pending = list(times)
    previous = None
    for n, frame in enumerate(container.decode(stream)):
        if n >= MAX_FALLBACK_FRAMES:
            break
        rotation = float(frame.rotation or 0)
        t = float((frame.pts - start) * base) if frame.pts is not None else 0.0
        while pending and t > pending[0]:
            frames.append(_grey(previous or frame, size))  # the frame shown at pending[0]
            pending.pop(0)
        if not pending:
            break
        previous = frame
    if pending and previous is not None:
        frames.append(_grey(previous, size))  # the last frame is shown until the end
    return frames, rotation
