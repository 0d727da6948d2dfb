"""Frame descriptors as they are stored and read back for the second stage of a search.

Stored in the embedding's row (migration 0007): float16 (T, D) bytes, one L2-normalised
descriptor per sampled frame, and float32 (T,) frame times in seconds. The initial
encoder's 384-d (app.learn.encoder.EncoderConfig.descriptor_dim) float16 is 768 bytes a
frame: a 64-frame video is 48 KB, read for each of the first stage's candidates in one
statement (or from an index version's copy, ``app.index.version``).

The background is a fixed sample of the library's frames: their mean is subtracted from
every frame before frames are compared (a network's raw descriptors crowd into a narrow
cone, where every pair looks alike), and each query frame's similarity to it says what
"similar" means around that frame (``app.index.align.frame_references``). Where the
descriptors end in mirror components (:mod:`app.index.mirrors`), frames are compared under
their mirror images too, the best of the four, and the mean is taken mirror-symmetric.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from app.index.align import frame_references, unit_rows
from app.index.mirrors import Mirrors

# Background: at most this many library videos, and this many frames of each.
BACKGROUND_VIDEOS = 64
BACKGROUND_FRAMES_PER_VIDEO = 16


@dataclass(frozen=True)
class Frames:
    """One video's frame descriptors (T, D) float32 and their times (T,) in seconds."""

    vectors: np.ndarray
    times: np.ndarray

    def __len__(self) -> int:
        return len(self.vectors)


def pack(vectors: np.ndarray, times: np.ndarray) -> tuple[bytes, bytes]:
    """(frame_vectors, frame_times) column bytes of (T, D) descriptors and (T,) times."""
    return np.asarray(vectors, dtype=np.float16).tobytes(), np.asarray(times, dtype=np.float32).tobytes()


def as_float32(vectors: np.ndarray) -> np.ndarray:
    """Stored (float16) descriptors as float32. Through torch's vectorised conversion in a
    process that has loaded torch (every worker that embeds), about three times numpy's
    (64 candidates' 64 frames of 384-d: 0.6 ms against 2.0)."""
    torch = sys.modules.get("torch")
    if torch is not None and vectors.dtype == np.float16:
        # (torch takes only writable arrays: bytes read back are not, and copying float16
        # costs a fraction of converting it)
        writable = vectors if vectors.flags.writeable and vectors.flags.c_contiguous else vectors.copy()
        return torch.from_numpy(writable).float().numpy()
    return np.asarray(vectors, dtype=np.float32)


def unpack(vectors: bytes, times: bytes | None, dim: int) -> Frames:
    """The :class:`Frames` stored as :func:`pack` wrote them (times: one a second when absent)."""
    v = as_float32(np.frombuffer(vectors, dtype=np.float16).reshape(-1, dim))
    t = np.frombuffer(times, dtype=np.float32).astype(np.float64) if times else np.arange(len(v), dtype=np.float64)
    return Frames(v, t[: len(v)])


@dataclass(frozen=True)
class Background:
    """The library's mean frame ``centre`` (D,), and ``frames`` (B, F, D): a few centred
    unit frames of each of B library videos, ``valid`` (B, F) marking the real ones.
    With ``mirrors``, frames are compared under their mirror images too."""

    centre: np.ndarray
    frames: np.ndarray
    valid: np.ndarray
    mirrors: Mirrors | None = None

    @classmethod
    def of(
        cls, videos: Sequence[np.ndarray], *, per_video: int = BACKGROUND_FRAMES_PER_VIDEO,
        mirrors: Mirrors | None = None,
    ) -> Background | None:  # fmt: skip
        """From the frame descriptors (T_i, D) of some library videos, whose mirror
        components (if any) lie where ``mirrors`` says; None without any."""
        videos = [np.asarray(v, dtype=np.float32) for v in videos if len(v)]
        if not videos:
            return None
        dim = videos[0].shape[1]
        centre = np.concatenate(videos).mean(axis=0)
        if mirrors is not None:
            centre = mirrors.symmetric(centre)
        frames = np.zeros((len(videos), per_video, dim), dtype=np.float32)
        valid = np.zeros((len(videos), per_video), dtype=bool)
        for i, v in enumerate(videos):
            rows = np.unique(np.linspace(0, len(v) - 1, min(per_video, len(v))).round().astype(int))
            frames[i, : len(rows)] = unit_rows(v[rows], centre)
            valid[i, : len(rows)] = True
        return cls(centre.astype(np.float32), frames, valid, mirrors)

    def prepare(self, vectors: np.ndarray) -> np.ndarray:
        """Frames as they are compared: centred on the library's mean frame, unit length."""
        return unit_rows(vectors, self.centre)

    def products(self, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        """(Nl, Nr) dot products of two sets of frames: the best over mirror images with
        ``mirrors``."""
        return self.mirrors.products(left, right) if self.mirrors is not None else left @ right.T

    def levels(self, prepared: np.ndarray) -> np.ndarray:
        """The background level (Tq,) of each of the ``prepared`` query frames
        (:func:`app.index.align.frame_references`)."""
        return frame_references(prepared, self.frames, self.valid, products=self.products)

    def similarity(self, vectors: np.ndarray, prepared: np.ndarray) -> np.ndarray:
        """(N, Tq) cosines of ``vectors`` as :meth:`prepare` would make them with the
        ``prepared`` frames (:meth:`prepare`), without making them: (y - c).q / |y - c|
        from y.q, c.q and |y|^2, y.c (a search's thousands of candidate frames are read
        once). With ``mirrors`` the best over the query frames' mirror images: centring
        on a mirror-symmetric mean changes neither c.q nor |q - c| under a mirror."""
        y = np.asarray(vectors, dtype=np.float32)
        c = self.centre
        norms = np.sqrt(np.maximum(np.einsum("nd,nd->n", y, y) - 2 * (y @ c) + float(c @ c), 1e-12))
        sims = self.products(y, prepared)
        sims -= (prepared @ c)[None, :]
        sims /= norms[:, None]
        return sims
