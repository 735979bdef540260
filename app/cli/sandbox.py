"""`radcohort sandbox-pacs`: a throwaway Orthanc to try radcohort on when no PACS is at hand.

It is the Orthanc the demo and the tests use (config from orthanc/), on loopback only, with radcohort
(RADCOHORT_AE_TITLE on RADCOHORT_SCP_PORT) registered as its C-MOVE destination. It keeps running
after the command returns; `--stop` ends it.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import typer

PID_FILE = "orthanc.pid"


def _running_pid(directory: Path) -> int | None:
    try:
        pid = int((directory / PID_FILE).read_text().split()[0])
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError, IndexError):
        return None


def register(cli: typer.Typer) -> None:
    @cli.command("sandbox-pacs")
    def sandbox_pacs(
        directory: Path = typer.Option(Path("sandbox-pacs"), "--dir", help="Orthanc's storage, config and log"),
        port: int = typer.Option(4242, "--port", envvar="PACS_PORT", min=1, max=65535, help="DICOM port"),
        http_port: int = typer.Option(0, "--http-port", min=0, max=65535, help="Orthanc's HTTP port (0: a free one)"),
        aet: str = typer.Option("ORTHANC", "--aet", help="the sandbox's AE title"),
        stop: bool = typer.Option(False, "--stop", help="stop the sandbox started from --dir"),
    ) -> None:
        """Start a local Orthanc (apt package `orthanc`) that can C-MOVE to radcohort; returns when it answers."""
        from app.config import get_settings
        from app.devtools.orthanc import OrthancServer, orthanc_binary

        directory = directory.resolve()
        pid = _running_pid(directory)
        if stop:
            if pid is None:
                typer.echo(f"no sandbox PACS running from {directory}")
                return
            os.kill(pid, signal.SIGTERM)
            for _ in range(100):  # Orthanc flushes its index on SIGTERM (a few seconds)
                if _running_pid(directory) is None:
                    break
                time.sleep(0.1)
            (directory / PID_FILE).unlink(missing_ok=True)
            typer.echo(f"sandbox PACS stopped (pid {pid})")
            return
        if pid is not None:
            typer.echo(f"a sandbox PACS is already running from {directory} (pid {pid}); --stop ends it")
            return
        if not orthanc_binary():
            typer.echo("Orthanc is not installed: apt-get install orthanc (or use your own PACS)", err=True)
            raise typer.Exit(1)
        settings = get_settings()
        srv = OrthancServer(directory, dicom_port=port, http_port=http_port, aet=aet,
                            modalities={"radcohort": (settings.ae_title, "127.0.0.1", settings.scp_port)})
        try:
            srv.start(timeout=60)
        except RuntimeError as exc:
            typer.echo(f"sandbox PACS did not start: {exc} (port {port} taken? --port)", err=True)
            raise typer.Exit(1) from exc
        (directory / PID_FILE).write_text(f"{srv.proc.pid}\n")
        typer.echo(f"sandbox PACS {aet} on 127.0.0.1:{port} (DICOM), {srv.url} (web), moves to "
                   f"{settings.ae_title}@127.0.0.1:{settings.scp_port}; stop it with "
                   f"`radcohort sandbox-pacs --stop --dir {directory}`")
