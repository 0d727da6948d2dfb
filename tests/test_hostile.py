"""Hostile input through a live worker: videos, events, message envelopes and callback
URLs that a careless service would choke on, crash on, or be turned against its own
network by. Each must get a clear, recorded reason; the worker stays up; memory stays
bounded; no connection ever reaches an internal address.

Decoder behaviour on the same files is tested without a worker in tests/test_video.py;
address vetting, redirects (``test_redirect_is_not_followed``: a 302 to an internal
address is never followed) and signatures (``test_tampered_wrong_secret_and_stale_are_
rejected``: tampered body, wrong secret, stale timestamp; ``test_rotation_either_secret_
accepts``) in tests/test_callbacks.py. Here, end to end: a worker signing with two secrets
during a rotation, and a tampered or stale copy of a real callback, rejected.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import select
from standardwebhooks.webhooks import WebhookVerificationError
from support.faultkit import Hook, Stack, Supervised, children, rss_mb, shared_stack
from support.media import HOSTILE_BUT_VALID, HOSTILE_REASONS, make_hostile_files, make_video
from support.net import Canary

from app.deliver.outbox import webhook_id_for
from app.deliver.signing import generate_secret, verify
from app.models import Delivery, Event, Recommendation, Video

NEW_SECRET, OLD_SECRET = generate_secret(), generate_secret()
DECODE_TIMEOUT_S = 8
DECODE_MEMORY_MB = 512

# What the worker answers for each hostile file (after "video <id>: "): the decoder's
# refusals (media.HOSTILE_REASONS, tested directly in tests/test_video.py) as seen by a
# chat app, plus the kinds that only make sense through a worker.
EXPECTED = {
    **HOSTILE_REASONS,
    "over_4k": r"^resolution 4096x2304 exceeds limit 8847360 pixels$",
    # AV1: PyAV reads it, decord 0.6.0's bundled FFmpeg has no AV1 decoder.
    "unsupported_codec": r"^cannot decode: ",
    "decoder_hang": rf"^decode timed out after {DECODE_TIMEOUT_S} s$",
}
VALID = {"vfr", "4k"} | set(HOSTILE_BUT_VALID)
# Refused before a video row exists: the answer is the event's error itself.
REFUSED_AT_THE_DOOR = {
    "fifo": r"outside the allowed media roots|file not found|not a regular file",
    "symlink_to_dev_zero": r"outside the allowed media roots$",
    "symlink_to_etc_passwd": r"outside the allowed media roots$",
}

# In the decoding child only (app/media/sandbox.py passes PYTHONPATH on, nothing else): a file
# whose name contains "decoder-hang" makes the "decoder" sleep, as one stuck in C code
# would. The child's wall-clock limit must kill it. Production code has no such hook. A
# spare child gets its request after start-up, on stdin: the hook wraps the request's run.
DECODER_HANG_HOOK = """
import importlib.abc, importlib.util, sys, time
try:
    _cmdline = open("/proc/self/cmdline", "rb").read()
except OSError:
    _cmdline = b""


