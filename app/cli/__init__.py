"""The `radcohort` console script. Each area registers its commands from its own module."""

from __future__ import annotations

import importlib

import typer

from app.privacy import configure_logging

cli = typer.Typer(no_args_is_help=True, add_completion=False, help="radcohort: PACS -> labels -> cohorts -> CNN")

# modules under app/cli, each with `register(cli)`
COMMAND_MODULES = ["db", "pacs", "synth", "worker", "demo", "server", "cohorts", "labels"]


@cli.callback()
def _root(
    log_level: str = typer.Option("INFO", envvar="RADCOHORT_LOG_LEVEL", help="log level (identifiers are "
                                  "redacted at every level)"),
    dicom_log_level: str = typer.Option("WARNING", envvar="RADCOHORT_DICOM_LOG_LEVEL",
                                        help="pynetdicom's log level (INFO logs every PDU and identifier)"),
) -> None:
    configure_logging(log_level, dicom_log_level)


for _name in COMMAND_MODULES:
    importlib.import_module(f"app.cli.{_name}").register(cli)


def main() -> None:
    cli()
