"""Training on real footage: windows, the loop, checkpoints, resume, DDP, the registry."""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from support.training import TINY, training_clips

import app.learn.train.loop as train_loop
from app.learn.encoder import EncoderConfig, initial_encoder, load_checkpoint, save_checkpoint
from app.learn.registry import register_trained
from app.learn.train.config import TrainConfig
from app.learn.train.curves import read_metrics
from app.learn.train.data import WindowDataset, collate_windows
from app.learn.train.loop import finetune, train
from app.learn.train.model import TwinForward
from app.media.ffmpeg import cut


@pytest.fixture(autouse=True)
def one_thread():  # type: ignore[no-untyped-def]
    """One torch thread: the loader worker has the other core, and a shared machine
    makes OpenMP threads that wait on each other many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Six 3-second clips of real footage, 160 px wide."""
    return training_clips(tmp_path_factory.mktemp("footage"))


@pytest.fixture(scope="module")
def odd_videos(tmp_path_factory: pytest.TempPathFactory, videos: list[Path]) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("odd")
    text = root / "text.mp4"
    text.write_text("This is not a video.\n" * 100)
    short = cut(videos[0], root / "short.mp4", start_s=0.0, duration_s=1.2)
    return {"text": text, "short": short, "missing": root / "missing.mp4"}


def _dataset(paths: list[Path], **options) -> WindowDataset:
    defaults = {"frames": 4, "fps": 1.0, "augment": TrainConfig(encoder=EncoderConfig(frame_size=48)).augmenters()}
    return WindowDataset(paths, **{**defaults, **options})


def test_windows_are_two_augmented_views(videos: list[Path]) -> None:
    dataset = _dataset(videos[:2], frames=2)
    sample = dataset[(0, 123)]
    assert sample["views"].shape == (2, 2, 3, 48, 48) and sample["views"].dtype == torch.float32
    assert sample["mask"].all() and sample["skipped"] == [] and sample["video"] == 0
    assert not torch.allclose(sample["views"][0], sample["views"][1])  # independent draws
    again = dataset[(0, 123)]  # a key's seed fixes windows and augmentations
    torch.testing.assert_close(again["views"], sample["views"], rtol=0, atol=0)


def test_short_and_broken_videos_are_handled(videos: list[Path], odd_videos: dict[str, Path]) -> None:
    # A 1.2-s video and 4-frame windows at 1 fps: a shorter window, padded and masked.
    sample = _dataset([odd_videos["short"]])[(0, 1)]
    assert sample["mask"].sum(1).tolist() == [2, 2]
    assert sample["views"].shape == (2, 4, 3, 48, 48)
    # ...or looped: every frame real.
    looped = _dataset([odd_videos["short"]], short_videos="loop")[(0, 1)]
    assert looped["mask"].all()
    # min_frames above what the window holds: frames spaced more densely.
    dense = _dataset([odd_videos["short"]], min_frames=3)[(0, 1)]
    assert dense["mask"].sum(1).tolist() == [3, 3]
    # Undecodable or missing files are skipped with a reason; another video stands in.
    dataset = _dataset([odd_videos["text"], odd_videos["missing"], videos[1]])
    samples = [dataset[(i, i)] for i in range(3)]
    assert all(s["views"] is not None and s["video"] == 2 for s in samples)
    reasons = dict(pair for s in samples for pair in s["skipped"])
    assert set(reasons) == {str(odd_videos["text"]), str(odd_videos["missing"])}
    assert "no such file" in reasons[str(odd_videos["missing"])]
    # Nothing decodable at all: an empty sample, which collate drops.
    broken = _dataset([odd_videos["text"]])
    batch = collate_windows([broken[0], dataset[(2, 5)]])
    assert batch["views"].shape[0] == 1 and len(batch["skipped"]) == 1


