"""Crawler tables: sources, the items found on them, runs, and training requests.

They share ``Base`` with app.models, so Alembic (migrations/env.py imports this module)
sees them; migrations/versions/0002_crawl.py creates them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Boolean, Float, ForeignKey, Index, Integer, LargeBinary, String, Text, text
from sqlalchemy.orm import Mapped, mapped_column

from app.models import Base, BigId, utcnow

SOURCE_KINDS = ("url_list", "web_page", "feed", "sitemap", "platform")

# Item states. discovered -> fetched -> preprocessed, or -> rejected (reject_code, reason)
# or -> duplicate (duplicate_of_id: the item holding the same content).
DISCOVERED, FETCHED, PREPROCESSED, REJECTED, DUPLICATE = (
    "discovered",
    "fetched",
    "preprocessed",
    "rejected",
    "duplicate",
)
# States whose rows own a file with a given content hash: one per hash (partial unique index).
HOLDS_CONTENT = (FETCHED, PREPROCESSED)


class CrawlSource(Base):
    """Where videos are looked for. ``options`` by kind (all optional):

    - every kind: ``trim_head_s``, ``trim_tail_s`` (fixed trims), ``max_items`` per run;
    - ``url_list``: ``urls`` (list of video URLs; ``url``, if set, is a text file of more);
    - ``web_page``: ``max_depth`` (links followed, 0 = this page only), ``max_pages``,
      ``same_host`` (default true);
    - ``sitemap``: ``max_pages`` (sitemaps and pages read), ``follow_pages`` (read page
      URLs listed in the sitemap for videos, default true);
    - ``platform``: ``extractors`` (yt-dlp extractor names), ``allow_generic``,
      ``max_duration_s``.
    """

    __tablename__ = "crawl_sources"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    url: Mapped[str | None] = mapped_column(Text)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    options: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_crawled_at: Mapped[datetime | None] = mapped_column()


class CrawlRun(Base):
    """One run of a stage (crawl, preprocess), with its counts. A run that dies leaves
    status 'running'; the next run of the stage marks it 'abandoned'."""

    __tablename__ = "crawl_runs"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    stage: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default="running")  # running|done|failed|abandoned
    trigger: Mapped[str] = mapped_column(String(16), default="cli")  # cli|beat|task|test
    counts: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column()


class CrawledItem(Base):
    """One video URL found on a source, and what became of it."""

    __tablename__ = "crawled_items"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    source_id: Mapped[int] = mapped_column(ForeignKey("crawl_sources.id", ondelete="CASCADE"))
    url: Mapped[str] = mapped_column(Text)
    page_url: Mapped[str | None] = mapped_column(Text)  # where it was found
    via: Mapped[str] = mapped_column(String(16), default="http")  # http | ytdlp
    state: Mapped[str] = mapped_column(String(16), default=DISCOVERED)
    reject_code: Mapped[str | None] = mapped_column(String(32))  # robots, too_large, timeout, not_video...
    reason: Mapped[str | None] = mapped_column(Text)  # one readable line
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    content_hash: Mapped[str | None] = mapped_column(String(64))
    duplicate_of_id: Mapped[int | None] = mapped_column(ForeignKey("crawled_items.id", ondelete="SET NULL"))
    local_path: Mapped[str | None] = mapped_column(Text)  # the file as downloaded
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    duration_s: Mapped[float | None] = mapped_column(Float)
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    # Preprocessing: per-sample fingerprints of the first/last seconds (T, 64) uint8, what
    # was cut ({"head_s", "tail_s", "head": why, "tail": why}), and the clean file.
    head_fp: Mapped[bytes | None] = mapped_column(LargeBinary)
    tail_fp: Mapped[bytes | None] = mapped_column(LargeBinary)
    trimmed: Mapped[dict[str, Any]] = mapped_column(default=dict)
    clean_path: Mapped[str | None] = mapped_column(Text)
    clean_duration_s: Mapped[float | None] = mapped_column(Float)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("crawl_runs.id", ondelete="SET NULL"))
    discovered_at: Mapped[datetime] = mapped_column(default=utcnow)
    fetched_at: Mapped[datetime | None] = mapped_column()
    preprocessed_at: Mapped[datetime | None] = mapped_column()

    __table_args__ = (
        Index("crawled_items_source_url", "source_id", "url", unique=True),
        Index("crawled_items_state", "state", "source_id"),
        # The same content is stored once, whichever source or URL it came from.
        Index(
            "crawled_items_one_copy",
            "content_hash",
            unique=True,
            postgresql_where=text("state IN ('fetched', 'preprocessed')"),
            sqlite_where=text("state IN ('fetched', 'preprocessed')"),
        ),
    )


class TrainingRequest(Base):
    """ "Enough new material to train on": recorded by app.crawl.pipeline.on_new_material.
    ``item_watermark``: crawled items with id <= it were counted."""

    __tablename__ = "crawl_training_requests"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    new_items: Mapped[int] = mapped_column(Integer)
    item_watermark: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending|enqueued
    task_id: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
