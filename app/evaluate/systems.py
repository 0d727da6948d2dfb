"""The systems a benchmark scores: trained encoders, and the baselines they have to beat
(the untrained network, tiny frames, and a per-second perceptual hash).

A system turns decoded clips into a (queries x library) score matrix, higher = more
similar, through the same pipeline for every system: vector systems search an index
version of the library and calibrate what it returns, exactly as serving does
(:mod:`.served`); the perceptual hash, no vector, is calibrated the same way from its
matrix. Then every system's first-stage candidates are re-ranked by aligning their per-
frame descriptors with the query's (:func:`.served.second_stage`): the encoders' frame
descriptors, tiny frames' and pHash's per-frame codes; thumbnails (tiny frames, and the
encoders' frame descriptors that end in one) are matched under mirror images alike
(:mod:`app.index.mirrors`). With ``ablation``, each system
also reports its first stage alone and its second stage without normalisation. Every
encoder, trained or not, has its library normalisation (centring and whitening,
``EncoderConfig.library_norm``) fitted on the library it is scored against, so
"untrained" is the untrained network given the whole pipeline: the baseline training
must beat.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.evaluate.served import SecondStage, calibrated_rows, second_stage, served_scores
from app.index.mirrors import Mirrors, mirror_basis, mirror_invariant
from app.index.params import IndexParams

Clip = np.ndarray  # (T, S, S, 3) uint8 RGB frames, sampled at a fixed rate
# queries, library -> (Q, L) score matrices by variant: "" is the whole pipeline, the
# others (the ablation) are named by what they leave out.
ScoreFn = Callable[[list[Clip], list[Clip]], dict[str, np.ndarray]]
# clips -> (N, D) video vectors and each clip's (T_i, F) frame descriptors
Describe = Callable[[list[Clip]], tuple[np.ndarray, list[np.ndarray]]]

# The ablation's variants, by the suffix of their system name.
FIRST_STAGE_ONLY = " · video vector only"
UNNORMALISED = " · re-rank, no normalisation"

# Frame size the non-learned baselines decode at (pHash wants 32x32 before its DCT).
SMALL_FRAME = 32


@dataclass(frozen=True)
class System:
    """A system under test: ``score_matrices(queries, library)``, (Q, L) each, higher =
    more similar, on clips decoded at ``frame_size``. ``baseline`` systems are what a
    trained encoder has to beat."""

    name: str
    frame_size: int
    score_matrices: ScoreFn
    baseline: bool = True

    def score_matrix(self, queries: list[Clip], library: list[Clip]) -> np.ndarray:
        """The whole pipeline's (Q, L) scores."""
        return self.score_matrices(queries, library)[""]


def _with_second_stage(
    first: np.ndarray, q_frames: list[np.ndarray], l_frames: list[np.ndarray], *,
    stage: SecondStage, params: IndexParams, ablation: bool, mirrors: Mirrors | None = None,
) -> dict[str, np.ndarray]:  # fmt: skip
    out = {"": second_stage(first, q_frames, l_frames, stage=stage, seed=params.seed, mirrors=mirrors)}
    if ablation:
        out[FIRST_STAGE_ONLY] = first
        unnormalised = dataclasses.replace(stage, beta=0.0)
        out[UNNORMALISED] = second_stage(first, q_frames, l_frames, stage=unnormalised, seed=params.seed,
                                         mirrors=mirrors)  # fmt: skip
    return out


def vector_system(
    name: str,
    frame_size: int,
    describe: Describe,
    *,
    params: IndexParams,
    stage: SecondStage,
    baseline: bool = True,
    ablation: bool = False,
    fit: Callable[[list[Clip]], None] | None = None,
    mirrors: Mirrors | None = None,
) -> System:
    """A system from a descriptor (clips -> video vectors and frame descriptors), scored
    on the served path (:func:`app.evaluate.served.served_scores`, then the second stage,
    frames matched under mirror images where ``mirrors`` says where their mirror
    components are). ``fit`` is given the library clips first (the statistics a
    descriptor learns from the library it serves)."""

    def score(queries: list[Clip], library: list[Clip]) -> dict[str, np.ndarray]:
        if fit is not None:
            fit(library)
        (q_vectors, q_frames), (l_vectors, l_frames) = describe(queries), describe(library)
        first = served_scores(q_vectors, l_vectors, params=params)
        return _with_second_stage(first, q_frames, l_frames, stage=stage, params=params, ablation=ablation,
                                  mirrors=mirrors)  # fmt: skip

    return System(name, frame_size, score, baseline)


