"""The `radcohort` console script. Each area registers its commands from its own module."""

from __future__ import annotations

import importlib

import typer
from typer.core import TyperOption

from app.privacy import configure_logging

_display_type = TyperOption.display_type_rich


def _flag_without_type(self, ctx):
    # this typer prints a type column for every option, `<bool>` for flags, as if they took a value
    return None if self.is_flag else _display_type(self, ctx)


TyperOption.display_type_rich = _flag_without_type

cli = typer.Typer(no_args_is_help=True, add_completion=False, help="radcohort: PACS -> labels -> cohorts -> CNN")

# modules under app/cli, each with `register(cli)`
COMMAND_MODULES = ["db", "pacs", "synth", "worker", "demo", "server", "cohorts", "labels", "sandbox", "train",
                   "exports", "worklists"]


def _version(value: bool) -> None:
    if value:
        from app import __version__

        typer.echo(f"radcohort {__version__}")
        raise typer.Exit()


@cli.callback()
def _root(
    log_level: str = typer.Option("INFO", envvar="RADCOHORT_LOG_LEVEL", help="log level (identifiers are "
                                  "redacted at every level)"),
    dicom_log_level: str = typer.Option("WARNING", envvar="RADCOHORT_DICOM_LOG_LEVEL",
                                        help="pynetdicom's log level (INFO logs every PDU and identifier)"),
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_version,
                                 help="print the version and exit"),
) -> None:
    configure_logging(log_level, dicom_log_level)


for _name in COMMAND_MODULES:
    importlib.import_module(f"app.cli.{_name}").register(cli)


def main() -> None:
    cli()
