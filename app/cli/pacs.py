"""`radcohort echo|find|retrieve` and `radcohort nodes add|list|remove` (PACS side, in-process)."""

from __future__ import annotations

import json
import sys
from contextlib import ExitStack

import typer

from app.config import get_settings

ACTOR = "cli"


def _ctx():
    from app.context import AppContext
    from app.db.migrate import upgrade

    settings = get_settings()
    upgrade(settings.database_url)
    return AppContext.build(settings)


def _parse_query(pairs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for p in pairs or []:
        if "=" not in p:
            raise typer.BadParameter(f"'{p}': expected Keyword=Value (e.g. StudyDate=20110101-20161231)",
                                     param_hint="-q/--query")
        k, v = p.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _fail(message: str, code: int = 1) -> None:
    typer.secho(message, fg="red", err=True)
    raise typer.Exit(code)


def _write(change) -> None:
    """Run `change(session)` in one committed unit of work; a domain error ends the command."""
    from app.db.base import session_scope
    from app.errors import RadcohortError

    ctx = _ctx()
    try:
        with session_scope(ctx.sessions) as s:
            change(s)
    except RadcohortError as exc:
        _fail(exc.message)
    finally:
        ctx.close()


def _node(ctx, name: str):
    from app.errors import NotFound
    from app.retrievals.nodes import get_node

    with ctx.sessions() as s:
        try:
            node = get_node(s, name)
        except NotFound as exc:
            _fail(f"{exc.message} (see `radcohort nodes list`)")
        s.expunge(node)
    return node


QUERY_OPT = typer.Option(None, "-q", "--query", help="Keyword=Value (repeatable); ranges and wildcards allowed")


def register(cli: typer.Typer) -> None:
    nodes = typer.Typer(help="PACS nodes (their AE titles are also accepted by our Storage SCP)",
                        no_args_is_help=True)

    @nodes.command("add")
    def nodes_add(name: str, ae_title: str = typer.Option(..., "--ae-title"), host: str = typer.Option(...),
                  port: int = typer.Option(...), method: str = typer.Option("move", help="move or get")) -> None:
        """Register a PACS node."""
        from pydantic import ValidationError

        from app.retrievals.nodes import create_node
        from app.retrievals.schemas import NodeIn

        try:
            data = NodeIn(name=name, ae_title=ae_title, host=host, port=port, retrieve_method=method)
        except ValidationError as exc:
            _fail("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()), 2)
        _write(lambda s: create_node(s, data, ACTOR))
        typer.echo(f"added {name}: {ae_title}@{host}:{port} ({method})")

    @nodes.command("list")
    def nodes_list() -> None:
        """List PACS nodes."""
        from app.retrievals.nodes import list_nodes

        ctx = _ctx()
        with ctx.sessions() as s:
            for n in list_nodes(s):
                typer.echo(f"{n.name}\t{n.ae_title}\t{n.host}:{n.port}\t{n.retrieve_method}")
        ctx.close()

    @nodes.command("remove")
    def nodes_remove(name: str) -> None:
        """Remove a PACS node."""
        from app.retrievals.nodes import delete_node

        _write(lambda s: delete_node(s, name, ACTOR))
        typer.echo(f"removed {name}")

    cli.add_typer(nodes, name="nodes")

    @cli.command("echo")
    def echo(node: str = typer.Argument(..., help="node name")) -> None:
        """C-ECHO a PACS node."""
        from app.dicom.scu import DicomClient
        from app.errors import DicomError

        ctx = _ctx()
        try:
            ms = DicomClient(ctx.settings, _node(ctx, node)).echo()
        except DicomError as exc:
            _fail(exc.message)
        finally:
            ctx.close()
        typer.echo(f"{node}: ok ({ms:.1f} ms)")

    @cli.command("find")
    def find(node: str = typer.Argument(..., help="node name"),
             level: str = typer.Option("STUDY", help="PATIENT, STUDY, SERIES or IMAGE"),
             root: str = typer.Option("study", help="study or patient (PATIENT level needs patient)"),
             query: list[str] = QUERY_OPT,
             identified: bool = typer.Option(False, "--identified",
                                             help="allow identifying matching keys (PatientName, PatientID, "
                                                  "birth date, accession number ...); audited"),
             as_json: bool = typer.Option(False, "--json", help="print JSON lines")) -> None:
        """C-FIND; identifying attributes are withheld (a pseudonymous patient_key is shown instead), and
        matching on one needs --identified (the search is then audited)."""
        from rich.console import Console
        from rich.table import Table

        from app import audit
        from app.db.base import session_scope
        from app.dicom.scu import DicomClient
        from app.errors import RadcohortError
        from app.find_policy import answer_rows, identifying_match_keys

        q = _parse_query(query)
        keys = identifying_match_keys(q)
        if keys and not identified:
            _fail(f"matching on {', '.join(keys)} identifies a patient: pass --identified to search on it "
                  "(the search is audited; answers still withhold identifiers)", code=2)
        ctx = _ctx()
        try:
            pacs = _node(ctx, node)
            if keys:  # committed before the query: the attempt is on record even if the PACS fails
                with session_scope(ctx.sessions) as s:
                    audit.record(s, ACTOR, "pacs.find_identified", node, level=level, keys=keys)
            res = DicomClient(ctx.settings, pacs).find(level, q, root=root)
            key = ctx.settings.get_pseudonym_key()
        except RadcohortError as exc:
            _fail(exc.message)
        finally:
            ctx.close()
        rows = answer_rows(res.results, level, key)
        if as_json:
            for item in rows:
                typer.echo(json.dumps(item, ensure_ascii=False))
        else:
            cols = list(dict.fromkeys(k for item in rows for k in item if k != "QueryRetrieveLevel"))
            table = Table(*cols)
            for item in rows:
                table.add_row(*(str(item.get(c, "")) for c in cols))
            Console().print(table)
        typer.secho(f"{len(rows)} result(s)" + (" — CAPPED by the PACS: incomplete, narrow the query"
                                                 if res.capped else ""), err=True,
                    fg="yellow" if res.capped else None)

    @cli.command("retrieve")
    def retrieve(node: str = typer.Argument(..., help="node name"),
                 query: list[str] = QUERY_OPT,
                 with_scp: bool = typer.Option(False, "--with-scp",
                                               help="run our Storage SCP in this process for the C-MOVE"),
                 method: str = typer.Option(None, help="override the node's method: move or get")) -> None:
        """Retrieve into the store and index (C-MOVE needs our SCP: `radcohort serve`/`scp` or --with-scp)."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from app.errors import RadcohortError
        from app.retrievals.runner import run_retrieval  # the node's windows, limits and backoff apply
        from app.retrievals.service import create_retrieval, to_out

        q = _parse_query(query)
        if method not in (None, "move", "get"):
            raise typer.BadParameter("move or get", param_hint="--method")
        ctx = _ctx()
        with ExitStack() as stack:
            stack.callback(ctx.close)
            pacs = _node(ctx, node)
            try:
                with ctx.sessions() as s:
                    r = create_retrieval(s, node, q, ACTOR)
                    rid = r.id
                    s.commit()
            except RadcohortError as exc:
                _fail(exc.message, 2)
            if with_scp and (method or pacs.retrieve_method) == "move":
                from app.wiring import storage_scp

                stack.enter_context(storage_scp(ctx))
            columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("skipped {task.fields[skipped]}"), TimeElapsedColumn()]
            with Progress(*columns, transient=False, disable=not sys.stderr.isatty()) as bar:
                task = bar.add_task("listing", total=None, skipped=0)

                def on_progress(p) -> None:
                    bar.update(task, description=p.phase, total=p.expected or None,
                               completed=p.received + p.skipped, skipped=p.skipped)

                result = run_retrieval(ctx, rid, on_progress=on_progress, method=method)
            out = to_out(result)
        typer.echo(f"retrieval {out.id}: {out.status} — expected {out.expected}, received {out.received}, "
                   f"skipped {out.skipped}, failed {out.failed}, missing {len(out.missing)}")
        for uid in out.missing[:20]:
            typer.echo(f"  missing {uid}")
        if len(out.missing) > 20:
            typer.echo(f"  ... and {len(out.missing) - 20} more (GET /api/v1/retrievals/{out.id})")
        if out.error:
            typer.secho(f"  {out.error}", fg="yellow", err=True)
        raise typer.Exit(0 if out.status == "completed" else (3 if out.status == "partial" else 1))
