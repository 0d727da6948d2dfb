"""The public event path end to end, through a live Celery worker on real Redis and
Postgres, with real decoding and a real local HTTP server as the chat app."""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path

import pytest
import redis
from sqlalchemy import func, select
from support.helpers import wait_until
from support.media import make_video, own_hue, run_ffmpeg

from app.db import session_scope
from app.deliver.outbox import webhook_id_for
from app.evaluate.footage import real_footage
from app.index.rebuild import rebuild_index
from app.learn.registry import active_model
from app.media.register import register
from app.models import Delivery, DeliveryAttempt, Embedding, Event, Recommendation, Video
from workers.publish import publish_video_selected
from workers.tasks import embed_video


def _embedded(video_ids: list[int]) -> bool:
    with session_scope() as s:
        model = active_model(session=s)
        n = s.scalar(
            select(func.count()).where(Embedding.video_id.in_(video_ids), Embedding.model_version_id == model.id)
        )
        failed = s.scalar(select(func.count()).where(Video.id.in_(video_ids), Video.status == "failed"))
        return (n or 0) + (failed or 0) == len(video_ids)


@pytest.fixture(scope="module")
def library(data_dir: Path, settings, worker) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """A small library of real encoded videos, embedded by the worker, then indexed."""
    media = data_dir / "library"
    files = {
        # Hues of their own: other tests' testsrc2 and mandelbrot videos in the same
        # database would be sources as good as these (the same frames, another encode).
        "testsrc": make_video(media / "testsrc.mp4", seconds=5, pattern="testsrc2", extra_vf=own_hue()),
        "mandelbrot": make_video(media / "mandelbrot.mp4", seconds=5, pattern="mandelbrot", extra_vf=own_hue()),
        "bars": make_video(media / "bars.mp4", seconds=5, pattern="smptebars", extra_vf="hue=H=t"),
    }
    for footage in real_footage(data_dir / "footage")[:3]:
        files[footage.name] = make_video(media / f"{footage.name}.mp4", source=footage.path, seconds=4)
    with session_scope() as s:
        ids = {name: register(s, str(path), settings=settings).video_id for name, path in files.items()}
    for video_id in ids.values():
        embed_video.delay(video_id)
    wait_until(lambda: _embedded(list(ids.values())), timeout_s=240, what="the library to be embedded")
    with session_scope() as s:
        rebuild_index(session=s, model=active_model(session=s), settings=settings)
    return ids


def _rec(event_id: str) -> Recommendation | None:
    with session_scope() as s:
        return s.scalar(select(Recommendation).where(Recommendation.event_id == event_id))


def test_event_by_library_id_gets_signed_callback(library, receiver, settings) -> None:  # type: ignore[no-untyped-def]
    query_id = library["testsrc"]
    event_id = publish_video_selected(video_id=query_id, callback_url=receiver.url, k=3)
    got = receiver.wait_for({event_id}, timeout_s=60)[event_id]

    body = got.payload
    assert body["event_id"] == event_id
    assert body["error"] is None
    assert body["query"]["video_id"] == query_id
    assert len(body["results"]) == 3
    assert [r["rank"] for r in body["results"]] == [1, 2, 3]
    assert query_id not in {r["video_id"] for r in body["results"]}
    assert set(body["results"][0]) == {"video_id", "uri", "score", "match", "calibrated", "near_duplicate", "rank",
                                        "query_start_s", "query_end_s", "start_s", "end_s"}  # fmt: skip
    # The fused score: the alignment plus the first stage's share, flagged by its threshold.
    threshold = settings.rerank_near_duplicate_threshold
    assert all(r["near_duplicate"] is (r["calibrated"] >= threshold) for r in body["results"])
    # Ranked by the second stage: frame alignment fused with the first stage, "calibrated".
    finals = [r["calibrated"] for r in body["results"]]
    assert finals == sorted(finals, reverse=True) and all(r["match"] is not None for r in body["results"])
    assert body["model_version"] and body["index_version"] is not None
    assert got.webhook_id == webhook_id_for(event_id)
    assert receiver.rejected == []

    with session_scope() as s:
        rec = s.scalar(select(Recommendation).where(Recommendation.event_id == event_id))
        assert rec is not None and rec.error is None
        delivery = s.scalar(select(Delivery).where(Delivery.recommendation_id == rec.id))
        assert delivery is not None
        wait_until(lambda: s.get(Delivery, delivery.id, populate_existing=True).status == "delivered", what="delivered")
        attempts = s.scalars(select(DeliveryAttempt).where(DeliveryAttempt.delivery_id == delivery.id)).all()
        assert [a.status_code for a in attempts] == [200]
        assert s.get_one(Event, event_id).status == "served"


