"""One settings object for the whole service, read from the environment.

With nothing set, vidsim runs embedded: SQLite and a filesystem Celery broker under
``VIDSIM_DATA_DIR``. With ``DATABASE_URL`` / ``REDIS_URL`` it runs on Postgres and Redis.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# A well-formed development secret (Standard Webhooks: "whsec_" + base64 of 24-64 bytes).
# It is public, so it is refused outside development.
DEV_WEBHOOK_SECRET = "whsec_dmlkc2ltLWRldmVsb3BtZW50LW9ubHktc2VjcmV0IQ=="

# Standard Webhooks' retry schedule, in seconds after the previous attempt.
STANDARD_RETRY_SCHEDULE = (0, 5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VIDSIM_", extra="ignore")

    env: Literal["development", "production"] = "development"
    data_dir: Path = Path(".vidsim")
    database_url: str | None = Field(default=None, validation_alias=AliasChoices("DATABASE_URL", "VIDSIM_DATABASE_URL"))
    redis_url: str | None = Field(default=None, validation_alias=AliasChoices("REDIS_URL", "VIDSIM_REDIS_URL"))

    # Webhooks. Several secrets may be given comma-separated while rotating: every
    # delivery is signed with each, so receivers holding either one accept it.
    webhook_secret: str = DEV_WEBHOOK_SECRET
    callback_allow_private: bool = False
    callback_timeout_s: float = 15.0
    # Seconds to wait before each attempt (the first is immediate); its length is the
    # number of attempts before a delivery is dead-lettered.
    callback_retry_schedule: Annotated[tuple[float, ...], NoDecode] = STANDARD_RETRY_SCHEDULE
    outbox_sweep_interval_s: float = 5.0

    # Retrieval: the largest k an event may ask for.
    max_k: int = 100

    # Vector index (app/index/: built by rebuild.py, searched by search.py; measured by scripts/bench_index.py).
    # Build parameters are recorded in each IndexVersion.params; a change applies at the
    # next rebuild. hnsw: a graph over the vectors stored as index_dtype; hash: a graph
    # over binary codes (Hamming), candidates re-ranked by exact cosine.
    index_mode: Literal["hnsw", "hash"] = "hnsw"
    index_dtype: Literal["f32", "f16", "i8"] = "f16"
    index_connectivity: int = 16
    index_expansion_add: int = 128
    # search-time, applies to the version being served; None: the mode's measured default
    # (app.index.params.DEFAULT_EXPANSION_SEARCH: 96 for hnsw, 256 for hash)
    index_expansion_search: int | None = None
    index_shards: int = 1
    pca_dim: int | None = None  # learned reduction before indexing (re-ranked like hash)
    pca_whiten: bool = False
    hash_bits: int | None = None  # None: one bit per (reduced) dimension
    hash_rotation: Literal["none", "pca", "itq"] = "itq"
    # Candidates re-ranked by exact cosine of the embeddings (hash and PCA modes; None:
    # 100 there, 0 otherwise). Search-time. They are read from the database (the
    # system of record: the index keeps only graph and codes, ~225 bytes per video at
    # 1M in hash mode) or from a float copy written beside the index (index_rerank_dtype;
    # faster, 1 KB more per 512-d video as f16).
    index_rerank: int | None = None
    index_rerank_from: Literal["database", "file"] = "database"
    index_rerank_dtype: Literal["f32", "f16"] = "f16"
    index_refresh_s: float = 1.0  # a worker notices a new active index version within this
    index_keep_versions: int = 3  # index files kept on disk (the active one included)
    # Beat rebuilds the index this often when at least index_rebuild_min_new embeddings
    # are newer than the active build (until then they are searched exactly).
    index_rebuild_interval_s: float = 600.0
    index_rebuild_min_new: int = 100
    # A result whose calibrated score (app.index.calibrate.calibrate) reaches this is flagged as a
    # near-duplicate of the query (precision measured by scripts/bench_index.py).
    near_duplicate_threshold: float = 0.92
    # The second stage: this many of the first stage's candidates (at least k) are
    # re-ranked by aligning their frames with the query's (app.index.align); 0 turns it off.
    rerank_candidates: int = 64
    # A re-ranked result whose fused score (app.index.rerank.fused) reaches this is flagged
    # as a near-duplicate (dev part of the benchmark, untrained encoder: precision 0.62,
    # recall 0.53; README).
    rerank_near_duplicate_threshold: float = 0.5
    # Candidates' frame descriptors kept in each worker process (MB, least recently used
    # out first; 0: read from Postgres for every search). 256 MB holds the frames of about
    # 2,700 videos of 64 s (384-d, float32 once read).
    rerank_frame_cache_mb: int = 256
    # Index versions keep a memory-mapped copy of the library's frame descriptors (48 KB
    # a 64-s video of the initial encoder on disk), read for the second stage instead of Postgres; fresh videos,
    # not yet in a version, are read from Postgres (and the cache above) either way.
    index_frames_file: bool = True

    # Decoding limits (applied in a throwaway child process).
    frame_fps: float = 1.0
    max_frames: int = 64
    # Cut black, flat or blurred borders (letterbox, pillarbox, padding) off every sampled
    # video before its frames are resized (app/media/geometry.py); rotation is always applied.
    crop_borders: bool = True
    decode_timeout_s: float = 120.0
    decode_memory_mb: int = 4096
    max_video_seconds: float = 4 * 3600
    max_video_pixels: int = 4096 * 2160
    max_video_streams: int = 16
    max_download_bytes: int = 2 * 1024**3
    # Wall clock for one event video's download, connecting to the last byte: a server
    # that trickles its answer is cut off then (and the event answered with an error).
    download_deadline_s: float = 120.0
    # Where file:// or plain-path videos may be read from (empty: the data dir's media/).
    media_roots: Annotated[tuple[Path, ...], NoDecode] = ()

    # Celery.
    visibility_timeout_s: int = 3600
    # Prefix of every Redis key the broker uses, so several deployments (or test runs)
    # can share one Redis.
    broker_prefix: str = ""
    task_max_attempts: int = 3
    # Embedding tasks that may fail on one video with one model (beyond their own
    # retries) before it is given up for that model: a rollout skips it, and events for
    # it are answered with the reason instead of asking for it again.
    embed_max_attempts: int = 3
    # An embedding asked for this long ago and still not made, while nothing waits in the
    # embed queue, is asked for again (a rollout's video; a parked event is served
    # again). The embed queue's hard limit (900 s) bounds any embedding that started.
    embed_requeue_after_s: float = 900.0
    # An event still waiting for its video's embedding this long after it arrived is
    # answered with an error.
    parked_event_deadline_s: float = 3600.0
    # How often beat advances rollouts and looks at parked events.
    sweep_interval_s: float = 30.0
    torch_threads: int = 0  # 0: let torch decide
    # numpy's BLAS threads in each worker process (0: the library's default, one per core).
    # Prefork already runs a process per core, and a search's matrices are small: with two
    # BLAS threads on a busy 2-core machine, both stages of a warm search took p50 58 ms
    # against 14 ms with one (scripts/bench_search.py, 10k videos).
    blas_threads: int = 1
    metrics_port: int | None = None  # workers serve Prometheus metrics here when set

    # Logs. Workers write one JSON object per line (ts, level, logger, message, and the
    # event_id, task and task_id being served) for log shippers; "text" for a terminal.
    log_format: Literal["json", "text"] = "json"
    log_level: str = "INFO"

    # Crawler (app/crawl). Politeness: one request per host every crawl_host_interval_s
    # at most, or slower when robots.txt asks (Crawl-delay / Request-rate); hosts asking
    # for more than crawl_max_crawl_delay_s are skipped for the run, not hammered.
    crawl_user_agent: str = "vidsim-crawler/0.1 (+https://github.com/vidsim/vidsim#crawler)"
    crawl_allow_private: bool = False  # private/loopback targets (tests, intranet crawls)
    crawl_host_interval_s: float = 1.0
    crawl_max_crawl_delay_s: float = 60.0
    crawl_robots_ttl_s: float = 3600.0
    crawl_timeout_s: float = 20.0  # connect, and each read of a response
    crawl_download_timeout_s: float = 600.0  # wall clock for one whole download
    crawl_max_download_bytes: int = 512 * 1024**2
    crawl_max_page_bytes: int = 5 * 1024**2  # HTML pages, feeds, sitemaps, robots.txt
    crawl_retries: int = 3  # attempts per request for transient failures (5xx, 429, resets)
    crawl_retry_max_wait_s: float = 30.0
    crawl_item_max_attempts: int = 3  # runs in which a transiently failing item is retried
    crawl_max_redirects: int = 5
    # Budget of one crawl run (all sources together).
    crawl_run_max_pages: int = 2000
    crawl_run_max_items: int = 500
    crawl_run_max_bytes: int = 50 * 1024**3
    crawl_run_max_s: float = 1500.0  # below the crawl queue's hard time limit
    crawl_max_video_seconds: float = 1200.0  # longer crawled videos are refused
    # Platforms via yt-dlp: extractor names allowed unless a source names its own; the
    # generic extractor (any URL on the web) only for sources that enable it.
    crawl_ytdlp_extractors: Annotated[tuple[str, ...], NoDecode] = ("youtube", "vimeo", "dailymotion")
    crawl_ytdlp_max_height: int = 720
    # Preprocessing: fixed trims (seconds), and recurring intros/outros found by comparing
    # tiny per-frame fingerprints of the first/last crawl_trim_scan_s of a source's videos.
    crawl_trim_head_s: float = 0.0
    crawl_trim_tail_s: float = 0.0
    crawl_trim_detect: bool = True
    crawl_trim_scan_s: float = 45.0
    crawl_trim_fps: float = 2.0
    crawl_trim_min_support: int = 2  # a segment must recur in at least this many other videos
    crawl_trim_max_diff: float = 12.0  # mean |grey difference| (0-255) for "the same frame"
    crawl_min_clean_seconds: float = 2.0
    crawl_preprocess_max_s: float = 900.0  # no new cut starts later; a cut takes <= 800 s
    # Schedule: the pipeline's period, and how many new clean videos start a training run.
    crawl_pipeline_interval_s: float = 6 * 3600.0
    crawl_train_min_new_items: int = 1000
    # Training workers train a run in chunks of this many seconds (app.learn.runs), each
    # resumed from the run's checkpoint; kept under the train queue's hard limit.
    train_chunk_s: float = 2400.0
    # A trained model rolls out only where it finds copies of the library no worse than
    # the active model (app/learn/gate.py); off, every requested rollout goes ahead.
    rollout_gate: bool = True
    beat_lock_timeout_s: int = 60  # the single-beat lock (RedBeat) lapses this long after a beat dies
    # Retrieval benchmarks (ground_truth.json files, or folders holding them) whose queries
    # and test-part footage every training run refuses (app/learn/train/guards.py).
    benchmarks: Annotated[tuple[Path, ...], NoDecode] = ()

    @field_validator("crawl_ytdlp_extractors", mode="before")
    @classmethod
    def _split_extractors(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip().lower() for part in value.split(",") if part.strip())
        return value

    @field_validator("callback_retry_schedule", "media_roots", "benchmarks", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @model_validator(mode="after")
    def _refuse_placeholder_secret_in_production(self) -> Settings:
        if self.env == "production" and DEV_WEBHOOK_SECRET in self.webhook_secrets:
            raise ValueError(
                "VIDSIM_WEBHOOK_SECRET is the public development secret; "
                "set a real one (whsec_ + base64 of 24-64 random bytes) in production"
            )
        return self

    @property
    def webhook_secrets(self) -> list[str]:
        return [s.strip() for s in self.webhook_secret.split(",") if s.strip()]

    @property
    def sqlalchemy_url(self) -> str:
        if self.database_url:
            # Accept the common postgres:// spellings and use psycopg 3.
            url = self.database_url
            for prefix in ("postgres://", "postgresql://"):
                if url.startswith(prefix):
                    return "postgresql+psycopg://" + url[len(prefix) :]
            return url
        return f"sqlite:///{(self.data_dir / 'vidsim.db').resolve()}"

    @property
    def embedded(self) -> bool:
        """True when no broker server is configured (filesystem broker)."""
        return not self.redis_url

    @property
    def index_dir(self) -> Path:
        return self.data_dir / "index"

    @property
    def media_dir(self) -> Path:
        return self.data_dir / "media"

    @property
    def checkpoint_dir(self) -> Path:
        return self.data_dir / "checkpoints"

    @property
    def crawl_dir(self) -> Path:
        """Crawled files: raw/ (as downloaded), clean/ (trimmed, for training), tmp/."""
        return self.data_dir / "crawl"


@functools.cache
def get_settings() -> Settings:
    return Settings()
