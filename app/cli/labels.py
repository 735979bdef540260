"""`radcohort labels coverage|validate-overlay|backfill` (next to `labels relabel`)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from app.config import get_settings


def _labels_group(cli: typer.Typer) -> typer.Typer:
    """The `labels` group another module may already have registered (relabel), else a new one."""
    for info in cli.registered_groups:
        if info.name == "labels" and info.typer_instance is not None:
            return info.typer_instance
    group = typer.Typer(help="header labels (rules file, relabel, coverage)", no_args_is_help=True)
    cli.add_typer(group, name="labels")
    return group


def register(cli: typer.Typer) -> None:
    labels = _labels_group(cli)

    @labels.command("coverage")
    def coverage_cmd(label: list[str] = typer.Option(None, "--label", help="body_part, view or laterality "
                                                                          "(repeatable; default all)"),
                     limit: int = typer.Option(20, min=1, max=200, help="values per label"),
                     examples: int = typer.Option(3, min=0, max=20, help="example instance UIDs per value"),
                     as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
        """What the site's headers say where the rules found no body part, view or laterality."""
        from app.context import AppContext
        from app.db.base import session_scope
        from app.labels.coverage import COVERAGE_LABELS, coverage

        wanted = tuple(dict.fromkeys(label)) if label else COVERAGE_LABELS
        bad = [x for x in wanted if x not in COVERAGE_LABELS]
        if bad:
            typer.echo(f"error: --label {bad[0]}: expected one of {', '.join(COVERAGE_LABELS)}", err=True)
            raise typer.Exit(2)
        ctx = AppContext.build(get_settings())
        try:
            with session_scope(ctx.sessions) as s:
                out = coverage(s, wanted, limit=limit, examples=examples)
        finally:
            ctx.close()
        if as_json:
            typer.echo(json.dumps(out, ensure_ascii=False, indent=2))
            return
        typer.echo(f"{out['instances']} instances indexed")
        for name, rep in out["labels"].items():
            typer.echo(f"\n{name}: {rep['missing']} without a label")
            for v in rep["values"]:
                typer.echo(f"  {v['count']:>7}  {v['source']:<40} {v['value']!r}  e.g. {', '.join(v['examples'][:1])}")

    @labels.command("validate-overlay")
    def validate_cmd(path: Path = typer.Argument(..., help="the overlay file (YAML, extends: builtin)")) -> None:
        """Check a site rules overlay; errors name their line (exit 2 when invalid)."""
        from app.labels.overlay import overlay_summary, validate_overlay

        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            typer.echo(f"error: cannot read {path}: {exc.strerror}", err=True)
            raise typer.Exit(2) from exc
        data, errors = validate_overlay(text)
        if errors:
            for e in errors:
                where = f"{path}:{e['line']}:{e['column']}" if e.get("line") else str(path)
                typer.echo(f"{where}: {e['path']}: {e['message']}", err=True)
            raise typer.Exit(2)
        typer.echo(json.dumps({"valid": True, "adds": overlay_summary(data or {})}))

    @labels.command("backfill")
    def backfill_cmd() -> None:
        """Fill the label-source columns of indexed instances from their stored files (after an
        upgrade run with RADCOHORT_SKIP_LABEL_BACKFILL=1); then run `labels relabel`."""
        from app.context import AppContext
        from app.labels.backfill import backfill_label_sources

        settings = get_settings()
        ctx = AppContext.build(settings)
        try:
            with ctx.sessions() as s:
                stats = backfill_label_sources(s.connection(), settings.store_dir)
                s.commit()
        finally:
            ctx.close()
        typer.echo(json.dumps(stats))
