"""What an operator touches: the CLI against real services, the metrics endpoint, the
README's code examples, and the results page in real headless Chromium."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from conftest import start_worker
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select
from support.helpers import wait_until
from support.media import make_video

from app.db import session_scope
from app.models import Event, Video

README = Path(__file__).resolve().parent.parent / "README.md"


def vidsim(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "250"}
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


def test_worker_metrics_endpoint(data_dir: Path, receiver, two_videos: list[Path], settings) -> None:  # type: ignore[no-untyped-def]
    from app.media.register import register

    with session_scope() as s:
        video_id = register(s, str(two_videos[0]), settings=settings).video_id
    port = _free_port()
    metrics_dir = data_dir / f"metrics-{uuid.uuid4().hex[:6]}"
    metrics_dir.mkdir()
    # Its own broker keys, so that no other worker of this test run takes its messages.
    env = {"VIDSIM_METRICS_PORT": str(port), "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
           "VIDSIM_BROKER_PREFIX": f"{settings.broker_prefix}metrics-{uuid.uuid4().hex[:6]}:"}  # fmt: skip
    with start_worker(data_dir / "metrics-worker.log", pool="prefork", beat=False, extra_env=env):
        event_id = f"metrics-{uuid.uuid4().hex[:8]}"
        publish = (
            "from workers.publish import publish_video_selected as p; "
            f"p(event_id={event_id!r}, video_id={video_id}, callback_url={receiver.url!r})"
        )
        subprocess.run([sys.executable, "-c", publish], env={**os.environ, **env}, check=True, timeout=120)
        receiver.wait_for({event_id}, timeout_s=120)

        def scrape() -> dict[str, float]:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            samples: dict[str, float] = {}
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    key = sample.name + "".join(f"[{k}={v}]" for k, v in sorted(sample.labels.items()))
                    samples[key] = samples.get(key, 0.0) + sample.value
            return samples

        samples = wait_until(lambda: (s := scrape()).get("vidsim_event_to_callback_seconds_count", 0) >= 1 and s,
                             timeout_s=30, what="the latency histogram")  # fmt: skip
    assert samples["vidsim_task_duration_seconds_count[task=vidsim.video_selected]"] >= 1
    assert samples["vidsim_deliveries_total[outcome=delivered]"] >= 1
    assert "vidsim_queue_depth[queue=events]" in samples
    assert samples["vidsim_model_version"] >= 1


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
    import json

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
