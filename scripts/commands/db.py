"""`vidsim db ...`: move the database schema between Alembic revisions."""

from __future__ import annotations

import typer

from scripts.commands.common import console

db_app = typer.Typer(no_args_is_help=True, help="Database schema (Alembic).")


@db_app.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Apply migrations up to REVISION."""
    from app.db import migrate

    migrate(revision)
    console.print(f"database at {revision}")


@db_app.command("downgrade")
def db_downgrade(revision: str) -> None:
    """Revert migrations down to REVISION ('base' for an empty database)."""
    from app.db import downgrade

    downgrade(revision)
    console.print(f"database at {revision}")
