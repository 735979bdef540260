"""`radcohort db upgrade|downgrade`."""

from __future__ import annotations

import typer

from app.config import get_settings


def register(cli: typer.Typer) -> None:
    db = typer.Typer(help="database schema (Alembic)", no_args_is_help=True)

    @db.command("upgrade")
    def upgrade(revision: str = typer.Argument("head")) -> None:
        """alembic upgrade head on RADCOHORT_DATABASE_URL."""
        from app.db.migrate import upgrade as do_upgrade

        settings = get_settings()
        do_upgrade(settings.database_url, revision)
        typer.echo(f"database at {revision}")

    @db.command("downgrade")
    def downgrade(revision: str = typer.Argument(...)) -> None:
        """alembic downgrade to REVISION."""
        from app.db.migrate import downgrade as do_downgrade

        do_downgrade(get_settings().database_url, revision)
        typer.echo(f"database at {revision}")

    cli.add_typer(db, name="db")
