"""The rollout gate: a trained model is compared with the serving one on edited copies of
the library's own videos, through the served pipeline, before it may serve."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from support.media import make_video

from app.learn import gate
from app.learn.encoder import INITIAL_CONFIG, EncoderConfig, VideoEncoder, initial_encoder, save_checkpoint
from app.learn.registry import INITIAL_MODEL_NAME
from app.models import ModelVersion

PATTERNS = ("testsrc2", "mandelbrot", "smptebars", "rgbtestsrc", "life=ratio=0.2:mold=4", "cellauto=rule=110")


@pytest.fixture(scope="module")
def library(media_dir: Path) -> list[Path]:
    return [make_video(media_dir / f"gate-{i}.mp4", seconds=4, pattern=p) for i, p in enumerate(PATTERNS)]


# A model that gives every video and frame the same (zero) description: no ranking at all.
# (Thumbnails are not weights, so zeroing cannot blank them: it has none.)
BROKEN = dataclasses.replace(INITIAL_CONFIG, frame_thumbnail=0, video_thumbnail_weight=0.0)


def _broken() -> VideoEncoder:
    model = initial_encoder(BROKEN)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


def _model(id_: int, name: str, checkpoint: Path | None, config: EncoderConfig = INITIAL_CONFIG) -> ModelVersion:
    path = str(checkpoint) if checkpoint else None
    return ModelVersion(id=id_, name=name, checkpoint_path=path, config=config.to_dict(), dim=config.output_dim)


def test_copies_are_edited_stretches_of_each_video(library: list[Path], tmp_path: Path) -> None:
    copies = gate.make_copies(library[:3], tmp_path)
    assert [c.source for c in copies] == [library[0], library[0], library[1], library[1], library[2], library[2]]
    assert len({c.edit for c in copies}) == 6  # the edits taken in turn
    assert all(c.path.stat().st_size > 0 for c in copies)


def test_a_model_worse_than_the_serving_one_is_refused_and_an_equal_one_passes(
    library: list[Path], tmp_path: Path, settings
) -> None:  # type: ignore[no-untyped-def]
    serving = _model(1, INITIAL_MODEL_NAME, None)  # the untrained encoder, as a fresh install serves it
    worse = _model(2, "broken", save_checkpoint(tmp_path / "broken.pt", _broken()), BROKEN)
    same = _model(3, "same-weights", save_checkpoint(tmp_path / "same.pt", initial_encoder(INITIAL_CONFIG)))

    refused = gate.compare(worse, serving, library, settings=settings)
    assert refused.copies == 2 * len(library) and refused.library == len(library)
    assert refused.scores[INITIAL_MODEL_NAME]["recall@1"] > 0.5
    # All ties, scored neutrally: a random order's worth, 1 / library size.
    assert refused.scores["broken"]["recall@1"] == pytest.approx(1 / len(library), abs=1e-4)
    assert not refused.passes
    assert "broken: recall@1 0.167" in refused.summary()

    equal = gate.compare(same, serving, library, settings=settings)
    assert equal.scores["same-weights"] == equal.scores[INITIAL_MODEL_NAME]
    assert equal.passes


def test_too_small_a_library_is_not_judged(library: list[Path], settings) -> None:  # type: ignore[no-untyped-def]
    verdict = gate.compare(_model(2, "a", None), _model(1, "b", None), library[:1], settings=settings)
    assert verdict.passes and not verdict.scores
    assert "too few library videos" in verdict.summary()


def test_a_queued_run_whose_model_fails_the_gate_is_not_rolled_out(
    library: list[Path], tmp_path: Path, settings, caplog
) -> None:  # type: ignore[no-untyped-def]
    """The end of a workers' run (workers/train_tasks.py) asks the gate, on the library's
    files, before it starts the rollout; a refused model stays registered, not warming."""
    import logging

    from app.db import session_scope
    from app.learn import registry
    from app.media.register import register
    from workers.train_tasks import _passes_gate

    with session_scope() as s:
        for path in library[:3]:  # (the shared test library may hold no other video yet)
            register(s, str(path), settings=settings, collection="gate")
        registry.active_model(session=s)
        model = registry.register_model(session=s, name=f"gate-broken-{tmp_path.name}", config=BROKEN,
                                        checkpoint_path=save_checkpoint(tmp_path / "broken.pt", _broken()))  # fmt: skip
        model_id = model.id
    with caplog.at_level(logging.WARNING, logger="workers.train_tasks"):
        assert not _passes_gate(model_id)
    assert f"model {model_id} not rolled out: the rollout gate found it worse" in caplog.text
    with session_scope() as s:
        assert s.get_one(ModelVersion, model_id).status not in ("warming", "active")
