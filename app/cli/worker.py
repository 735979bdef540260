"""`radcohort worker`: claim queued training jobs and run them (needs the [worker] extra for training)."""

from __future__ import annotations

import typer

from app.config import get_settings


def register(cli: typer.Typer) -> None:
    @cli.command("worker")
    def worker(
        once: bool = typer.Option(False, "--once", help="run queued jobs, then exit when the queue is empty"),
        poll: float = typer.Option(None, "--poll", min=0.1, help="seconds between queue polls "
                                   "(default RADCOHORT_WORKER_POLL_SECONDS)"),
        stale_after: float = typer.Option(60.0, "--stale-after", min=1.0,
                                          help="reclaim running jobs whose heartbeat is older than this"),
        nproc: int = typer.Option(None, "--nproc", min=1, help="processes per job (torchrun when > 1; "
                                  "default RADCOHORT_WORKER_GPUS or every visible GPU)"),
    ) -> None:
        """Claim queued training jobs and run them; SIGTERM gives the running job back to the queue."""
        from app.context import AppContext
        from models.worker import main

        ctx = AppContext.build(get_settings())
        typer.echo("worker started: claims queued training jobs (Ctrl-C gives a running job back to the queue)")
        try:
            # every claim, epoch, end and failure on the console as it happens
            main(ctx, once=once, poll=poll, stale_after=stale_after, nproc=nproc,
                 say=lambda text: typer.echo(text))
        finally:
            ctx.close()
