"""`radcohort worklist upload|resolve|show|retrieve`: batch study requests from a CSV/XLSX (app.worklists)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from app.config import get_settings

ACTOR = "cli"


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(code)


def _ctx():
    from app.context import AppContext

    return AppContext.build(get_settings())


def register(cli: typer.Typer) -> None:
    wl = typer.Typer(help="worklists: upload a CSV/XLSX of studies, resolve by C-FIND, retrieve", no_args_is_help=True)
    identified_opt = typer.Option(False, "--identified", help="allow a PatientID/AccessionNumber worklist "
                                                              "(an identified search; audited)")

    @wl.command("upload")
    def upload(file: Path = typer.Argument(..., exists=True, dir_okay=False, help="CSV or XLSX"),
               column: str = typer.Option(None, help="the key column when several are present"),
               identified: bool = identified_opt) -> None:
        """Store a worklist; prints its id and the rows that are invalid (with the reason)."""
        from app.db.base import session_scope
        from app.errors import RadcohortError
        from app.worklists import parse as wparse
        from app.worklists import service

        ctx = _ctx()
        try:
            parsed = wparse.parse(file.read_bytes(), file.name, column)
            if service.needs_identified(parsed.key_type) and not identified:
                _fail(f"a {parsed.key_type} worklist is an identified search: pass --identified")
            with session_scope(ctx.sessions) as s:
                out = service.store(s, parsed, file.name, ACTOR)
        except RadcohortError as exc:
            _fail(exc.message)
        finally:
            ctx.close()
        typer.echo(f"worklist {out['id']}: {out['rows']} rows by {out['key_type']}, {out['invalid']} invalid")
        for w in out["warnings"]:
            typer.echo(f"warning: column {w['column']!r}: {w['msg']}")
        for r in parsed.rows:
            if r.status == "invalid":
                typer.echo(f"row {r.row}: {r.detail}")

    @wl.command("resolve")
    def resolve(worklist_id: int, node: str = typer.Option(..., help="the PACS node"),
                identified: bool = identified_opt) -> None:
        """Dry run: C-FIND every valid row (nothing is moved) and print the counts per status."""
        from app.db.base import session_scope
        from app.errors import RadcohortError
        from app.worklists import service

        ctx = _ctx()
        try:
            with session_scope(ctx.sessions) as s:
                w = service.get_worklist(s, worklist_id)
                if service.needs_identified(w.key_type) and not identified:
                    _fail(f"a {w.key_type} worklist is an identified search: pass --identified")
                service.start_resolve(s, w, node, ACTOR)
            counts = service.resolve(ctx, worklist_id)
        except RadcohortError as exc:
            _fail(exc.message)
        finally:
            ctx.close()
        typer.echo(", ".join(f"{k} {v}" for k, v in sorted(counts.items())))

    @wl.command("show")
    def show(worklist_id: int, identified: bool = typer.Option(False, "--identified", help="show identifying keys"),
             as_json: bool = typer.Option(False, "--json")) -> None:
        """Per-row results as CSV (or the worklist as JSON)."""
        from app.db.base import session_scope
        from app.errors import RadcohortError
        from app.worklists import service

        ctx = _ctx()
        try:
            with session_scope(ctx.sessions) as s:
                w = service.get_worklist(s, worklist_id)
                text = (json.dumps(service.view(s, w, show_keys=identified), default=str) if as_json
                        else service.results_csv(s, w, show_keys=identified))
        except RadcohortError as exc:
            _fail(exc.message)
        finally:
            ctx.close()
        typer.echo(text, nl=False)

    @wl.command("retrieve")
    def retrieve(worklist_id: int,
                 include_ambiguous: bool = typer.Option(False, help="also rows matching several studies"),
                 with_scp: bool = typer.Option(False, "--with-scp", help="run our Storage SCP in this process "
                                                                         "for the C-MOVE")) -> None:
        """Retrieve the found studies as one retrieval, in the foreground; then `worklist show` has the
        per-row counts."""
        from contextlib import ExitStack

        from app.db.base import session_scope
        from app.errors import RadcohortError
        from app.retrievals.runner import run_retrieval
        from app.worklists import service

        ctx = _ctx()
        with ExitStack() as stack:
            stack.callback(ctx.close)
            try:
                with session_scope(ctx.sessions) as s:
                    r = service.create_retrieval(s, service.get_worklist(s, worklist_id), ACTOR, include_ambiguous)
                    rid, n = r.id, len(r.query["StudyInstanceUID"].split("\\"))
            except RadcohortError as exc:
                _fail(exc.message)
            if with_scp:
                from app.wiring import storage_scp

                stack.enter_context(storage_scp(ctx))
            typer.echo(f"retrieval {rid}: {n} studies")
            out = run_retrieval(ctx, rid)
        typer.echo(f"retrieval {rid}: {out.status}, received {out.received}, skipped {out.skipped}, "
                   f"failed {out.failed}")
        raise typer.Exit(0 if out.status == "completed" else (3 if out.status == "partial" else 1))

    cli.add_typer(wl, name="worklist")
