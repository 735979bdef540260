"""`radcohort export create|list|status`: cohort exports from the shell (app.exports)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from app.config import get_settings

ACTOR = "cli"


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(code)


def register(cli: typer.Typer) -> None:
    export = typer.Typer(help="exports of a frozen cohort: de-identified DICOM, PNG/NumPy, WebDataset",
                         no_args_is_help=True)

    @export.command("create")
    def create(cohort_id: int = typer.Argument(..., help="the cohort to export"),
               fmt: str = typer.Option("dicom-deid", "--format",
                                       help="dicom-deid | png | npy | webdataset | dicom (identified: --identified)"),
               image_size: int = typer.Option(224, help="png/npy/webdataset: square side in pixels"),
               bit_depth: int = typer.Option(8, help="png: 8 or 16"),
               burned_in: str = typer.Option("exclude", help="exclude | flag instances that may show burned-in text"),
               archive: str = typer.Option(None, help="zip | tar (default zip; tar for webdataset)"),
               out: Path = typer.Option(None, help="write the files into this folder instead of an archive"),
               identified: bool = typer.Option(False, "--identified",
                                               help="allow identified output (format dicom); audited"),
               as_json: bool = typer.Option(False, "--json", help="print the export as JSON")) -> None:
        """Export a cohort in the foreground (progress on stderr), audited as actor `cli`."""
        from app.context import AppContext
        from app.db.base import session_scope
        from app.errors import RadcohortError
        from app.exports import service

        params = {"format": fmt, "image_size": image_size, "bit_depth": bit_depth, "burned_in": burned_in}
        if archive:
            params["archive"] = archive
        try:
            service.validate_params(params)
        except RadcohortError as exc:
            _fail(exc.message)
        if fmt in service.IDENTIFIED_FORMATS and not identified:
            _fail(f"format {fmt} is identified output: pass --identified (the export is audited)")
        if out is not None and out.exists() and any(out.iterdir()):
            _fail(f"--out {out}: the folder is not empty")
        ctx = AppContext.build(get_settings())
        try:
            with session_scope(ctx.sessions) as s:
                export_id = service.create_export(s, cohort_id, params, actor=ACTOR).id
            report = service.run_export(ctx, export_id, target=out)
            with session_scope(ctx.sessions) as s:
                view = service.view(service.get_export(s, export_id))
        except RadcohortError as exc:
            _fail(exc.message)
        finally:
            ctx.close()
        if as_json:
            typer.echo(json.dumps(view, default=str))
            return
        where = out if out is not None else ctx.settings.data_dir / "exports" / str(export_id)
        typer.echo(f"export {export_id}: {report['exported']} images ({fmt}) in {where}")
        if report["excluded"]:
            typer.echo("excluded: " + ", ".join(f"{k} {v}" for k, v in sorted(report["excluded"].items())))
        if report["flagged"]:
            typer.echo("flagged (see flagged.csv): " + ", ".join(f"{k} {v}" for k, v in sorted(report["flagged"].items())))

    @export.command("list")
    def list_() -> None:
        """Exports, newest first: id, cohort, format, status, progress."""
        from sqlalchemy import select

        from app.context import AppContext
        from app.db.base import session_scope
        from app.db.models import Export

        ctx = AppContext.build(get_settings())
        try:
            with session_scope(ctx.sessions) as s:
                rows = list(s.scalars(select(Export).order_by(Export.id.desc()).limit(100)))
                typer.echo(f"{'id':>5} {'cohort':>6} {'format':<11} {'status':<8} {'done':>9}")
                for e in rows:
                    typer.echo(f"{e.id:>5} {e.cohort_id:>6} {e.format:<11} {e.status:<8} {e.done:>4}/{e.total:<4}")
        finally:
            ctx.close()

    @export.command("delete")
    def delete(export_id: int) -> None:
        """Remove an export's archive from the server (shared data should not linger); audited."""
        from app.context import AppContext
        from app.db.base import session_scope
        from app.errors import RadcohortError
        from app.exports import service

        ctx = AppContext.build(get_settings())
        try:
            with session_scope(ctx.sessions) as s:
                service.delete_archive(s, ctx.settings.data_dir, export_id, ACTOR)
        except RadcohortError as exc:
            _fail(exc.message)
        finally:
            ctx.close()
        typer.echo(f"export {export_id}: files removed")

    cli.add_typer(export, name="export")
