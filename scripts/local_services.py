"""Pointing a benchmark at this machine's Postgres and Redis, in a database, key prefix
and data folder of its own, unless DATABASE_URL / REDIS_URL are already configured."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def use_local_services(name: str, **env: str) -> None:
    """Creates database ``name`` if needed and sets the environment before settings are read."""
    if not os.environ.get("DATABASE_URL"):
        import psycopg

        with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
                conn.execute(f'CREATE DATABASE "{name}"')
        os.environ["DATABASE_URL"] = f"postgresql://postgres@127.0.0.1:5432/{name}"
    os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/12")
    os.environ.setdefault("VIDSIM_BROKER_PREFIX", f"{name}:")
    os.environ.setdefault("VIDSIM_CALLBACK_ALLOW_PRIVATE", "true")  # the receiver is on 127.0.0.1
    os.environ.setdefault("VIDSIM_DATA_DIR", str(Path(tempfile.gettempdir()) / name))
    os.environ.setdefault("VIDSIM_MEDIA_ROOTS", os.environ["VIDSIM_DATA_DIR"])
    for key, value in env.items():
        os.environ.setdefault(key, value)
    from app.config import get_settings

    get_settings.cache_clear()