class _HangOnRequest(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "app.media.decode":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            run = module.run_request

            def run_request(request, *args, **kwargs):
                if "decoder-hang" in str(request.get("path")):
                    time.sleep(3600)
                return run(request, *args, **kwargs)

            module.run_request = run_request

        spec.loader.exec_module = exec_module
        return spec


if b"app.media.child" in _cmdline:
    sys.meta_path.insert(0, _HangOnRequest())
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with shared_stack(
        tmp_path_factory.mktemp("hostile"),
        VIDSIM_CALLBACK_ALLOW_PRIVATE="true",  # the chat app here is on 127.0.0.1
        VIDSIM_WEBHOOK_SECRET=f"{NEW_SECRET},{OLD_SECRET}",  # rotating: both sign
        VIDSIM_DECODE_TIMEOUT_S=str(DECODE_TIMEOUT_S),
        VIDSIM_DECODE_MEMORY_MB=str(DECODE_MEMORY_MB),
        VIDSIM_OUTBOX_SWEEP_INTERVAL_S="0.5",
    ) as s:
        yield s


@pytest.fixture(scope="module")
def worker(stack: Stack) -> Iterator[Supervised]:
    hook_dir = stack.data_dir / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(DECODER_HANG_HOOK)
    root = str(Path(__file__).resolve().parent.parent)
    with stack.beat(), stack.worker(PYTHONPATH=os.pathsep.join([str(hook_dir), root])) as proc:
        yield proc
    assert proc.starts == 1  # the worker never died


@pytest.fixture(scope="module")
def hook() -> Iterator[Hook]:
    with Hook(NEW_SECRET) as h:
        yield h


@pytest.fixture(scope="module")
def library(stack: Stack) -> list[int]:
    return stack.seed_library(6)


def _answers(stack: Stack, hook: Hook, events: list[dict[str, Any]], timeout_s: float = 120) -> dict[str, dict]:
    """Publishes events and returns each one's callback body."""
    published = stack.publish(events)
    assert all(p["ok"] for p in published), published
    ids = {e["event_id"] if "event_id" in e else e["raw"]["event_id"] for e in events}
    got = hook.wait_delivered(ids, timeout_s=timeout_s)
    missing = ids - got.keys()
    assert not missing, f"no callback for {sorted(missing)}\n{stack.log()[-3000:]}"
    return {e: got[e][0].payload for e in ids}


def _pool_rss(worker: Supervised) -> dict[int, float]:
    return {pid: round(rss_mb(pid)) for pid in [worker.pid, *children(worker.pid)]}


def hostile_videos(folder: Path) -> dict[str, Path]:
    """make_hostile_files() plus the kinds a worker meets that a decoder test does not."""
    files = make_hostile_files(folder)
    fast = ("-preset", "ultrafast")
    files["4k"] = make_video(folder / "4k.mp4", seconds=1, width=4096, height=2160, fps=5, extra_args=fast)
    files["over_4k"] = make_video(folder / "over_4k.mp4", seconds=1, width=4096, height=2304, fps=5, extra_args=fast)
    files["unsupported_codec"] = make_video(
        folder / "av1.mp4", seconds=1, width=160, height=120, codec="libaom-av1", extra_args=("-cpu-used", "8")
    )
    files["decoder_hang"] = make_video(
        folder / "decoder-hang.mp4", seconds=1, width=160, height=120, pattern="mandelbrot"
    )
    os.mkfifo(folder / "fifo.mp4")  # a naive decoder would block on it for ever
    files["fifo"] = folder / "fifo.mp4"
    (folder / "zero.mp4").symlink_to("/dev/zero")  # endless bytes
    files["symlink_to_dev_zero"] = folder / "zero.mp4"
    (folder / "passwd.mp4").symlink_to("/etc/passwd")
    files["symlink_to_etc_passwd"] = folder / "passwd.mp4"
    return files


def test_hostile_videos_get_a_reason_and_the_worker_carries_on(
    stack: Stack, worker: Supervised, hook: Hook, library: list[int]
) -> None:
    """Every kind of hostile file, published as an event's video_uri: answered with an
    error callback naming the reason, recorded on the event and the video; the awkward but
    valid ones (VFR, 4K) are served; a hung decoder is killed at its wall-clock limit; the
    decoding child of a 4K file stays within its address-space limit; the worker's own
    processes stay small and keep serving."""
    files = hostile_videos(stack.media_dir / "hostile")
    assert set(files) == set(EXPECTED) | VALID | set(REFUSED_AT_THE_DOOR)
    _answers(
        stack, hook, [{"event_id": f"warm-{uuid.uuid4().hex[:6]}", "video_id": library[0], "callback_url": hook.url}]
    )
    rss_before = _pool_rss(worker)
    events = {
        kind: {"event_id": f"video-{kind}-{uuid.uuid4().hex[:6]}", "video_uri": str(path), "callback_url": hook.url}
        for kind, path in files.items()
    }
    started = time.monotonic()
    answers = _answers(stack, hook, list(events.values()), timeout_s=180)
    elapsed = time.monotonic() - started
    rss_after = _pool_rss(worker)

    outcomes = {}
    with stack.session() as s:
        for kind, event in events.items():
            body = answers[event["event_id"]]
            ev = s.get_one(Event, event["event_id"])
            if kind in VALID:
                assert body["error"] is None and body["results"], (kind, body)
                assert ev.status == "served"
                outcomes[kind] = f"served, {len(body['results'])} results"
                continue
            assert body["results"] == [] and body["error"], (kind, body)
            assert ev.status == "failed" and ev.error == body["error"]
            if kind in REFUSED_AT_THE_DOOR:  # the answer names the client's own URI
                assert re.search(REFUSED_AT_THE_DOOR[kind], body["error"]), (kind, body["error"])
                outcomes[kind] = body["error"].split(": ", 1)[-1]
                continue
            assert str(files[kind]) not in body["error"]  # a decoder's reason never carries the path
            video = s.get_one(Video, ev.video_id)
            assert video.status == "failed" and body["error"] == f"video {video.id}: {video.error}"
            assert re.search(EXPECTED[kind], video.error or ""), (kind, video.error)
            outcomes[kind] = video.error

    assert worker.starts == 1 and Path(f"/proc/{worker.pid}").exists()
    # Decoding runs in throwaway children: the worker's processes grow by the encoder
    # (loaded for the valid files) at most, never by a decoded 4K frame.
    for pid, mb in rss_after.items():
        assert mb < 1500, (pid, mb, rss_before, rss_after)
    after = _answers(
        stack, hook, [{"event_id": f"after-{uuid.uuid4().hex[:6]}", "video_id": library[1], "callback_url": hook.url}]
    )
    assert next(iter(after.values()))["error"] is None
    print(
        f"\nhostile videos ({len(files)} kinds, {elapsed:.1f} s; worker RSS MB before {rss_before}, after {rss_after}):"
    )
    for kind, outcome in sorted(outcomes.items()):
        print(f"  {kind}: {outcome}")


def test_path_traversal_and_outside_files_are_refused(stack: Stack, worker: Supervised, hook: Hook) -> None:
    """video_uri naming a file outside VIDSIM_MEDIA_ROOTS, however spelled, is refused
    before anything reads it; even a real video."""
    outside = make_video(stack.data_dir / "outside" / "real.mp4", seconds=1, width=160, height=120)
    root = stack.media_dir
    uris = {
        "dotdot": f"{root}/../outside/real.mp4",
        "dotdot_file_uri": f"file://{root}/../outside/real.mp4",
        "encoded_dotdot": f"file://{root}/%2e%2e/outside/real.mp4",
        "absolute": str(outside),
        "etc_passwd": f"file://{root}/../../../../../../etc/passwd",
        "proc_self": "/proc/self/environ",
        "relative": "../../etc/shadow",
    }
    events = [
        {"event_id": f"path-{k}-{uuid.uuid4().hex[:6]}", "video_uri": u, "callback_url": hook.url}
        for k, u in uris.items()
    ]
    answers = _answers(stack, hook, events)
    with stack.session() as s:
        for event in events:
            body = answers[event["event_id"]]
            assert body["results"] == [] and body["error"].endswith("outside the allowed media roots"), body
            assert s.scalar(select(Video).where(Video.local_path == str(outside))) is None  # never registered


def _raw(event_id: str, **fields: Any) -> dict[str, Any]:
    return {"raw": {"event_id": event_id, **fields}}


def test_hostile_events_are_recorded_and_answered_with_a_reason(
    stack: Stack, worker: Supervised, hook: Hook, library: list[int]
) -> None:
    """Malformed, missing and wrong-typed fields, unknown ids, huge k, oversized payloads:
    each recorded as a failed event with its reason, and answered when it names a URL."""
    tag = uuid.uuid4().hex[:6]
    url = hook.url
    cases: dict[str, tuple[dict[str, Any], str]] = {
        "missing_video": (_raw(f"missing-video-{tag}", callback_url=url), "exactly one of video_id or video_uri"),
        "both_videos": (_raw(f"both-{tag}", video_id=library[0], video_uri="/x.mp4", callback_url=url), "exactly one"),
        "video_id_string": (
            _raw(f"vid-str-{tag}", video_id="seven", callback_url=url),
            "video_id: Input should be a valid integer",
        ),
        "video_id_float": (
            _raw(f"vid-float-{tag}", video_id=1.5, callback_url=url),
            "video_id: Input should be a valid integer",
        ),
        "video_id_negative": (
            _raw(f"vid-neg-{tag}", video_id=-3, callback_url=url),
            "video_id: Input should be greater than or equal to 1",
        ),
        "video_id_list": (
            _raw(f"vid-list-{tag}", video_id=[1, 2], callback_url=url),
            "video_id: Input should be a valid integer",
        ),
        "k_string": (
            _raw(f"k-str-{tag}", video_id=library[0], k="five", callback_url=url),
            "k: Input should be a valid integer",
        ),
        "k_zero": (
            _raw(f"k-zero-{tag}", video_id=library[0], k=0, callback_url=url),
            "k: Input should be greater than or equal to 1",
        ),
        "k_huge": (
            _raw(f"k-huge-{tag}", video_id=library[0], k=10**9, callback_url=url),
            "k=1000000000 is over the limit of 100",
        ),
        "k_bigint": (_raw(f"k-big-{tag}", video_id=library[0], k=10**40, callback_url=url), "is over the limit of 100"),
        "unknown_video": (_raw(f"unknown-{tag}", video_id=987654321, callback_url=url), "unknown video id 987654321"),
        "oversized": (
            _raw(f"big-{tag}", video_id=library[0], callback_url=url, padding="x" * 1_000_000),
            "over the 16384-byte limit",
        ),
        "collection_huge": (
            _raw(f"coll-{tag}", video_id=library[0], collection="c" * 5000, callback_url=url),
            "collection: String should have at most 200 characters",
        ),
        "uri_scheme": (
            _raw(f"scheme-{tag}", video_uri="gopher://127.0.0.1:70/x.mp4", callback_url=url),
            "outside the allowed media roots",
        ),
        "uri_empty": (
            _raw(f"uri-empty-{tag}", video_uri="", callback_url=url),
            "video_uri: String should have at least 1 character",
        ),
    }
    answers = _answers(stack, hook, [event for event, _ in cases.values()])
    with stack.session() as s:
        for kind, (event, reason) in cases.items():
            event_id = event["raw"]["event_id"]
            body = answers[event_id]
            assert body["results"] == [] and reason in (body["error"] or ""), (kind, body["error"])
            ev = s.get_one(Event, event_id)
            assert ev.status == "failed" and ev.error == body["error"], kind
            assert s.scalar(select(Recommendation).where(Recommendation.event_id == event_id)) is not None

    # Without a usable callback URL or event id: recorded only, under the message's id.
    before = _count_invalid(stack)
    no_answer = [
        {"raw": "{not json"},
        {"raw": [1, 2, 3]},
        {"raw": None},
        {"raw": 42},
        {"raw": {"event_id": 123, "video_id": 1, "callback_url": url}},
        {"raw": {"event_id": "x" * 500, "video_id": 1}},
        {"raw": "x" * 100_000},
    ]
    assert all(p["ok"] for p in stack.publish(no_answer))
    deadline = time.monotonic() + 60
    while _count_invalid(stack) - before < len(no_answer) and time.monotonic() < deadline:
        time.sleep(0.5)
    with stack.session() as s:
        recorded = s.scalars(select(Event).where(Event.event_id.like("invalid-%"))).all()
        by_raw = {e.payload["raw"]: e.error for e in recorded}  # the raw event, as repr()
    reasons = [by_raw.get(repr(item["raw"])[:2000]) for item in no_answer]
    assert all(r and (r.startswith("invalid event") or r.startswith("event ")) for r in reasons), reasons
    # event_id 123 names a URL: it is answered (under the fallback id) as well.
    assert any(r.payload and r.payload["event_id"].startswith("invalid-") for r in hook.requests)
    print(f"\nhostile events ({len(cases) + len(no_answer)} kinds):")
    for kind, (event, _) in cases.items():
        print(f"  {kind}: {answers[event['raw']['event_id']]['error'][:110]}")
    for raw, reason in zip(no_answer, reasons, strict=True):
        print(f"  {repr(raw['raw'])[:40]}: {reason[:110]}")


def _count_invalid(stack: Stack) -> int:
    from sqlalchemy import func

    with stack.session() as s:
        return s.scalar(select(func.count()).where(Event.event_id.like("invalid-%"))) or 0


def test_hostile_message_envelopes_do_not_stop_the_worker(
    stack: Stack, worker: Supervised, hook: Hook, library: list[int]
) -> None:
    """What a broken non-Python producer might push onto the events list: not JSON, a body
    that is not base64, an unknown task, arguments of the wrong shape. Celery drops or
    fails them (they never reach app code, so nothing is recorded in Postgres: the
    worker's log says why); the worker keeps serving."""
    import base64
    import json

    client = redis.Redis.from_url(stack.redis_url)
    queue = stack.prefix + "events"

    def message(body: Any, task: str = "vidsim.video_selected", raw_body: str | None = None) -> str:
        encoded = raw_body if raw_body is not None else base64.b64encode(json.dumps(body).encode()).decode()
        return json.dumps(
            {
                "body": encoded,
                "content-encoding": "utf-8",
                "content-type": "application/json",
                "headers": {"lang": "py", "task": task, "id": str(uuid.uuid4()), "retries": 0},
                "properties": {
                    "delivery_tag": str(uuid.uuid4()),
                    "body_encoding": "base64",
                    "delivery_mode": 2,
                    "delivery_info": {"exchange": "", "routing_key": "events"},
                    "priority": 0,
                },
            }
        )

    envelopes = {
        "not_json": "{this is not json",
        "body_not_base64": message(None, raw_body="%%%not base64%%%"),
        "body_not_json": message(None, raw_body=base64.b64encode(b"\xff\xfe not json").decode()),
        "unknown_task": message([[], {}, {}], task="vidsim.no_such_task"),
        "too_many_args": message([[1, 2, 3], {}, {}]),
        "unknown_kwarg_types": message(
            [
                [],
                {"event": {"event_id": f"kw-{uuid.uuid4().hex[:6]}", "video_id": {"$gt": 1}, "callback_url": hook.url}},
                {},
            ]
        ),
    }
    for raw in envelopes.values():
        client.lpush(queue, raw)
    client.close()
    after = _answers(
        stack,
        hook,
        [{"event_id": f"after-env-{uuid.uuid4().hex[:6]}", "video_id": library[2], "callback_url": hook.url}],
    )
    assert next(iter(after.values()))["error"] is None
    assert worker.starts == 1
    log = stack.log()
    assert "vidsim.no_such_task" in log  # Celery: "Received unregistered task"
    print(f"\nhostile envelopes ({len(envelopes)} kinds): the worker logged and dropped or failed them; still serving")


def test_rotated_secrets_both_verify_and_tampering_is_rejected(
    stack: Stack, worker: Supervised, library: list[int]
) -> None:
    """The worker signs with both secrets during a rotation: receivers holding either
    accept; a tampered body or a stale timestamp on that same real callback is rejected."""
    with Hook(OLD_SECRET) as old_hook:
        event_id = f"rotate-{uuid.uuid4().hex[:6]}"
        stack.publish([{"event_id": event_id, "video_id": library[0], "callback_url": old_hook.url}])
        got = old_hook.wait_delivered({event_id}, timeout_s=60)
        assert event_id in got and not [r for r in old_hook.requests if not r.verified]
    with stack.session() as s:
        delivery = s.scalars(select(Delivery).where(Delivery.webhook_id == webhook_id_for(event_id))).one()
    # Re-sign the stored body as the worker does, then tamper with the copy.
    from app.deliver.signing import sign

    body = delivery.body.encode()
    headers = sign(secrets=[NEW_SECRET, OLD_SECRET], msg_id=delivery.webhook_id, timestamp=int(time.time()), body=body)
    assert verify(secret=NEW_SECRET, headers=headers, body=body)["event_id"] == event_id
    assert verify(secret=OLD_SECRET, headers=headers, body=body)["event_id"] == event_id
    with pytest.raises(WebhookVerificationError):
        verify(secret=NEW_SECRET, headers=headers, body=body.replace(b'"error":null', b'"error":"x"'))
    stale = sign(secrets=[NEW_SECRET], msg_id=delivery.webhook_id, timestamp=int(time.time()) - 600, body=body)
    with pytest.raises(WebhookVerificationError, match="too old"):
        verify(secret=NEW_SECRET, headers=stale, body=body)


# --------------------------------------------------------------------------- SSRF


def test_hostile_callback_urls_are_refused_without_connecting(tmp_path: Path) -> None:
    """With VIDSIM_CALLBACK_ALLOW_PRIVATE=false (the default), callbacks to private,
    loopback, link-local and metadata addresses, IPv4-mapped IPv6, decimal/octal/hex IPs,
    names that resolve to loopback (checked when connecting), and non-http schemes are
    refused: the delivery is dead-lettered at once with a "blocked:" reason, and nothing
    ever connects (a canary listens on the loopback port they name). A video_uri on an
    internal address is refused the same way, before any download."""
    with shared_stack(
        tmp_path / "ssrf", VIDSIM_CALLBACK_ALLOW_PRIVATE="false", VIDSIM_OUTBOX_SWEEP_INTERVAL_S="0.5"
    ) as stack:
        library = stack.seed_library(3)
        with Canary() as canary, stack.beat(), stack.worker(queues="events,callbacks,maintenance") as worker:
            p = canary.port
            urls = {
                "private_10": "http://10.0.0.1/hook",
                "private_192": "http://192.168.1.10/hook",
                "private_172": "http://172.16.0.1/hook",
                "loopback": f"http://127.0.0.1:{p}/hook",
                "loopback_other": f"http://127.8.9.10:{p}/hook",
                "localhost_name": f"http://localhost:{p}/hook",
                "loopback_v6": f"http://[::1]:{p}/hook",
                "unspecified": f"http://0.0.0.0:{p}/hook",
                "link_local": "http://169.254.10.20/hook",
                "metadata": "http://169.254.169.254/latest/meta-data/",
                "metadata_v6": "http://[fd00:ec2::254]/latest/meta-data/",
                "link_local_v6": "http://[fe80::1]/hook",
                "ula_v6": "http://[fc00::1]/hook",
                "mapped_loopback": f"http://[::ffff:127.0.0.1]:{p}/hook",
                "mapped_metadata": "http://[::ffff:169.254.169.254]/",
                "nat64_metadata": "http://[64:ff9b::a9fe:a9fe]/",
                "decimal": f"http://2130706433:{p}/hook",
                "octal": f"http://0177.0.0.1:{p}/hook",
                "hex": f"http://0x7f000001:{p}/hook",
                "short": f"http://127.1:{p}/hook",
                "decimal_metadata": "http://2852039166/",
                "cgnat": "http://100.64.0.1/hook",
                "credentials": f"http://user:pass@127.0.0.1:{p}/hook",
                "ftp": "ftp://example.com/hook",
                "file": "file:///etc/passwd",
                "gopher": f"gopher://127.0.0.1:{p}/_hook",
                "javascript": "javascript:alert(1)",
                "data": "data:text/plain,hello",
                "no_host": "http:///hook",
            }
            events = [
                {"event_id": f"ssrf-{k}-{uuid.uuid4().hex[:6]}", "video_id": library[0], "callback_url": u}
                for k, u in urls.items()
            ]
            video_urls = {
                "video_loopback": f"http://127.0.0.1:{p}/v.mp4",
                "video_metadata": "http://169.254.169.254/v.mp4",
                "video_decimal": f"http://2130706433:{p}/v.mp4",
            }
            events += [
                {"event_id": f"ssrf-{k}-{uuid.uuid4().hex[:6]}", "video_uri": u, "callback_url": urls["loopback"]}
                for k, u in video_urls.items()
            ]
            assert all(r["ok"] for r in stack.publish(events))
            ids = [e["event_id"] for e in events]

            def settled() -> dict | None:
                out = stack.outcomes(ids)
                done = all(o["delivery"] is not None and o["delivery"]["status"] != "pending" for o in out.values())
                return out if done else None

            deadline = time.monotonic() + 60
            while (outcomes := settled()) is None and time.monotonic() < deadline:
                time.sleep(0.5)
            assert outcomes is not None, stack.outcomes(ids)
            time.sleep(1.5)  # a retry, if there were one, would come now
            outcomes = stack.outcomes(ids)
            assert worker.starts == 1
        for event_id, o in outcomes.items():
            d = o["delivery"]
            # Dead at once: a blocked address is policy, not a transient failure.
            assert d["status"] == "dead" and d["attempts"] == 1, (event_id, d)
            assert d["last_error"].startswith("blocked: "), (event_id, d)
        video_events = [e["event_id"] for e in events if "video_uri" in e]
        for event_id in video_events:
            assert outcomes[event_id]["status"] == "failed" and outcomes[event_id]["recommendations"] == 1
        assert canary.connections == [], canary.connections
        print(f"\nSSRF: {len(urls)} callback URLs and {len(video_urls)} video URLs, all refused, 0 connections:")
        for e in events:
            o = outcomes[e["event_id"]]
            print(
                f"  {e['event_id'].rsplit('-', 1)[0][5:]}: {o['delivery']['last_error'][:100]}"
                + (f" | event: {o.get('error', '')[:80]}" if "video_uri" in e else "")
            )


# --------------------------------------------------------------------------- soak


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_rss_of_one_worker_process_stays_flat_over_1000_decodes(tmp_path: Path) -> None:
    """One solo-pool worker process embeds 1000 library videos (each decoded in a
    throwaway child, then embedded in the worker): its resident memory, sampled as it
    goes, stays within 10 % of what it was after the first 100."""
    from sqlalchemy import func

    from app.models import Embedding

    n, warm_up = 1000, 100
    with shared_stack(tmp_path / "soak") as stack:
        sources = [
            make_video(stack.media_dir / f"src-{i}.mp4", seconds=2, width=w, height=h, pattern=pattern)
            for i, (pattern, w, h) in enumerate(
                [("testsrc2", 320, 240), ("mandelbrot", 160, 120), ("smptebars", 640, 360), ("rgbtestsrc", 320, 180)]
            )
        ]
        with stack.session() as s:  # distinct rows over a few real files: each row is decoded anew
            s.add_all(
                [
                    Video(
                        uri=f"{sources[i % len(sources)].as_uri()}#{i}",
                        local_path=str(sources[i % len(sources)]),
                        in_library=True,
                        status="registered",
                    )
                    for i in range(n)
                ]
            )
        samples: list[tuple[int, float]] = []  # (embedded so far, RSS MB of the worker process)
        started = time.monotonic()
        with stack.worker(pool="solo", queues="embed") as worker:
            out = stack.cli("backfill")
            assert out.returncode == 0, out.stderr
            done = 0
            while done < n and time.monotonic() - started < 3600:
                time.sleep(2)
                with stack.session() as s:
                    done = s.scalar(select(func.count()).select_from(Embedding)) or 0
                samples.append((done, rss_mb(worker.pid)))
            assert worker.starts == 1
        elapsed = time.monotonic() - started
        with stack.session() as s:
            failed = s.scalar(select(func.count()).where(Video.status == "failed")) or 0
        assert done == n and failed == 0, (done, failed)
        baseline = max(mb for k, mb in samples if k <= warm_up)
        peak = max(mb for k, mb in samples if k > warm_up)
        table = [(k, round(mb)) for k, mb in samples[:: max(1, len(samples) // 20)]]
        print(
            f"\nRSS soak: {n} decodes + embeds in one worker process in {elapsed:.0f} s; RSS after {warm_up}: "
            f"{baseline:.0f} MB, peak after: {peak:.0f} MB ({(peak / baseline - 1) * 100:+.1f} %); "
            f"final {samples[-1][1]:.0f} MB; (decodes, MB): {table}"
        )
        assert peak <= 1.10 * baseline
