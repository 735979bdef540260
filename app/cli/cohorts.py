"""`radcohort labels relabel` and `radcohort cohort create|manifest|plan-pull|pull`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer

from app.config import get_settings


@contextmanager
def _command_context() -> Iterator:
    """The command's AppContext, closed at the end; a domain error ends the command (exit 2)."""
    from app.context import AppContext
    from app.errors import RadcohortError

    ctx = AppContext.build(get_settings())
    try:
        yield ctx
    except RadcohortError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from exc
    finally:
        ctx.close()


def cohort_table(out: dict) -> str:
    """The class counts, the exclusions and the warnings of a cohort answer, as a small table."""
    head = f"cohort {out['id']}" if out.get("id") else "preview (nothing saved)"
    lines = [f"{head}: taxonomy {out['taxonomy']}, {out['size']} images, seed {out['seed']}",
             f"{'class':<10} {'available':>9} {'selected':>8} {'train':>6} {'val':>5} {'test':>5}"]
    for c in out.get("classes") or []:
        lines.append(f"{c['name']:<10} {c.get('available', 0):>9} {c.get('selected', 0):>8} {c.get('train', 0):>6} "
                     f"{c.get('val', 0):>5} {c.get('test', 0):>5}")
    excluded = {k: v for k, v in (out.get("excluded") or {}).items() if v}
    if excluded:
        lines.append("excluded: " + ", ".join(f"{k} {v}" for k, v in sorted(excluded.items())))
    lines += [f"warning: {w}" for w in out.get("warnings") or []]
    return "\n".join(lines)


def register(cli: typer.Typer) -> None:
    labels = typer.Typer(help="header labels (rules file, relabel)", no_args_is_help=True)
    cohort = typer.Typer(help="cohorts: build snapshots, export manifests, plan PACS pulls", no_args_is_help=True)

    @labels.command("relabel")
    def relabel(rules: Path = typer.Option(None, help="rules file (default: RADCOHORT_LABEL_RULES or built-in)"),
                ) -> None:
        """Recompute every instance's labels with the current rule set (a new version when it changed)."""
        from app.context import AppContext
        from app.db.base import session_scope
        from app.labels.service import relabel_all

        settings = get_settings()
        ctx = AppContext.build(settings)
        try:
            with session_scope(ctx.sessions) as s:
                stats = relabel_all(s, rules_file=rules or settings.label_rules)
        finally:
            ctx.close()
        typer.echo(json.dumps(stats))

    @cohort.command("create")
    def create(taxonomy: str = typer.Option("xr10"), per_class: int = typer.Option(None, min=1),
               train: float = typer.Option(0.8), val: float = typer.Option(0.0), test: float = typer.Option(0.2),
               seed: int = typer.Option(0, min=0), preview: bool = typer.Option(False, "--preview"),
               include_conflicts: bool = typer.Option(False, "--include-conflicts"),
               match_name_birthdate: bool = typer.Option(False, "--match-name-birthdate"),
               as_json: bool = typer.Option(False, "--json", help="print the full answer as JSON")) -> None:
        """Build (or --preview) a cohort snapshot; prints the class counts and the exclusion report."""
        from pydantic import ValidationError

        from app.cohorts.schemas import CohortIn
        from app.cohorts.service import create_cohort
        from app.db.base import session_scope
        from app.labels.service import get_rules

        split = {k: v for k, v in (("train", train), ("val", val), ("test", test)) if v}
        try:
            body = CohortIn(taxonomy=taxonomy, per_class=per_class, split=split, seed=seed, preview=preview,
                            include_conflicts=include_conflicts, match_name_birthdate=match_name_birthdate)
        except ValidationError as exc:
            from app.cli.train import error_lines

            typer.echo(error_lines(exc), err=True)
            raise typer.Exit(2) from exc
        with _command_context() as ctx, session_scope(ctx.sessions) as s:
            settings = ctx.settings
            out = create_cohort(s, body.model_dump(), pseudonym_key=settings.get_pseudonym_key(),
                                store_dir=settings.store_dir, actor="cli", rules=get_rules(settings.label_rules))
        typer.echo(json.dumps(out, default=str, indent=1) if as_json else cohort_table(out))

    @cohort.command("manifest")
    def manifest(cohort_id: int, out: Path = typer.Option(None, help="file to write (default: stdout)"),
                 fmt: str = typer.Option("csv", "--format", help="csv, or parquet (needs the parquet extra)")) -> None:
        """The manifest (sop_instance_uid, class, split, patient_key) as CSV or Parquet."""
        from app.cohorts.service import manifest_csv, manifest_parquet

        if fmt not in ("csv", "parquet"):
            raise typer.BadParameter("csv or parquet", param_hint="--format")
        if fmt == "parquet" and out is None:
            raise typer.BadParameter("Parquet is binary: give --out FILE", param_hint="--out")
        with _command_context() as ctx, ctx.sessions() as s:
            data = manifest_parquet(s, cohort_id) if fmt == "parquet" else manifest_csv(s, cohort_id).encode()
        if out:
            tmp = out.with_suffix(out.suffix + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(out)  # never a half-written manifest
        else:
            typer.echo(data.decode("utf-8"), nl=False)

    @cohort.command("plan-pull")
    def plan_pull(taxonomy: str = typer.Option("xr10"),
                  study_dates: str = typer.Option("20110101-20161231", help="YYYYMMDD-YYYYMMDD")) -> None:
        """The C-FIND queries (one per line, JSON) that find a taxonomy's candidates on a PACS."""
        from app.cohorts.pull import plan_queries
        from app.cohorts.taxonomies import get_taxonomy
        from app.context import AppContext
        from app.labels.service import get_rules

        settings = get_settings()
        ctx = AppContext.build(settings)
        try:
            with ctx.sessions() as s:
                tax = get_taxonomy(s, taxonomy)
        finally:
            ctx.close()
        for q in plan_queries(tax, study_dates, get_rules(settings.label_rules)):
            typer.echo(json.dumps(q, ensure_ascii=False))

    @cohort.command("pull")
    def pull(node: str, taxonomy: str = typer.Option("xr10"), per_class: int = typer.Option(..., min=1),
             study_dates: str = typer.Option("20110101-20161231", help="YYYYMMDD-YYYYMMDD"),
             max_rounds: int = typer.Option(200, min=1, help="at most this many retrievals")) -> None:
        """Retrieve from NODE until each class has PER_CLASS patients or the PACS has no more (prints the report)."""
        from app.cohorts.pull_runner import pull_to_quota

        def show(cls, rid, status, received, _counts):
            typer.echo(f"{cls}: retrieval {rid} {status}, {received} received", err=True)

        with _command_context() as ctx:
            out = pull_to_quota(ctx, node, taxonomy, per_class, study_dates, max_rounds=max_rounds, actor="cli",
                                progress=show)
        typer.echo(json.dumps(out, indent=1))
        if out["stopped"] != "done":  # max_rounds or a DICOM failure: the report says which
            raise typer.Exit(1)

    cli.add_typer(labels, name="labels")
    cli.add_typer(cohort, name="cohort")
