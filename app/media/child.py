"""The decoding child's entry point: ``python -m app.media.child --child REQUEST_JSON OUT_DIR``,
or, started ahead as a spare (:mod:`app.media.sandbox`), ``python -P -m app.media.child
--wait PARENT_PID STREAM_FD``, which reads its request (with ``out``, the folder) as one
JSON line on stdin, moves into that folder and writes its log there.

Started by :mod:`app.media.sandbox`, never imported by the parent. Before it touches the
file it makes itself disposable: it dies with its parent and sets resource limits on
itself (address space, CPU seconds, output file size, no core dumps). Then it runs the
request (:mod:`app.media.decode`), sending the frames to the parent chunk by chunk as
they are decoded, on the pipe the parent passed it (``stream_fd``), and writes what came
of it, success or a readable refusal, to ``result.json`` in ``OUT_DIR``, atomically so
that the parent never reads half a result.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from pathlib import Path

from app.files import write_atomic
from app.logs import one_line
from app.media.decode import Refused, clean_message, looks_like_oom, run_request
from app.media.sandbox import EXIT_OOM, LOG_FILE, RESULT_FILE, send_chunk
from app.media.video import DecodeLimits, VideoError


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "--child":
        request = json.loads(argv[1])
        _die_with_parent(request["parent_pid"])
        return serve(request, Path(argv[2]), time.perf_counter())
    if len(argv) == 3 and argv[0] == "--wait":
        _die_with_parent(int(argv[1]))
        line = sys.stdin.buffer.readline()
        if not line:  # discarded unused
            return 0
        t = time.perf_counter()
        request = json.loads(line)
        out = Path(request.pop("out"))
        os.chdir(out)
        log = os.open(out / LOG_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        return serve({**request, "stream_fd": int(argv[2])}, out, t)
    usage = "usage: python -m app.media.child --child REQUEST_JSON OUT_DIR | --wait PARENT_PID STREAM_FD"
    print(usage, file=sys.stderr)
    return 2


def serve(request: dict, out: Path, t: float) -> int:
    """Runs ``request`` (its frames on its ``stream_fd``), leaving its result in ``out``;
    ``t`` is when it started (its phases' timings count from it)."""
    timings: dict[str, float] = {}
    limits = DecodeLimits(**request["limits"])
    _set_rlimits(limits, request["fsize_limit"])
    import faulthandler

    faulthandler.enable()  # a crash leaves a Python traceback in the child's log
    stream_fd: int = request["stream_fd"]

    def send(payload: memoryview) -> None:
        send_chunk(stream_fd, payload)

    try:
        result = run_request(request, limits, send, timings, t)
    except (Refused, VideoError) as exc:
        result = {"ok": False, "kind": "refused", "reason": one_line(str(exc), 300)}
    except MemoryError:
        result = {"ok": False, "kind": "oom"}
    except BrokenPipeError:  # the parent stopped reading: it wants nothing more
        result = {"ok": False, "kind": "error", "reason": "the parent closed the frame stream"}
    except Exception as exc:  # the parent turns this into a VideoError
        message = clean_message(exc, request["path"])
        if looks_like_oom(message):
            result = {"ok": False, "kind": "oom"}
        else:
            reason = f"decoder error: {type(exc).__name__}: {message}"
            result = {"ok": False, "kind": "error", "reason": one_line(reason, 300)}
    os.close(stream_fd)  # EOF for the parent: nothing more comes
    result["timings"] = timings
    import resource

    # ru_maxrss is in KiB on Linux: the child's peak resident memory, for the parent's log.
    result["max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    try:
        write_atomic(out / RESULT_FILE, json.dumps(result))  # the parent never reads half a result
    except MemoryError:
        return EXIT_OOM
    return 0


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL this child if the parent dies (e.g. a worker killed by -9)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the parent's timeout still applies
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _set_rlimits(limits: DecodeLimits, fsize_limit: int) -> None:
    import resource

    def cap(which: int, soft: int, hard: int | None = None) -> None:
        # Never raise a limit above what this process already has (not permitted).
        _, cur_hard = resource.getrlimit(which)
        hard = soft if hard is None else hard
        if cur_hard != resource.RLIM_INFINITY:
            hard = min(hard, cur_hard)
        resource.setrlimit(which, (min(soft, hard), hard))

    cap(resource.RLIMIT_AS, limits.memory_mb * 1024**2)
    # CPU seconds as a backstop for a child the parent can no longer kill: decoding
    # threads may legitimately burn CPU on every core for the whole wall-clock budget.
    cpu_s = math.ceil(limits.timeout_s * max(2, os.cpu_count() or 1)) + 10
    cap(resource.RLIMIT_CPU, cpu_s, cpu_s + 5)  # SIGXCPU at soft, SIGKILL at hard
    # Bounds frames.npy and the log. Python ignores SIGXFSZ: an oversized write fails with
    # EFBIG ("File too large") instead, reported as a decoder error.
    cap(resource.RLIMIT_FSIZE, fsize_limit)
    cap(resource.RLIMIT_CORE, 0)  # a crash on a hostile file needs no core dump


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
