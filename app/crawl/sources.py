"""Crawl sources: small data functions (the caller owns the transaction)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.crawl.discover import normalise
from app.crawl.models import SOURCE_KINDS, CrawlSource

# Options each kind understands (see CrawlSource); anything else is refused, not ignored.
_COMMON = {"trim_head_s", "trim_tail_s", "max_items"}
OPTIONS = {
    "url_list": _COMMON | {"urls"},
    "web_page": _COMMON | {"max_depth", "max_pages", "same_host"},
    "feed": _COMMON,
    "sitemap": _COMMON | {"max_pages", "follow_pages"},
    "platform": _COMMON | {"extractors", "allow_generic", "max_duration_s", "max_height"},
}


class SourceError(ValueError):
    """A source that cannot be added as given; str() says why."""


def add_source(
    session: Session, *, name: str, kind: str, url: str | None, options: dict[str, Any] | None = None
) -> CrawlSource:
    options = {k: v for k, v in (options or {}).items() if v is not None}
    if kind not in SOURCE_KINDS:
        raise SourceError(f"unknown kind {kind!r} (one of {', '.join(SOURCE_KINDS)})")
    unknown = set(options) - OPTIONS[kind]
    if unknown:
        raise SourceError(
            f"options {sorted(unknown)} do not apply to {kind} sources (allowed: {sorted(OPTIONS[kind])})"
        )
    if url is not None and normalise(url) is None:
        raise SourceError(f"{url!r} is not an http(s) URL")
    if url is None and not (kind == "url_list" and options.get("urls")):
        raise SourceError(f"a {kind} source needs a URL")
    bad = [u for u in options.get("urls", []) if normalise(str(u)) is None]
    if bad:
        raise SourceError(f"not http(s) URLs: {bad[:3]}")
    if session.scalar(select(CrawlSource.id).where(CrawlSource.name == name)) is not None:
        raise SourceError(f"a source named {name!r} exists already")
    source = CrawlSource(name=name, kind=kind, url=url, options=options, enabled=True)
    session.add(source)
    session.flush()
    return source


def find_source(session: Session, ref: str | int) -> CrawlSource:
    """A source by id or name."""
    source = None
    if isinstance(ref, int) or str(ref).isdigit():
        source = session.get(CrawlSource, int(ref))
    if source is None:
        source = session.scalar(select(CrawlSource).where(CrawlSource.name == str(ref)))
    if source is None:
        raise SourceError(f"no source {ref!r}")
    return source


def list_sources(session: Session) -> list[CrawlSource]:
    return list(session.scalars(select(CrawlSource).order_by(CrawlSource.id)))


def set_enabled(session: Session, ref: str | int, enabled: bool) -> CrawlSource:
    source = find_source(session, ref)
    source.enabled = enabled
    return source
