"""The domain functions directly (no worker): schema, settings, events, index, search."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import create_database, drop_database
from sqlalchemy import create_engine, inspect

from app.config import DEV_WEBHOOK_SECRET, Settings
from app.index.build import build_version
from app.index.hits import exact_search
from app.index.version import IndexFileError, IndexVersionFiles
from app.serve.events import InvalidEvent, parse_event


def test_migrations_up_down_up_on_postgres() -> None:
    name = create_database()
    try:
        url = os.environ["DATABASE_URL"].rsplit("/", 1)[0] + f"/{name}"
        env = {**os.environ, "DATABASE_URL": url}
        code = (
            "import sys; from app.db import migrate, downgrade; "
            "getattr(sys.modules['app.db'], sys.argv[1])(sys.argv[2])"
        )
        for step, rev in (("migrate", "head"), ("downgrade", "base"), ("migrate", "head")):
            subprocess.run([sys.executable, "-c", code, step, rev], env=env, check=True)
            engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
            tables = set(inspect(engine).get_table_names())
            if rev == "head":  # vectors kept in the row (0003): re-ranking reads them
                with engine.connect() as conn:
                    storage = conn.exec_driver_sql(
                        "SELECT attstorage FROM pg_attribute WHERE attrelid = 'embeddings'::regclass"
                        " AND attname = 'vector'"
                    ).scalar_one()
                assert storage == "m"
            engine.dispose()
            expected = {"videos", "embeddings", "model_versions", "index_versions", "events", "recommendations",
                        "deliveries", "delivery_attempts", "task_attempts"}  # fmt: skip
            assert (expected <= tables) if rev == "head" else not (expected & tables)
    finally:
        drop_database(name)


def test_placeholder_secret_is_refused_in_production() -> None:
    with pytest.raises(ValueError, match="development secret"):
        Settings(env="production", webhook_secret=DEV_WEBHOOK_SECRET)
    ok = Settings(env="production", webhook_secret="whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo=")
    assert ok.webhook_secrets == ["whsec_QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo="]


def test_every_time_limit_is_below_the_visibility_timeout() -> None:
    from workers.app import QUEUES, TIME_LIMITS, celery_app

    visibility = celery_app.conf.broker_transport_options["visibility_timeout"]
    assert set(TIME_LIMITS) == set(QUEUES)
    for task in celery_app.tasks.values():
        if task.name.startswith("vidsim."):
            assert task.time_limit is not None and task.time_limit < visibility, task.name
    assert celery_app.conf.task_acks_late and celery_app.conf.worker_prefetch_multiplier == 1


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ({"event_id": "a", "callback_url": "http://x"}, "exactly one of video_id or video_uri"),
        ({"event_id": "a", "video_id": 1, "video_uri": "/x", "callback_url": "http://x"}, "exactly one"),
        ({"video_id": 1, "callback_url": "http://x"}, "event_id: Field required"),
        ({"event_id": "a", "video_id": "x", "callback_url": "http://x"}, "video_id: Input should be a valid integer"),
        ({"event_id": "a", "video_id": 1, "k": 10**6, "callback_url": "http://x"}, "over the limit"),
        ({"event_id": "a b", "video_id": 1, "callback_url": "http://x"}, "event_id"),
        ("{not json", "Invalid JSON"),
        ("x" * 20000, "over the 16384-byte limit"),
        ([1, 2], "must be a JSON object"),
    ],
)
def test_malformed_events_get_a_readable_reason(raw: object, reason: str) -> None:
    with pytest.raises(InvalidEvent, match=reason.replace("(", r"\(")):
        parse_event(raw, max_k=100)


def _unit(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_index_round_trip_and_corrupt_file_refused(tmp_path: Path) -> None:
    vectors = _unit(200, 64)
    keys = np.arange(1000, 1200)
    built = build_version(keys=keys, vectors=vectors, directory=tmp_path / "a")
    index = IndexVersionFiles.view(built.path, sha256=built.sha256, dim=64)
    for i in (0, 57, 199):  # every key is found by an exact self-query
        hit = index.search(vectors[i], 1)[0]
        assert hit.key == keys[i] and hit.score == pytest.approx(1.0, abs=1e-3)
    assert next(h.key for h in exact_search(keys, vectors, vectors[3], 3)) == keys[3]

    graph = built.path.parent / "shard-0.usearch"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    with pytest.raises(IndexFileError, match="corrupt"):
        IndexVersionFiles.view(built.path, sha256=built.sha256, dim=64)
    with pytest.raises(IndexFileError, match="missing"):
        IndexVersionFiles.view(tmp_path / "nope" / "manifest.json", sha256=built.sha256, dim=64)


def test_encoder_checkpoint_round_trip(tmp_path: Path) -> None:
    from app.learn.encoder import EncoderConfig, initial_encoder, load_checkpoint, save_checkpoint

    config = EncoderConfig(frame_size=64, embed_dim=64, projector_hidden=64)
    model = initial_encoder(config)
    clip = np.random.default_rng(0).integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)
    path = save_checkpoint(tmp_path / "m.pt", model, extra={"step": 7})
    loaded, payload = load_checkpoint(path)
    assert loaded.config == config and payload["step"] == 7
    np.testing.assert_allclose(loaded.embed([clip]), model.embed([clip]), atol=1e-5)
    np.testing.assert_allclose(initial_encoder(config).embed([clip]), model.embed([clip]), atol=1e-5)


def test_search_finds_fresh_additions_and_never_disabled_videos(session, settings) -> None:  # type: ignore[no-untyped-def]
    """A vector added after the index build is found without a rebuild; a disabled
    video or one outside the collection is never returned; the query is excluded."""
    from app.index.rebuild import rebuild_index
    from app.index.search import search_library
    from app.learn.registry import active_model
    from app.models import Embedding, Video

    model = active_model(session=session)
    vectors = _unit(6, model.dim, seed=42)
    videos = [
        Video(uri=f"test://search/{i}-{os.getpid()}", status="ready", collection="acme" if i < 5 else "other")
        for i in range(6)
    ]
    session.add_all(videos)
    session.flush()
    for video, vec in zip(videos[:3], vectors[:3], strict=True):
        session.add(
            Embedding(video_id=video.id, model_version_id=model.id, vector=vec.tobytes(), dim=model.dim, frames=1)
        )
    session.flush()
    version = rebuild_index(session=session, model=model, settings=settings)
    session.commit()
    for video, vec in zip(videos[3:], vectors[3:], strict=True):  # after the build
        session.add(
            Embedding(video_id=video.id, model_version_id=model.id, vector=vec.tobytes(), dim=model.dim, frames=1)
        )
    session.commit()

    near_fresh = vectors[4] + 0.05 * vectors[0]
    matches, used = search_library(
        session=session, model=model, query=near_fresh, k=3, exclude=set(), collection="acme"
    )
    assert used == version.id
    assert matches[0].video_id == videos[4].id  # fresh addition, found exactly
    assert videos[5].id not in {m.video_id for m in matches}  # other collection

    videos[4].enabled = False
    session.commit()
    matches, _ = search_library(
        session=session, model=model, query=near_fresh, k=3, exclude={videos[0].id}, collection="acme"
    )
    ids = {m.video_id for m in matches}
    assert videos[4].id not in ids and videos[0].id not in ids


def test_json_log_records_carry_the_bound_event_and_extra_fields() -> None:
    import io
    import json
    import logging

    from app.logs import JsonFormatter, log_context

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("vidsim.test.logs")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with log_context(event_id="ev-1", task=None):
            logger.info("served %d results", 3, extra={"video_id": 7})
            try:
                raise ValueError("boom")
            except ValueError:
                logger.exception("failed")
        logger.info("outside")
    finally:
        logger.removeHandler(handler)
    served, failed, outside = (json.loads(line) for line in stream.getvalue().splitlines())
    assert served["message"] == "served 3 results" and served["level"] == "INFO"
    assert served["event_id"] == "ev-1" and served["video_id"] == 7 and "task" not in served
    assert failed["event_id"] == "ev-1" and "ValueError: boom" in failed["exception"]
    assert "event_id" not in outside