def test_training_lowers_the_loss(videos: list[Path], tmp_path: Path) -> None:
    config = dataclasses.replace(TINY, steps=14, checkpoint_every=100)
    result = train(config, videos, out_dir=tmp_path / "run")
    rows = read_metrics(result.metrics_path)
    losses = [r["loss"] for r in rows]
    assert [r["step"] for r in rows] == list(range(1, 15))
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4, losses
    assert {"loss", "on_diag", "off_diag", "lr", "clips_per_s"} <= set(rows[0])
    assert result.clips == 14 * 4 and result.clips_per_s > 0
    assert result.loss_plot is not None and result.loss_plot.stat().st_size > 1000
    assert result.loss_plot.read_bytes()[:4] == b"\x89PNG"


def test_checkpoint_round_trip_and_resume_after_interruption(
    videos: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = dataclasses.replace(TINY, steps=5, checkpoint_every=3)
    reference = train(config, videos, out_dir=tmp_path / "whole")

    # The same run, interrupted at step 4 (after the step-3 checkpoint)...
    real_step = train_loop._step
    calls = {"n": 0}

    def crashing_step(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_loop, "_step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        train(config, videos, out_dir=tmp_path / "cut")
    monkeypatch.setattr(train_loop, "_step", real_step)
    with pytest.raises(FileExistsError):  # a run is never overwritten silently
        train(config, videos, out_dir=tmp_path / "cut")

    # ...then resumed: it continues from step 3 and ends where the whole run did.
    resumed = train(config, videos, out_dir=tmp_path / "cut", resume=True)
    assert resumed.steps == 5 and resumed.clips == 5 * 4
    rows = read_metrics(resumed.metrics_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    want = [r["loss"] for r in read_metrics(reference.metrics_path)]
    assert [r["loss"] for r in rows] == pytest.approx(want, rel=1e-3)

    # The checkpoint carries its config and state; serving loads the encoder alone.
    model, payload = load_checkpoint(resumed.checkpoint)
    assert payload["step"] == 5 and TrainConfig.from_dict(payload["train_config"]) == config
    assert model.config == config.encoder and not model.training
    whole, _ = load_checkpoint(reference.checkpoint)
    for key, value in whole.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-3, atol=1e-4)
    last = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert last["step"] == 5 and "optimizer" in last

    # Fine-tuning starts from those weights for N epochs (6 videos, batch 4: 2 steps/epoch).
    tuned = finetune(config, videos, init_checkpoint=resumed.checkpoint, out_dir=tmp_path / "ft", epochs=2)
    assert tuned.steps == 3 and tuned.epochs == pytest.approx(2.0)
    assert tuned.init_checkpoint == resumed.checkpoint


def test_register_trained_records_a_model_version(videos: list[Path], tmp_path: Path, session) -> None:  # type: ignore[no-untyped-def]
    from app.learn.registry import embed_clips

    config = dataclasses.replace(TINY, steps=2, freeze_backbone_bn_stats=True)
    result = train(config, videos, out_dir=tmp_path / "run")
    model, _ = load_checkpoint(result.checkpoint)
    # Frozen statistics: the backbone's batch norms still hold their initial ones.
    bn = model.backbone.bn1
    assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean)) and int(bn.num_batches_tracked) == 0
    assert int(model.projector[1].num_batches_tracked) == 4  # the projector's do train: 2 steps x 2 views
    version = register_trained(session=session, result=result, name=f"test-{uuid.uuid4().hex[:8]}")
    assert version.trained and version.checkpoint_path == str(result.checkpoint)
    assert version.dim == TINY.encoder.output_dim and not version.is_active
    assert version.data_summary["videos"] == 6 and version.data_summary["steps"] == 2
    assert version.data_summary["clips"] == 8 and "loss" in version.metrics
    clip = torch.randint(0, 255, (3, 64, 64, 3), dtype=torch.uint8).numpy()
    vectors = embed_clips(version, [clip])
    assert vectors.shape == (1, TINY.encoder.output_dim)