def encoder_system(
    name: str, model: Any, *, baseline: bool, params: IndexParams, stage: SecondStage,
    ablation: bool = False, batch_size: int = 8,
) -> System:  # fmt: skip
    """A :class:`app.learn.encoder.VideoEncoder`, describing ``batch_size`` clips per
    forward (video vectors and frame descriptors), its library normalisation (when its
    config has one) fitted on the library it is scored against, whatever statistics the
    checkpoint carried: every encoder gets the same."""

    def describe(clips: list[Clip]) -> tuple[np.ndarray, list[np.ndarray]]:
        parts = [model.describe(clips[i : i + batch_size]) for i in range(0, len(clips), batch_size)]
        if not parts:
            return np.zeros((0, model.config.output_dim), np.float32), []
        return np.concatenate([v for v, _ in parts]), [f for _, frames in parts for f in frames]

    def fit(library: list[Clip]) -> None:
        model.fit_library_norm(library, batch_size=batch_size)

    return vector_system(name, int(model.config.frame_size), describe, params=params, stage=stage,
                         baseline=baseline, ablation=ablation, fit=fit,
                         mirrors=Mirrors.of(model.config.to_dict()))  # fmt: skip


def _gray(frames: np.ndarray) -> np.ndarray:
    """(T, S, S, 3) uint8 -> (T, S, S) float32 luma."""
    return frames.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def tiny_frames(clip: Clip, *, size: int = 16) -> np.ndarray:
    """Each frame shrunk to size x size grayscale, mean-centred and L2-normalised: (T, size*size)."""
    g = _gray(clip)  # (T, S, S)
    t, s = g.shape[:2]
    f = s // size
    g = g[:, : f * size, : f * size].reshape(t, size, f, size, f).mean(axis=(2, 4))
    x = g.reshape(t, -1)
    x = x - x.mean(axis=1, keepdims=True)
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-6)


def tiny_frames_descriptor(clips: list[Clip], *, size: int = 16) -> tuple[np.ndarray, list[np.ndarray]]:
    """Each clip's :func:`tiny_frames` in their mirror components (:mod:`app.index.mirrors`),
    and their mean over time, mirror-invariant, (N, size*size) L2-normalised, as the
    encoders' served vectors carry their thumbnails."""
    basis = mirror_basis(size).astype(np.float32)
    frames = [tiny_frames(clip, size=size) @ basis.T for clip in clips]
    out = np.stack([mirror_invariant(x.mean(axis=0)) for x in frames]) if frames else np.zeros((0, size * size))
    return (out / np.linalg.norm(out, axis=1, keepdims=True).clip(min=1e-6)).astype(np.float32), frames


def tiny_frames_system(*, params: IndexParams, stage: SecondStage, ablation: bool = False,
                       frame_size: int = SMALL_FRAME) -> System:  # fmt: skip
    """The tiny-frames baseline: :func:`tiny_frames_descriptor` on the served path, its
    frames matched under mirror images as the encoders' thumbnails are."""
    mirrors = Mirrors(0, 8 * 8)  # tiny_frames_descriptor's 16 x 16 grid, nothing before it
    return vector_system("tiny frames", frame_size, tiny_frames_descriptor, params=params, stage=stage,
                         ablation=ablation, mirrors=mirrors)  # fmt: skip


def _dct_matrix(n: int) -> np.ndarray:
    k, x = np.arange(n)[:, None], np.arange(n)[None, :]
    return np.cos(np.pi * (2 * x + 1) * k / (2 * n))  # (n, n), unnormalised DCT-II


