"""The console's research inputs and outputs (issue #17): worklist pages and a cohort's exports.

Like app.web.pages: parse a CSRF-checked form, call the API's own route function with the signed-in actor
(scopes and refusals are the API's: its `require_scope` dependency where a route declares one, and the route's
own checks, audited, for identified worklists and identified exports), render a template."""

from __future__ import annotations

from fastapi import FastAPI, HTTPException, Query, Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from app.api.deps import CtxDep, SessionDep, has_scope, require_scope
from app.api.routes import exports as export_api
from app.api.routes import worklists as worklist_api
from app.cohorts import service as cohort_service
from app.config import Settings
from app.errors import NotFound, RadcohortError
from app.exports import service as export_service
from app.retrievals import nodes
from app.web.render import flash_redirect, render
from app.web.routes import Form, Who, _errors, _status, _text
from app.worklists import service as worklist_service
from app.worklists.parse import KEY_TYPES

ROWS_PER_PAGE = 500
ACTIVE_EXPORT = ("queued", "running")
EXPORT_FORMATS = ("dicom-deid", "png", "npy", "webdataset")
IDENTIFIED_EXPORT_FORMAT = "dicom"
EXPORT_DEFAULTS = {"format": "dicom-deid", "burned_in": "exclude", "image_size": "224", "bit_depth": "8"}


def _require(request: Request, scope: str) -> None:
    """The API route's `require_scope` dependency, called for the page (403 with the API's words)."""
    require_scope(scope)(request)


# ---------------------------------------------------------------------- exports (on /cohorts/{id})
def exports_context(request: Request, session, cohort_id: int) -> dict:
    """The cohort's exports as `GET /api/v1/exports` lists them for this token (identified ones only with
    export-identified), and what the export form may offer."""
    def mine():
        return list(export_api.list_exports(request, session, limit=1000, offset=0, cohort_id=cohort_id).items)

    items = mine()
    active = [e.id for e in items if e.status in ACTIVE_EXPORT]
    for export_id in active:
        # as GET /exports/{id} does: one whose process died with no job left to finish it reads failed,
        # so the page stops polling it
        export_service.get_export(session, export_id)
    if active:
        items = mine()
    return {"exports": items, "exports_active": any(e.status in ACTIVE_EXPORT for e in items),
            "can_export": has_scope(request, "export"),
            # downloading or deleting needs what reading one needs (the API's missing_scope)
            "can_fetch": {e.id: export_service.missing_scope(e.format, _scopes(request)) is None for e in items},
            "export_formats": EXPORT_FORMATS + ((IDENTIFIED_EXPORT_FORMAT,)
                                                if has_scope(request, "export-identified") else ()),
            "image_formats": sorted(export_service.IMAGE_FORMATS)}


def _scopes(request: Request) -> frozenset[str]:
    return frozenset(getattr(request.state, "scopes", None) or ())


def _export_of(session, cohort_id: int, export_id: int):
    exp = export_service.get_export(session, export_id)
    if exp.cohort_id != cohort_id:  # an export is reached through its own cohort's page only
        raise NotFound(f"export {export_id} not found on cohort {cohort_id}")
    return exp


