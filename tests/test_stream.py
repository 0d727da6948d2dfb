"""Frames streamed from the decoding child while it decodes (app.media.video.stream_frames),
and the encoder's chunk-by-chunk description of them: real PyAV and decord in a real
child process, real encoded videos, a real (small) encoder."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch

from app.learn.encoder import EncoderConfig, initial_encoder
from app.media import sandbox
from app.media.video import DecodeLimits, VideoError, sample_frames, stream_frames

try:
    from tests.media import make_video
except ModuleNotFoundError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from support.media import make_video

# 2 frames of 128x128 make a chunk larger than a pipe's buffer (64 KiB): after the first
# chunk, the child cannot have finished a 20-frame stream the test has not read.
BIG = {"size": 128, "chunk_frames": 2, "crop_borders": False}


@pytest.fixture(scope="module")
def twenty_s(media_dir: Path) -> Path:
    """20 s, 160x120, 25 fps, a keyframe every second, index at the front."""
    return make_video(
        media_dir / "twenty.mp4", seconds=20, width=160, height=120, extra_args=("-g", "25", "-movflags", "+faststart")
    )


@pytest.fixture(scope="module")
def corrupt_tail(media_dir: Path, twenty_s: Path) -> Path:
    """twenty_s with its last fifth of frame data zeroed: it opens, indexes and starts
    decoding; the frames from ~16 s on cannot be decoded."""
    data = bytearray(twenty_s.read_bytes())
    a, b = int(len(data) * 0.8), int(len(data) * 0.97)
    data[a:b] = bytes(b - a)
    path = media_dir / "corrupt-tail.mp4"
    path.write_bytes(bytes(data))
    return path


class _SpyPopen(subprocess.Popen):
    """subprocess.Popen that remembers the children it started."""

    started: ClassVar[list[int]] = []

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        _SpyPopen.started.append(self.pid)


@pytest.fixture
def children(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The pids of the decoding children started during the test, each started for its
    request (no spare child: test_spare_* test those)."""
    monkeypatch.setattr(sandbox, "SPARE_CHILD", False)
    spare = sandbox._take_spare()
    if spare is not None:
        spare.discard()
    _SpyPopen.started = []
    monkeypatch.setattr(sandbox.subprocess, "Popen", _SpyPopen)
    return _SpyPopen.started


def _gone(pid: int) -> bool:
    """Whether the child's process group has no process left (killed and reaped)."""
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    return False


# ---------------------------------------------------------------------------------------
# The stream
# ---------------------------------------------------------------------------------------


def test_stream_yields_sample_frames_in_chunks(twenty_s: Path) -> None:
    whole = sample_frames(twenty_s, fps=1.0, size=48, crop_borders=True)
    with stream_frames(twenty_s, fps=1.0, size=48, crop_borders=True, chunk_frames=3) as stream:
        chunks = [chunk.copy() for chunk in stream]
        streamed = stream.sample()
    assert [len(c) for c in chunks] == [3] * 6 + [2]
    np.testing.assert_array_equal(np.concatenate(chunks), whole.frames)
    np.testing.assert_array_equal(streamed.frames, whole.frames)
    np.testing.assert_array_equal(streamed.timestamps, whole.timestamps)
    assert (streamed.info, streamed.rotation, streamed.crop) == (whole.info, whole.rotation, whole.crop)


def test_repeated_frames_across_chunks(media_dir: Path) -> None:
    # 2 s at 2 fps sampled at 5 fps: every frame repeats, across chunk boundaries too.
    path = make_video(media_dir / "slow.mp4", seconds=2, width=64, height=48, fps=2)
    whole = sample_frames(path, fps=5.0, size=32)
    with stream_frames(path, fps=5.0, size=32, chunk_frames=3) as stream:
        streamed = stream.sample()
    assert len(whole.frames) == 10
    np.testing.assert_array_equal(streamed.frames, whole.frames)
    np.testing.assert_array_equal(streamed.timestamps, whole.timestamps)


