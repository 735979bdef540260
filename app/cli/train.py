"""`radcohort train`, `radcohort jobs list|follow|cancel`, `radcohort models list`: training from the shell.

On the configured database (RADCOHORT_DATABASE_URL), validated exactly as the API validates
(app.training.params + app.training.jobs.check_request); nothing here imports torch: a running
`radcohort worker` trains.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager

import typer

from app.config import get_settings

FINAL = ("completed", "failed", "cancelled")
EXIT_BY_STATUS = {"completed": 0, "failed": 1, "cancelled": 3}


def error_lines(exc) -> str:
    """A pydantic ValidationError (or RequestInvalid) as `field: message` lines, without pydantic's URLs."""
    errors = exc.errors() if callable(getattr(exc, "errors", None)) else getattr(exc, "errors", [])
    lines = []
    for e in errors:
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        lines.append(f"{'.'.join(loc) or 'request'}: {e.get('msg')}")
    return "\n".join(lines) or str(exc)


@contextmanager
def _session() -> Iterator:
    """A committed session on the configured database; a domain error ends the command (exit 2)."""
    from app.context import AppContext
    from app.db.base import session_scope
    from app.errors import RadcohortError

    ctx = AppContext.build(get_settings())
    try:
        with session_scope(ctx.sessions) as s:
            yield s
    except RadcohortError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from exc
    finally:
        ctx.close()


def _fmt(v, pct: bool = False) -> str:
    if v is None:
        return "-"
    return f"{float(v):.1f}%" if pct else f"{float(v):.4f}"


def epoch_line(h: dict, epochs) -> str:
    parts = [f"epoch {h.get('epoch')}/{epochs}", f"loss {_fmt(h.get('loss'))}",
             f"train acc {_fmt(h.get('train_accuracy'), True)}"]
    if h.get("val_accuracy") is not None:
        parts.append(f"val acc {_fmt(h['val_accuracy'], True)}")
    if h.get("images_per_second"):
        parts.append(f"{float(h['images_per_second']):.0f} img/s")
    return "  ".join(parts)


def per_class_table(metrics: dict) -> str:
    rows = [f"{'class':<8} {'n':>4} {'correct':>7} {'accuracy %':>10}  confidence mean ± SD"]
    for r in metrics.get("per_class") or []:
        sd = "-" if r.get("confidence_sd") is None else f"{r['confidence_sd']:.3f}"
        acc = "-" if r.get("accuracy") is None else f"{r['accuracy']:.1f}"
        rows.append(f"{r['class']:<8} {r['n']:>4} {r['correct']:>7} {acc:>10}  {r['confidence_mean']:.3f} ± {sd}")
    rows.append(f"overall accuracy: {float(metrics.get('overall_accuracy') or 0):.1f} %")
    return "\n".join(rows)


def follow_job(job_id: int, poll: float = 1.0, timeout: float | None = None) -> int:
    """Print a job's progress until it ends; returns the exit code for its status."""
    from app.training import jobs

    shown: set = set()
    last = None
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        with _session() as s:
            job = jobs.get_job(s, job_id)
            view = jobs.job_view(job)
            note = jobs.note(s, job)
        state = (view["status"], note, (view.get("preprocess") or {}).get("done"))
        if state != last:
            pre = view.get("preprocess") or {}
            extra = f" (preprocessed {pre.get('done')}/{pre.get('total')})" if pre.get("total") else ""
            typer.echo(f"training job {job_id}: {note or view['status']}"
                       + (f" on {view['device']}" if view.get("device") else "") + extra)
            last = state
        for h in view["history"]:
            if h.get("epoch") not in shown:
                shown.add(h.get("epoch"))
                typer.echo("  " + epoch_line(h, view["epochs"]))
        if view["status"] in FINAL:
            if view["status"] == "completed" and job.metrics:
                typer.echo(per_class_table(job.metrics))
            elif view.get("error"):
                typer.echo(f"error: {view['error'].strip()}", err=True)
            return EXIT_BY_STATUS[view["status"]]
        if deadline is not None and time.monotonic() > deadline:
            typer.echo(f"training job {job_id} still {view['status']} after {timeout:.0f} s", err=True)
            return 4
        time.sleep(poll)


