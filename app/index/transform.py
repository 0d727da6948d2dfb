"""What the graph holds for each vector: L2-normalised rows, optionally reduced and
rotated by a transform learned on the library at build time (PCA, whitening, ITQ) and
applied to the queries the same way, then stored as floats, as int8 or as binary codes.

int8 is quantised here (``x / max|x| * 127``): USearch's own float-to-i8 conversion
loses recall. Binary codes are the sign bits of the centred, rotated vectors; the
rotation is PCA, ITQ learned on the library, or none.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from app.index.params import IndexParams


def normalise(x: np.ndarray) -> np.ndarray:
    """L2-normalised float32 rows (a zero row stays zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def quantise_i8(x: np.ndarray) -> np.ndarray:
    """Per-vector symmetric int8 (x / max|x| * 127). Cosine is scale-free, so the per-row
    scale need not be kept."""
    x = np.asarray(x, dtype=np.float32)
    peak = np.maximum(np.abs(x).max(axis=-1, keepdims=True), 1e-12)
    return np.rint(x / peak * 127.0).astype(np.int8)


@dataclass(frozen=True)
class Transform:
    """x (N, D) -> (x - mean) @ components * scale @ rotation, each step optional. Learned
    on the library at build time and applied to the queries the same way."""

    mean: np.ndarray | None = None  # (D,)
    components: np.ndarray | None = None  # (D, d) PCA directions as columns
    scale: np.ndarray | None = None  # (d,) whitening: 1 / sqrt(eigenvalue)
    rotation: np.ndarray | None = None  # (d, d) ITQ rotation

    def __post_init__(self) -> None:
        # The linear steps folded into one (D, d) matrix: one product per query.
        matrix = self.components
        if self.scale is not None:
            matrix = matrix * self.scale if matrix is not None else np.diag(self.scale)
        if self.rotation is not None:
            matrix = matrix @ self.rotation if matrix is not None else self.rotation
        object.__setattr__(self, "_matrix", None if matrix is None else np.ascontiguousarray(matrix, np.float32))

    def apply(self, x: np.ndarray) -> np.ndarray:
        y = np.asarray(x, dtype=np.float32)
        if self.mean is not None:
            y = y - self.mean
        matrix = self._matrix  # type: ignore[attr-defined]
        if matrix is not None:
            y = y @ matrix
        return np.ascontiguousarray(y, dtype=np.float32)

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            n: getattr(self, n) for n in ("mean", "components", "scale", "rotation") if getattr(self, n) is not None
        }


def fit_pca(sample: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean (D,), top-``dim`` directions (D, dim) and their variances (dim,)."""
    mean = sample.mean(axis=0)
    centred = (sample - mean).astype(np.float64)
    cov = centred.T @ centred / max(1, len(sample) - 1)  # (D, D)
    values, vectors = np.linalg.eigh(cov)
    order = np.argsort(values)[::-1][:dim]
    return mean.astype(np.float32), vectors[:, order].astype(np.float32), values[order].astype(np.float32)


def fit_itq(projected: np.ndarray, *, iterations: int = 30, seed: int = 0) -> np.ndarray:
    """Iterative quantisation (Gong & Lazebnik 2011): the rotation R (d, d) that minimises
    ||sign(VR) - VR||, alternating the codes and an orthogonal Procrustes step."""
    d = projected.shape[1]
    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(rng.standard_normal((d, d)))
    v = projected.astype(np.float32)
    for _ in range(iterations):
        codes = np.where(v @ rotation >= 0, 1.0, -1.0).astype(np.float32)  # (n, d)
        u, _, wt = np.linalg.svd(v.T @ codes)  # Procrustes: argmax_R tr(R^T V^T B)
        rotation = u @ wt
    return rotation.astype(np.float32)


def fit_transform(vectors: np.ndarray, params: IndexParams) -> Transform:
    """What the coarse representation needs learned from the library (may be nothing)."""
    dim = vectors.shape[1]
    reduce = params.pca_dim is not None and params.pca_dim < dim
    hashing = params.mode == "hash"
    if not (reduce or hashing) or len(vectors) < 2:
        return Transform()
    rng = np.random.default_rng(params.seed)
    sample = vectors[np.sort(rng.choice(len(vectors), min(len(vectors), params.fit_sample), replace=False))]
    out_dim = params.pca_dim if reduce and params.pca_dim is not None else dim
    if hashing:
        bits = params.hash_bits or out_dim
        out_dim = min(out_dim, bits)
    if hashing and params.hash_rotation == "none" and not reduce:
        return Transform(mean=sample.mean(axis=0).astype(np.float32))  # sign bits of the centred vector
    mean, components, variances = fit_pca(sample, out_dim)
    scale = (1.0 / np.sqrt(np.maximum(variances, 1e-12))).astype(np.float32) if params.pca_whiten else None
    rotation = None
    if hashing and params.hash_rotation == "itq":
        projected = (sample - mean) @ components
        if scale is not None:
            projected = projected * scale
        # A few thousand rows and 20 rounds: ITQ converges fast and costs O(n d^2) a round.
        rotation = fit_itq(projected[:5000], iterations=20, seed=params.seed)
    return Transform(mean=mean, components=components, scale=scale, rotation=rotation)


def coarse_representation(vectors: np.ndarray, transform: Transform, params: IndexParams) -> np.ndarray:
    """The representation the graph is built on and searched with, for rows (N, D):
    (N, bits/8) packed binary codes in hash mode, else (N, d) float32 or int8."""
    y = transform.apply(vectors)
    if params.mode == "hash":
        return np.packbits(y > 0, axis=-1)  # (N, bits/8) uint8
    if params.dtype == "i8":
        return quantise_i8(y)
    return y
