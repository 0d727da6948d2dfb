"""The parent's side of sandboxed decoding: run one request in a throwaway child process.

The child is ``python -m app.media.child --child REQUEST_JSON OUT_DIR`` (see
:mod:`app.media.child`). It runs in its own session, with a pruned environment, in a
folder the caller owns; it sends what it decodes (frames, chunk by chunk, as it goes) on
a pipe, writes ``result.json`` there at the end, and its output goes to ``child.log``
beside it. This module reads the pipe under a wall-clock deadline that covers the whole
stream, caps what may come through it, kills the child's whole process group when the
deadline runs out (or when anything interrupts the caller), reads its result, and turns
every way it can fail into one line an operator can read (:class:`ChildFailed`).

It knows nothing of what the request asks; :mod:`app.media.video` builds the requests and
reads the frames.

A child's start-up (the interpreter, numpy and PyAV: 0.1-0.4 s on a 2-core machine) is a
tenth to a third of a 60-s video's decode, and on a cold event it came before the first
frame. So each
process keeps one **spare** child, started when a child ends, that has imported all it
needs and waits on its stdin for a request (``python -P -m app.media.child --wait``); the
next request goes to it, and the spare is replaced once that child ends. It is a child
like any other (its own session, the same pruned environment, the same limits and
deadline, which start when the request is sent), used for one request only; a spare
started under another environment, by another process (before a fork), or that died
waiting is not used. ``SPARE_CHILD = False`` starts every child afresh.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from app.logs import one_line

if TYPE_CHECKING:
    from app.media.video import DecodeLimits

logger = logging.getLogger(__name__)

# What the child leaves in its output folder.
RESULT_FILE = "result.json"
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


# Whether a process keeps a spare child ready for its next request (see the module docstring).
SPARE_CHILD = True


@dataclass
class _Spare:
    """A child started ahead, waiting on its stdin for one request."""

    proc: subprocess.Popen[bytes]
    pipe: int  # the read end of its frame stream
    owner: int  # the pid of the process that started it
    env: dict[str, str]  # the environment it was started with

    def discard(self) -> None:
        _kill_group(self.proc)
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        os.close(self.pipe)


_spare: _Spare | None = None
_spare_lock = threading.Lock()


def _start_spare() -> None:
    """Starts this process's spare child unless it has one (a failure only logs)."""
    global _spare
    with _spare_lock:
        if _spare is not None and _spare.owner == os.getpid():
            return
        read_fd, write_fd = os.pipe()
        env = _child_env()
        try:
            # -P: nothing of the working directory on the child's path (it has no folder
            # of its own until its request names one). Its output is the request's log.
            proc = subprocess.Popen(
                [sys.executable, "-P", "-m", "app.media.child", "--wait", str(os.getpid()), str(write_fd)],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                cwd="/", env=env, start_new_session=True, pass_fds=(write_fd,),
            )  # fmt: skip
        except OSError as exc:
            os.close(read_fd)
            logger.warning("no spare decoding child: %s", exc)
            return
        finally:
            os.close(write_fd)
        _spare = _Spare(proc, read_fd, os.getpid(), env)


@atexit.register
def _discard_spare() -> None:
    """At exit: this process's spare goes with it (it would also die with its parent)."""
    spare = _take_spare()
    if spare is not None:
        spare.discard()


def _take_spare() -> _Spare | None:
    """This process's spare child, if it has a usable one (it is no longer the spare)."""
    global _spare
    with _spare_lock:
        spare, _spare = _spare, None
    if spare is None or spare.owner != os.getpid():
        return None  # (another process's, before a fork: not ours to use or to kill)
    if spare.proc.poll() is not None or spare.env != _child_env():
        spare.discard()
        return None
    return spare


