"""The training loop: self-supervised pre-training and fine-tuning of the video encoder
with the Barlow Twins objective.

Each step embeds the two augmented windows of each video in the batch
(:mod:`app.learn.train.data`) and :mod:`app.learn.loss` pulls their cross-correlation
towards the identity; a second Barlow Twins term (``frame_weight``) does the same for the
per-frame descriptors of the frames of both views that show the same moments.

DDP-ready: under ``torchrun`` (``WORLD_SIZE > 1``) each rank loads its shard of the videos
(DistributedSampler), the loss is computed over the global batch (all-reduced statistics
and cross-correlation) and DDP averages the gradients. Mixed precision (bf16 autocast) on
GPU. ``out_dir`` holds the checkpoints (:mod:`app.learn.train.checkpoints`),
``metrics.jsonl`` and ``loss.png`` (:mod:`app.learn.train.curves`).

A loader worker that dies or hangs (decord crashes or hangs on some corrupt files) costs
one batch: the loader is rebuilt after it, up to ``max_loader_failures`` times.

A run can be trained in pieces (``keep_going``): each piece stops between two steps,
saves ``last.pt`` there, and the next resumes from it. As the windows of each step are a
function of (seed, epoch, item) and the state carries the optimiser and the position in
the stream, the pieces together take the same steps as one uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from app.learn.device import torch_threads, training_device, use_bf16
from app.learn.loss import barlow_twins_terms, matched_frames
from app.learn.train.checkpoints import LAST_CHECKPOINT, final_path, save_final, save_state, starting_point
from app.learn.train.config import TrainConfig
from app.learn.train.curves import LOSS_PLOT, METRICS_FILE, truncate_metrics, write_loss_plot
from app.learn.train.data import EpochSampler, WindowDataset, make_loader
from app.learn.train.distributed import Ranks, barrier, join_process_group, leave_process_group
from app.learn.train.guards import check_training_videos
from app.learn.train.model import fit_library_norm, prepare_for_training
from app.learn.train.optim import make_optimizer, set_scheduled_lr
from app.learn.train.progress import ProgressBar
from app.logs import one_line

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    checkpoint: Path  # final weights (model-step<N>.pt), what a model version points to
    out_dir: Path
    config: TrainConfig
    steps: int  # optimizer steps taken in total (a resumed run counts the earlier ones)
    epochs: float  # passes over the videos, fractional
    clips: int  # window pairs trained on in total
    videos: int  # videos given
    skipped: dict[str, str]  # path -> reason, videos that could not be used
    final_metrics: dict[str, float]  # mean of the last steps: loss, on_diag, off_diag
    clips_per_s: float  # the run's throughput, the first steps of each piece (warm-up) excluded
    seconds: float  # this call's wall time
    metrics_path: Path
    loss_plot: Path | None
    init_checkpoint: Path | None = None
    total_steps: int = 0  # the run's step budget
    # False: stopped early by keep_going; ``checkpoint`` is then last.pt, to resume from.
    finished: bool = True


# keep_going(step, total_steps): asked before the first step, after each step and before
# the finishing work (library normalisation, final weights); False stops the run there.
KeepGoing = Callable[[int, int], bool]


def train(
    config: TrainConfig,
    videos: Sequence[Path],
    *,
    out_dir: Path,
    resume: bool = False,
    init_checkpoint: Path | None = None,
    progress: bool = False,
    keep_going: KeepGoing | None = None,
) -> TrainResult:
    """Trains the encoder on ``videos`` with the Barlow Twins objective.

    ``resume``: continue from ``out_dir/last.pt`` (weights, optimizer, step, position in
    the epoch) up to the step budget of ``config``; without it, an ``out_dir`` that already
    holds a run is refused. ``init_checkpoint``: start from these weights (fine-tuning);
    its encoder architecture replaces ``config.encoder``'s. ``keep_going``: see
    :data:`KeepGoing`; when it says stop, ``last.pt`` is saved at that step and the
    result is not ``finished``. Runs on every rank under ``torchrun``; returns the same
    result on each.
    """
    out_dir = Path(out_dir)
    check_training_videos(videos, out_dir=out_dir, resume=resume)  # benchmark footage; a resume's video list
    with torch_threads(config.torch_threads):
        ranks = join_process_group()
        try:
            return _train(config, list(videos), out_dir, resume, init_checkpoint, progress, ranks, keep_going)
        finally:
            leave_process_group(ranks)


def finetune_config(config: TrainConfig, epochs: int) -> TrainConfig:
    """``config`` for a fine-tune of ``epochs`` passes over the videos."""
    return dataclasses.replace(config, epochs=epochs, steps=None)


def finetune(
    config: TrainConfig,
    videos: Sequence[Path],
    *,
    init_checkpoint: Path,
    out_dir: Path,
    epochs: int = 5,
    resume: bool = False,
    progress: bool = False,
) -> TrainResult:
    """Continues training ``init_checkpoint`` for ``epochs`` passes over ``videos`` (the
    company's library); the optimizer and schedule start afresh."""
    return train(
        finetune_config(config, epochs), videos, out_dir=out_dir, resume=resume, init_checkpoint=init_checkpoint,
        progress=progress,
    )  # fmt: skip


def _train(
    config: TrainConfig,
    videos: list[Path],
    out_dir: Path,
    resume: bool,
    init_checkpoint: Path | None,
    progress: bool,
    ranks: Ranks,
    keep_going: KeepGoing | None,
) -> TrainResult:
    started = time.perf_counter()
    device = training_device(ranks.local_rank)
    last_path = out_dir / LAST_CHECKPOINT
    start = starting_point(config, out_dir, resume=resume, init_checkpoint=init_checkpoint)
    encoder, config, state = start.encoder, start.config, start.state
    if ranks.main:
        out_dir.mkdir(parents=True, exist_ok=True)

    if config.batch_size < 2 * ranks.world_size or config.batch_size % ranks.world_size:
        raise ValueError(f"batch_size {config.batch_size}: needs a multiple of {ranks.world_size} ranks, >= 2 per rank")
    local_batch = config.batch_size // ranks.world_size
    dataset = WindowDataset(
        videos,
        frames=config.frames,
        fps=config.fps,
        augment=config.augmenters(),
        short_videos=config.short_videos,
        min_frames=config.min_frames,
        clips_per_video=config.clips_per_video,
        view_shift_s=config.view_shift_s,
    )
    sampler = EpochSampler(len(dataset), rank=ranks.rank, world_size=ranks.world_size, seed=config.seed)
    per_epoch = sampler.items_per_epoch  # items of this rank per pass over the videos
    # An epoch may be shorter than a batch (a small library): batches then span epochs.
    total_steps = (
        config.steps if config.steps is not None else math.ceil((config.epochs or 1) * per_epoch / local_batch)
    )
    if total_steps < 1:
        raise ValueError("nothing to train: steps or epochs must be >= 1")

    # Model, optimizer, precision.
    twin = prepare_for_training(encoder, config, ranks, device)
    optimizer = make_optimizer(encoder, config)
    bf16 = use_bf16(config.precision, device)

    # position: items of this rank's stream consumed (loaded batches, used or skipped).
    step, position, clips_total = 0, 0, 0
    skipped: dict[str, str] = {}
    recent: list[dict[str, float]] = []  # the last steps' metrics: the run's final summary
    timed_clips, timed_s = 0, 0.0  # clips and seconds of the steps that count for throughput
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        step, position, clips_total = int(state["step"]), int(state["position"]), int(state["clips"])
        skipped = dict(state.get("skipped", {}))
        recent = list(state.get("recent", []))
        timed_clips, timed_s = int(state.get("timed_clips", 0)), float(state.get("timed_s", 0.0))
    metrics_path = out_dir / METRICS_FILE
    if ranks.main:
        truncate_metrics(metrics_path, step)

    def save_last() -> None:
        save_state(last_path, encoder, optimizer, config=config, step=step, position=position,
                   items_per_epoch=per_epoch, clips=clips_total, skipped=skipped, recent=recent,
                   timed=(timed_clips, timed_s))  # fmt: skip

    def stop_here() -> bool:
        if keep_going is None:
            return False
        stop = torch.tensor([0.0 if keep_going(step, total_steps) else 1.0], device=device)
        if ranks.enabled:  # every rank stops at the same step, or DDP waits forever
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        return bool(stop.item())

    logger.info(
        "training on %d videos (%d items/epoch/rank), steps %d -> %d, "
        "global batch %d on %d rank(s), %s, device %s%s",
        len(videos), per_epoch, step, total_steps,
        config.batch_size, ranks.world_size, config.encoder.backbone, device, " bf16" if bf16 else "",
    )  # fmt: skip
    first_step = step
    saved_step, failures = step, 0  # last.pt holds `step` already (or nothing: step 0)
    loader: DataLoader | None
    bar = ProgressBar(total_steps, step, enabled=progress and ranks.main)
    stopped = stop_here()
    with bar, open(metrics_path, "a", encoding="utf-8") if ranks.main else contextlib.nullcontext() as log:
        while step < total_steps and not stopped:
            # Enough items for the steps left, plus a few batches for steps skipped.
            sampler.start(position, (total_steps - step + 8) * local_batch)
            loader = make_loader(dataset, sampler, local_batch, config, device)
            t_wait = time.perf_counter()
            try:
                for batch in loader:
                    t_start = time.perf_counter()
                    position += local_batch
                    for path, reason in batch["skipped"]:
                        if path not in skipped:
                            skipped[path] = reason
                            logger.warning("skipped %s: %s", path, reason)
                    row = _step(twin, optimizer, batch, config, step, total_steps, device, bf16, ranks)
                    if row is None:
                        t_wait = time.perf_counter()
                        continue
                    step += 1
                    now = time.perf_counter()
                    clips_total += int(row["clips"])
                    row.update(
                        step=step,
                        epoch=round(position / per_epoch, 4),
                        data_s=round(t_start - t_wait, 4),
                        step_s=round(now - t_start, 4),
                        clips_per_s=round(row["clips"] / max(1e-9, now - t_wait), 3),
                    )
                    if step - first_step > 2:  # the first steps pay for warm-up and worker start
                        timed_clips += int(row["clips"])
                        timed_s += now - t_wait
                    recent = [*recent[-9:], row]
                    if log is not None:
                        log.write(json.dumps(row) + "\n")
                        log.flush()
                    bar.update(step, row)
                    if step % config.checkpoint_every == 0 or step >= total_steps:
                        if ranks.main:
                            save_last()
                        saved_step = step
                        barrier(ranks)
                    if step >= total_steps:
                        break
                    if stop_here():
                        stopped = True
                        break
                    t_wait = time.perf_counter()
            except RuntimeError as exc:
                # A worker that died (a decoder crash) or went silent (a decoder hang):
                # lose that batch, rebuild the loader after it, go on.
                if "DataLoader" not in str(exc) or failures >= config.max_loader_failures:
                    raise
                failures += 1
                position += local_batch
                logger.error("data loader failed (%s); skipping one batch, restarting the loader", one_line(exc))
            finally:
                loader = None  # the iterator's end shuts its workers down

    # The finishing work may take a while (library normalisation decodes up to
    # norm_videos videos): a piece whose budget the steps spent leaves it to the next.
    if stopped or stop_here():
        if ranks.main and saved_step != step:
            save_last()
        barrier(ranks)
        logger.info("stopped at step %d of %d after %.0f s; %s resumes it",
                    step, total_steps, time.perf_counter() - started, last_path)  # fmt: skip
        return TrainResult(
            checkpoint=last_path, out_dir=out_dir, config=config, steps=step, epochs=position / per_epoch,
            clips=clips_total, videos=len(videos), skipped=skipped, final_metrics={},
            clips_per_s=timed_clips / timed_s if timed_s > 0 else 0.0, seconds=time.perf_counter() - started,
            metrics_path=metrics_path, loss_plot=None, init_checkpoint=init_checkpoint, total_steps=total_steps,
            finished=False,
        )  # fmt: skip
    if ranks.main and config.encoder.library_norm != "none":
        fit_library_norm(encoder, videos, limit=config.norm_videos, seed=config.seed)
    final = final_path(out_dir, step)
    final_metrics = (
        {
            k: float(np.mean([r[k] for r in recent if k in r]))
            for k in ("loss", "on_diag", "off_diag", "frame_loss")
            if any(k in r for r in recent)
        }
        if recent
        else {}
    )
    plot = None
    if ranks.main:
        if saved_step != step:
            save_last()
        save_final(final, encoder, config=config, step=step, epoch=position / per_epoch, clips=clips_total,
                   metrics=final_metrics, init_checkpoint=init_checkpoint)  # fmt: skip
        plot = write_loss_plot(metrics_path, out_dir / LOSS_PLOT, lambd=config.lambd)
    barrier(ranks)
    clips_per_s = timed_clips / timed_s if timed_s > 0 else 0.0
    seconds = time.perf_counter() - started
    if ranks.main:
        logger.info("trained to step %d in %.0f s: %.2f clips/s, loss %s; %s",
                    step, seconds, clips_per_s, final_metrics.get("loss"), final)  # fmt: skip
    return TrainResult(
        checkpoint=final,
        out_dir=out_dir,
        config=config,
        steps=step,
        epochs=position / per_epoch,
        clips=clips_total,
        videos=len(videos),
        skipped=skipped,
        final_metrics=final_metrics,
        clips_per_s=clips_per_s,
        seconds=seconds,
        metrics_path=metrics_path,
        loss_plot=plot,
        init_checkpoint=init_checkpoint,
        total_steps=total_steps,
    )


def _step(
    twin: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, Any],
    config: TrainConfig,
    step: int,
    total_steps: int,
    device: torch.device,
    bf16: bool,
    ranks: Ranks,
) -> dict[str, float] | None:
    """One optimizer step; None (on every rank alike) when some rank has under 2 clips."""
    views, mask = batch["views"], batch["mask"]
    local = 0 if views is None else views.shape[0]
    counts = torch.tensor([local], device=device)
    if ranks.enabled:
        fewest = counts.clone()
        dist.all_reduce(fewest, op=dist.ReduceOp.MIN)
        dist.all_reduce(counts)
        if fewest.item() < 2:
            logger.warning("step %d skipped: a rank has under 2 decodable clips", step + 1)
            return None
    elif local < 2:
        logger.warning("step %d skipped: under 2 decodable clips", step + 1)
        return None
    set_scheduled_lr(optimizer, step=step, total_steps=total_steps, warmup_fraction=config.warmup_fraction)
    views = views.to(device, non_blocking=True)  # (B, 2, T, 3, S, S)
    mask = mask.to(device, non_blocking=True)  # (B, 2, T)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        z1, z2, *frames = twin(views, mask)  # (B, embed_dim) each [, (B, T, frame_dim) each]
    terms = barlow_twins_terms(z1, z2, lambd=config.lambd, distributed=ranks.enabled)
    loss, extra = terms.loss, {}
    if frames:
        # The frames of both views that show the same moments (within half a period).
        times = batch["times"].to(device, non_blocking=True)  # (B, 2, T)
        p1, p2 = matched_frames(frames[0], frames[1], times, mask, tolerance_s=0.5 / config.fps)  # (P, frame_dim) each
        pairs = torch.tensor([len(p1)], device=device)
        if ranks.enabled:
            dist.all_reduce(pairs, op=dist.ReduceOp.MIN)
        if pairs.item() >= 2:
            frame_terms = barlow_twins_terms(p1, p2, lambd=config.frame_lambd, distributed=ranks.enabled)
            loss = loss + config.frame_weight * frame_terms.loss
            extra = {"frame_loss": float(frame_terms.loss.detach()), "frame_pairs": float(len(p1))}
        else:  # no moment in common: the head still joins the graph (DDP waits for it)
            loss = loss + 0.0 * (frames[0].sum() + frames[1].sum())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if config.grad_clip:
        torch.nn.utils.clip_grad_norm_(twin.parameters(), config.grad_clip)
    optimizer.step()
    return {
        "loss": float(terms.loss.detach()),
        "on_diag": float(terms.on_diag.detach()),
        "off_diag": float(terms.off_diag.detach()),
        "lr": optimizer.param_groups[0]["lr"],
        "clips": float(counts.item()),
        **extra,
    }