def test_training_fits_library_norm_on_its_videos_and_keeps_frozen_stages(videos: list[Path], tmp_path: Path) -> None:
    from app.media.video import sample_frames

    encoder = dataclasses.replace(TINY.encoder, library_norm="centre+whiten")
    config = dataclasses.replace(TINY, encoder=encoder, steps=2, freeze_backbone_stages=2)
    result = train(config, videos, out_dir=tmp_path / "run")
    model, _ = load_checkpoint(result.checkpoint)
    fresh = initial_encoder(config.encoder)  # seed 0: the run's initial weights
    before, after = fresh.backbone.state_dict(), model.backbone.state_dict()
    for name in ("conv1.weight", "bn1.weight", "layer1.0.conv1.weight"):  # stem and layer1: frozen
        assert torch.equal(before[name], after[name]), name
    assert not torch.equal(before["layer4.0.conv1.weight"], after["layer4.0.conv1.weight"])

    # The statistics come from the training videos, decoded as serving decodes them.
    clips = [sample_frames(v, fps=1.0, size=64, max_frames=64).frames for v in videos]
    centre, whiten = model.centre.clone(), model.whiten.clone()
    assert centre.norm() > 0.1 and not fresh.centre.any()
    model.fit_library_norm(clips)
    torch.testing.assert_close(model.centre, centre, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.whiten, whiten, rtol=1e-3, atol=1e-3)
    vectors = model.embed(clips)  # [centred, whitened] halves, unit length together
    d = encoder.base_dim
    assert vectors.shape == (len(videos), 2 * d) == (len(videos), encoder.output_dim)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.allclose(np.linalg.norm(vectors[:, :d], axis=1), 2**-0.5, atol=1e-5)
    assert np.linalg.norm(vectors[:, :d].mean(0)) < 0.5 * float(centre.norm())
    # Whitened library vectors are spread out: lower mean similarity between them.
    w = vectors[:, d:] / np.linalg.norm(vectors[:, d:], axis=1, keepdims=True)
    c = vectors[:, :d] / np.linalg.norm(vectors[:, :d], axis=1, keepdims=True)
    off = ~np.eye(len(videos), dtype=bool)
    assert (w @ w.T)[off].mean() < (c @ c.T)[off].mean() + 1e-6
    # Unfitted statistics leave cosine scores as they were (the untrained baseline).
    raw = dataclasses.replace(encoder, library_norm="none")
    plain = initial_encoder(raw).embed(clips)
    doubled = fresh.embed(clips)
    np.testing.assert_allclose(doubled @ doubled.T, plain @ plain.T, rtol=1e-4, atol=1e-5)


def test_zoom_out_shrinks_every_frame_onto_one_plain_canvas() -> None:
    from app.learn.augment import ClipAugment

    augment = ClipAugment(32, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0,
                          blur_p=0.0, zoom_out_p=1.0, zoom_out_range=(0.5, 0.5))  # fmt: skip
    clip = torch.full((3, 3, 40, 40), 255, dtype=torch.uint8)  # white frames
    params = augment.draw(40, 40, generator=torch.Generator().manual_seed(1))
    assert params.zoom_out is not None
    out = augment.apply(clip, params)  # (3, 3, 32, 32)
    white = (out == 1.0).all(dim=1)  # (3, 32, 32): where the shrunk frame landed
    assert white.sum(dim=(1, 2)).tolist() == [16 * 16] * 3 and (white == white[0]).all()
    fill = params.zoom_out[4]
    assert torch.allclose(out[~white.unsqueeze(1).expand_as(out)], torch.tensor(fill))


def test_mean_temporal_pooling_ignores_padded_frames() -> None:
    from app.learn.encoder import VideoEncoder

    model = VideoEncoder(EncoderConfig(frame_size=32, embed_dim=16, projector_hidden=16, temporal="mean")).eval()
    frames = torch.rand(2, 3, 3, 32, 32)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    with torch.no_grad():
        feats = model.backbone(((frames - model.mean) / model.std).flatten(0, 1)).view(2, 3, -1)
        got = model.represent(frames, mask)
    torch.testing.assert_close(got[0], feats[0, :2].mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1], feats[1].mean(0), rtol=1e-4, atol=1e-5)