def register(cli: typer.Typer) -> None:
    @cli.command("train")
    def train(
        cohort_id: int = typer.Argument(..., help="a cohort id (`radcohort cohort create`, POST /api/v1/cohorts)"),
        model: str = typer.Option(None, "--model", help="timm model name (default resnet18; "
                                  "`radcohort models list --architectures`)"),
        depth: int = typer.Option(None, "--depth", help="study depth preset 4, 19, 34 or 64 (overrides --model)"),
        epochs: int = typer.Option(None, "--epochs", help="default 30 (the study); a CPU try-out: 2-10"),
        image_size: int = typer.Option(None, "--image-size", help="input height in px (default 256; CPU: 64-96)"),
        batch_size: int = typer.Option(None, "--batch-size", help="default 256 on CUDA, 32 on CPU"),
        lr: float = typer.Option(None, "--lr", help="learning rate (default 1e-3, AdamW)"),
        seed: int = typer.Option(None, "--seed", help="default 0"),
        experiment: list[str] = typer.Option(None, "--experiment",
                                             help="rotate90, scale10 or depth_ladder (repeat; default none)"),
        val_fraction: float = typer.Option(None, "--val-fraction",
                                           help="train patients held out for val_accuracy (default 0.1; 0 = none)"),
        device: str = typer.Option(None, "--device", help="auto (default), cpu, cuda, cuda:N"),
        follow: bool = typer.Option(False, "--follow/--no-follow", help="print progress until the job ends"),
    ) -> None:
        """Queue a training job for a cohort (the API's POST /api/v1/training-jobs, validated the same way)."""
        from pydantic import ValidationError

        from app.training import jobs
        from app.training.params import TrainingJobCreate

        given = {"cohort_id": cohort_id, "model": model, "depth": depth, "epochs": epochs, "image_size": image_size,
                 "batch_size": batch_size, "lr": lr, "seed": seed, "experiments": experiment or None,
                 "val_fraction": val_fraction, "device": device}
        try:
            body = TrainingJobCreate(**{k: v for k, v in given.items() if v is not None})
        except ValidationError as exc:
            typer.echo(error_lines(exc), err=True)
            raise typer.Exit(2) from exc
        try:
            with _session() as s:
                created = jobs.create_jobs(s, body, "cli")
                ids, note = [j.id for j in created], jobs.note(s, created[0])
        except jobs.RequestInvalid as exc:
            typer.echo(error_lines(exc), err=True)
            raise typer.Exit(2) from exc
        typer.echo(f"training job{'s' if len(ids) > 1 else ''} {', '.join(map(str, ids))} queued"
                   + (f"; {note.removeprefix('queued — ')}" if note else ""))
        if follow:
            raise typer.Exit(follow_job(ids[-1]))

    jobs_app = typer.Typer(help="training jobs: list, follow, cancel", no_args_is_help=True)

    @jobs_app.command("list")
    def list_jobs(status: str = typer.Option(None, help="queued, running, completed, failed or cancelled"),
                  limit: int = typer.Option(20, min=1)) -> None:
        """Newest first."""
        from app.training import jobs

        with _session() as s:
            total, rows = jobs.list_jobs(s, status=status, limit=limit)
            views = [jobs.job_view(j) for j in rows]
        typer.echo(f"{total} job(s)")
        for v in views:
            p = v["params"] or {}
            typer.echo(f"{v['id']:>5}  {v['status']:<10} cohort {v['cohort_id']:<4} {p.get('model')}"
                       f"{'' if p.get('depth') is None else ' depth ' + str(p['depth'])}  epoch {v['epoch']}/{v['epochs']}")

    @jobs_app.command("follow")
    def follow_cmd(job_id: int, poll: float = typer.Option(1.0, min=0.1, help="seconds between reads"),
                   timeout: float = typer.Option(None, min=1, help="give up after this many seconds (exit 4)")) -> None:
        """Print epochs as they finish, then the per-class table; exit 0 completed, 1 failed, 3 cancelled."""
        raise typer.Exit(follow_job(job_id, poll, timeout))

    @jobs_app.command("cancel")
    def cancel(job_id: int) -> None:
        """Cancel a queued job at once, a running one at the worker's next check."""
        from app.training import jobs

        with _session() as s:
            job = jobs.cancel_job(s, job_id, "cli")
            status, requested = job.status, job.cancel_requested
        typer.echo(f"training job {job_id}: {status}" + (" (cancel requested)" if status == "running" and requested
                                                         else ""))

    models_app = typer.Typer(help="trained models and the architectures workers offer", no_args_is_help=True)

    @models_app.command("list")
    def list_models(architectures: bool = typer.Option(False, "--architectures",
                                                       help="the model names a training job may ask for"),
                    as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
        """Trained models (id, job, architecture, classes, overall accuracy), newest first."""
        from app.training import predict, workers

        with _session() as s:
            if architectures:
                names, source = workers.offered_models(s)
                typer.echo(json.dumps({"source": source, "items": names}) if as_json else
                           f"{len(names)} architectures ({source}):\n" + "\n".join(names))
                return
            total, rows = predict.list_models(s, limit=1000, offset=0)
            views = [predict.model_view(m) for m in rows]
        if as_json:
            typer.echo(json.dumps({"total": total, "items": views}, default=str, indent=1))
            return
        typer.echo(f"{total} model(s)")
        for v in views:
            acc = ((v.get("card") or {}).get("metrics") or {}).get("overall_accuracy")
            typer.echo(f"{v['id']:>5}  job {v['job_id']:<5} {v['architecture']:<20} {len(v['classes'])} classes"
                       f"  overall {'-' if acc is None else f'{acc:.1f}%'}")

    cli.add_typer(jobs_app, name="jobs")
    cli.add_typer(models_app, name="models")
