"""What an operator touches: the CLI against real services, the metrics endpoint, the
README's code examples, and the results page in real headless Chromium."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import start_worker
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select
from support.helpers import wait_until
from support.media import make_video, own_hue

from app.db import session_scope
from app.models import Event, Video

README = Path(__file__).resolve().parent.parent / "README.md"


def vidsim(*args: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "250", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.cli", *args], capture_output=True, text=True, timeout=300, env=env
    )
    if check:
        assert proc.returncode == 0, proc.stderr + proc.stdout
    return proc


@pytest.fixture(scope="module")
def two_videos(data_dir: Path) -> list[Path]:
    folder = data_dir / "operator"
    return [
        make_video(folder / "a.mp4", seconds=3, pattern="testsrc2"),
        make_video(folder / "b.mp4", seconds=3, pattern="mandelbrot"),
    ]


def test_cli_library_backfill_index_and_status(two_videos: list[Path]) -> None:
    out = vidsim("library", "add", str(two_videos[0].parent), "--collection", "operator").stdout
    assert "2 added" in out or "already known" in out
    again = vidsim("library", "add", str(two_videos[0])).stdout
    assert "0 added, 1 already known" in again  # the same content is registered once

    assert "embedded" in vidsim("backfill", "--inline").stdout
    assert "index version" in vidsim("index", "rebuild").stdout
    assert "a.mp4" in vidsim("library", "list").stdout
    status = vidsim("status").stdout
    assert "model:" in status and "index:" in status and "queues:" in status and "workers:" in status


def _embedded(paths: list[Path], settings, *, in_library: bool = True) -> list[int]:  # type: ignore[no-untyped-def]
    """The videos registered and embedded with the active model, here (no worker)."""
    from app.media.register import register
    from app.serve import recommend

    ids = []
    for path in paths:
        with session_scope() as s:
            ids.append(register(s, str(path), settings=settings, in_library=in_library).video_id)
        assert recommend.embed_video(ids[-1], sessions=session_scope, settings=settings).ok
    return ids


def test_index_rebuild_builds_what_the_settings_ask(two_videos: list[Path], settings) -> None:  # type: ignore[no-untyped-def]
    """VIDSIM_INDEX_DTYPE takes effect at the next `vidsim index rebuild`, as the README
    says; --dtype overrides it for one build."""
    _embedded(two_videos, settings)
    assert re.search(r"-d f32,", vidsim("index", "rebuild", env={"VIDSIM_INDEX_DTYPE": "f32"}).stdout)
    assert re.search(r"-d i8,", vidsim("index", "rebuild", "--dtype", "i8", env={"VIDSIM_INDEX_DTYPE": "f32"}).stdout)
    assert re.search(r"-d f16,", vidsim("index", "rebuild").stdout)  # the setting's default


def test_status_counts_library_videos_only(data_dir: Path, two_videos: list[Path], settings) -> None:  # type: ignore[no-untyped-def]
    """`vidsim status` says how many library videos the active model embedded, out of how
    many: a query-only video (a cold event's) embedded too is not one of them."""
    from sqlalchemy import func

    from app.learn.registry import active_model
    from app.models import Embedding

    _embedded(two_videos, settings)
    query = make_video(data_dir / "operator" / "query-only.mp4", seconds=2, pattern="smptebars")
    [query_id] = _embedded([query], settings, in_library=False)
    with session_scope() as s:
        model_id = active_model(session=s).id
        assert s.get_one(Video, query_id).in_library is False
        shown = Video.in_library.is_(True) & Video.enabled.is_(True)
        library = s.scalar(select(func.count()).select_from(Video).where(shown))
        embedded = s.scalar(
            select(func.count()).select_from(Embedding).join(Video, Video.id == Embedding.video_id)
            .where(Embedding.model_version_id == model_id, shown)
        )  # fmt: skip
    out = vidsim("status").stdout
    found = re.search(r"(\d+)/(\d+) library videos embedded", out)
    assert found, out
    assert (int(found.group(1)), int(found.group(2))) == (embedded, library), out
    assert embedded <= library


def test_cli_errors_are_one_line_with_a_fix() -> None:
    proc = vidsim("library", "disable", "987654321", check=False)
    assert proc.returncode == 1
    assert "error: unknown video id 987654321" in proc.stderr and "fix:" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = vidsim("deliveries", "replay", "987654321", check=False)
    assert proc.returncode == 1 and "unknown delivery id" in proc.stderr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def metrics_worker(data_dir: Path, settings, name: str) -> Iterator[tuple[int, dict[str, str]]]:  # type: ignore[no-untyped-def]
    """A live prefork worker serving metrics on a free port, on a database and broker keys
    of its own: no other worker of this test run may take its messages, nor (through the
    session worker's outbox sweeper) deliver its callbacks. Yields the port and the
    environment that publishes to it and reads its database."""
    from conftest import _pg_url, create_database, drop_database

    port = _free_port()
    metrics_dir = data_dir / f"metrics-{uuid.uuid4().hex[:6]}"
    metrics_dir.mkdir()
    database = create_database()
    env = {"VIDSIM_METRICS_PORT": str(port), "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
           "DATABASE_URL": _pg_url(database),
           "VIDSIM_BROKER_PREFIX": f"{settings.broker_prefix}{name}-{uuid.uuid4().hex[:6]}:"}  # fmt: skip
    try:
        subprocess.run([sys.executable, "-c", "from app.db import migrate; migrate()"],
                       env={**os.environ, **env}, check=True, timeout=120)  # fmt: skip
        with start_worker(data_dir / f"{name}-worker.log", pool="prefork", beat=False, extra_env=env):
            yield port, env
    finally:
        drop_database(database)


def publish(env: dict[str, str], **event: object) -> None:
    """Publishes one event from another process, under ``env``'s broker keys."""
    code = f"from workers.publish import publish_video_selected as p; p(**{event!r})"
    subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, check=True, timeout=120)


