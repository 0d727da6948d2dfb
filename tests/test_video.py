"""app.media.video on real encoded videos: real PyAV and decord in a real child process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import av
import numpy as np
import pytest

from app.media import sandbox, video
from app.media.video import DecodeLimits, Sample, VideoError, VideoInfo, probe, sample_frames

try:
    from tests.media import HOSTILE_BUT_VALID, HOSTILE_REASONS, make_hostile_files, make_video
except ModuleNotFoundError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from support.media import HOSTILE_BUT_VALID, HOSTILE_REASONS, make_hostile_files, make_video

# Generous for a busy 2-core machine: a refusal takes ~0.3 s (child start-up + probe).
FAST_S = 10.0


@pytest.fixture(scope="module")
def clip(media_dir: Path) -> Path:
    """4 s, 320x240, 25 fps H.264 with B-frames."""
    return make_video(media_dir / "clip.mp4", seconds=4, pattern="smptebars")


@pytest.fixture(scope="module")
def ten_s(media_dir: Path) -> Path:
    return make_video(media_dir / "ten.mp4", seconds=10, width=160, height=120)


@pytest.fixture(scope="module")
def hostile(media_dir: Path) -> dict[str, Path]:
    return make_hostile_files(media_dir / "hostile")


# ---------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------


def test_one_fps_gives_one_frame_per_second(clip: Path, private_tmp: Path) -> None:
    sample = sample_frames(clip)
    assert isinstance(sample, Sample)
    assert sample.frames.shape == (4, 224, 224, 3)
    assert sample.frames.dtype == np.uint8
    assert sample.frames.flags.writeable  # torch.from_numpy warns on read-only arrays
    np.testing.assert_allclose(sample.timestamps, [0, 1, 2, 3], atol=1e-3)
    assert sample.info == VideoInfo(
        duration_s=pytest.approx(4.0, abs=0.05),
        width=320,
        height=240,
        fps=25.0,
        frame_count=100,
        codec="h264",
        size_bytes=clip.stat().st_size,
    )
    assert sample.frames.std() > 10  # colour bars, not a blank frame
    assert list(private_tmp.iterdir()) == []  # the child's files are gone


def test_fps_and_size_are_honoured(clip: Path) -> None:
    sample = sample_frames(clip, fps=2.5, size=64)
    assert sample.frames.shape == (10, 64, 64, 3)
    np.testing.assert_allclose(sample.timestamps, np.arange(10) * 0.4, atol=0.021)


def test_max_frames_spreads_frames_evenly_over_the_video(ten_s: Path) -> None:
    sample = sample_frames(ten_s, fps=1, max_frames=4, size=32)
    assert sample.frames.shape == (4, 32, 32, 3)
    # 4 frames over 10 s: at 0, 2.5, 5, 7.5 s (to the frame, 40 ms at 25 fps).
    np.testing.assert_allclose(sample.timestamps, [0, 2.5, 5, 7.5], atol=0.041)


def test_window_samples_only_inside_it(ten_s: Path) -> None:
    sample = sample_frames(ten_s, start_s=2, duration_s=3, size=32)
    np.testing.assert_allclose(sample.timestamps, [2, 3, 4], atol=1e-3)
    # A window running past the end is clipped to the video.
    sample = sample_frames(ten_s, start_s=8, duration_s=5, size=32)
    np.testing.assert_allclose(sample.timestamps, [8, 9], atol=1e-3)
    # start_s alone runs to the end; with max_frames, spread over the window only.
    sample = sample_frames(ten_s, start_s=6, max_frames=2, size=32)
    np.testing.assert_allclose(sample.timestamps, [6, 8], atol=1e-3)


def test_window_after_the_end_is_refused(ten_s: Path) -> None:
    with pytest.raises(VideoError, match=r"window starts at 30 s, after the end"):
        sample_frames(ten_s, start_s=30, size=32)


def test_short_video_yields_at_least_one_frame(media_dir: Path, clip: Path) -> None:
    short = make_video(media_dir / "short.mp4", seconds=0.2)
    sample = sample_frames(short, size=32)
    assert sample.frames.shape == (1, 32, 32, 3)
    assert sample.timestamps.tolist() == [0.0]
    # A sampling period longer than the video: one frame too.
    assert sample_frames(clip, fps=0.1, size=32).frames.shape[0] == 1


def _bands(media_dir: Path, name: str, width: int, height: int, *, sar: str = "1") -> Path:
    """Red | green | blue thirds, vertical bands if landscape, horizontal if portrait."""
    if width >= height:
        boxes = "drawbox=x=0:y=0:w=iw/3:h=ih:color=red:t=fill,drawbox=x=2*iw/3:y=0:w=iw/3:h=ih:color=blue:t=fill"
    else:
        boxes = "drawbox=x=0:y=0:w=iw:h=ih/3:color=red:t=fill,drawbox=x=0:y=2*ih/3:w=iw:h=ih/3:color=blue:t=fill"
    return make_video(
        media_dir / name,
        seconds=1,
        width=width,
        height=height,
        pattern="color=c=lime",
        extra_vf=f"{boxes},setsar={sar}",
    )


@pytest.mark.parametrize(
    ("width", "height", "sar"),
    [(720, 240, "1"), (240, 720, "1"), (240, 240, "3")],
    ids=["landscape-3:1", "portrait-1:3", "anamorphic-sar3"],
)
def test_crop_keeps_aspect_and_centre(media_dir: Path, width: int, height: int, sar: str) -> None:
    # Displayed 3:1 (or 1:3): short side to 96, then the centre square is exactly the
    # middle band. Squashing instead of cropping would show all three colours.
    path = _bands(media_dir, f"bands-{width}x{height}-{sar}.mp4", width, height, sar=sar)
    frame = sample_frames(path, size=96).frames[0].astype(int)
    inner = frame[8:-8, 8:-8]
    assert (inner[..., 1] > 200).all(), "centre should be all green"
    assert (inner[..., 0] < 60).all() and (inner[..., 2] < 60).all()


def test_left_right_split_stays_centred(media_dir: Path) -> None:
    path = make_video(
        media_dir / "split.mp4",
        seconds=1,
        width=640,
        height=240,
        pattern="color=c=blue",
        extra_vf="drawbox=x=0:y=0:w=iw/2:h=ih:color=red:t=fill",
    )
    frame = sample_frames(path, size=64).frames[0].astype(int)
    red = frame[..., 0] > frame[..., 2]  # (64, 64) bool
    assert red[:, :30].all() and not red[:, 34:].any()


def test_sizes_that_plan_a_width_decord_missizes_still_decode(media_dir: Path) -> None:
    # A 4:3 picture at 36 or 54 px plans a 48- or 72-px-wide decode, where decord returns
    # wider frames than asked ("from_size == to_size"), as a 9:8 one does at the served 64.
    path = make_video(media_dir / "four-three.mp4", seconds=2, width=320, height=240,
                      extra_vf="drawbox=x=0:y=0:w=iw/2:h=ih:color=red:t=fill")  # fmt: skip
    wide = make_video(media_dir / "nine-eight.mp4", seconds=1, width=360, height=320)
    for clip, size in ((path, 36), (path, 54), (wide, 64)):
        frames = sample_frames(clip, size=size).frames
        assert frames.shape[1:] == (size, size, 3)
    left = sample_frames(path, size=36).frames[0].astype(int)
    red = left[..., 0] > left[..., 2] + 40
    assert red[:, :16].all() and not red[:, 20:].any()  # the centre square, unstretched


def test_frames_match_their_timestamps_with_b_frames_and_vfr(media_dir: Path) -> None:
    """Frame n is a flat grey of level 16 + 2n; 2 s at 25 fps, then 5 fps; B-frames.

    Each sampled frame must be the one shown at its target time (the last frame starting
    at or before it, by PyAV's reading of the same file), and carry that frame's time.
    """
    path = make_video(
        media_dir / "clock.mp4",
        seconds=4,
        width=64,
        height=48,
        pattern="color=c=black",
        extra_vf="format=yuv420p,geq=lum='16+2*N':cb=128:cr=128,setpts='if(lt(N,50),N/25,2+(N-50)/5)/TB'",
        extra_args=("-fps_mode", "passthrough", "-bf", "3", "-g", "30"),
    )
    with av.open(str(path)) as container:
        ref = sorted(
            (float(f.pts * f.time_base), float(f.to_ndarray(format="rgb24").mean())) for f in container.decode(video=0)
        )
    ref_times = np.array([t for t, _ in ref])  # (100,) presentation times
    ref_levels = np.array([level for _, level in ref])  # (100,) grey level of each frame
    assert np.all(np.diff(ref_levels) > 1)  # every frame tells itself apart

    for fps in (1.0, 3.0):
        sample = sample_frames(path, fps=fps, size=32)
        levels = sample.frames.reshape(len(sample.frames), -1).mean(axis=1)
        which = np.abs(levels[:, None] - ref_levels[None, :]).argmin(axis=1)  # (T,)
        targets = np.arange(len(which)) / fps
        expected = np.searchsorted(ref_times, targets + 1e-6, side="right") - 1
        assert which.tolist() == expected.tolist()
        np.testing.assert_allclose(sample.timestamps, ref_times[which], atol=1e-3)
    assert len(sample.timestamps) == 36  # 11.8 s + the last frame's 0.2 s, at 3 fps


@pytest.mark.parametrize(
    ("codec", "suffix"),
    [("mpeg4", ".avi"), ("libvpx-vp9", ".webm"), ("mjpeg", ".mkv")],
)
def test_other_codecs_and_containers(media_dir: Path, codec: str, suffix: str) -> None:
    fast = ("-deadline", "realtime", "-cpu-used", "8") if "vpx" in codec else ()
    path = make_video(
        media_dir / f"other-{codec}{suffix}",
        seconds=2,
        width=160,
        height=120,
        codec=codec,
        extra_args=fast,
    )
    sample = sample_frames(path, size=32)
    assert sample.frames.shape == (2, 32, 32, 3)
    assert sample.frames.std() > 10


def test_probe_reports_the_declaration(clip: Path) -> None:
    info = probe(clip)
    assert (info.width, info.height, info.fps, info.frame_count, info.codec) == (
        320,
        240,
        25.0,
        100,
        "h264",
    )
    assert info.duration_s == pytest.approx(4.0, abs=0.05)


def test_file_uri_and_path_objects(media_dir: Path, clip: Path) -> None:
    spaced = media_dir / "with space %.mp4"
    spaced.write_bytes(clip.read_bytes())
    assert probe(spaced.as_uri()).width == 320  # file:///...with%20space%20%25.mp4
    assert probe(str(spaced)).width == 320
    assert probe(f"file://localhost{spaced}").width == 320


def test_bad_arguments_are_value_errors(clip: Path) -> None:
    for kwargs in ({"fps": 0}, {"size": 0}, {"max_frames": 0}, {"start_s": -1},
                   {"duration_s": 0}, {"fps": float("nan")}):  # fmt: skip
        with pytest.raises(ValueError):
            sample_frames(clip, **kwargs)


# ---------------------------------------------------------------------------------------
# Refusals and failures
# ---------------------------------------------------------------------------------------


def _refusal(call: Callable[[Path], Any], path: Path) -> str:
    """The VideoError reason of call(path); anything else raised fails the test."""
    started = time.monotonic()
    with pytest.raises(VideoError) as caught:
        call(path)
    elapsed = time.monotonic() - started
    reason = caught.value.reason
    assert elapsed < FAST_S, f"{path.name}: took {elapsed:.1f} s"
    assert str(caught.value) == reason
    assert "\n" not in reason and str(path) not in reason
    return reason


def test_hostile_files_cover_the_corpus(hostile: dict[str, Path]) -> None:
    assert set(hostile) == set(HOSTILE_REASONS) | HOSTILE_BUT_VALID


@pytest.mark.parametrize("kind", sorted(HOSTILE_REASONS))
def test_hostile_file_is_refused_quickly(hostile: dict[str, Path], kind: str, private_tmp: Path) -> None:
    path = hostile[kind]
    reason = _refusal(lambda p: sample_frames(p, size=32), path)
    assert re.search(HOSTILE_REASONS[kind], reason), reason
    if kind != "truncated_faststart":  # probe() stops where sample_frames() refused
        assert _refusal(probe, path) == reason
    assert list(private_tmp.iterdir()) == []


def test_vfr_file_decodes(hostile: dict[str, Path]) -> None:
    sample = sample_frames(hostile["vfr"], size=32)
    assert sample.frames.shape == (12, 32, 32, 3)  # 2 s at 25 fps + 10 s at 5 fps
    np.testing.assert_allclose(sample.timestamps, np.arange(12), atol=0.05)


def test_limits_are_configurable(clip: Path) -> None:
    assert "exceeds limit 1000 bytes" in _refusal(lambda p: probe(p, limits=DecodeLimits(max_bytes=1000)), clip)
    assert _refusal(lambda p: probe(p, limits=DecodeLimits(max_pixels=320 * 239)), clip) == (
        "resolution 320x240 exceeds limit 76480 pixels"
    )
    assert _refusal(lambda p: probe(p, limits=DecodeLimits(max_seconds=3)), clip) == "duration 4 s exceeds limit 3 s"
    assert _refusal(lambda p: probe(p, limits=DecodeLimits(max_streams=0)), clip) == "too many streams: 1 (limit 0)"


def test_missing_path_is_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "nope.mp4"
    assert _refusal(probe, missing) == "file not found"
    assert _refusal(sample_frames, missing) == "file not found"
    assert _refusal(lambda p: probe(p.as_uri()), missing) == "file not found"


def test_non_files_and_other_urls_are_refused(tmp_path: Path) -> None:
    assert _refusal(probe, tmp_path) == "not a regular file"
    with pytest.raises(VideoError, match=r"unsupported URL scheme 'https'"):
        sample_frames("https://example.com/a.mp4")
    with pytest.raises(VideoError, match=r"another host"):
        probe("file://example.com/a.mp4")


class _SpyPopen(subprocess.Popen):
    """subprocess.Popen that remembers the children it started."""

    started: ClassVar[list[int]] = []

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        _SpyPopen.started.append(self.pid)


def test_timeout_kills_the_child(clip: Path, monkeypatch: pytest.MonkeyPatch, private_tmp: Path) -> None:
    monkeypatch.setattr(sandbox, "SPARE_CHILD", False)  # a child started for this request
    _SpyPopen.started = []
    monkeypatch.setattr(sandbox.subprocess, "Popen", _SpyPopen)
    started = time.monotonic()
    with pytest.raises(VideoError, match=r"^decode timed out after 0.05 s$"):
        sample_frames(clip, limits=DecodeLimits(timeout_s=0.05))
    assert time.monotonic() - started < 2
    (pid,) = _SpyPopen.started
    with pytest.raises(ProcessLookupError):  # killed, reaped, its group gone
        os.killpg(pid, 0)
    assert list(private_tmp.iterdir()) == []


def test_crashing_decoder_is_reported_as_a_crash(clip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No test hook in app.media.video: a sitecustomize on the child's PYTHONPATH kills it with
    # the signal a decoder bug would raise.
    for sig, call in (("SIGSEGV", sample_frames), ("SIGABRT", probe)):
        hook = tmp_path / sig  # one folder each: a cached .pyc must not be reused
        hook.mkdir()
        (hook / "sitecustomize.py").write_text(f"import os, signal\nos.kill(os.getpid(), signal.{sig})\n")
        monkeypatch.setenv("PYTHONPATH", str(hook))
        assert _refusal(call, clip) == f"decoder crashed (signal {sig})"


def test_memory_limit_is_enforced_and_reported(clip: Path) -> None:
    # 100 MB of address space is not enough to load PyAV and decord in the child.
    limits = DecodeLimits(memory_mb=100)
    assert _refusal(lambda p: sample_frames(p, limits=limits), clip) == "decoder ran out of memory (limit 100 MB)"


def test_protocol_looking_relative_path_is_a_plain_file(
    clip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # FFmpeg would read "concat:..." as its concat protocol; it must stay a file name.
    (tmp_path / "concat:clip.mp4").write_bytes(clip.read_bytes())
    monkeypatch.chdir(tmp_path)
    assert sample_frames("concat:clip.mp4", size=32).frames.shape == (4, 32, 32, 3)


def test_chunks_are_checked_before_use() -> None:
    # What a misbehaving child could send: a chunk that is not whole frames.
    with pytest.raises(VideoError, match="malformed chunk of 100 bytes"):
        video._chunk_frames(bytearray(100), size=8)
    with pytest.raises(VideoError, match="malformed chunk of 0 bytes"):
        video._chunk_frames(bytearray(), size=8)
    chunk = video._chunk_frames(bytearray(2 * 8 * 8 * 3), size=8)
    assert chunk.shape == (2, 8, 8, 3) and chunk.dtype == np.uint8 and chunk.flags.writeable


def test_failure_reasons_for_signals() -> None:
    # Signals that need no hostile file to exercise: the parent's reading of them.
    limits = DecodeLimits()
    missing = Path("/nonexistent")
    reason = sandbox._failure_reason
    assert reason(-signal.SIGXCPU, None, missing, limits) == "decoder exceeded its CPU time limit"
    assert reason(-signal.SIGKILL, None, missing, limits).startswith("decoder was killed")
    assert reason(86, None, missing, limits) == "decoder ran out of memory (limit 4096 MB)"
    assert reason(1, None, missing, limits) == "decoder failed (exit status 1)"