def test_edited_copy_not_in_library_finds_its_source(library, receiver, data_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """Cold path: a URI never seen is decoded, embedded and searched; it is not added to
    the library, so it is never recommended to anyone else."""
    src = data_dir / "library" / "mandelbrot.mp4"
    copy = make_video(data_dir / "queries" / f"copy-{uuid.uuid4().hex[:6]}.mp4", source=src, seconds=4,
                      source_start_s=0.5, extra_vf="scale=240:180")  # fmt: skip
    event_id = publish_video_selected(video_uri=str(copy), callback_url=receiver.url)
    body = receiver.wait_for({event_id}, timeout_s=120)[event_id].payload
    assert body["error"] is None, body["error"]
    assert body["results"][0]["video_id"] == library["mandelbrot"]
    assert len(body["results"]) == 5

    with session_scope() as s:
        query = s.get_one(Video, body["query"]["video_id"])
        assert query.in_library is False and query.status == "ready"
    other = publish_video_selected(video_id=library["mandelbrot"], callback_url=receiver.url, k=10)
    results = receiver.wait_for({other}, timeout_s=60)[other].payload["results"]
    assert body["query"]["video_id"] not in {r["video_id"] for r in results}


def test_clip_inserted_into_other_footage_is_found_and_located(library, receiver, data_dir: Path, settings) -> None:  # type: ignore[no-untyped-def]
    """The second stage: four seconds of a library video (its seconds 3-7) inserted
    between six seconds of other footage on each side. The callback names the library
    video first and says where the match is: the query's seconds 6-10 = its seconds 3-7
    (within a frame step: frames are sampled once a second)."""
    footage = real_footage(data_dir / "footage")
    hue = own_hue()
    long_clip = make_video(data_dir / "library" / f"long-{uuid.uuid4().hex[:6]}.mp4", source=footage[-1].path,
                           seconds=10, extra_vf=f"scale=320:240,{hue}")  # fmt: skip
    with session_scope() as s:
        clip_id = register(s, str(long_clip), settings=settings).video_id
    embed_video.delay(clip_id)
    wait_until(lambda: _embedded([clip_id]), timeout_s=120, what="the long clip to be embedded")
    query = data_dir / "queries" / f"inserted-{uuid.uuid4().hex[:6]}.mp4"
    query.parent.mkdir(parents=True, exist_ok=True)
    run_ffmpeg(
        "-t", "6", "-f", "lavfi", "-i", "life=size=320x240:rate=25:mold=10",
        "-ss", "3", "-t", "4", "-i", long_clip,
        "-t", "6", "-f", "lavfi", "-i", "cellauto=size=320x240:rate=25",
        "-filter_complex",
        "[0:v]format=yuv420p,setsar=1[a];[1:v]fps=25,format=yuv420p,setsar=1[b];[2:v]format=yuv420p,setsar=1[c];"
        "[a][b][c]concat=n=3:v=1:a=0[v]",
        "-map", "[v]", "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", query,
    )  # fmt: skip
    event_id = publish_video_selected(video_uri=str(query), callback_url=receiver.url)
    body = receiver.wait_for({event_id}, timeout_s=120)[event_id].payload
    assert body["error"] is None, body["error"]
    top = body["results"][0]
    assert top["video_id"] == clip_id, body["results"]
    assert top["match"] is not None and top["match"] > body["results"][1]["match"]
    located = (top["query_start_s"], top["query_end_s"], top["start_s"], top["end_s"])
    assert located == pytest.approx((6.0, 10.0, 3.0, 7.0), abs=1.5), located


def test_worker_logs_follow_one_event_across_tasks(library, receiver, data_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """Worker logs are JSON lines; a cold event's id is a field on the records of every
    task that worked for it, so one query finds its whole path."""
    tag = uuid.uuid4()
    # A hue of its own: content seen before is registered once and would be served warm.
    copy = make_video(data_dir / "queries" / f"logged-{tag.hex[:6]}.mp4", seconds=3, pattern="testsrc2",
                      extra_vf=f"hue=h={tag.int % 3600 / 10}")  # fmt: skip
    event_id = publish_video_selected(video_uri=str(copy), callback_url=receiver.url)
    receiver.wait_for({event_id}, timeout_s=120)

    def tasks_logged() -> set[str]:
        lines = (data_dir / "worker.log").read_text().splitlines()
        records = [json.loads(line) for line in lines if line.startswith("{")]
        mine = [r for r in records if r.get("event_id") == event_id]
        # The callback's first attempt is made by the task that served the event.
        return {r["task"] for r in mine} | {"delivery" for r in mine if r.get("delivery_id") is not None}

    wanted = {"vidsim.video_selected", "vidsim.embed_video", "vidsim.serve_event", "delivery"}
    try:
        wait_until(lambda: wanted <= tasks_logged(), timeout_s=30, what=f"records of {sorted(wanted)} for the event")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; found {sorted(tasks_logged())}") from None


def test_same_event_id_twice_gives_one_recommendation(library, receiver) -> None:  # type: ignore[no-untyped-def]
    event_id = f"dup-{uuid.uuid4().hex}"
    publish_video_selected(event_id=event_id, video_id=library["bars"], callback_url=receiver.url)
    receiver.wait_for({event_id}, timeout_s=60)
    publish_video_selected(event_id=event_id, video_id=library["bars"], callback_url=receiver.url)
    marker = publish_video_selected(video_id=library["bars"], callback_url=receiver.url)
    receiver.wait_for({marker}, timeout_s=60)  # the worker has handled the duplicate by now

    with session_scope() as s:
        assert s.scalar(select(func.count()).where(Recommendation.event_id == event_id)) == 1
    assert [r.webhook_id for r in receiver.received if r.payload["event_id"] == event_id] == [webhook_id_for(event_id)]


def test_unknown_video_id_is_answered_with_a_reason(library, receiver) -> None:  # type: ignore[no-untyped-def]
    event_id = publish_video_selected(video_id=987654321, callback_url=receiver.url)
    body = receiver.wait_for({event_id}, timeout_s=60)[event_id].payload
    assert body["results"] == []
    assert body["error"] == "unknown video id 987654321"
    with session_scope() as s:
        ev = s.get_one(Event, event_id)
        assert ev.status == "failed" and ev.error == "unknown video id 987654321"


def test_corrupt_video_is_recorded_and_worker_carries_on(library, receiver, data_dir: Path, worker) -> None:  # type: ignore[no-untyped-def]
    good = make_video(data_dir / "queries" / "whole.mp4", seconds=4, pattern="testsrc2")
    broken = data_dir / "queries" / f"truncated-{uuid.uuid4().hex[:6]}.mp4"
    broken.write_bytes(good.read_bytes()[: good.stat().st_size // 3])

    event_id = publish_video_selected(video_uri=str(broken), callback_url=receiver.url)
    body = receiver.wait_for({event_id}, timeout_s=60)[event_id].payload
    assert body["results"] == [] and body["error"]
    with session_scope() as s:
        video = s.scalar(select(Video).where(Video.uri == broken.resolve().as_uri()))
        assert video is not None and video.status == "failed" and video.error
        assert video.error in body["error"]

    assert worker.poll() is None
    after = publish_video_selected(video_id=library["testsrc"], callback_url=receiver.url)
    assert receiver.wait_for({after}, timeout_s=60)[after].payload["error"] is None


def test_uri_outside_media_roots_is_refused(library, receiver) -> None:  # type: ignore[no-untyped-def]
    event_id = publish_video_selected(video_uri="/etc/passwd", callback_url=receiver.url)
    body = receiver.wait_for({event_id}, timeout_s=60)[event_id].payload
    assert "outside the allowed media roots" in body["error"]


def test_callback_failing_then_succeeding_is_retried_from_the_outbox(library, receiver) -> None:  # type: ignore[no-untyped-def]
    answers = iter([(500, {}), (503, {"Retry-After": "1"})])
    receiver.respond = lambda payload: next(answers, (200, {}))
    event_id = publish_video_selected(video_id=library["testsrc"], callback_url=receiver.url)
    receiver.wait_for({event_id}, timeout_s=60)

    with session_scope() as s:
        rec = s.scalars(select(Recommendation).where(Recommendation.event_id == event_id)).one()
        delivery = s.scalars(select(Delivery).where(Delivery.recommendation_id == rec.id)).one()
        wait_until(lambda: s.get(Delivery, delivery.id, populate_existing=True).status == "delivered", what="delivered")
        attempts = s.scalars(
            select(DeliveryAttempt).where(DeliveryAttempt.delivery_id == delivery.id).order_by(DeliveryAttempt.attempt)
        ).all()
    assert [a.status_code for a in attempts] == [500, 503, 200]
    assert attempts[0].error == "HTTP 500"
    assert (attempts[2].attempted_at - attempts[1].attempted_at).total_seconds() >= 0.9  # Retry-After honoured


def test_unreachable_callback_goes_dead_after_the_schedule(library) -> None:  # type: ignore[no-untyped-def]
    import socket

    with socket.socket() as sock:  # a port with nobody listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    event_id = publish_video_selected(video_id=library["testsrc"], callback_url=f"http://127.0.0.1:{port}/hook")

    def dead() -> Delivery | None:
        with session_scope() as s:
            d = s.scalar(select(Delivery).join(Recommendation).where(Recommendation.event_id == event_id))
            return d if d is not None and d.status == "dead" else None

    delivery = wait_until(dead, timeout_s=60, what="the delivery to be dead-lettered")
    assert delivery.attempts == 4  # the test schedule: 0, 0.5, 0.5, 0.5
    assert "refused" in (delivery.last_error or "")


def test_malformed_event_is_recorded_with_a_reason(library, receiver) -> None:  # type: ignore[no-untyped-def]
    from workers.app import celery_app

    event_id = f"bad-{uuid.uuid4().hex[:8]}"
    celery_app.send_task(
        "vidsim.video_selected",
        kwargs={"event": {"event_id": event_id, "video_id": "seven", "callback_url": receiver.url}},
    )
    body = receiver.wait_for({event_id}, timeout_s=60)[event_id].payload
    assert body["error"].startswith("invalid event: video_id")
    celery_app.send_task("vidsim.video_selected", kwargs={"event": "not json at all"})

    def recorded() -> Event | None:
        with session_scope() as s:
            return s.scalar(select(Event).where(Event.event_id.like("invalid-%")))

    ev = wait_until(recorded, timeout_s=60, what="the malformed event to be recorded")
    assert ev.status == "failed" and "invalid event" in (ev.error or "")


def test_raw_message_from_a_non_python_producer(library, receiver) -> None:  # type: ignore[no-untyped-def]
    """The README's raw message, pushed to Redis without Celery, is served."""
    event_id = f"raw-{uuid.uuid4().hex[:8]}"
    event = {"event_id": event_id, "video_id": library["bars"], "k": 2, "callback_url": receiver.url}
    body = json.dumps([[], {"event": event}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
    message = {
        "body": base64.b64encode(body.encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"lang": "py", "task": "vidsim.video_selected", "id": str(uuid.uuid4()), "root_id": None,
                    "parent_id": None, "group": None, "retries": 0, "eta": None, "expires": None},
        "properties": {"correlation_id": str(uuid.uuid4()), "reply_to": "", "delivery_mode": 2,
                       "delivery_tag": str(uuid.uuid4()), "body_encoding": "base64", "priority": 0,
                       "delivery_info": {"exchange": "", "routing_key": "events"}},
    }  # fmt: skip
    from app.config import get_settings

    settings = get_settings()
    redis.Redis.from_url(settings.redis_url).lpush(settings.broker_prefix + "events", json.dumps(message))
    payload = receiver.wait_for({event_id}, timeout_s=60)[event_id].payload
    assert payload["error"] is None and len(payload["results"]) == 2
