"""Where the encoder runs and in what precision: the GPU-or-CPU, bf16 and torch-thread
decisions that training and serving share."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Literal

import torch

Precision = Literal["auto", "bf16", "fp32"]


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU runs bf16 natively (oneDNN). bf16 autocast is then 1.5-2.5x faster
    for training and ~1.6x for serving, with the same ranking; elsewhere it is emulated
    and slower than fp32."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def serving_device() -> torch.device:
    """The GPU when there is one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def training_device(local_rank: int = 0) -> torch.device:
    """This rank's GPU (one per rank under torchrun), else the CPU."""
    return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def use_bf16(precision: Precision, device: torch.device) -> bool:
    """bf16 autocast for training: asked for, or ``auto`` on GPUs and on CPUs with native bf16."""
    return precision == "bf16" or (precision == "auto" and (device.type == "cuda" or cpu_has_bf16()))


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Runs the block with ``count`` torch threads (None or 0: as they are), then restores
    the number there was. On a few shared cores, fewer threads than cores leaves room for
    the data loader's workers: oversubscribed OpenMP threads wait on each other."""
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