def register(app: FastAPI, settings: Settings, cohort_page) -> None:  # noqa: C901 - one function per page below
    """`cohort_page(request, who, session, cohort_id, **extra)` renders /cohorts/{id} (app.web.pages)."""

    # ================================================================== worklists
    def _worklists_page(request, who, session, form=None, errors=None, status=200, offset=0):
        listing = worklist_api.list_worklists(session, limit=100, offset=offset)
        return render(request, "worklists.html", status=status, who=who, total=listing.total, rows=listing.items,
                      offset=offset, form=form or {}, errors=errors or [], key_types=KEY_TYPES,
                      can_upload=has_scope(request, "retrieve"))

    @app.get("/worklists", include_in_schema=False)
    def worklists_page(request: Request, who: Who, session: SessionDep, offset: int = Query(0, ge=0)):
        return _worklists_page(request, who, session, offset=offset)

    @app.post("/worklists/upload", include_in_schema=False)
    def upload_worklist(request: Request, who: Who, form: Form, session: SessionDep, ctx: CtxDep):
        upload = form.get("file")
        column = _text(form, "column")
        values = {"column": column or ""}
        try:
            _require(request, "retrieve")
            if not isinstance(upload, UploadFile) or not upload.filename:
                raise HTTPException(422, "file: choose a CSV or XLSX file to upload")
            out = worklist_api.upload(request, ctx, session, who.actor, file=upload, column=column)
        except (RadcohortError, HTTPException) as exc:
            session.rollback()
            return _worklists_page(request, who, session, values, _errors(exc), _status(exc))
        msg = f"Worklist {out['id']} uploaded: {out['rows']} rows by {out['key_type']}, {out['invalid']} invalid."
        if out["warnings"]:
            msg += f" {len(out['warnings'])} column(s) ignored (see below)."
        return flash_redirect(request, f"/worklists/{out['id']}", msg)

    def _worklist_ctx(request, session, worklist_id: int, offset: int) -> dict:
        wl = worklist_api.get_worklist(worklist_id, request, session, limit=ROWS_PER_PAGE, offset=offset)
        identified = worklist_service.needs_identified(wl["key_type"])
        return {"wl": wl, "offset": offset, "per_page": ROWS_PER_PAGE, "active": wl["status"] == "resolving",
                "nodes": [n.name for n in nodes.list_nodes(session)],
                "can_retrieve": has_scope(request, "retrieve"),
                "sees_keys": not identified or has_scope(request, worklist_api.IDENTIFIED),
                "identified": identified, "identified_scope": worklist_api.IDENTIFIED}

    def _worklist_page(request, who, session, worklist_id, errors=None, status=200, offset=0):
        return render(request, "worklist.html", status=status, who=who, errors=errors or [],
                      **_worklist_ctx(request, session, worklist_id, offset))

    @app.get("/worklists/{worklist_id}", include_in_schema=False)
    def worklist_page(request: Request, who: Who, session: SessionDep, worklist_id: int,
                      offset: int = Query(0, ge=0)):
        return _worklist_page(request, who, session, worklist_id, offset=offset)

    @app.get("/worklists/{worklist_id}/live", include_in_schema=False)
    def worklist_live(request: Request, who: Who, session: SessionDep, worklist_id: int,
                      offset: int = Query(0, ge=0)):
        return render(request, "_worklist.html", who=who, errors=[],
                      **_worklist_ctx(request, session, worklist_id, offset))

    @app.post("/worklists/{worklist_id}/resolve", include_in_schema=False)
    def resolve_worklist(request: Request, who: Who, form: Form, session: SessionDep, ctx: CtxDep,
                         worklist_id: int):
        worklist_service.get_worklist(session, worklist_id)  # 404 first
        try:
            _require(request, "retrieve")
            body = worklist_api.ResolveIn(node=_text(form, "node") or "")
            worklist_api.resolve(worklist_id, body, request, ctx, session, who.actor)
        except (ValidationError, RadcohortError, HTTPException) as exc:
            session.rollback()
            return _worklist_page(request, who, session, worklist_id, _errors(exc), _status(exc))
        return flash_redirect(request, f"/worklists/{worklist_id}",
                              f"Resolving worklist {worklist_id} on {body.node} (C-FIND only, nothing is moved).")

    @app.post("/worklists/{worklist_id}/retrieve", include_in_schema=False)
    def retrieve_worklist(request: Request, who: Who, form: Form, session: SessionDep, ctx: CtxDep,
                          worklist_id: int):
        worklist_service.get_worklist(session, worklist_id)
        try:
            _require(request, "retrieve")
            body = worklist_api.RetrieveIn(include_ambiguous=bool(form.get("include_ambiguous")))
            out = worklist_api.retrieve(worklist_id, ctx, session, who.actor, body=body)
        except (ValidationError, RadcohortError, HTTPException) as exc:
            session.rollback()
            return _worklist_page(request, who, session, worklist_id, _errors(exc), _status(exc))
        return flash_redirect(request, f"/retrievals/{out.retrieval_id}",
                              f"Retrieval {out.retrieval_id} queued for the {out.studies} studies of worklist "
                              f"{worklist_id}.")

    @app.get("/worklists/{worklist_id}/results.csv", include_in_schema=False)
    def worklist_results(request: Request, who: Who, session: SessionDep, worklist_id: int):
        return worklist_api.results(worklist_id, request, session)

    # ================================================================== exports of a cohort
    @app.post("/cohorts/{cohort_id}/exports", include_in_schema=False)
    def start_export(request: Request, who: Who, form: Form, session: SessionDep, ctx: CtxDep, cohort_id: int):
        cohort_service.get_cohort(session, cohort_id)  # 404 first
        values = {k: _text(form, k) or "" for k in EXPORT_DEFAULTS}
        try:
            fmt = values["format"] or EXPORT_DEFAULTS["format"]
            fields: dict = {"format": fmt, "burned_in": values["burned_in"] or "exclude"}
            if fmt in export_service.IMAGE_FORMATS:
                fields["image_size"] = values["image_size"] or EXPORT_DEFAULTS["image_size"]
                if fmt == "png":  # a Literal[8, 16]: pydantic does not turn the form's "16" into 16
                    bits = values["bit_depth"] or "8"
                    fields["bit_depth"] = int(bits) if bits.isdigit() else bits
            body = export_api.ExportIn(**fields)
            out = export_api.create_export(cohort_id, body, request, session, ctx, who.actor)
        except (ValidationError, RadcohortError, HTTPException) as exc:
            session.rollback()
            return cohort_page(request, who, session, cohort_id, export_form=values, export_errors=_errors(exc),
                               status=_status(exc))
        return flash_redirect(request, f"/cohorts/{cohort_id}#exports",
                              f"Export {out['id']} ({fmt}) queued; its progress shows below.")

    @app.get("/cohorts/{cohort_id}/exports/live", include_in_schema=False)
    def exports_live(request: Request, who: Who, session: SessionDep, cohort_id: int):
        c = cohort_service.get_cohort(session, cohort_id)
        return render(request, "_exports.html", who=who, c=c, **exports_context(request, session, cohort_id))

    @app.get("/cohorts/{cohort_id}/exports/{export_id}/download", include_in_schema=False)
    def export_download(request: Request, who: Who, session: SessionDep, ctx: CtxDep, cohort_id: int,
                        export_id: int):
        _export_of(session, cohort_id, export_id)
        return export_api.download(export_id, request, session, ctx, who.actor)

    @app.post("/cohorts/{cohort_id}/exports/{export_id}/delete", include_in_schema=False)
    def export_delete(request: Request, who: Who, form: Form, session: SessionDep, ctx: CtxDep, cohort_id: int,
                      export_id: int):
        _export_of(session, cohort_id, export_id)
        try:
            export_api.delete_export(export_id, request, session, ctx, who.actor)
        except RadcohortError as exc:
            session.rollback()
            return cohort_page(request, who, session, cohort_id, export_errors=[exc.message], status=exc.status_code)
        return flash_redirect(request, f"/cohorts/{cohort_id}#exports",
                              f"Export {export_id}'s files were removed from the server (its record and audit "
                              "trail stay).")