class ChildFailed(Exception):
    """The child did not succeed: it refused the file, crashed, ran out of memory or time.

    ``reason`` is one readable line without the file's path.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def run_child(request: dict[str, Any], limits: DecodeLimits, *, out: Path) -> dict[str, Any]:
    """Run one request that streams nothing (a probe) in a child writing into the folder
    ``out``; return its result dict. Raises :class:`ChildFailed` for anything but success."""
    with ChildStream(request, limits, out=out, max_bytes=0) as child:
        for _ in child.chunks():
            pass  # max_bytes=0: a chunk is refused before it is read
        return child.result()


class ChildStream:
    """One child that sends chunks of bytes on a pipe while it works, then leaves its result.

    ::

        with ChildStream(request, limits, out=folder, max_bytes=cap) as child:
            for chunk in child.chunks():  # bytearray payloads, as the child sends them
                ...
            result = child.result()

    The wall-clock deadline (``limits.timeout_s``) covers the whole life of the child,
    however long the caller takes between chunks (the child waits on a full pipe
    meanwhile). When it runs out, when the child sends more than ``max_bytes`` in all, or
    when the ``with`` block is left for any reason (an exception, a caller that stops
    reading), the child's whole process group is killed and reaped. On the pipe, a chunk
    is a 4-byte little-endian length, then that many bytes (:func:`send_chunk`).
    """

    def __init__(self, request: dict[str, Any], limits: DecodeLimits, *, out: Path, max_bytes: int) -> None:
        self._limits = limits
        self._out = out
        self._max_bytes = max_bytes
        self._path = request["path"]
        self._request = {**request, "limits": asdict(limits), "parent_pid": os.getpid()}
        # The frames go on the pipe: the output size limit is for the log and the result.
        self._request["fsize_limit"] = _FSIZE_SLACK
        self._proc: subprocess.Popen[bytes] | None = None
        self._pipe = -1
        self._received = 0
        self._ended = False
        self._started = 0.0

    def __enter__(self) -> ChildStream:
        spare = _take_spare() if SPARE_CHILD else None
        if spare is not None and self._hand_to(spare):
            return self
        read_fd, write_fd = os.pipe()
        self._request["stream_fd"] = write_fd
        self._started = time.perf_counter()
        try:
            with open(self._out / LOG_FILE, "wb") as log:
                # A new session: the child leads its own process group, which is killed as
                # a whole on timeout, and terminal signals meant for the parent do not
                # reach it. cwd is the private temp dir, so `-m` puts nothing else on the
                # child's path. Only the pipe's write end is passed on (close_fds).
                self._proc = subprocess.Popen(
                    [sys.executable, "-m", "app.media.child", "--child", json.dumps(self._request), str(self._out)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    cwd=self._out,
                    env=_child_env(),
                    start_new_session=True,
                    pass_fds=(write_fd,),
                )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)  # the child's copy is the only one: EOF when it exits
        self._pipe = read_fd
        return self

    def _hand_to(self, spare: _Spare) -> bool:
        """Sends the request to the spare child (it writes its log in ``out``); False,
        the spare discarded, when it can no longer take it."""
        assert spare.proc.stdin is not None
        self._started = time.perf_counter()
        try:
            spare.proc.stdin.write(json.dumps({**self._request, "out": str(self._out)}).encode() + b"\n")
            spare.proc.stdin.close()
        except OSError:  # it died since it was checked
            spare.discard()
            return False
        self._proc, self._pipe = spare.proc, spare.pipe
        return True

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Kill the child's process group if it is still running; close the pipe."""
        # Also reached on exceptions raised into this thread while the caller works on a
        # chunk (e.g. Celery's SoftTimeLimitExceeded): never leave a decoder running.
        if self._proc is not None and self._proc.returncode is None:
            _kill_group(self._proc)
        if self._pipe >= 0:
            os.close(self._pipe)
            self._pipe = -1
            if SPARE_CHILD:
                _start_spare()  # for the next request, while this one's caller goes on

    def chunks(self) -> Iterator[bytearray]:
        """The chunks the child sends, until it closes the pipe (it is done, or died).

        Raises :class:`ChildFailed` when the deadline runs out or the child sends more
        than ``max_bytes``; the child is killed first.
        """
        while True:
            header = self._read(4)
            if header is None:  # EOF between chunks: the child is done or died
                self._ended = True
                return
            size = int.from_bytes(header, "little")
            if size == 0 or self._received + size > self._max_bytes:
                self._fail(f"decoder sent more than {self._max_bytes} bytes of frames")
            payload = self._read(size)
            if payload is None:  # EOF inside a chunk: the child died while sending it
                self._ended = True
                return
            self._received += size
            yield payload

    def result(self) -> dict[str, Any]:
        """Wait (within the deadline) for the child to exit; its result dict.

        Raises :class:`ChildFailed` for anything but success.
        """
        assert self._proc is not None, "result() outside the with block"
        if not self._ended:  # chunks the caller did not read: drain them (and count them)
            for _ in self.chunks():
                pass
        try:
            self._proc.wait(timeout=max(0.0, self._deadline() - time.perf_counter()))
        except subprocess.TimeoutExpired:
            self._timed_out()
        wall = time.perf_counter() - self._started
        result = _read_result(self._out)
        if result is not None:
            logger.debug(
                "decoder child for %s: %.3f s wall, %d bytes streamed, peak RSS %s MB, phases %s",
                self._path,
                wall,
                self._received,
                result.get("max_rss_mb"),
                result.get("timings"),
            )
        if result is not None and result.get("ok"):
            result["streamed_bytes"] = self._received
            return result
        reason = _failure_reason(self._proc.returncode, result, self._out, self._limits)
        logger.info("video %s refused: %s (%.2f s)", self._path, reason, wall)
        raise ChildFailed(reason)

    def _deadline(self) -> float:
        return self._started + self._limits.timeout_s

    def _read(self, n: int) -> bytearray | None:
        """Exactly ``n`` bytes from the pipe, or None at EOF; waits until the deadline."""
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        poller = select.poll()
        poller.register(self._pipe, select.POLLIN)
        while got < n:
            left = self._deadline() - time.perf_counter()
            if left <= 0 or not poller.poll(left * 1000):
                self._timed_out()
            count = os.readv(self._pipe, [view[got:]])
            if count == 0:
                return None
            got += count
        return buf

    def _timed_out(self) -> NoReturn:
        wall = time.perf_counter() - self._started
        logger.warning("decode of %s timed out after %.1f s, killed", self._path, wall)
        self._fail(f"decode timed out after {self._limits.timeout_s:g} s")

    def _fail(self, reason: str) -> NoReturn:
        self.close()
        raise ChildFailed(reason)


def send_chunk(fd: int, payload: bytes | memoryview) -> None:
    """The child's side of :meth:`ChildStream.chunks`: one chunk on the pipe ``fd``."""
    data = memoryview(payload).cast("B")
    os.write(fd, len(data).to_bytes(4, "little"))
    while len(data):
        data = data[os.write(fd, data) :]


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
