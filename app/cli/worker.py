"""`radcohort worker`: run background jobs — the job queues (probe, cohort, export, worklist, retrieval) and
training (training and scoring jobs; needs the [worker] extra)."""

from __future__ import annotations

import typer

from app.config import get_settings


def register(cli: typer.Typer) -> None:
    @cli.command("worker")
    def worker(
        queues: str = typer.Option("all", "--queues", help="comma-separated queues to serve: probe, cohort, "
                                   "export, worklist, retrieval, training (default: all)"),
        once: bool = typer.Option(False, "--once", help="run queued jobs, then exit when the queues are empty"),
        poll: float = typer.Option(None, "--poll", min=0.1, help="seconds between training queue polls "
                                   "(default RADCOHORT_WORKER_POLL_SECONDS)"),
        stale_after: float = typer.Option(60.0, "--stale-after", min=1.0,
                                          help="reclaim running training jobs whose heartbeat is older than this"),
        nproc: int = typer.Option(None, "--nproc", min=1, help="processes per training job (torchrun when > 1; "
                                  "default RADCOHORT_WORKER_GPUS or every visible GPU)"),
    ) -> None:
        """Claim queued jobs of the given queues and run them; SIGTERM gives running jobs back to the queue."""
        from app.context import AppContext
        from app.errors import InvalidInput
        from app.jobs.queue import parse_queues
        from app.jobs.worker import run_worker

        try:
            names = parse_queues(queues)
        except InvalidInput as exc:
            raise typer.BadParameter(exc.message, param_hint="--queues") from None
        ctx = AppContext.build(get_settings())
        typer.echo(f"worker started: serves {', '.join(names)} (Ctrl-C gives running jobs back to the queue)")
        try:
            # every claim, epoch, end and failure on the console as it happens
            run_worker(ctx, names, once=once, poll=poll, stale_after=stale_after, nproc=nproc,
                       say=lambda text: typer.echo(text))
        finally:
            ctx.close()
