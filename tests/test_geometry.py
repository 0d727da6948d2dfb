"""Geometry before embedding (app.media.geometry): borders cut and rotation applied, on
real ffmpeg output decoded in the real child."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from app.config import get_settings
from app.media.video import Box, sample_frames

try:
    from tests.media import make_video, own_hue, run_ffmpeg
except ModuleNotFoundError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from support.media import make_video, own_hue, run_ffmpeg

SIZE = 64
# Moving texture over the whole frame, as real footage has (testsrc2 is mostly still
# colour bars, which at a frame's edge are a flat border by any measure).
LIFE = "life=ratio=0.5:mold=10:seed=7:life_color=#00ff00:death_color=#aa00aa:mold_color=#ffaa00"
# _diff (0-255) between the sampled frames of a copy and of its source: a re-encode of the
# same picture scores about 2, the same picture 1-2 % off in scale or position under 10;
# a border left in (or picture cut away) 20 and more.
SAME_PICTURE = 10.0
OTHER_PICTURE = 20.0


@pytest.fixture(scope="module")
def source(media_dir: Path) -> Path:
    """6 s of 240x180 moving texture (cells of 4 pixels: 1 would make a 1 % change of
    scale a new picture), a content of its own."""
    vf = f"scale=240:180,{own_hue()}"
    return make_video(media_dir / "source.mp4", seconds=6, width=60, height=45, pattern=LIFE, extra_vf=vf)


def _frames(path: Path, *, crop_borders: bool = True) -> np.ndarray:
    return sample_frames(path, size=SIZE, crop_borders=crop_borders).frames


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    """Mean |difference| of (T, SIZE, SIZE, 3) frames over 4x4 blocks: a pixel or two of
    shift (a border found to within a detection pixel) is forgiven, other pictures not."""

    def blocks(x: np.ndarray) -> np.ndarray:
        t = x.shape[0]
        return x.reshape(t, SIZE // 4, 4, SIZE // 4, 4, 3).mean(axis=(2, 4))

    return float(np.abs(blocks(a.astype(np.float32)) - blocks(b.astype(np.float32))).mean())


@pytest.mark.parametrize(
    ("name", "vf", "args", "picture"),
    [
        # keyframes every second: the keyframe path (the others decode from the start)
        ("letterbox", "pad=240:300:0:60:black", ("-g", "25"), Box(0, 60, 240, 180)),
        # 4:3 in 16:9; the centre square misses these bars, but the crop must be right
        ("pillarbox", "pad=320:180:40:0:black", (), Box(40, 0, 240, 180)),
        # off-centre, light grey: padding of any flat colour
        ("padding", "pad=300:240:20:40:0xc0c0c0", (), Box(20, 40, 240, 180)),
        # both: the picture in the middle of a larger canvas (the benchmark's letterbox edit)
        ("windowbox", "pad=336:252:48:36:black", (), Box(48, 36, 240, 180)),
    ],
)
def test_borders_are_cut_off(
    media_dir: Path, source: Path, name: str, vf: str, args: tuple[str, ...], picture: Box
) -> None:
    boxed = make_video(media_dir / f"{name}.mp4", source=source, seconds=6, extra_vf=vf, extra_args=args)
    sample = sample_frames(boxed, size=SIZE)
    assert sample.crop is not None
    # Found to within a detection pixel or two (the line where border and picture blend goes too).
    for found, true in zip(
        (sample.crop.x, sample.crop.y, sample.crop.width, sample.crop.height),
        (picture.x, picture.y, picture.width, picture.height),
        strict=True,
    ):
        assert abs(found - true) <= 4, (sample.crop, picture)
    want = _frames(source)
    assert _diff(sample.frames, want) < SAME_PICTURE
    if name != "pillarbox":
        assert _diff(_frames(boxed, crop_borders=False), want) > OTHER_PICTURE  # what the border costs


def test_blurred_side_bars_are_cut_off(media_dir: Path, source: Path) -> None:
    """A portrait picture shown on a blurred, stretched copy of itself, as phones post them."""
    _check_blurred_side_bars(media_dir, source, "")


def test_blurred_bars_whose_edge_barely_moves_are_cut_off(media_dir: Path) -> None:
    """The same with the one hue of 10-349 whose bar edge moved just under MOVING_TIME_STD:
    the picture's motion is looked for past the bar's soft edge lines, not at them (they
    once made this one video's bars be kept)."""
    vf = "scale=240:180,hue=h=346"
    source = make_video(media_dir / "hue-346.mp4", seconds=6, width=60, height=45, pattern=LIFE, extra_vf=vf)
    _check_blurred_side_bars(media_dir, source, "-346")


def _check_blurred_side_bars(media_dir: Path, source: Path, suffix: str) -> None:
    portrait = make_video(media_dir / f"portrait{suffix}.mp4", source=source, seconds=6, extra_vf="crop=100:180")
    bars = make_video(
        media_dir / f"blurred-bars{suffix}.mp4",
        source=portrait,
        seconds=6,
        extra_vf="split[a][b];[a]scale=320:180,setsar=1,boxblur=10[bg];[bg][b]overlay=(W-w)/2:0",
    )
    sample = sample_frames(bars, size=SIZE)
    assert sample.crop is not None
    assert abs(sample.crop.x - 110) <= 4 and abs(sample.crop.width - 100) <= 6, sample.crop
    want = _frames(portrait)
    assert _diff(sample.frames, want) < SAME_PICTURE
    assert _diff(_frames(bars, crop_borders=False), want) > OTHER_PICTURE


def test_padding_around_a_still_shot_is_cut_off_but_a_still_dark_edge_is_not(media_dir: Path, source: Path) -> None:
    """Nothing moves next to the padding of a static shot (a slide, a surveillance camera):
    centred padding, the same flat level at both ends, is cut all the same; a still dark
    region at one edge alone is picture, and kept."""
    freeze = "trim=end_frame=1,loop=loop=150:size=1:start=0,setpts=N/25/TB"
    still = make_video(media_dir / "still.mp4", source=source, seconds=6, extra_vf=freeze)
    boxed = make_video(media_dir / "still-windowbox.mp4", source=still, seconds=6, extra_vf="pad=336:252:48:36:black")
    sample = sample_frames(boxed, size=SIZE)
    assert sample.crop is not None
    for found, true in zip((sample.crop.x, sample.crop.y, sample.crop.width, sample.crop.height), (48, 36, 240, 180),
                           strict=True):  # fmt: skip
        assert abs(found - true) <= 4, sample.crop
    want = _frames(still)
    n = min(len(want), len(sample.frames))  # (one frozen frame: any of them)
    assert _diff(sample.frames[:n], want[:n]) < SAME_PICTURE

    dark_edge = make_video(media_dir / "still-dark-edge.mp4", source=still, seconds=6,
                           extra_vf="drawbox=x=0:y=0:w=40:h=180:color=black:t=fill")  # fmt: skip
    assert sample_frames(dark_edge, size=SIZE).crop == Box(0, 0, 240, 180)


@pytest.mark.parametrize("scene", ["bright", "dark", "still-bars"])
def test_full_frame_video_keeps_its_whole_frame(media_dir: Path, source: Path, scene: str) -> None:
    # A dark scene is near-black at its edges, but moves: time tells it from a border.
    # testsrc2's bars are still, but so is what lies next to them: nothing moves there.
    if scene == "bright":
        path = source
    elif scene == "dark":
        path = make_video(media_dir / "dark.mp4", source=source, seconds=6, extra_vf="lutyuv=y=val/6")
        assert _frames(path).mean() < _frames(source).mean() / 2
    else:
        path = make_video(media_dir / "bars.mp4", seconds=6, width=240, height=180, extra_vf=own_hue())
    sample = sample_frames(path, size=SIZE)
    assert sample.crop == Box(0, 0, 240, 180)
    np.testing.assert_array_equal(sample.frames, sample_frames(path, size=SIZE, crop_borders=False).frames)


@pytest.mark.parametrize(("turn", "stored"), [(90, "transpose=clock"), (270, "transpose=cclock")])
def test_rotation_metadata_is_applied(media_dir: Path, source: Path, turn: int, stored: str) -> None:
    """A phone's video: pixels stored sideways, a display matrix saying how to turn them."""
    sideways = make_video(media_dir / f"sideways-{turn}.mp4", source=source, seconds=6, extra_vf=stored)
    rotated = media_dir / f"rotated-{turn}.mp4"
    run_ffmpeg("-display_rotation", str(turn), "-i", sideways, "-c", "copy", rotated)
    want = _frames(source)
    assert _diff(_frames(sideways), want) > OTHER_PICTURE  # without the matrix: sideways
    for crop_borders in (True, False):
        sample = sample_frames(rotated, size=SIZE, crop_borders=crop_borders)
        assert sample.rotation == turn
        assert _diff(sample.frames, want) < 5  # the same picture, re-encoded
    assert sample_frames(rotated, size=SIZE).crop == Box(0, 0, 240, 180)  # upright pixels


@pytest.fixture
def borders_off(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("VIDSIM_CROP_BORDERS", "false")
    get_settings.cache_clear()
    yield
    monkeypatch.undo()
    get_settings.cache_clear()


def test_setting_turns_border_cutting_off(media_dir: Path, source: Path, borders_off: None) -> None:
    boxed = make_video(media_dir / "off.mp4", source=source, seconds=6, extra_vf="pad=240:300:0:60:black")
    sample = sample_frames(boxed, size=SIZE)
    assert sample.crop is None
    assert _diff(sample.frames, _frames(source)) > OTHER_PICTURE
