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

Beyond that recipe, the edit families that copies undergo (VSC22 / AugLy), each off unless
its probability is set (:data:`FAMILIES` names them; ``TrainConfig.augment_families``
chooses): rotation, vertical mirror, gaussian noise, re-encoding (downscale and JPEG),
text / shape / logo overlays, picture-in-picture both ways and blending with *unrelated
footage* (another video's window, given to :meth:`ClipAugment.apply` as ``other``), and the
temporal ones, which change *which moments* a window shows (:meth:`ClipAugment.draw_time`:
speed change, frame drops, a stretch of unrelated footage inserted).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

__all__ = ["FAMILIES", "AugmentParams", "ClipAugment", "TimeWarp"]

# The edit families of copies that augmentation covers, each a switch of TrainConfig.
FAMILIES: tuple[str, ...] = (
    "crop", "letterbox", "rotate", "hflip", "vflip", "colour", "grayscale", "blur", "noise",
    "reencode", "overlay", "pip", "blend", "speed", "frame_drop", "insert",
)  # fmt: skip
# Families that need another video's frames (ClipAugment.apply's ``other``).
NEEDS_OTHER = ("pip", "blend", "insert")
_WORDS = ("LIVE", "HD", "news", "@channel", "2024", "FUNNY", "wow", "subscribe", "#1", "TV", "EXCLUSIVE", "lol")

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
    vflip: bool = False
    rotate_deg: float | None = None  # counter-clockwise, the corners filled black
    noise: tuple[float, int] | None = None  # (sigma in [0, 1] units, seed of the noise)
    reencode: tuple[float, int] | None = None  # (downscale factor, JPEG quality)
    overlay: int | None = None  # seed of the overlay layer (shapes, text, a logo)
    # Unrelated footage: ("pip_in" the clip shrunk into it | "pip_out" it shrunk into the
    # clip | "blend"), size as a fraction of the frame (or the blend's alpha), top, left.
    mix: tuple[str, float, float, float] | None = None


@dataclass(frozen=True)
class TimeWarp:
    """Which moments a window of T frames shows: frame k shows ``speed * k`` periods after
    the window's start, except ``held`` frames (a dropped frame: the previous one shown
    again) and ``inserted`` = (first, count) frames, replaced by unrelated footage."""

    speed: float = 1.0
    held: tuple[int, ...] = ()
    inserted: tuple[int, int] | None = None


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
        rotate_p: float = 0.0,
        rotate_deg: float = 20.0,
        vflip_p: float = 0.0,
        noise_p: float = 0.0,
        noise_sigma: tuple[float, float] = (0.02, 0.12),
        reencode_p: float = 0.0,
        reencode_scale: tuple[float, float] = (0.25, 0.7),
        reencode_quality: tuple[int, int] = (8, 40),
        overlay_p: float = 0.0,
        pip_p: float = 0.0,
        pip_size: tuple[float, float] = (0.35, 0.7),
        blend_p: float = 0.0,
        blend_alpha: tuple[float, float] = (0.15, 0.4),
        speed_p: float = 0.0,
        speed_range: tuple[float, float] = (0.5, 2.0),
        frame_drop_p: float = 0.0,
        insert_p: float = 0.0,
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
        self.rotate_p, self.rotate_deg = rotate_p, rotate_deg
        self.vflip_p = vflip_p
        self.noise_p, self.noise_sigma = noise_p, noise_sigma
        self.reencode_p, self.reencode_scale, self.reencode_quality = reencode_p, reencode_scale, reencode_quality
        self.overlay_p = overlay_p
        self.pip_p, self.pip_size = pip_p, pip_size
        self.blend_p, self.blend_alpha = blend_p, blend_alpha
        self.speed_p, self.speed_range = speed_p, speed_range
        self.frame_drop_p = frame_drop_p
        self.insert_p = insert_p

    def needs_other(self) -> bool:
        """Whether some draw may ask for unrelated footage (``apply``'s ``other``)."""
        return self.pip_p > 0 or self.blend_p > 0 or self.insert_p > 0

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
        vflip = coin(self.vflip_p)
        rotate = uniform(-self.rotate_deg, self.rotate_deg) if coin(self.rotate_p) else None
        noise = (uniform(*self.noise_sigma), _seed(generator)) if coin(self.noise_p) else None
        reencode = None
        if coin(self.reencode_p):
            lo, hi = self.reencode_quality
            reencode = (uniform(*self.reencode_scale), round(uniform(lo, hi)))
        overlay = _seed(generator) if coin(self.overlay_p) else None
        mix = None
        if coin(self.pip_p):
            mode = "pip_in" if coin(0.5) else "pip_out"
            mix = (mode, uniform(*self.pip_size), uniform(0.0, 1.0), uniform(0.0, 1.0))
        elif coin(self.blend_p):
            mix = ("blend", uniform(*self.blend_alpha), 0.0, 0.0)
        return AugmentParams(
            crop, flip, jitter, grayscale, blur_sigma, solarize, zoom_out,
            vflip=vflip, rotate_deg=rotate, noise=noise, reencode=reencode, overlay=overlay, mix=mix,
        )  # fmt: skip

    def draw_time(self, frames: int, *, generator: torch.Generator | None = None) -> TimeWarp:
        """Draws the temporal edits of a window of ``frames`` frames: a speed change (log-
        uniform in ``speed_range``), dropped frames (each but the first with p=0.25), a
        stretch of 1..T/2 frames of unrelated footage inserted at a random place."""

        def coin(p: float) -> bool:
            return p > 0 and float(torch.rand((), generator=generator)) < p

        speed = 1.0
        if coin(self.speed_p):
            lo, hi = (math.log(v) for v in self.speed_range)
            speed = math.exp(lo + (hi - lo) * float(torch.rand((), generator=generator)))
        held: tuple[int, ...] = ()
        if coin(self.frame_drop_p) and frames > 1:
            drops = torch.rand(frames - 1, generator=generator) < 0.25
            held = tuple(int(k) + 1 for k in torch.nonzero(drops).flatten())
        inserted = None
        if coin(self.insert_p) and frames > 1:
            count = 1 + int(torch.randint(max(1, frames // 2), (), generator=generator))
            first = int(torch.randint(frames - count + 1, (), generator=generator))
            inserted = (first, count)
        return TimeWarp(speed, held, inserted)

    def apply(self, clip: torch.Tensor, params: AugmentParams, other: torch.Tensor | None = None) -> torch.Tensor:
        """Applies ``params`` to every frame of ``clip`` (T, 3, H, W); returns float32
        (T, 3, frame_size, frame_size) in [0, 1]. ``other``: unrelated footage (T, 3, h, w)
        for the picture-in-picture and blending draws (without it they are left out)."""
        if clip.ndim != 4 or clip.shape[1] != 3:
            raise ValueError(f"expected a clip (T, 3, H, W), got {tuple(clip.shape)}")
        top, left, h, w = params.crop
        size = [self.frame_size, self.frame_size]
        # Crop and resize first: every later op then works on the (smaller) output size.
        x = TF.resized_crop(clip, top, left, h, w, size=size, antialias=True)  # (T, 3, S, S)
        x = TF.to_dtype(x, torch.float32, scale=True)
        if params.flip:
            x = TF.horizontal_flip(x)
        if params.vflip:
            x = TF.vertical_flip(x)
        if params.rotate_deg is not None:
            x = TF.rotate(x, params.rotate_deg, interpolation=TF.InterpolationMode.BILINEAR, fill=[0.0])
        if params.zoom_out is not None:  # before the colour ops: they change the canvas too
            x = _zoom_out(x, params.zoom_out)
        if params.mix is not None and other is not None:
            x = _mix(x, self._as_frames(other, len(x)), params.mix)
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
        if params.overlay is not None:
            x = _overlay(x, params.overlay)
        if params.noise is not None:
            sigma, seed = params.noise
            noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
            x = x + sigma * noise
        if params.reencode is not None:  # last: a re-encode sees every earlier edit
            x = _reencode(x.clamp(0.0, 1.0), *params.reencode)
        return x.clamp(0.0, 1.0).contiguous()

    def _as_frames(self, other: torch.Tensor, t: int) -> torch.Tensor:
        """Unrelated footage (T', 3, h, w) as float frames of the output size, T of them."""
        size = [self.frame_size, self.frame_size]
        y = TF.to_dtype(TF.resize(other, size, antialias=True), torch.float32, scale=True)
        return y[torch.arange(t) % len(y)]

    def __call__(
        self, clip: torch.Tensor, *, generator: torch.Generator | None = None, other: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Draws parameters once and applies them to all frames of ``clip``."""
        return self.apply(clip, self.draw(clip.shape[-2], clip.shape[-1], generator=generator), other)

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


def _seed(generator: torch.Generator | None) -> int:
    return int(torch.randint(2**31 - 1, (), generator=generator))


def _mix(x: torch.Tensor, other: torch.Tensor, mix: tuple[str, float, float, float]) -> torch.Tensor:
    """(T, 3, S, S) clip and unrelated footage -> the same size: the clip shrunk into the
    footage (``pip_in``), the footage shrunk into the clip (``pip_out``), or blended."""
    mode, amount, top_f, left_f = mix
    if mode == "blend":
        return (1.0 - amount) * x + amount * other
    inner, outer = (x, other) if mode == "pip_in" else (other, x)
    size = x.shape[-1]
    side = max(1, round(amount * size))
    small = TF.resize(inner, [side, side], antialias=True)  # (T, 3, side, side)
    out = outer.clone()
    top, left = round(top_f * (size - side)), round(left_f * (size - side))
    out[..., top : top + side, left : left + side] = small
    return out


def _overlay(x: torch.Tensor, seed: int) -> torch.Tensor:
    """(T, 3, S, S) -> the same size with one overlay layer composited on every frame: a
    few filled shapes, a caption and perhaps a corner logo, drawn from ``seed``."""
    from PIL import Image, ImageDraw, ImageFont

    rng = random.Random(seed)
    size = x.shape[-1]
    layer = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)

    def colour() -> tuple[int, int, int, int]:
        return (rng.randrange(256), rng.randrange(256), rng.randrange(256), rng.randrange(140, 256))

    for _ in range(rng.randrange(0, 3)):  # shapes
        x0, y0 = rng.uniform(0, 0.8) * size, rng.uniform(0, 0.8) * size
        x1, y1 = x0 + rng.uniform(0.1, 0.4) * size, y0 + rng.uniform(0.1, 0.4) * size
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)((x0, y0, x1, y1), fill=colour())
    font = ImageFont.load_default(size=max(6, round(size * rng.uniform(0.08, 0.2))))
    text = " ".join(rng.choice(_WORDS) for _ in range(rng.randrange(1, 4)))
    draw.text((rng.uniform(0, 0.5) * size, rng.uniform(0, 0.85) * size), text, fill=colour(), font=font)
    if rng.random() < 0.5:  # a corner logo: a disc with a letter
        r = size * rng.uniform(0.06, 0.12)
        cx, cy = rng.choice((r + 2, size - r - 2)), rng.choice((r + 2, size - r - 2))
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour())
        draw.text((cx - r / 2, cy - r / 2), rng.choice("VTNX"), fill=(255, 255, 255, 255), font=font)
    rgba = torch.from_numpy(np.array(layer)).permute(2, 0, 1).float() / 255.0  # (4, S, S)
    alpha = rgba[3:]
    return x * (1.0 - alpha) + rgba[:3] * alpha


def _reencode(x: torch.Tensor, scale: float, quality: int) -> torch.Tensor:
    """(T, 3, S, S) float -> the same size, as a low-bitrate copy looks: downscaled by
    ``scale``, JPEG-compressed at ``quality`` frame by frame (Pillow), upscaled back."""
    import io

    from PIL import Image

    size = x.shape[-1]
    side = max(8, round(size * scale))
    small = TF.to_dtype(TF.resize(x, [side, side], antialias=True).clamp(0, 1), torch.uint8, scale=True)
    frames = []
    for frame in small.permute(0, 2, 3, 1).numpy():  # (side, side, 3) uint8 each
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="JPEG", quality=quality)
        frames.append(np.array(Image.open(buffer).convert("RGB")))
    y = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)  # (T, 3, side, side) uint8
    return TF.resize(TF.to_dtype(y, torch.float32, scale=True), [size, size], antialias=True)
