"""The optimiser and its schedule: LARS (or AdamW) with biases and norms apart, linear
warm-up then cosine decay, as Barlow Twins trains."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from app.learn.train.config import TrainConfig


class LARS(torch.optim.Optimizer):
    """LARS as in facebookresearch/barlowtwins: SGD with momentum whose update of each
    weight matrix is scaled by ``eta * |w| / |update|``. Param groups with
    ``exclude=True`` (biases, norms) get neither weight decay nor the adaptation."""

    def __init__(
        self, params: Any, *, lr: float, weight_decay: float = 0.0, momentum: float = 0.9, eta: float = 0.001
    ) -> None:
        defaults = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "eta": eta, "exclude": False}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if not group["exclude"]:
                    dp = dp.add(p, alpha=group["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(
                        param_norm > 0.0,
                        torch.where(update_norm > 0, group["eta"] * param_norm / update_norm, one),
                        one,
                    )
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(dp)
                p.add_(mu, alpha=-group["lr"])


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """``config.optimizer`` over ``model``'s trainable parameters; each param group keeps
    its ``base_lr``, which :func:`set_scheduled_lr` scales step by step."""
    # Biases and norm parameters (1-d) get no weight decay (and no LARS adaptation).
    weights = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    others = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    if config.optimizer == "lars":
        groups = [
            {"params": weights, "base_lr": config.lr},
            {"params": others, "base_lr": config.lr * config.lr_bias_ratio, "exclude": True},
        ]
        return LARS(groups, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        groups = [
            {"params": weights, "base_lr": config.lr, "weight_decay": config.weight_decay},
            {"params": others, "base_lr": config.lr, "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=config.lr)
    raise ValueError(f"unknown optimizer {config.optimizer!r}")


def lr_factor(step: int, total: int, warmup_fraction: float) -> float:
    """Linear warm-up from 0, then cosine decay to 0.001 (Barlow Twins' schedule).
    ``step`` counts from 0."""
    warmup = max(1, round(total * warmup_fraction)) if warmup_fraction > 0 else 0
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.001 + 0.999 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def set_scheduled_lr(optimizer: torch.optim.Optimizer, *, step: int, total_steps: int, warmup_fraction: float) -> None:
    """Sets every param group's learning rate for ``step`` (from 0) of ``total_steps``."""
    factor = lr_factor(step, total_steps, warmup_fraction)
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
