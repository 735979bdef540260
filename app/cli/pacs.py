"""Commands of this area (placeholder: filled in by the stage that owns them)."""

import typer


def register(cli: typer.Typer) -> None:
    pass