def test_a_clip_embeds_the_same_alone_or_batched_with_longer_ones() -> None:
    from app.learn.encoder import VideoEncoder

    model = VideoEncoder(EncoderConfig(frame_size=32, embed_dim=16, projector_hidden=16)).eval()
    torch.nn.init.normal_(model.temporal.mix.weight, std=0.1)  # as after training (it starts at zero)
    gen = torch.Generator().manual_seed(0)
    short, long = (torch.randint(0, 255, (t, 32, 32, 3), dtype=torch.uint8, generator=gen).numpy() for t in (2, 5))
    alone = model.embed([short])
    batched = model.embed([short, long])
    np.testing.assert_allclose(batched[0], alone[0], rtol=1e-4, atol=1e-5)


def test_checkpoints_from_before_centring_still_load(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "old.pt", initial_encoder(TINY.encoder))
    payload = torch.load(path, weights_only=True)
    del payload["state_dict"]["centre"], payload["state_dict"]["whiten"]
    torch.save(payload, path)
    model, _ = load_checkpoint(path)
    assert not model.centre.any() and torch.equal(model.whiten, torch.eye(len(model.centre)))
    clip = torch.randint(0, 255, (2, 64, 64, 3), dtype=torch.uint8).numpy()
    assert model.embed([clip]).shape == (1, TINY.encoder.output_dim)


