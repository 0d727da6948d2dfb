"""Temporally consistent augmentation of training clips (training only).

A view of a video is one window of frames; every frame of the window gets *the same*
augmentation (one crop box, one flip, one colour jitter...), so that the view stays a
plausible video and the encoder cannot match views by frame-to-frame inconsistencies.
Parameters are drawn once per clip (:meth:`ClipAugment.draw`) and applied to all frames
at once with torchvision's functional ops (:meth:`ClipAugment.apply`).

The recipe is Barlow Twins' (itself BYOL's): random resized crop, horizontal flip, colour
jitter, grayscale, gaussian blur, solarisation; optionally a zoom-out (the frame shrunk,
each side independently, onto a plain canvas of a random grey, as torchvision's
``RandomZoomOut`` does for detection), off by default; :meth:`ClipAugment.barlow_twins_pair`
gives its asymmetric pair of views (blur always / rarely, solarise never / sometimes).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torchvision.transforms.v2.functional as TF

__all__ = ["AugmentParams", "ClipAugment"]

# Barlow Twins blurs 224-px crops with a 23-px kernel, sigma in [0.1, 2.0]; we scale both
# with the frame size so that a 96-px crop is blurred as much, relatively.
_REFERENCE_SIZE = 224


@dataclass(frozen=True)
class AugmentParams:
    """One draw of the augmentation, applied identically to every frame of a clip."""

    crop: tuple[int, int, int, int]  # top, left, height, width in input pixels
    flip: bool
    jitter: tuple[tuple[str, float], ...]  # (op, factor) in the order applied; () = none
    grayscale: bool
    blur_sigma: float | None  # in output pixels; None = no blur
    solarize: bool
    # (height, width) fractions of the output the frame shrinks to, its (top, left) as
    # fractions of the free space, and the canvas grey; None = no zoom-out.
    zoom_out: tuple[float, float, float, float, float] | None = None


class ClipAugment:
    """Augments a clip (T, 3, H, W), uint8 or float in [0, 1], into a float32 clip
    (T, 3, frame_size, frame_size) in [0, 1], drawing the parameters once per call."""

    def __init__(
        self,
        frame_size: int,
        *,
        scale: tuple[float, float] = (0.3, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        jitter_p: float = 0.8,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.2,
        hue: float = 0.1,
        grayscale_p: float = 0.2,
        blur_p: float = 0.5,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        solarize_p: float = 0.0,
        zoom_out_p: float = 0.0,
        zoom_out_range: tuple[float, float] = (0.6, 1.0),
    ) -> None:
        if frame_size < 1:
            raise ValueError(f"frame_size must be >= 1, got {frame_size}")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        self.frame_size = frame_size
        self.scale = scale
        self.ratio = ratio
        self.flip_p = flip_p
        self.jitter_p = jitter_p
        self.brightness = brightness
        self.contrast = contrast
        self.saturation = saturation
        self.hue = hue
        self.grayscale_p = grayscale_p
        self.blur_p = blur_p
        factor = frame_size / _REFERENCE_SIZE
        self.blur_sigma = (blur_sigma[0] * factor, blur_sigma[1] * factor)
        self.blur_kernel = max(3, round(23 * factor) | 1)  # odd
        self.solarize_p = solarize_p
        if not 0 < zoom_out_range[0] <= zoom_out_range[1] <= 1:
            raise ValueError(f"zoom_out_range must satisfy 0 < min <= max <= 1, got {zoom_out_range}")
        self.zoom_out_p = zoom_out_p
        self.zoom_out_range = zoom_out_range

    @classmethod
    def barlow_twins_pair(cls, frame_size: int, **overrides: object) -> tuple[ClipAugment, ClipAugment]:
        """Barlow Twins' asymmetric views: the first always blurred and never solarised,
        the second blurred with p=0.1 and solarised with p=0.2. ``overrides`` apply to both."""
        first = {"blur_p": 1.0, "solarize_p": 0.0, **overrides}
        second = {"blur_p": 0.1, "solarize_p": 0.2, **overrides}
        return cls(frame_size, **first), cls(frame_size, **second)  # type: ignore[arg-type]

    def draw(self, height: int, width: int, *, generator: torch.Generator | None = None) -> AugmentParams:
        """Draws one set of parameters for a clip whose frames are ``height`` x ``width``."""

        def uniform(lo: float, hi: float) -> float:
            return lo + (hi - lo) * float(torch.rand((), generator=generator))

        def coin(p: float) -> bool:
            return p > 0 and float(torch.rand((), generator=generator)) < p

        crop = self._crop_box(height, width, uniform)
        flip = coin(self.flip_p)
        jitter: tuple[tuple[str, float], ...] = ()
        if coin(self.jitter_p):
            ranges = {
                "brightness": (max(0.0, 1 - self.brightness), 1 + self.brightness),
                "contrast": (max(0.0, 1 - self.contrast), 1 + self.contrast),
                "saturation": (max(0.0, 1 - self.saturation), 1 + self.saturation),
                "hue": (-self.hue, self.hue),
            }
            order = torch.randperm(4, generator=generator).tolist()  # ColorJitter's random order
            names = list(ranges)
            jitter = tuple((names[i], uniform(*ranges[names[i]])) for i in order)
        grayscale = coin(self.grayscale_p)
        blur_sigma = uniform(*self.blur_sigma) if coin(self.blur_p) else None
        solarize = coin(self.solarize_p)
        zoom_out = None
        if coin(self.zoom_out_p):
            zoom_out = (
                uniform(*self.zoom_out_range), uniform(*self.zoom_out_range),
                uniform(0.0, 1.0), uniform(0.0, 1.0), uniform(0.0, 1.0),
            )  # fmt: skip
        return AugmentParams(crop, flip, jitter, grayscale, blur_sigma, solarize, zoom_out)

    def apply(self, clip: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """Applies ``params`` to every frame of ``clip`` (T, 3, H, W); returns float32
        (T, 3, frame_size, frame_size) in [0, 1]."""
        if clip.ndim != 4 or clip.shape[1] != 3:
            raise ValueError(f"expected a clip (T, 3, H, W), got {tuple(clip.shape)}")
        top, left, h, w = params.crop
        size = [self.frame_size, self.frame_size]
        # Crop and resize first: every later op then works on the (smaller) output size.
        x = TF.resized_crop(clip, top, left, h, w, size=size, antialias=True)  # (T, 3, S, S)
        x = TF.to_dtype(x, torch.float32, scale=True)
        if params.flip:
            x = TF.horizontal_flip(x)
        if params.zoom_out is not None:  # before the colour ops: they change the canvas too
            x = _zoom_out(x, params.zoom_out)
        for name, factor in params.jitter:
            if name == "brightness":
                x = TF.adjust_brightness(x, factor)
            elif name == "contrast":
                x = TF.adjust_contrast(x, factor)  # each frame around its own mean grey
            elif name == "saturation":
                x = TF.adjust_saturation(x, factor)
            elif name == "hue":
                x = TF.adjust_hue(x, factor)
        if params.grayscale:
            x = TF.rgb_to_grayscale(x, num_output_channels=3)
        if params.blur_sigma is not None:
            kernel = [self.blur_kernel, self.blur_kernel]
            x = TF.gaussian_blur(x, kernel_size=kernel, sigma=[params.blur_sigma, params.blur_sigma])
        if params.solarize:
            x = TF.solarize(x, threshold=0.5)
        return x.clamp(0.0, 1.0).contiguous()

    def __call__(self, clip: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draws parameters once and applies them to all frames of ``clip``."""
        return self.apply(clip, self.draw(clip.shape[-2], clip.shape[-1], generator=generator))

    def _crop_box(self, height: int, width: int, uniform: Callable[[float, float], float]) -> tuple[int, int, int, int]:
        """RandomResizedCrop's box: area fraction in ``scale``, aspect ratio log-uniform in
        ``ratio``; after 10 misses, the central crop at the nearest allowed ratio."""
        area = height * width
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target = area * uniform(*self.scale)
            aspect = math.exp(uniform(log_lo, log_hi))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(uniform(0, height - h + 1 - 1e-9))
                left = int(uniform(0, width - w + 1 - 1e-9))
                return top, left, h, w
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            h, w = height, round(height * self.ratio[1])
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w


def _zoom_out(x: torch.Tensor, zoom: tuple[float, float, float, float, float]) -> torch.Tensor:
    """(T, 3, S, S) float -> the same size: the frames shrunk to (fh * S, fw * S) at
    (top, left) fractions of the free space, on a canvas of grey ``fill``."""
    fh, fw, top_f, left_f, fill = zoom
    size = x.shape[-1]
    h, w = max(1, round(fh * size)), max(1, round(fw * size))
    if (h, w) == (size, size):
        return x
    small = TF.resize(x, [h, w], antialias=True)  # (T, 3, h, w)
    canvas = torch.full_like(x, fill)
    top, left = round(top_f * (size - h)), round(left_f * (size - w))
    canvas[..., top : top + h, left : left + w] = small
    return canvas