def phash_bits(clip: Clip) -> np.ndarray:
    """The 64-bit DCT perceptual hash of each frame: (T, 64) bool. Frames are 32x32
    grayscale; the hash is the top-left 8x8 DCT coefficients against their median."""
    g = _gray(clip)
    if g.shape[1:] != (32, 32):
        from PIL import Image

        g = np.stack([np.asarray(Image.fromarray(f).resize((32, 32), Image.Resampling.BILINEAR)) for f in g])
    c = _dct_matrix(32)[:8]  # (8, 32)
    low = np.einsum("ij,tjk,lk->til", c, g.astype(np.float64), c).reshape(len(g), 64)  # (T, 64)
    return low > np.median(low, axis=1, keepdims=True)


def phash_similarity(queries: list[Clip], library: list[Clip]) -> np.ndarray:
    """Clip similarity from frame hashes: each query frame's best match (1 - Hamming/64)
    among a library clip's frames, averaged over the query's frames. (Q, L) in [0, 1]."""
    qh = [phash_bits(c) for c in queries]
    lh = [phash_bits(c) for c in library]
    q_all = np.concatenate(qh).astype(np.float32) * 2 - 1  # (sum Tq, 64), +-1
    l_all = np.concatenate(lh).astype(np.float32) * 2 - 1  # (sum Tl, 64)
    frame_sim = (64 + q_all @ l_all.T) / 128  # 1 - hamming/64: (sum Tq, sum Tl)
    l_starts = np.cumsum([0, *map(len, lh)])[:-1]
    best = np.maximum.reduceat(frame_sim, l_starts, axis=1)  # (sum Tq, L)
    q_starts = np.cumsum([0, *map(len, qh)])[:-1]
    return np.add.reduceat(best, q_starts, axis=0) / np.array([len(h) for h in qh])[:, None]


def phash_system(*, params: IndexParams, stage: SecondStage, ablation: bool = False,
                 frame_size: int = SMALL_FRAME) -> System:  # fmt: skip
    """The perceptual-hash baseline: :func:`phash_similarity`, calibrated as served scores
    are, then re-ranked by aligning the frames' hashes (as +-1 codes)."""

    def score(queries: list[Clip], library: list[Clip]) -> dict[str, np.ndarray]:
        first = calibrated_rows(phash_similarity(queries, library), params=params)
        codes = [[phash_bits(c).astype(np.float32) * 2 - 1 for c in clips] for clips in (queries, library)]
        return _with_second_stage(first, codes[0], codes[1], stage=stage, params=params, ablation=ablation)

    return System("pHash", frame_size, score)


# The baselines by the names a benchmark run is given.
BASELINES = ("untrained", "tiny_frames", "phash")


def build_systems(
    checkpoints: dict[str, Path], baselines: Sequence[str], batch_size: int, *, params: IndexParams,
    stage: SecondStage | None = None, ablation: bool = False,
) -> list[System]:  # fmt: skip
    """The systems to score: the trained ``checkpoints`` by name, in order, then the named
    ``baselines`` (from :data:`BASELINES`), all on the served path of ``params`` and
    ``stage`` (default: serving's)."""
    stage = stage or SecondStage()
    kw: dict[str, Any] = {"params": params, "stage": stage, "ablation": ablation}
    from app.learn.encoder import INITIAL_CONFIG, initial_encoder, load_checkpoint

    systems: list[System] = []
    config = None
    for name, path in checkpoints.items():
        model, _ = load_checkpoint(Path(path))
        config = config or model.config
        systems.append(encoder_system(name, model, baseline=False, batch_size=batch_size, **kw))
    unknown = set(baselines) - set(BASELINES)
    if unknown:
        raise ValueError(f"unknown baselines {sorted(unknown)}; choose from {BASELINES}")
    if "untrained" in baselines:
        # The same architecture and library normalisation as the (first) trained encoder,
        # before any training.
        model = initial_encoder(config or INITIAL_CONFIG)
        systems.append(encoder_system("untrained", model, baseline=True, batch_size=batch_size, **kw))
    if "tiny_frames" in baselines:
        systems.append(tiny_frames_system(**kw))
    if "phash" in baselines:
        systems.append(phash_system(**kw))
    return systems