def test_the_child_runs_this_checkout(twenty_s: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The child is `python -m app.media.child` in a folder of its own: it must import the
    # same app package as the parent, whatever PYTHONPATH the caller had.
    import app

    hook = tmp_path / "hook"
    hook.mkdir()
    report = tmp_path / "child-app.txt"
    (hook / "sitecustomize.py").write_text(
        f"import atexit, sys\natexit.register(lambda: open({str(report)!r}, 'w').write(sys.modules['app'].__file__))\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(hook))
    sample_frames(twenty_s, size=16, max_frames=2)
    assert report.read_text() == app.__file__


# ---------------------------------------------------------------------------------------
# Failures mid-stream: readable reasons, no child left behind
# ---------------------------------------------------------------------------------------


def test_corrupt_file_mid_stream(corrupt_tail: Path, children: list[int], private_tmp: Path) -> None:
    got = 0
    with pytest.raises(VideoError) as caught, stream_frames(corrupt_tail, fps=1.0, **BIG) as stream:
        for chunk in stream:
            got += len(chunk)
    assert 0 < got < 20  # the first frames came before the damaged part
    assert caught.value.reason.startswith("cannot decode: ")
    assert "\n" not in caught.value.reason and str(corrupt_tail) not in caught.value.reason
    (pid,) = children
    assert _gone(pid)
    assert list(private_tmp.iterdir()) == []


def test_deadline_expires_mid_stream(twenty_s: Path, children: list[int], private_tmp: Path) -> None:
    timeout_s = 6.0  # room for the child's start on a busy machine; the consumer then stalls
    started = time.monotonic()
    got = 0
    stream = stream_frames(twenty_s, fps=1.0, limits=DecodeLimits(timeout_s=timeout_s), **BIG)
    with pytest.raises(VideoError, match=r"^decode timed out after 6 s$"), stream:
        for chunk in stream:
            got += len(chunk)
            time.sleep(max(0.0, started + timeout_s + 0.5 - time.monotonic()))
    assert got == 2  # one chunk, then the deadline: the child was waiting on the pipe
    assert time.monotonic() - started < timeout_s + 3
    (pid,) = children
    assert _gone(pid)
    assert list(private_tmp.iterdir()) == []


def test_child_killed_mid_stream(twenty_s: Path, children: list[int], private_tmp: Path) -> None:
    with pytest.raises(VideoError) as caught, stream_frames(twenty_s, fps=1.0, **BIG) as stream:
        for _ in stream:
            os.killpg(children[0], signal.SIGKILL)  # what the kernel's OOM killer does
    assert caught.value.reason == "decoder was killed (signal SIGKILL; out of memory?)"
    (pid,) = children
    assert _gone(pid)
    assert list(private_tmp.iterdir()) == []


def test_leaving_the_stream_early_kills_the_child(twenty_s: Path, children: list[int], private_tmp: Path) -> None:
    class Stop(Exception):
        pass

    with pytest.raises(Stop), stream_frames(twenty_s, fps=1.0, **BIG) as stream:
        for _ in stream:
            raise Stop  # e.g. the forward pass failed, or the task's soft time limit
    (pid,) = children
    assert _gone(pid)
    assert list(private_tmp.iterdir()) == []


# ---------------------------------------------------------------------------------------
# The spare child: started ahead, one request each
# ---------------------------------------------------------------------------------------


def _spare_pid() -> int:
    """The pid of this process's spare child (it exists and waits)."""
    spare = sandbox._spare
    assert spare is not None and spare.owner == os.getpid() and spare.proc.poll() is None
    return spare.proc.pid


def test_spare_child_takes_the_next_request_and_is_replaced(twenty_s: Path) -> None:
    fresh = sample_frames(twenty_s, fps=1.0, size=32)  # (its end starts a spare)
    spare = _spare_pid()
    again = sample_frames(twenty_s, fps=1.0, size=32)
    np.testing.assert_array_equal(again.frames, fresh.frames)
    assert _gone(spare)  # used for that request only, and reaped
    assert _spare_pid() != spare
    with stream_frames(twenty_s, fps=1.0, size=32, chunk_frames=4) as stream:
        streamed = stream.sample()
    np.testing.assert_array_equal(streamed.frames, fresh.frames)


def test_spare_child_that_died_waiting_is_not_used(twenty_s: Path) -> None:
    sample_frames(twenty_s, size=16, max_frames=2)
    os.killpg(_spare_pid(), signal.SIGKILL)
    spare = sandbox._spare
    assert spare is not None
    spare.proc.wait(timeout=10)
    assert len(sample_frames(twenty_s, size=16, max_frames=2).frames) == 2  # a child started for it


def test_spare_child_that_fails_mid_stream_is_killed(twenty_s: Path, private_tmp: Path, tmp_path: Path) -> None:
    sample_frames(twenty_s, size=16, max_frames=2)
    spare = _spare_pid()
    with pytest.raises(VideoError, match=r"^decoder was killed"), stream_frames(twenty_s, fps=1.0, **BIG) as stream:
        for _ in stream:
            os.killpg(spare, signal.SIGKILL)
    assert _gone(spare)
    assert list(private_tmp.iterdir()) == []
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n" * 100)
    with pytest.raises(VideoError, match=r"^not a video: "):  # the next spare's reason is its request's own
        sample_frames(text)


def test_refusal_before_any_frame_comes_from_the_iteration(tmp_path: Path) -> None:
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n" * 100)
    with pytest.raises(VideoError, match=r"^not a video: "), stream_frames(text) as stream:
        for _ in stream:
            pytest.fail("a refused file sent a frame")


# ---------------------------------------------------------------------------------------
# The encoder, chunk by chunk
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        EncoderConfig(frame_size=64),
        EncoderConfig(frame_size=64, serve="projection", embed_dim=256, projector_hidden=256, temporal="mean"),
        EncoderConfig(frame_size=64, library_norm="centre+whiten"),
        EncoderConfig(frame_size=64, frame_thumbnail=16),
    ],
    ids=["conv-representation", "mean-projection", "centre+whiten", "thumbnails"],
)
def test_streamed_description_equals_the_whole_clip(twenty_s: Path, config: EncoderConfig) -> None:
    encoder = initial_encoder(config)
    with torch.no_grad():  # a trained temporal convolution, not the identity it starts as
        for p in encoder.temporal.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    if config.library_norm != "none":
        clips = [np.random.default_rng(i).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8) for i in range(6)]
        encoder.fit_library_norm(clips)
    with stream_frames(twenty_s, fps=1.0, size=64, chunk_frames=3) as stream:
        vector, frames = encoder.describe_stream(stream)
        clip = stream.sample().frames
    vectors, per_clip = encoder.describe([clip])
    assert vector.shape == (config.output_dim,) and frames.shape == (20, config.descriptor_dim)
    np.testing.assert_allclose(vector, vectors[0], atol=1e-5)
    np.testing.assert_allclose(frames, per_clip[0], atol=1e-5)
    assert abs(float(np.linalg.norm(vector)) - 1.0) < 1e-5


def test_describe_stream_needs_a_frame() -> None:
    encoder = initial_encoder(EncoderConfig(frame_size=32))
    with pytest.raises(ValueError, match="at least one frame"):
        encoder.describe_stream(iter([np.zeros((0, 32, 32, 3), np.uint8)]))


@pytest.mark.parametrize("uri", ["test://nowhere/clip.mp4", "/nonexistent/clip.mp4"])
def test_a_video_that_cannot_be_streamed_is_recorded_failed_with_its_reason(uri: str, settings) -> None:  # type: ignore[no-untyped-def]
    """embed_video turns a source the stream refuses before any child starts (another URL
    scheme, a missing file) into the video's readable error, as a decoding failure is."""
    import uuid

    from app.db import session_scope
    from app.models import Video
    from app.serve.recommend import embed_video

    with session_scope() as s:
        video = Video(uri=f"{uri}?{uuid.uuid4().hex}", status="ready")
        s.add(video)
        s.flush()
        video_id = video.id
    result = embed_video(video_id, sessions=session_scope, settings=settings)
    assert not result.ok and result.error
    with session_scope() as s:
        stored = s.get_one(Video, video_id)
        assert stored.status == "failed" and stored.error == result.error
