"""The parent's side of sandboxed decoding: run one request in a throwaway child process.

The child is ``python -m app.media.child --child REQUEST_JSON OUT_DIR`` (see
:mod:`app.media.child`). It runs in its own session, with a pruned environment, in a
folder the caller owns; it writes ``result.json`` (and, for a sample, ``frames.npy``)
there and its output goes to ``child.log`` beside them. This module waits for it under a
wall-clock timeout, kills its whole process group when that runs out (or when anything
interrupts the wait), reads its result, and turns every way it can fail into one line an
operator can read (:class:`ChildFailed`).

It knows nothing of what the request asks; :mod:`app.media.video` builds the requests and
reads the frames.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.logs import one_line

if TYPE_CHECKING:
    from app.media.video import DecodeLimits

logger = logging.getLogger(__name__)

# What the child leaves in its output folder.
RESULT_FILE = "result.json"
FRAMES_FILE = "frames.npy"
LOG_FILE = "child.log"
# Child exit status when it ran out of memory and could not even write its result.
EXIT_OOM = 86
_MAX_RESULT_BYTES = 1 << 20
# Room for the child's log and result on top of the frames, for RLIMIT_FSIZE.
_FSIZE_SLACK = 64 * 1024**2

# Environment variables the child inherits. The rest (database URLs, webhook secrets...)
# stay out of the process that parses hostile input.
_CHILD_ENV_KEEP = (
    "PATH",
    "HOME",
    "LANG",
    "LANGUAGE",
    "TZ",
    "TMPDIR",
    "PYTHONPATH",
    "PYTHONHOME",
    "VIRTUAL_ENV",
    "LD_LIBRARY_PATH",
)


class ChildFailed(Exception):
    """The child did not succeed: it refused the file, crashed, ran out of memory or time.

    ``reason`` is one readable line without the file's path.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def run_child(request: dict[str, Any], limits: DecodeLimits, *, out: Path, frames_bytes: int) -> dict[str, Any]:
    """Run one request in a child writing into the folder ``out``; return its result dict.

    ``frames_bytes`` is the most the frames may take, for the child's output size limit.
    Raises :class:`ChildFailed` for anything but success.
    """
    request = {**request, "limits": asdict(limits), "parent_pid": os.getpid()}
    request["fsize_limit"] = frames_bytes + _FSIZE_SLACK
    path = request["path"]
    t_start = time.perf_counter()
    timed_out = False
    with open(out / LOG_FILE, "wb") as log:
        # A new session: the child leads its own process group, which is killed as a
        # whole on timeout, and terminal signals meant for the parent do not reach it.
        # cwd is the private temp dir, so `-m` puts nothing else on the child's path.
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.media.child", "--child", json.dumps(request), str(out)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            cwd=out,
            env=_child_env(),
            start_new_session=True,
        )
        try:
            proc.wait(timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            # Also reached on exceptions raised into this thread while waiting (e.g.
            # Celery's SoftTimeLimitExceeded): never leave a decoder running.
            if proc.returncode is None:
                _kill_group(proc)
    wall = time.perf_counter() - t_start
    if timed_out:
        logger.warning("decode of %s timed out after %.1f s, killed", path, wall)
        raise ChildFailed(f"decode timed out after {limits.timeout_s:g} s")

    result = _read_result(out)
    if result is not None:
        logger.debug(
            "decoder child for %s: %.3f s wall, peak RSS %s MB, phases %s",
            path,
            wall,
            result.get("max_rss_mb"),
            result.get("timings"),
        )
    if result is not None and result.get("ok"):
        return result

    reason = _failure_reason(proc.returncode, result, out, limits)
    logger.info("video %s refused: %s (%.2f s)", path, reason, wall)
    raise ChildFailed(reason)


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in _CHILD_ENV_KEEP or k.startswith("LC_")}
    # Make `-m app.media.child` importable whatever the caller's working directory.
    root = str(Path(__file__).resolve().parent.parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    # One BLAS thread (numpy is imported for the .npy only), and few malloc arenas so that
    # per-thread arenas do not eat the RLIMIT_AS budget with reservations.
    env["OPENBLAS_NUM_THREADS"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    env["MALLOC_ARENA_MAX"] = "2"
    return env


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _read_result(out: Path) -> dict[str, Any] | None:
    result_path = out / RESULT_FILE
    try:
        if result_path.stat().st_size > _MAX_RESULT_BYTES:
            return None
        data = json.loads(result_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _log_tail(out: Path, limit: int = 4096) -> str:
    try:
        with open(out / LOG_FILE, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _failure_reason(rc: int, result: dict[str, Any] | None, out: Path, limits: DecodeLimits) -> str:
    """One readable line for a child that did not succeed."""
    oom = f"decoder ran out of memory (limit {limits.memory_mb} MB)"
    if result is not None and result.get("kind") == "oom":
        return oom
    if result is not None and isinstance(result.get("reason"), str):
        return one_line(result["reason"], 300)
    tail = _log_tail(out)
    if tail:
        logger.debug("decoder child log tail:\n%s", tail)
    if rc == EXIT_OOM or "MemoryError" in tail or "bad_alloc" in tail:
        return oom
    if rc < 0:
        sig = -rc
        if sig == signal.SIGXCPU:
            return "decoder exceeded its CPU time limit"
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        if sig == signal.SIGKILL:
            # Not our kill (that is reported as a timeout): most likely the OOM killer.
            return f"decoder was killed (signal {name}; out of memory?)"
        return f"decoder crashed (signal {name})"
    last = next((ln for ln in reversed(tail.strip().splitlines()) if ln.strip()), "")
    return one_line(f"decoder failed (exit status {rc})" + (f": {last}" if last else ""), 300)
