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
