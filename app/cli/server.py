"""`radcohort serve` (API + Storage SCP), `radcohort scp` (SCP only, N processes behind one port), `radcohort reindex`."""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import threading
from pathlib import Path

import typer

from app.config import Settings, get_settings

log = logging.getLogger("radcohort.server")


def _scp_child(overrides: dict, levels: tuple[str, str], channel, fsync: bool = True, chunked: bool = False) -> None:
    """One receiving process: its own engine; connections arrive from the dispatcher."""
    from app.privacy import configure_logging

    configure_logging(*levels, fmt="%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s")
    from app.context import AppContext
    from app.wiring import storage_scp

    settings = get_settings(**overrides)
    ctx = AppContext.build(settings)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    # the dispatcher's process gone (even SIGKILLed) closes the channel: this child stops too
    scp = storage_scp(ctx, fsync=fsync, chunked=chunked).start(channel=channel, on_channel_closed=stop.set)
    try:
        stop.wait()
    finally:
        scp.stop()
        ctx.close()


class ScpProcesses:
    """N Storage SCP processes behind one port: this process accepts and hands each connection
    to the next child (round-robin, SCM_RIGHTS). Associations are threads sharing one GIL in a
    process; several processes are what scales with concurrent senders.
    """

    def __init__(self, settings: Settings, n: int, overrides: dict | None = None, fsync: bool = True,
                 chunked: bool = False):
        self.settings, self.n, self.fsync, self.chunked = settings, n, fsync, chunked
        self.overrides = overrides or {}
        self.procs: list = []
        self.dispatcher = None

    def start(self) -> "ScpProcesses":
        from app.dicom.scp import ConnectionDispatcher
        from app.store import DicomStore

        DicomStore(self.settings.store_dir).clean_temp()  # before any child writes
        self.dispatcher = ConnectionDispatcher(self.settings.scp_host, self.settings.scp_port, self.n)
        spawn = mp.get_context("spawn")  # fresh interpreters: no engine or threads inherited
        levels = (logging.getLevelName(logging.getLogger().level),
                  logging.getLevelName(logging.getLogger("pynetdicom").getEffectiveLevel()))
        for ch in self.dispatcher.child_channels():
            p = spawn.Process(target=_scp_child, args=(self.overrides, levels, ch, self.fsync, self.chunked),
                              daemon=True)
            p.start()
            self.procs.append(p)
        self.dispatcher.start()
        return self

    def stop(self) -> None:
        if self.dispatcher:
            self.dispatcher.close()
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(15)
            if p.is_alive():
                p.kill()
        self.procs = []


def _overrides(ae_title, scp_host, scp_port) -> dict:
    return {k: v for k, v in {"ae_title": ae_title, "scp_host": scp_host, "scp_port": scp_port}.items()
            if v is not None}


def _wait_for_signal() -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()


def register(cli: typer.Typer) -> None:
    @cli.command("scp")
    def scp(
        processes: int = typer.Option(None, "--processes", "-p", min=1, max=64,
                                      help="receiving processes (default RADCOHORT_SCP_PROCESSES)"),
        ae_title: str = typer.Option(None, help="override RADCOHORT_AE_TITLE"),
        host: str = typer.Option(None, help="override RADCOHORT_SCP_HOST"),
        port: int = typer.Option(None, help="override RADCOHORT_SCP_PORT"),
        fsync: bool = typer.Option(True, help="fsync each file before answering Success (durable)"),
        chunked: bool = typer.Option(True, help="stream each dataset into the store while it arrives (needed for "
                                                "huge instances; measured faster with fsync) instead of memory"),
    ) -> None:
        """Run the DICOM Storage SCP only (after `db upgrade`)."""
        from app.context import AppContext
        from app.db.migrate import upgrade
        from app.wiring import storage_scp

        overrides = _overrides(ae_title, host, port)
        settings = get_settings(**overrides)
        upgrade(settings.database_url)
        n = processes or settings.scp_process_count
        typer.echo(f"Storage SCP {settings.ae_title} on {settings.scp_host}:{settings.scp_port} ({n} process(es))")
        if n > 1:
            procs = ScpProcesses(settings, n, overrides, fsync=fsync, chunked=chunked).start()
            try:
                _wait_for_signal()
            finally:
                procs.stop()
            return
        ctx = AppContext.build(settings)
        server = storage_scp(ctx, fsync=fsync, chunked=chunked).start()
        try:
            _wait_for_signal()
        finally:
            server.stop()
            ctx.close()

    @cli.command("serve")
    def serve(
        no_scp: bool = typer.Option(False, "--no-scp", help="HTTP API only (run `radcohort scp` apart)"),
        scp_processes: int = typer.Option(None, min=1, max=64, help="SCP processes (default RADCOHORT_SCP_PROCESSES)"),
        host: str = typer.Option(None, help="override RADCOHORT_API_HOST"),
        port: int = typer.Option(None, help="override RADCOHORT_API_PORT"),
        chunked: bool = typer.Option(True, help="SCP: stream each dataset into the store while it arrives"),
    ) -> None:
        """Run the HTTP API and, unless --no-scp, the Storage SCP (after `db upgrade`)."""
        import uvicorn

        from app.api import create_app
        from app.context import AppContext
        from app.db.migrate import upgrade
        from app.wiring import storage_scp

        settings = get_settings(**{k: v for k, v in {"api_host": host, "api_port": port}.items() if v is not None})
        upgrade(settings.database_url)
        ctx = AppContext.build(settings)
        server = procs = None
        if not no_scp:
            n = scp_processes or settings.scp_process_count
            if n > 1:
                procs = ScpProcesses(settings, n, chunked=chunked).start()
            else:
                server = storage_scp(ctx, chunked=chunked).start()
            typer.echo(f"Storage SCP {settings.ae_title} on {settings.scp_host}:{settings.scp_port}")
        try:
            uvicorn.run(create_app(settings, ctx), host=settings.api_host, port=settings.api_port,
                        log_level=settings.log_level.lower())
        finally:
            if server:
                server.stop()
            if procs:
                procs.stop()
            ctx.close()

    @cli.command("reindex")
    def reindex(
        directory: Path = typer.Argument(None, exists=True, file_okay=False,
                                         help="folder of DICOM files (default: the store)"),
    ) -> None:
        """Index DICOM files on disk (the store after a DB loss, or any folder in place)."""
        from app.context import AppContext
        from app.db.migrate import upgrade
        from app.labels.service import load_labeler
        from app.index.ingest import index_directory

        settings = get_settings()
        upgrade(settings.database_url)
        ctx = AppContext.build(settings)
        try:
            labeler = load_labeler(ctx.sessions, settings.label_rules)
            res = index_directory(ctx, directory, labeler=labeler)
        finally:
            ctx.close()
        typer.echo(f"files {res.files}, indexed {res.inserted}, already indexed {res.existing}, "
                   f"unreadable {len(res.unreadable)}")
        for p in res.unreadable[:20]:
            typer.echo(f"  unreadable: {p}")
        if res.unreadable:
            raise typer.Exit(1)
