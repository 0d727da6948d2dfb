"""The Barlow Twins loss against a plain re-implementation, an invariant, and DDP."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from app.learn.loss import BarlowTwinsLoss, barlow_twins_loss, barlow_twins_terms


def reference_loss(z1: list[list[float]], z2: list[list[float]], lambd: float, eps: float = 1e-5) -> float:
    """The formula written out with loops: batch-normalise each dimension over the batch
    (biased variance), C_ij = mean_k z1n[k][i] * z2n[k][j], then the loss."""
    n, d = len(z1), len(z1[0])

    def normalise(z: list[list[float]]) -> list[list[float]]:
        out = [[0.0] * d for _ in range(n)]
        for i in range(d):
            mean = sum(z[k][i] for k in range(n)) / n
            var = sum((z[k][i] - mean) ** 2 for k in range(n)) / n
            for k in range(n):
                out[k][i] = (z[k][i] - mean) / math.sqrt(var + eps)
        return out

    a, b = normalise(z1), normalise(z2)
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(a[k][i] * b[k][j] for k in range(n)) / n
            loss += (1.0 - c) ** 2 if i == j else lambd * c**2
    return loss


def _views(n: int = 12, d: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=g) * 3 + 1
    z2 = 0.7 * z1 + 0.5 * torch.randn(n, d, generator=g)  # correlated, as two views are
    return z1, z2


@pytest.mark.parametrize("lambd", [0.001, 0.0051, 1.0])
def test_loss_equals_reference(lambd: float) -> None:
    z1, z2 = _views()
    got = barlow_twins_loss(z1, z2, lambd=lambd)
    want = reference_loss(z1.double().tolist(), z2.double().tolist(), lambd)
    assert got.dtype == torch.float32 and got.ndim == 0
    assert got.item() == pytest.approx(want, rel=1e-4)


def test_terms_and_module_agree() -> None:
    z1, z2 = _views()
    terms = barlow_twins_terms(z1, z2, lambd=0.0051)
    assert terms.loss.item() == pytest.approx(terms.on_diag.item() + 0.0051 * terms.off_diag.item(), rel=1e-6)
    # The off-diagonal term does not depend on lambda: both weights are measurable from one run.
    other = barlow_twins_terms(z1, z2, lambd=0.001)
    assert other.off_diag.item() == pytest.approx(terms.off_diag.item(), rel=1e-6)
    assert BarlowTwinsLoss(lambd=0.0051)(z1, z2).loss.item() == pytest.approx(terms.loss.item(), rel=1e-6)


def test_loss_is_invariant_to_affine_changes_of_each_dimension() -> None:
    z1, z2 = _views(n=32, d=16)
    g = torch.Generator().manual_seed(1)
    a1, a2 = torch.rand(16, generator=g) * 5 + 0.2, torch.rand(16, generator=g) * 5 + 0.2  # a > 0
    b1, b2 = torch.randn(16, generator=g) * 10, torch.randn(16, generator=g) * 10
    before = barlow_twins_loss(z1, z2)
    after = barlow_twins_loss(a1 * z1 + b1, a2 * z2 + b2)
    assert after.item() == pytest.approx(before.item(), rel=1e-4)


def test_identical_decorrelated_views_cost_nothing() -> None:
    # Orthogonal columns: C is the identity, so both terms vanish.
    z = torch.linalg.qr(torch.randn(64, 8, generator=torch.Generator().manual_seed(2)))[0] * 8.0
    z = z - z.mean(0)
    assert barlow_twins_loss(z, z).item() < 1e-3


def test_loss_accepts_bf16_and_rejects_bad_shapes() -> None:
    z1, z2 = _views()
    assert barlow_twins_loss(z1.bfloat16(), z2.bfloat16()).dtype == torch.float32
    with pytest.raises(ValueError):
        barlow_twins_loss(z1, z2[:, :3])
    with pytest.raises(ValueError):
        barlow_twins_loss(z1[:1], z2[:1])


# --------------------------------------------------------------------------------------
# DDP: two CPU processes (gloo) give the loss and gradients of the concatenated batch.
# --------------------------------------------------------------------------------------


class _TwoViews(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 10))

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net(x1), self.net(x2)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x1 = torch.randn(16, 6, generator=g)
    return x1, x1 + 0.3 * torch.randn(16, 6, generator=g)


# Unequal shards on purpose: ranks need not hold the same number of samples.
_SHARDS = ((0, 6), (6, 16))


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = DistributedDataParallel(_TwoViews())
        x1, x2 = _batch()
        lo, hi = _SHARDS[rank]
        z1, z2 = model(x1[lo:hi], x2[lo:hi])
        loss = barlow_twins_loss(z1, z2, lambd=0.0051, distributed=True)
        loss.backward()  # DDP averages the gradients over the two ranks
        grads = {name: p.grad for name, p in model.module.named_parameters()}
        torch.save({"loss": loss.detach(), "grads": grads}, Path(out_dir) / f"rank{rank}.pt")
        # Neither rank tears gloo down while the other still communicates: that aborts
        # the process ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_distributed_loss_and_gradients_equal_single_process(tmp_path: Path) -> None:
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)

    torch.manual_seed(0)
    model = _TwoViews()
    x1, x2 = _batch()
    z1, z2 = model(x1, x2)
    loss = barlow_twins_loss(z1, z2, lambd=0.0051)
    loss.backward()

    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
        for name, p in model.named_parameters():
            torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-4, atol=1e-6)


def test_matched_frames_pairs_the_same_moments_only() -> None:
    from app.learn.loss import matched_frames

    f1 = torch.arange(2 * 4 * 1, dtype=torch.float32).view(2, 4, 1)  # frame k of clip b: 4b + k
    f2 = 100 + f1
    nan = float("nan")
    times = torch.tensor(
        [
            [[0.0, 1.0, 2.0, 3.0], [1.1, 2.1, 3.1, 4.1]],  # shifted by 1.1 s: three moments shared
            [[0.0, 1.0, 1.0, 5.0], [nan, 1.2, 9.0, 9.0]],  # a held frame; inserted footage (NaN)
        ]
    )
    mask = torch.ones(2, 2, 4, dtype=torch.bool)
    mask[1, 1, 1] = False  # a padded frame pairs with nothing
    p1, p2 = matched_frames(f1, f2, times, mask, tolerance_s=0.5)
    assert p1.flatten().tolist() == [1.0, 2.0, 3.0] and p2.flatten().tolist() == [100.0, 101.0, 102.0]
    mask[1, 1, 1] = True
    p1, p2 = matched_frames(f1, f2, times, mask, tolerance_s=0.5)
    # Both showings of the held moment pair with the one frame of view 2 at that moment.
    assert p1.flatten().tolist() == [1.0, 2.0, 3.0, 5.0, 6.0] and p2.flatten().tolist()[-2:] == [105.0, 105.0]
