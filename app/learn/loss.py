"""The Barlow Twins objective (Zbontar et al., 2021), DDP-ready.

    L = sum_i (1 - C_ii)^2 + lambd * sum_i sum_{j != i} C_ij^2

``C`` is the cross-correlation matrix between the two views' embeddings, each
batch-normalised along the batch (no affine parameters). Under ``torch.distributed`` the
batch is the *global* batch, as in facebookresearch/barlowtwins: the normalisation uses
global statistics and ``C = (z1_bn.T @ z2_bn) / total_batch`` is all-reduced across ranks.
The all-reduces are autograd-aware, so the gradient that DDP averages over ranks equals
the gradient of the loss on the concatenated batch (the reference code's plain in-place
``all_reduce`` gives that gradient divided by the world size).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

# The specification's lambda; the paper's (for 8192-d projectors) is 0.0051.
DEFAULT_LAMBD = 0.001


@dataclass(frozen=True)
class BarlowTwinsTerms:
    """The loss and its two parts (``loss = on_diag + lambd * off_diag``), scalar tensors."""

    loss: torch.Tensor
    on_diag: torch.Tensor  # sum_i (1 - C_ii)^2
    off_diag: torch.Tensor  # sum_{i != j} C_ij^2, not yet weighted by lambd


def barlow_twins_terms(
    z1: torch.Tensor,
    z2: torch.Tensor,
    *,
    lambd: float = DEFAULT_LAMBD,
    distributed: bool = False,
    eps: float = 1e-5,
) -> BarlowTwinsTerms:
    """The loss with its on- and off-diagonal terms; see :func:`barlow_twins_loss`."""
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"expected two (N, D) embeddings of one shape, got {z1.shape} and {z2.shape}")
    # Statistics in float32 whatever the autocast dtype: C sums N products per entry.
    z1, z2 = z1.float(), z2.float()  # (N, D) each: N local samples, D embedding dims
    distributed = distributed and dist.is_available() and dist.is_initialized()
    n = _sum(torch.tensor(float(z1.shape[0]), device=z1.device), distributed)  # global batch
    if n.item() < 2:
        raise ValueError("the Barlow Twins loss needs at least 2 samples in the (global) batch")
    z1n = _batch_norm(z1, n, distributed, eps)  # (N, D)
    z2n = _batch_norm(z2, n, distributed, eps)  # (N, D)
    c = _sum(z1n.T @ z2n, distributed) / n  # (D, D): C_ij = E_batch[z1n_i * z2n_j]
    diag = torch.diagonal(c)  # (D,)
    on_diag = (1.0 - diag).pow(2).sum()
    off_diag = c.pow(2).sum() - diag.pow(2).sum()
    return BarlowTwinsTerms(loss=on_diag + lambd * off_diag, on_diag=on_diag, off_diag=off_diag)


def barlow_twins_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    *,
    lambd: float = DEFAULT_LAMBD,
    distributed: bool = False,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Barlow Twins loss between two views' embeddings ``z1``, ``z2``: (N, D) each, row k
    of both coming from the same video.

    With ``distributed=True`` (and a process group initialised) every rank passes its local
    (N_r, D) shard and gets the loss of the global batch; ranks may hold different N_r.
    Returns a float32 scalar.
    """
    return barlow_twins_terms(z1, z2, lambd=lambd, distributed=distributed, eps=eps).loss


class BarlowTwinsLoss(nn.Module):
    """``nn.Module`` wrapper of :func:`barlow_twins_terms`; ``forward`` returns the terms."""

    def __init__(self, *, lambd: float = DEFAULT_LAMBD, distributed: bool = False) -> None:
        super().__init__()
        self.lambd = lambd
        self.distributed = distributed

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> BarlowTwinsTerms:
        return barlow_twins_terms(z1, z2, lambd=self.lambd, distributed=self.distributed)

    def extra_repr(self) -> str:
        return f"lambd={self.lambd}, distributed={self.distributed}"


def matched_frames(
    f1: torch.Tensor, f2: torch.Tensor, times: torch.Tensor, mask: torch.Tensor, *, tolerance_s: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs of frames of two views that show the same moment of their video.

    ``f1``, ``f2``: (B, T, F) per-frame descriptors of the two views; ``times``: (B, 2, T)
    the moment each frame shows (NaN: unrelated footage); ``mask``: (B, 2, T) real frames.
    Each real frame of view 1 is paired with the frame of view 2 nearest in time, if
    within ``tolerance_s``. Returns two (P, F) tensors, row p of both one moment.
    """
    t1, t2 = times[:, 0], times[:, 1]  # (B, T) each
    gap = (t1.unsqueeze(2) - t2.unsqueeze(1)).abs()  # (B, T, T): |t1_i - t2_j|
    gap = gap.masked_fill(~(mask[:, 0].unsqueeze(2) & mask[:, 1].unsqueeze(1)) | gap.isnan(), float("inf"))
    nearest, j = gap.min(dim=2)  # (B, T): for each frame of view 1, the nearest of view 2
    b, i = torch.nonzero(nearest <= tolerance_s, as_tuple=True)  # (P,), (P,)
    return f1[b, i], f2[b, j[b, i]]


def _batch_norm(z: torch.Tensor, n: torch.Tensor, distributed: bool, eps: float) -> torch.Tensor:
    """(N, D) -> (N, D): zero mean, unit (biased) variance per dimension over the global
    batch of ``n`` samples, like ``BatchNorm1d(D, affine=False)`` in training mode."""
    mean = _sum(z.sum(0), distributed) / n  # (D,)
    centred = z - mean
    var = _sum(centred.pow(2).sum(0), distributed) / n  # (D,)
    return centred * torch.rsqrt(var + eps)


def _sum(x: torch.Tensor, distributed: bool) -> torch.Tensor:
    """Sum over ranks that gradients flow through (backward all-reduces the gradient)."""
    if not distributed:
        return x
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(x, op=dist.ReduceOp.SUM)