def scrape(port: int) -> dict[str, float]:
    """The worker's metrics, as ``name[label=value,...]`` -> value."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name + "".join(f"[{k}={v}]" for k, v in sorted(sample.labels.items()))
            samples[key] = samples.get(key, 0.0) + sample.value
    return samples


def test_worker_metrics_endpoint(data_dir: Path, receiver, two_videos: list[Path], settings) -> None:  # type: ignore[no-untyped-def]
    """A live worker's metrics; vidsim_event_to_callback_seconds times each event once, to
    its first successful delivery: an operator's `vidsim deliveries replay` is delivered
    (and counted as a delivery) again, but is no second event, and its late arrival no
    latency."""
    from sqlalchemy import create_engine

    from app.models import Delivery, Recommendation

    with metrics_worker(data_dir, settings, "metrics") as (port, env):
        event_id = f"metrics-{uuid.uuid4().hex[:8]}"
        publish(env, event_id=event_id, video_uri=str(two_videos[0]), callback_url=receiver.url)
        receiver.wait_for({event_id}, timeout_s=120)
        samples = wait_until(lambda: (s := scrape(port)).get("vidsim_event_to_callback_seconds_count", 0) >= 1 and s,
                             timeout_s=30, what="the latency histogram")  # fmt: skip
        assert samples["vidsim_task_duration_seconds_count[task=vidsim.video_selected]"] >= 1
        assert samples["vidsim_deliveries_total[outcome=delivered]"] == 1
        assert "vidsim_queue_depth[queue=events]" in samples
        assert samples["vidsim_model_version"] >= 1

        engine = create_engine(env["DATABASE_URL"].replace("postgresql://", "postgresql+psycopg://", 1))
        with engine.connect() as conn:
            delivery_id = conn.scalar(
                select(Delivery.id).join(Recommendation).where(Recommendation.event_id == event_id)
            )
        engine.dispose()
        vidsim("deliveries", "replay", str(delivery_id), env=env)
        wait_until(lambda: sum(r.payload["event_id"] == event_id for r in receiver.received) == 2, timeout_s=60,
                   what="the replayed callback")  # fmt: skip
        # The replay's attempt is recorded (counted as delivered) before this is read.
        samples = wait_until(lambda: (s := scrape(port)).get("vidsim_deliveries_total[outcome=delivered]", 0) >= 2
                             and s, timeout_s=30, what="the replay to be recorded")  # fmt: skip
    assert samples["vidsim_event_to_callback_seconds_count"] == 1, samples


def test_worker_and_beat_write_only_json_lines(data_dir: Path, receiver, two_videos: list[Path], settings) -> None:  # type: ignore[no-untyped-def]
    """Log shippers read a worker's stdout and stderr one JSON object per line: `vidsim
    worker` and `vidsim beat` write nothing else, from start-up (no banner) through
    warm, cold and failing events to a warm shutdown."""
    from app.media.register import register

    with session_scope() as s:
        video_id = register(s, str(two_videos[0]), settings=settings).video_id
    folder = data_dir / f"json-logs-{uuid.uuid4().hex[:6]}"
    # Content of its own (a hue of its own): the same bytes as another test's video would be
    # that video, already embedded, and not the cold path this test means.
    cold = make_video(folder / "cold.mp4", seconds=2, pattern="rgbtestsrc", extra_vf=own_hue())
    env = {"VIDSIM_BROKER_PREFIX": f"{settings.broker_prefix}json-{uuid.uuid4().hex[:6]}:"}
    commands = {
        "worker": ["worker", "--queues", "events,fetch,embed,callbacks,maintenance", "--concurrency", "1"],
        "beat": ["beat"],
    }
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, args in commands.items():
            with open(folder / f"{name}.out", "wb") as out, open(folder / f"{name}.err", "wb") as err:
                procs[name] = subprocess.Popen(
                    [sys.executable, "-m", "scripts.cli", *args], stdout=out, stderr=err,
                    env={**os.environ, **env}, start_new_session=True,
                )  # fmt: skip
        wait_until(lambda: b" ready." in (folder / "worker.err").read_bytes(), timeout_s=90, what="the worker")
        events = {
            f"json-warm-{uuid.uuid4().hex[:6]}": {"video_id": video_id},
            f"json-cold-{uuid.uuid4().hex[:6]}": {"video_uri": str(cold)},
            f"json-bad-{uuid.uuid4().hex[:6]}": {"video_uri": str(folder / "missing.mp4")},
        }
        for event_id, video in events.items():
            publish(env, event_id=event_id, callback_url=receiver.url, **video)
        got = receiver.wait_for(set(events), timeout_s=180)
        assert got.keys() == events.keys(), got.keys()
    finally:
        for proc in procs.values():  # as `docker stop` does: SIGTERM to the main process
            proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    records, not_json = [], []
    for name in commands:
        for stream in ("out", "err"):
            for line in (folder / f"{name}.{stream}").read_text().splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    record = None
                if isinstance(record, dict):
                    records.append(record)
                else:
                    not_json.append(f"{name} {stream}: {line!r}")
    assert not not_json, "\n".join(not_json[:40])
    assert {"ts", "level", "logger", "message"} <= records[0].keys()
    assert {r.get("event_id") for r in records} >= events.keys()  # every event's path is in the logs


def test_queue_depth_counts_waiting_messages(settings) -> None:  # type: ignore[no-untyped-def]
    """Messages on a queue no worker consumes here (`train`) are counted, under the
    run's broker key prefix."""
    import redis as redis_client

    from workers.app import celery_app
    from workers.metrics import queue_depths

    client = redis_client.Redis.from_url(settings.redis_url)
    key = settings.broker_prefix + "train"
    client.delete(key)
    try:
        for _ in range(3):
            celery_app.send_task("vidsim.train", kwargs={"preset": "cpu-small"}, queue="train")
        assert queue_depths()["train"] == 3
    finally:
        client.delete(key)
        client.close()


def _python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


def test_readme_publisher_example_publishes_an_event(worker) -> None:  # type: ignore[no-untyped-def]
    publisher = next(b for b in _python_blocks(README.read_text()) if "publish_video_selected(" in b)
    code = publisher.replace('"chat-42-msg-7"', f'"readme-{uuid.uuid4().hex[:8]}"')
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    event_id = namespace["event_id"]

    def recorded() -> Event | None:
        with session_scope() as s:
            return s.get(Event, event_id)

    ev = wait_until(recorded, timeout_s=60, what="the README's event to be recorded")
    assert ev.callback_url == "https://chat.example.com/hooks/vidsim"


def test_readme_signature_verifier_accepts_ours_and_rejects_tampering(settings) -> None:  # type: ignore[no-untyped-def]

    from app.deliver.signing import sign

    verifier = next(b for b in _python_blocks(README.read_text()) if "def handle(" in b)
    namespace: dict = {}
    exec(compile(verifier, "README.md", "exec"), namespace)
    body = json.dumps({"event_id": "e1", "results": []}).encode()
    headers = sign(secrets=settings.webhook_secrets, msg_id="msg_1", timestamp=int(time.time()), body=body)
    assert namespace["handle"](headers, body, settings.webhook_secrets[0])["event_id"] == "e1"
    with pytest.raises(Exception, match=r"(?i)signature"):
        namespace["handle"](headers, body.replace(b"e1", b"e2"), settings.webhook_secrets[0])


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it)")
def test_results_page_in_headless_chromium(data_dir: Path, two_videos: list[Path], settings) -> None:  # type: ignore[no-untyped-def]
    from playwright.sync_api import sync_playwright

    from app.media.register import register
    from app.ops.webui import make_server
    from app.serve import recommend

    with session_scope() as s:
        ids = [register(s, str(p), settings=settings).video_id for p in two_videos]
    for video_id in ids:
        recommend.embed_video(video_id, sessions=session_scope, settings=settings)
    event_id = f"ui-{uuid.uuid4().hex[:8]}"
    with session_scope() as s:
        recommend.accept_event({"event_id": event_id, "video_id": ids[0], "callback_url": "http://127.0.0.1:9/x"},
                               session=s, settings=settings, fallback_id="unused")  # fmt: skip

    server = make_server(host="127.0.0.1", port=0, limit=20, settings=settings)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    screenshot = data_dir / "results-page.png"
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=CHROMIUM,
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
            )
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(url, wait_until="networkidle")
            section = page.locator(f'section[data-event-id="{event_id}"]')
            assert section.count() == 1
            assert "Recommended" in section.inner_text()
            loaded = section.locator("img").evaluate_all("imgs => imgs.map(i => i.complete && i.naturalWidth > 0)")
            assert len(loaded) >= 2 and all(loaded), loaded  # query frames and result thumbnails drawn
            assert section.locator(".result").count() >= 1
            page.screenshot(path=str(screenshot), full_page=True)
            browser.close()
    finally:
        server.shutdown()
        server.server_close()
    assert screenshot.stat().st_size > 10_000
    artifacts = os.environ.get("VIDSIM_TEST_ARTIFACTS")
    if artifacts:
        shutil.copy(screenshot, Path(artifacts) / "results-page.png")
    with session_scope() as s:
        assert s.scalar(select(Video).where(Video.id == ids[0])) is not None


def test_the_results_page_shows_a_match_that_ends_with_its_video(tmp_path: Path, settings) -> None:  # type: ignore[no-untyped-def]
    """A span ends one sampling period after its last frame, so the middle of a one-frame
    span at the end of a video lies past its end: the page shows the video's last second
    instead of no frame."""
    from app.ops.report import _frame_at

    path = make_video(tmp_path / "five.mp4", seconds=5, pattern="testsrc2")
    video = Video(id=1, uri=str(path), local_path=str(path), duration_s=5.0)
    thumb = _frame_at(video, 5.5, settings=settings, out=tmp_path / "thumbs", stem="v1")
    assert thumb == "thumbs/v1-at4.0.jpg" and (tmp_path / thumb).stat().st_size > 0


def test_readme_documents_every_setting() -> None:
    """Every setting of app/config.py has a row in the README's Configuration tables,
    under its environment variable, and a literal default there is the real one."""
    from app.config import Settings

    text = README.read_text()
    section = text[text.index("\n## Configuration\n") :]
    section = section[: section.index("\n## ", 1)]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) >= 3:
            rows[cells[0].strip("`")] = cells[1]

    def env_name(name: str) -> str:
        alias = Settings.model_fields[name].validation_alias
        choices = getattr(alias, "choices", [alias] if alias else [])
        plain = [c for c in choices if isinstance(c, str) and not c.startswith("VIDSIM_")]
        return plain[0] if plain else f"VIDSIM_{name.upper()}"

    def parse(literal: str, like: object) -> object:
        if isinstance(like, bool):
            assert literal in ("true", "false"), literal
            return literal == "true"
        if isinstance(like, int | float):
            return type(like)(literal)
        if isinstance(like, tuple):
            return tuple(parse(part, like[0]) if like else part for part in literal.split(","))
        return literal if isinstance(like, str) else type(like)(literal)  # Path

    expected = {env_name(name): name for name in Settings.model_fields}
    missing = sorted(set(expected) - set(rows))
    assert not missing, f"README's Configuration section lacks {missing}"
    unknown = sorted(set(rows) - set(expected))
    assert not unknown, f"README documents variables that app/config.py has no setting for: {unknown}"

    checked = 0
    for variable, name in expected.items():
        default, cell = Settings.model_fields[name].default, rows[variable]
        literal = re.match(r"`([^`]*)`", cell)
        if literal:  # `value`, optionally followed by a remark
            value = literal.group(1)
            assert (default is None) == (value == "unset"), f"{variable}: README says {value!r}, default is {default!r}"
            if default is not None:
                assert parse(value, default) == default, f"{variable}: README says {value!r}, default is {default!r}"
        elif cell.startswith("empty"):
            assert default in ("", ()), f"{variable}: README says empty, default is {default!r}"
        else:  # descriptive text (the development webhook secret)
            continue
        checked += 1
    assert checked >= len(expected) - 2, f"only {checked} of {len(expected)} defaults are literal"


def test_readme_lists_every_cli_command() -> None:
    """The Commands table names every `vidsim` command and subcommand."""
    import typer

    from scripts.cli import app

    table = README.read_text().split("### Commands", 1)[1].split("\n\n", 2)[1]

    def named(word: str, row: str) -> bool:  # `vidsim word ...`, or `word ...` after a slash
        return re.search(rf"`(vidsim )?{word}[` ]", row) is not None

    missing = []
    for name, command in typer.main.get_command(app).commands.items():  # type: ignore[attr-defined]
        rows = [row for row in table.splitlines() if named(name, row)]
        if not rows:
            missing.append(name)
        for sub in getattr(command, "commands", {}):
            if not any(named(sub, row) or f"`vidsim {name} {sub}" in row for row in rows):
                missing.append(f"{name} {sub}")
    assert not missing, f"not in README's Commands table: {missing}"