def _ddp_train(rank: int, videos: list[str], out: str, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    result = train(dataclasses.replace(TINY, steps=2), [Path(v) for v in videos], out_dir=Path(out))
    Path(out, f"result{rank}.json").write_text(json.dumps({"steps": result.steps, **result.final_metrics}))


def test_ddp_training_with_two_processes(videos: list[Path], tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp"
    mp.spawn(_ddp_train, args=([str(v) for v in videos], str(out), port), nprocs=2, join=True)
    results = [json.loads((out / f"result{r}.json").read_text()) for r in range(2)]
    assert results[0] == results[1]  # one global loss, the same on both ranks
    assert results[0]["steps"] == 2
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["clips"] == 4  # rank 0 writes, global counts
    assert (out / "model-step000002.pt").exists()


def test_views_record_the_moments_they_show_under_every_edit_family(videos: list[Path]) -> None:
    from app.learn.augment import FAMILIES

    config = dataclasses.replace(
        TINY, augment_families=FAMILIES, family_p=1.0, view_shift_s=1.0, encoder=EncoderConfig(frame_size=48)
    )
    dataset = _dataset(videos, frames=3, augment=config.augmenters(), view_shift_s=1.0)
    seen_insert = False
    for key in range(6):
        sample = dataset[(key, 1000 + key)]
        views, times = sample["views"], sample["times"]
        assert views.shape == (2, 3, 3, 48, 48) and times.shape == (2, 3) and sample["mask"].all()
        again = dataset[(key, 1000 + key)]
        torch.testing.assert_close(again["views"], views, rtol=0, atol=0)
        torch.testing.assert_close(again["times"], times, rtol=0, atol=0, equal_nan=True)
        seen_insert |= bool(times.isnan().any())  # unrelated footage inserted: no moment of this video
        shown = times[~times.isnan()]
        assert (shown >= 0).all() and (shown <= 3.2).all()
    assert seen_insert


def test_frame_level_term_trains_the_frame_head_in_the_same_run(videos: list[Path], tmp_path: Path) -> None:
    config = dataclasses.replace(TINY, steps=3, checkpoint_every=100, view_shift_s=1.0)
    initial = initial_encoder(config.encoder, seed=config.seed)  # a fresh run's starting weights
    result = train(config, videos, out_dir=tmp_path / "frames")
    rows = read_metrics(result.metrics_path)
    assert all(r["frame_pairs"] >= 2 and r["frame_loss"] > 0 for r in rows), rows
    trained, _ = load_checkpoint(result.checkpoint)
    assert not torch.allclose(trained.frame_head.weight, initial.frame_head.weight)
    assert "frame_loss" in result.final_metrics
    # Weight 0: no frame-level term, the head stays as initialised.
    off = train(dataclasses.replace(config, frame_weight=0.0), videos, out_dir=tmp_path / "off")
    assert all("frame_loss" not in r for r in read_metrics(off.metrics_path))
    torch.testing.assert_close(load_checkpoint(off.checkpoint)[0].frame_head.weight, initial.frame_head.weight)


def test_frame_descriptors_come_from_the_backbone_pass_of_the_video_vector() -> None:
    encoder = initial_encoder(EncoderConfig(frame_size=32, embed_dim=16, projector_hidden=16, frame_dim=8)).eval()
    frames = torch.rand(2, 3, 3, 32, 32)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    with torch.no_grad():
        desc = encoder.frame_descriptors(frames, mask)
        assert desc.shape == (2, 3, 8)
        torch.testing.assert_close(desc[0], encoder.frame_head(encoder.frame_features(frames[:1]))[0])
        twin = TwinForward(encoder, frames=True)
        views = torch.stack([frames, frames], dim=1)  # (B, 2, T, 3, S, S)
        z1, _, f1, _ = twin(views, torch.stack([mask, mask], dim=1))
        torch.testing.assert_close(z1, encoder(frames, mask))
        torch.testing.assert_close(f1, desc)


def test_frame_descriptors_carry_each_frames_thumbnail() -> None:
    """With ``frame_thumbnail``, a frame descriptor is the head's unit part, then the
    frame's grey thumbnail (the tiny-frames baseline's descriptor of it), weighted so
    that the whole is unit length; the video vector does not change; a flat frame's
    descriptor is the head's alone."""
    from app.evaluate.systems import tiny_frames

    small = {"frame_size": 32, "embed_dim": 16, "projector_hidden": 16, "frame_dim": 8}
    plain = initial_encoder(EncoderConfig(**small))
    with_thumbnails = initial_encoder(EncoderConfig(**small, frame_thumbnail=8, frame_thumbnail_weight=0.3))
    assert with_thumbnails.config.descriptor_dim == 8 + 64
    rng = np.random.default_rng(4)
    clip = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    clip[2] = 90  # a flat grey frame
    (v_plain,), (f_plain,) = plain.describe([clip])
    (v_thumb,), (f_thumb,) = with_thumbnails.describe([clip])
    np.testing.assert_allclose(v_thumb, v_plain, atol=1e-6)
    assert f_thumb.shape == (5, 72)
    np.testing.assert_allclose(np.linalg.norm(f_thumb, axis=1), 1.0, atol=1e-5)
    moving = [0, 1, 3, 4]
    np.testing.assert_allclose(f_thumb[moving, :8], np.sqrt(0.7) * f_plain[moving], atol=1e-5)
    np.testing.assert_allclose(f_thumb[moving, 8:], np.sqrt(0.3) * tiny_frames(clip[moving], size=8), atol=1e-5)
    np.testing.assert_allclose(f_thumb[2], np.concatenate([f_plain[2], np.zeros(64)]), atol=1e-5)


def test_folded_thumbnails_are_the_same_for_a_frame_and_its_mirror_images() -> None:
    """With ``frame_thumbnail_fold``, a frame's thumbnail is its N x N thumbnail summed
    with its mirror images and kept as one quadrant: (N/2)^2 values, the same for the
    frame mirrored left-right, up-down or both, and still telling different frames apart."""
    from app.evaluate.systems import tiny_frames

    small = {"frame_size": 32, "embed_dim": 16, "projector_hidden": 16, "frame_dim": 8}
    folded = initial_encoder(EncoderConfig(**small, frame_thumbnail=8, frame_thumbnail_fold=True))
    assert folded.config.descriptor_dim == 8 + 16
    rng = np.random.default_rng(5)
    clip = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    mirrors = [clip[:, :, ::-1], clip[:, ::-1], clip[:, ::-1, ::-1]]
    _, (f_clip, *f_mirrors) = folded.describe([clip, *mirrors])
    assert f_clip.shape == (4, 24)
    w = folded.config.frame_thumbnail_weight
    thumbs = f_clip[:, 8:] / np.sqrt(w)
    np.testing.assert_allclose(np.linalg.norm(thumbs, axis=1), 1.0, atol=1e-5)
    for mirrored in f_mirrors:
        np.testing.assert_allclose(mirrored[:, 8:], f_clip[:, 8:], atol=1e-5)
    # by hand: the tiny-frames baseline's 8 x 8 thumbnail, each value summed with its three
    # mirror positions (centring commutes with the fold: a quadrant's mean is 4 x the frame's)
    blocks = tiny_frames(clip, size=8).reshape(4, 8, 8)
    quadrant = (blocks + blocks[:, ::-1] + blocks[:, :, ::-1] + blocks[:, ::-1, ::-1])[:, :4, :4].reshape(4, 16)
    np.testing.assert_allclose(thumbs, quadrant / np.linalg.norm(quadrant, axis=1, keepdims=True), atol=1e-4)
    assert np.abs(thumbs @ thumbs.T - np.eye(4)).max() < 0.9  # distinct frames stay distinct
    with pytest.raises(ValueError, match="even size"):
        EncoderConfig(**small, frame_thumbnail=7, frame_thumbnail_fold=True)


def test_mirror_matched_thumbnails_match_a_frame_and_its_mirror_images() -> None:
    """With ``frame_thumbnail_mirrors``, a frame's thumbnail is its whole N x N thumbnail
    (the tiny-frames baseline's) in its mirror components: the same cosines as the
    thumbnails', and a mirrored frame's components are the frame's with signs changed,
    so the second stage finds the mirror image at similarity 1 where the plain product
    does not."""
    from app.evaluate.systems import tiny_frames
    from app.index.mirrors import Mirrors, mirror_basis

    small = {"frame_size": 32, "embed_dim": 16, "projector_hidden": 16, "frame_dim": 8}
    config = EncoderConfig(**small, frame_thumbnail=8, frame_thumbnail_mirrors=True)
    encoder = initial_encoder(config)
    assert config.descriptor_dim == 8 + 64
    layout = Mirrors.of(config.to_dict())
    assert layout == Mirrors(8, 16) and Mirrors.of(EncoderConfig(**small, frame_thumbnail=8).to_dict()) is None
    rng = np.random.default_rng(6)
    clip = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    mirrored = [clip[:, :, ::-1], clip[:, ::-1], clip[:, ::-1, ::-1]]
    _, (f_clip, *f_mirrors) = encoder.describe([clip, *mirrored])
    w = config.frame_thumbnail_weight
    thumbs = f_clip[:, 8:] / np.sqrt(w)
    np.testing.assert_allclose(thumbs, tiny_frames(clip, size=8) @ mirror_basis(8).T, atol=1e-5)
    signs = {"left-right": (1, -1, 1, -1), "up-down": (1, 1, -1, -1), "half turn": (1, -1, -1, 1)}
    for (name, sign), f_mirror in zip(signs.items(), f_mirrors, strict=True):
        flipped = (thumbs.reshape(4, 4, 16) * np.array(sign)[None, :, None]).reshape(4, 64)
        np.testing.assert_allclose(f_mirror[:, 8:] / np.sqrt(w), flipped, atol=1e-5, err_msg=name)
        thumb_only = np.concatenate([np.zeros((4, 8)), f_mirror[:, 8:]], axis=1)
        best = layout.products(f_clip, thumb_only)
        np.testing.assert_allclose(np.diag(best), w, atol=1e-5)  # the mirror image, found
        assert np.diag(f_clip @ thumb_only.T).max() < 0.9 * w  # the plain product misses it
    with pytest.raises(ValueError, match="even size"):
        EncoderConfig(**small, frame_thumbnail=7, frame_thumbnail_mirrors=True)
    with pytest.raises(ValueError, match="not both"):
        EncoderConfig(**small, frame_thumbnail=8, frame_thumbnail_mirrors=True, frame_thumbnail_fold=True)


def test_the_video_thumbnail_scores_a_mirrored_or_brightened_copy_as_its_source() -> None:
    """With ``video_thumbnail_weight`` w the served vector is the network's (weight 1 - w)
    and the clip's mean thumbnail, mirror-invariant (weight w): a mirrored copy's part is
    its source's, and so is a copy under a brightness and contrast change (thumbnails are
    centred and unit length); the same from describe, embed and describe_stream."""
    small = {"frame_size": 32, "embed_dim": 16, "projector_hidden": 16, "frame_dim": 8, "frame_thumbnail": 8}
    plain = initial_encoder(EncoderConfig(**small, frame_thumbnail_mirrors=True))
    config = EncoderConfig(**small, frame_thumbnail_mirrors=True, video_thumbnail_weight=0.3)
    encoder = initial_encoder(config)
    assert config.output_dim == plain.config.output_dim + 64
    rng = np.random.default_rng(8)
    clip = rng.integers(30, 180, (5, 32, 32, 3), dtype=np.uint8)
    brighter = np.rint(clip * 1.2 + 20).astype(np.uint8)  # (no level clipped)
    copies = [clip[:, :, ::-1], clip[:, ::-1], clip[:, ::-1, ::-1], brighter]
    vectors, frames = encoder.describe([clip, *copies, clip[:3]])
    network, _ = plain.describe([clip, *copies, clip[:3]])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vectors[:, :-64] / np.sqrt(0.7), network, atol=1e-5)  # the network's, weighted
    thumbnail = vectors[:, -64:] / np.sqrt(0.3)
    for copy in thumbnail[1:4]:
        np.testing.assert_allclose(copy, thumbnail[0], atol=1e-5)  # mirrored: the same
    np.testing.assert_allclose(thumbnail[4], thumbnail[0], atol=2e-3)  # brightened: up to rounding the levels
    mean = frames[0][:, 8:].mean(0)
    expected = np.concatenate([mean[:16], np.abs(mean[16:])])
    np.testing.assert_allclose(thumbnail[0], expected / np.linalg.norm(expected), atol=1e-5)
    # A shorter clip padded in the same batch is summarised on its own frames only.
    alone, _ = encoder.describe([clip[:3]])
    np.testing.assert_allclose(vectors[5], alone[0], atol=1e-5)
    np.testing.assert_allclose(encoder.embed([clip]), vectors[:1], atol=1e-5)
    streamed, _ = encoder.describe_stream([clip[:2], clip[2:]])
    np.testing.assert_allclose(streamed, vectors[0], atol=1e-4)
    with pytest.raises(ValueError, match="mirror-matched frame thumbnails"):
        EncoderConfig(**small, video_thumbnail_weight=0.3)


def test_default_families_keep_the_benchmarks_held_out_edits_out_of_training() -> None:
    from app.evaluate.edits import DEFAULT_EDITS, HELD_OUT_EDITS
    from app.learn.augment import FAMILIES
    from app.learn.train.config import HELD_OUT_FAMILIES, PRESETS

    # The family of augmentation that teaches each benchmark edit's invariance.
    teaches = {
        "reencode_low_quality": "reencode", "crop": "crop", "hflip": "hflip", "brightness_contrast": "colour",
        "grayscale": "grayscale", "blur": "blur", "noise": "noise", "overlay_shapes": "overlay",
        "letterbox": "letterbox", "rotate": "rotate", "speed_up": "speed", "frame_rate": "frame_drop",
        "combined": "crop", "resize": "crop", "vflip": "vflip", "slow_down": "speed", "insertion": "insert",
    }  # fmt: skip
    assert set(teaches) == set(DEFAULT_EDITS) and set(teaches.values()) <= set(FAMILIES)
    for name, preset in {"default": TrainConfig(), **PRESETS}.items():
        trained = set(preset.augment_families)
        assert not trained & set(HELD_OUT_FAMILIES), name
        assert {teaches[e] for e in HELD_OUT_EDITS}.isdisjoint(trained), name
        first = preset.augmenters()[0]
        assert first.rotate_p == first.insert_p == first.speed_p == 0.0 and first.pip_p > 0, name
    everything = dataclasses.replace(TrainConfig(), augment_families=FAMILIES, family_p=0.5).augmenters()[0]
    assert everything.rotate_p == everything.insert_p == 0.5 and everything.needs_other()
    with pytest.raises(ValueError, match="unknown augmentation families"):
        dataclasses.replace(TrainConfig(), augment_families=("sepia",)).augmenters()
    # Stored in checkpoints as lists: read back as the same config.
    config = dataclasses.replace(TrainConfig(), augment_families=("crop", "pip"))
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
