"""The console's resource pages: overview, PACS nodes, retrievals, index, cohorts, training, models
(worklists and a cohort's exports: app.web.research).

Each handler parses (a query string or a CSRF-checked form), calls the service or the API's own route
function with the signed-in actor, and renders a template. Writes redirect (post/redirect/get) with a
one-time message; bad input re-renders the form with the reasons."""

from __future__ import annotations

import importlib.util
from datetime import datetime, timezone

from fastapi import FastAPI, HTTPException, Query, Request, Response
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from app.api.deps import CtxDep, SessionDep
from app.api.routes import cohorts as cohort_api
from app.api.routes import instances as instance_api
from app.api.routes import pacs as pacs_api
from app.api.routes import retrievals as retrieval_api
from app.api.routes import trained_models as model_api
from app.api.routes import training as training_api
from app.cohorts import service as cohort_service
from app.cohorts import taxonomies
from app.cohorts.schemas import CohortIn, TaxonomyIn
from app.config import Settings
from app.errors import InvalidInput, NotFound, RadcohortError
from app.index import query
from app.index.thumbnails import thumbnail_png
from app.labels.coverage import coverage
from app.policy import service as policy
from app.policy.schema import NodePatch, NodePolicy
from app.probe.service import probe_state
from app.retrievals import nodes, service as retrievals
from app.retrievals.schemas import NodeIn, RetrievalIn
from app.training import jobs, predict, workers
from app.training.params import DEPTH_PRESETS, EXPERIMENTS, TrainingJobCreate
from app.web import charts, research
from app.web.render import flash_redirect, render
from app.web.routes import Form, Who, _errors, _status, _text

ACTIVE_RETRIEVAL = ("queued", "running", "paused")
ACTIVE_JOB = ("queued", "running")
LABEL_FILTERS = ("label_body_part", "label_view", "label_laterality", "label_sex", "label_age_band")
HEADER_FILTERS = ("modality", "body_part_examined", "view_position", "laterality", "patient_sex", "study_date",
                  "source_node")
# the retrieval form's fields: study-level matching keys only, no identifiers
RETRIEVAL_KEYS = ("StudyDate", "Modality", "BodyPartExamined", "StudyDescription")
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def _node_row(node) -> dict:
    opts = node.options or {}
    state = probe_state(node)
    caps = opts.get("capabilities") or {}
    echo = opts.get("last_echo")
    if echo is None and caps.get("echo"):
        echo = {"ok": caps["echo"].get("ok"), "elapsed_ms": caps["echo"].get("elapsed_ms"),
                "error": caps["echo"].get("error"), "at": state.get("finished_at"), "by": "probe"}
    try:
        window = policy.node_settings(node)["window"]
    except Exception:  # noqa: BLE001 - a stored policy the schema no longer accepts: shown as unknown
        window = None
    return {"name": node.name, "ae_title": node.ae_title, "host": node.host, "port": node.port,
            "retrieve_method": node.retrieve_method, "echo": echo, "probe": state, "window": window}


def _progress(r) -> dict:
    """Received / expected as the page shows it (skipped ones count as present)."""
    done = (r.received or 0) + (r.skipped or 0)
    expected = r.expected or 0
    rate = None
    if r.started_at and r.received:
        end = r.finished_at or datetime.now(timezone.utc)
        start = r.started_at if r.started_at.tzinfo else r.started_at.replace(tzinfo=timezone.utc)
        end = end if end.tzinfo else end.replace(tzinfo=timezone.utc)
        secs = (end - start).total_seconds()
        rate = r.received / secs if secs > 0 else None
    return {"done": done, "expected": expected, "pct": (100.0 * done / expected) if expected else None,
            "rate": rate}


def _job_row(session, job) -> dict:
    view = jobs.job_view(job)
    view["pct"] = 100.0 * (job.epoch or 0) / job.epochs if job.epochs else None
    return view


def register(app: FastAPI, settings: Settings) -> None:  # noqa: C901 - one function per page below
    # ================================================================== overview
    def _overview_jobs(session) -> dict:
        rrows, _ = retrievals.list_retrievals(session, 8, 0)
        _, jrows = jobs.list_jobs(session, limit=8)
        ret = [{"r": retrievals.to_out(r), "p": _progress(r)} for r in rrows]
        trn = [_job_row(session, j) for j in jrows]
        active = any(x["r"].status in ACTIVE_RETRIEVAL for x in ret) or any(j["status"] in ACTIVE_JOB for j in trn)
        return {"retrievals": ret, "training": trn, "active": active}

    @app.get("/", include_in_schema=False)
    def overview(request: Request, who: Who, session: SessionDep):
        stats = query.stats(session)
        cov = coverage(session, limit=5, examples=0)
        body_parts = sorted(stats["labels"].get("body_part", {}).items(), key=lambda kv: -kv[1])
        return render(request, "overview.html", who=who, nodes=[_node_row(n) for n in nodes.list_nodes(session)],
                      stats=stats, coverage=cov, jobs=_overview_jobs(session),
                      body_part_chart=charts.hbars([(k, v, str(v)) for k, v in body_parts], title="instances by body part"),
                      worker_alive=workers.any_alive(session))

    @app.get("/overview/jobs", include_in_schema=False)
    def overview_jobs(request: Request, who: Who, session: SessionDep):
        return render(request, "_jobs.html", who=who, jobs=_overview_jobs(session))

    # ================================================================== PACS nodes
    def _nodes_page(request, who, session, form=None, errors=None, status=200):
        return render(request, "nodes.html", status=status, who=who,
                      nodes=[_node_row(n) for n in nodes.list_nodes(session)], form=form or {}, errors=errors or [])

    @app.get("/nodes", include_in_schema=False)
    def nodes_page(request: Request, who: Who, session: SessionDep):
        return _nodes_page(request, who, session)

    @app.post("/nodes", include_in_schema=False)
    def register_node(request: Request, who: Who, form: Form, session: SessionDep, ctx: CtxDep):
        values = {k: _text(form, k) for k in ("name", "ae_title", "host", "port", "retrieve_method", "find_limit")}
        try:
            body = NodeIn(name=values["name"] or "", ae_title=values["ae_title"] or "", host=values["host"] or "",
                          port=values["port"] or 0, retrieve_method=values["retrieve_method"] or "move",
                          find_limit=values["find_limit"])
            pacs_api.create_node(body, session, who.actor, ctx, probe=bool(_text(form, "probe")))
        except (ValidationError, RadcohortError) as exc:
            session.rollback()
            return _nodes_page(request, who, session, values, _errors(exc), _status(exc))
        msg = f"PACS node {body.name} registered." + (" Probing it in the background." if _text(form, "probe") else "")
        return flash_redirect(request, f"/nodes/{body.name}", msg)

    def _node_page(request, who, session, name, errors=None, status=200):
        node = nodes.get_node(session, name)
        return render(request, "node.html", status=status, who=who, node=_node_row(node),
                      settings=pacs_api._settings_out(node), probe=pacs_api.get_probe(name, session),
                      days=DAYS, errors=errors or [])

    @app.get("/nodes/{name}", include_in_schema=False)
    def node_page(request: Request, who: Who, session: SessionDep, name: str):
        return _node_page(request, who, session, name)

    @app.get("/nodes/{name}/live", include_in_schema=False)
    def node_live(request: Request, who: Who, session: SessionDep, name: str):
        node = nodes.get_node(session, name)
        return render(request, "_probe.html", who=who, node=_node_row(node), probe=pacs_api.get_probe(name, session))

    @app.post("/nodes/{name}/echo", include_in_schema=False)
    def node_echo(request: Request, who: Who, form: Form, session: SessionDep, ctx: CtxDep, name: str):
        nodes.get_node(session, name)
        try:  # the API's route keeps the verdict as the node's last echo
            out = pacs_api.echo(name, session, settings, ctx, who.actor)
        except RadcohortError as exc:
            return flash_redirect(request, f"/nodes/{name}", f"C-ECHO failed: {exc.message}")
        return flash_redirect(request, f"/nodes/{name}", f"C-ECHO ok in {out.elapsed_ms:.0f} ms.")

    @app.post("/nodes/{name}/probe", include_in_schema=False)
    def node_probe(request: Request, who: Who, form: Form, session: SessionDep, ctx: CtxDep, name: str):
        try:
            pacs_api.probe_node(name, session, settings, who.actor, ctx, Response(), wait=False)
        except RadcohortError as exc:
            return flash_redirect(request, f"/nodes/{name}", f"Probe refused: {exc.message}")
        return flash_redirect(request, f"/nodes/{name}", "Probe started; its findings appear below when it ends.")

    @app.post("/nodes/{name}/edit", include_in_schema=False)
    def node_edit(request: Request, who: Who, form: Form, session: SessionDep, name: str):
        node = nodes.get_node(session, name)
        try:
            windows = []
            for i in range(3):
                days = [d for d in DAYS if form.get(f"w{i}_{d}")]
                start, end = _text(form, f"w{i}_start"), _text(form, f"w{i}_end")
                if days or start or end:
                    windows.append({"days": days, "start": start or "", "end": end or ""})
            pol = NodePolicy(timezone=_text(form, "timezone") or "UTC", windows=windows,
                             max_associations=_text(form, "max_associations") or 2,
                             instances_per_minute=_text(form, "instances_per_minute"),
                             mb_per_second=_text(form, "mb_per_second"),
                             max_find_results=_text(form, "max_find_results"),
                             backoff=(node.options or {}).get("policy", {}).get("backoff") or {},
                             urgent={"allowed": bool(form.get("urgent_allowed")),
                                     "bypass_windows": bool(form.get("urgent_bypass_windows")),
                                     "bypass_rate_limits": bool(form.get("urgent_bypass_rate_limits"))})
            patch = NodePatch(policy=pol, retrieve_method=_text(form, "retrieve_method"),
                              protocol=_text(form, "protocol"), dicomweb_url=_text(form, "dicomweb_url"))
            pacs_api.patch_node(name, patch, session, who.actor)
        except (ValidationError, RadcohortError) as exc:
            session.rollback()
            return _node_page(request, who, session, name, _errors(exc), _status(exc))
        return flash_redirect(request, f"/nodes/{name}", "Settings saved.")

    @app.post("/nodes/{name}/delete", include_in_schema=False)
    def node_delete(request: Request, who: Who, form: Form, session: SessionDep, name: str):
        pacs_api.delete_node(name, session, who.actor)
        return flash_redirect(request, "/nodes", f"PACS node {name} deleted.")

    # ================================================================== retrievals
    def _retrievals_page(request, who, session, form=None, errors=None, status=200, offset=0):
        rows, total = retrievals.list_retrievals(session, 50, offset)
        defaults = {"StudyDate": "", "Modality": "CR", "BodyPartExamined": "", "StudyDescription": ""}
        return render(request, "retrievals.html", status=status, who=who, total=total, offset=offset,
                      rows=[{"r": retrievals.to_out(r), "p": _progress(r)} for r in rows],
                      nodes=[n.name for n in nodes.list_nodes(session)], form=form or defaults, errors=errors or [],
                      keys=RETRIEVAL_KEYS)

    @app.get("/retrievals", include_in_schema=False)
    def retrievals_page(request: Request, who: Who, session: SessionDep, offset: int = Query(0, ge=0),
                        node: str | None = None):
        form = {"node": node, "StudyDate": "", "Modality": "CR"} if node else None
        return _retrievals_page(request, who, session, form=form, offset=offset)

    @app.post("/retrievals", include_in_schema=False)
    def start_retrieval(request: Request, who: Who, form: Form, session: SessionDep, ctx: CtxDep):
        values = {k: _text(form, k) or "" for k in ("node", *RETRIEVAL_KEYS)}
        try:
            q = {k: values[k] for k in RETRIEVAL_KEYS if values[k]}
            if not q.get("StudyDate"):
                raise InvalidInput("StudyDate: give a date or a range (YYYYMMDD-YYYYMMDD), so that a retrieval "
                                   "never pulls a whole PACS by accident")
            body = RetrievalIn(node=values["node"], query=q, urgent=bool(form.get("urgent")))
            out = retrieval_api.create_retrieval(body, session, ctx, who.actor)
        except (ValidationError, RadcohortError) as exc:
            session.rollback()
            return _retrievals_page(request, who, session, values, _errors(exc), _status(exc))
        return flash_redirect(request, f"/retrievals/{out.id}", f"Retrieval {out.id} queued.")

    def _retrieval_ctx(session, retrieval_id):
        r = retrievals.get_retrieval(session, retrieval_id)
        out = retrievals.to_out(r)
        failed = list(r.failed_uids or [])
        return {"r": out, "p": _progress(r), "active": out.status in ACTIVE_RETRIEVAL,
                "failed_uids": failed, "missing_only": [u for u in out.missing if u not in set(failed)]}

    @app.get("/retrievals/{retrieval_id}", include_in_schema=False)
    def retrieval_page(request: Request, who: Who, session: SessionDep, retrieval_id: int):
        return render(request, "retrieval.html", who=who, **_retrieval_ctx(session, retrieval_id))

    @app.get("/retrievals/{retrieval_id}/live", include_in_schema=False)
    def retrieval_live(request: Request, who: Who, session: SessionDep, retrieval_id: int):
        return render(request, "_retrieval.html", who=who, **_retrieval_ctx(session, retrieval_id))

    @app.post("/retrievals/{retrieval_id}/{action}", include_in_schema=False)
    def retrieval_action(request: Request, who: Who, form: Form, session: SessionDep, ctx: CtxDep,
                         retrieval_id: int, action: str):
        calls = {"pause": lambda: retrieval_api.pause_retrieval(retrieval_id, session, who.actor),
                 "resume": lambda: retrieval_api.resume_retrieval(retrieval_id, session, who.actor),
                 "cancel": lambda: retrieval_api.cancel_retrieval(retrieval_id, session, who.actor),
                 "retry": lambda: retrieval_api.retry_retrieval(retrieval_id, session, ctx, who.actor)}
        if action not in calls:
            raise NotFound(f"no action {action!r} (pause, resume, cancel, retry)")
        retrievals.get_retrieval(session, retrieval_id)  # 404 first
        try:
            calls[action]()
        except RadcohortError as exc:
            session.rollback()
            return flash_redirect(request, f"/retrievals/{retrieval_id}", f"Not possible: {exc.message}")
        past = {"pause": "paused", "resume": "resumed", "cancel": "cancelled", "retry": "queued again"}[action]
        return flash_redirect(request, f"/retrievals/{retrieval_id}", f"Retrieval {retrieval_id} {past}.")

    # ================================================================== index
    @app.get("/instances", include_in_schema=False)
    def instances_page(request: Request, who: Who, session: SessionDep):
        params = {k: v.strip() for k, v in request.query_params.items() if v.strip()}
        errors: list[str] = []
        kwargs: dict = {}
        for k, v in params.items():
            if k in LABEL_FILTERS or k in HEADER_FILTERS:
                kwargs[k] = v[:64]
            elif k in ("age_min", "age_max"):
                try:
                    kwargs[k] = float(v)
                except ValueError:
                    errors.append(f"{k}: a number of years")
            elif k == "has_conflict":
                kwargs[k] = v == "true"
        try:
            offset = max(0, int(params.get("offset", 0)))
        except ValueError:
            offset = 0
        total, items = 0, []
        if not errors:
            try:
                f = instance_api._filters(**kwargs)
                total, items = query.list_instances(session, f, limit=48, offset=offset)
            except RadcohortError as exc:
                errors.append(exc.message)
        stats = query.stats(session)
        choices = {name: sorted(k for k in stats["labels"].get(name[len("label_"):], {}) if k != "unlabeled")
                   for name in LABEL_FILTERS}
        keep = {k: v for k, v in params.items() if k != "offset"}
        return render(request, "instances.html", status=422 if errors else 200, who=who, items=items, total=total,
                      offset=offset, limit=48, params=keep, choices=choices, errors=errors,
                      header_filters=HEADER_FILTERS)

    @app.get("/instances/{uid}", include_in_schema=False)
    def instance_page(request: Request, who: Who, session: SessionDep, uid: str):
        from app.store import validate_uid
        from app.training import scoring

        try:
            validate_uid(uid)
        except RadcohortError as exc:
            raise NotFound(f"instance {uid[:80]!r} not found ({exc.message})") from None
        item = instance_api.InstanceItem(**query.get_instance(session, uid))
        return render(request, "instance.html", who=who, item=item, scores=scoring.instance_scores(session, uid))

    @app.get("/instances/{uid}/thumbnail.png", include_in_schema=False)
    def thumbnail(request: Request, who: Who, session: SessionDep, uid: str, size: int = Query(160, ge=16, le=1024)):
        try:
            data = thumbnail_png(session, settings, uid, size)
        except InvalidInput as exc:
            raise NotFound(exc.message) from None
        return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=3600",
                                                               "X-Content-Type-Options": "nosniff"})

    # ================================================================== cohorts
    def _cohorts_page(request, who, session, form=None, errors=None, status=200, preview=None, tax_form=None,
                      tax_errors=None):
        total, items = cohort_service.list_cohorts(session, limit=100)
        defaults = {"taxonomy": "xr10", "per_class": "", "test": "0.2", "val": "0", "seed": "0"}
        return render(request, "cohorts.html", status=status, who=who, total=total, items=items,
                      taxonomies=taxonomies.list_taxonomies(session), form=form or defaults, errors=errors or [],
                      preview=preview, preview_chart=_cohort_chart(preview) if preview else None,
                      tax_form=tax_form or {}, tax_errors=tax_errors or [])

    def _cohort_chart(c: dict):
        return charts.stacked([(x["name"], x) for x in c.get("classes", [])], title="images per class and split")

    @app.get("/cohorts", include_in_schema=False)
    def cohorts_page(request: Request, who: Who, session: SessionDep):
        return _cohorts_page(request, who, session)

    @app.post("/cohorts", include_in_schema=False)
    def create_cohort(request: Request, who: Who, form: Form, session: SessionDep):
        values = {k: _text(form, k) or "" for k in ("taxonomy", "per_class", "test", "val", "seed")}
        flags = {k: bool(form.get(k)) for k in ("balanced", "include_conflicts")}
        values.update({k: "on" for k, v in flags.items() if v})
        preview = _text(form, "action") != "save"
        try:
            test = float(values["test"] or 0.2)
            val = float(values["val"] or 0)
            split = {"train": round(1 - test - val, 6), "test": test, **({"val": val} if val else {})}
            body = CohortIn(taxonomy=values["taxonomy"], per_class=values["per_class"] or None, split=split,
                            seed=values["seed"] or 0, preview=preview, **flags)
            out = cohort_api.create_cohort(body, Response(), session, settings, who.actor)
        except (ValidationError, RadcohortError, HTTPException, ValueError) as exc:
            session.rollback()
            return _cohorts_page(request, who, session, values, _errors(exc), _status(exc))
        if preview:
            return _cohorts_page(request, who, session, values, preview=out)
        return flash_redirect(request, f"/cohorts/{out['id']}", f"Cohort {out['id']} saved ({out['size']} images).")

    @app.post("/cohorts/taxonomies", include_in_schema=False)
    def create_taxonomy(request: Request, who: Who, form: Form, session: SessionDep):
        """Classes as lines `NAME: label=value, label=value|value, age_years=20-39`."""
        values = {k: _text(form, k) or "" for k in ("name", "description", "classes")}
        try:
            classes = []
            for n, line in enumerate(values["classes"].splitlines(), start=1):
                if not line.strip():
                    continue
                cname, sep, rest = line.partition(":")
                if not sep or not cname.strip():
                    raise InvalidInput(f"line {n}: expected 'NAME: label=value, ...'")
                where: dict = {}
                for part in filter(None, (p.strip() for p in rest.split(","))):
                    key, eq, val = part.partition("=")
                    if not eq:
                        raise InvalidInput(f"line {n}: expected label=value, got {part!r}")
                    key, val = key.strip(), val.strip()
                    if key == "age_years" and "-" in val:
                        lo, _, hi = val.partition("-")
                        where[key] = {"min": float(lo), "max": float(hi)}
                    elif "|" in val:
                        where[key] = [v.strip() for v in val.split("|") if v.strip()]
                    else:
                        where[key] = val
                classes.append({"name": cname.strip(), "where": where})
            body = TaxonomyIn(name=values["name"], description=values["description"] or None, classes=classes)
            from app.api.routes import taxonomies as taxonomy_api

            taxonomy_api.create_taxonomy(body, session, settings, who.actor)
        except (ValidationError, RadcohortError, HTTPException, ValueError) as exc:
            session.rollback()
            return _cohorts_page(request, who, session, tax_form=values, tax_errors=_errors(exc), status=_status(exc))
        return flash_redirect(request, "/cohorts", f"Taxonomy {values['name']} saved: pick it below.")

    def _cohort_page(request, who, session, cohort_id, export_form=None, export_errors=None, status=200):
        c = cohort_service.get_cohort(session, cohort_id)
        _, used = jobs.list_jobs(session, cohort_id=cohort_id, limit=20)
        return render(request, "cohort.html", status=status, who=who, c=c, chart=_cohort_chart(c), jobs=used,
                      parquet=importlib.util.find_spec("pyarrow") is not None,
                      export_form=export_form or research.EXPORT_DEFAULTS, export_errors=export_errors or [],
                      **research.exports_context(request, session, cohort_id))

    @app.get("/cohorts/{cohort_id}", include_in_schema=False)
    def cohort_page(request: Request, who: Who, session: SessionDep, cohort_id: int):
        return _cohort_page(request, who, session, cohort_id)

    @app.get("/cohorts/{cohort_id}/manifest.{fmt}", include_in_schema=False)
    def cohort_manifest(request: Request, who: Who, session: SessionDep, cohort_id: int, fmt: str):
        if fmt not in ("csv", "parquet"):
            raise NotFound(f"no manifest format {fmt!r} (csv, parquet)")
        return cohort_api.manifest(cohort_id, session, fmt)

    # ================================================================== training
    def _training_page(request, who, session, form=None, errors=None, status=200):
        total, items = jobs.list_jobs(session, limit=100)
        _, cohorts = cohort_service.list_cohorts(session, limit=200)
        offered, source = workers.offered_models(session)
        defaults = {"cohort_id": str(cohorts[0]["id"]) if cohorts else "", "model": "resnet18", "depth": "",
                    "image_size": "256", "epochs": "30", "batch_size": "", "seed": "0"}
        return render(request, "training.html", status=status, who=who, total=total,
                      items=[_job_row(session, j) for j in items], cohorts=cohorts, offered=offered[:400],
                      source=source, depths=DEPTH_PRESETS, experiments=EXPERIMENTS, form=form or defaults,
                      errors=errors or [], worker_alive=workers.any_alive(session),
                      active=any(j.status in ACTIVE_JOB for j in items))

    @app.get("/training", include_in_schema=False)
    def training_page(request: Request, who: Who, session: SessionDep, cohort_id: int | None = None):
        if cohort_id is None:
            return _training_page(request, who, session)
        return _training_page(request, who, session, form={"cohort_id": str(cohort_id), "model": "resnet18",
                                                           "image_size": "256", "epochs": "30", "seed": "0"})

    @app.post("/training", include_in_schema=False)
    def start_training(request: Request, who: Who, form: Form, session: SessionDep):
        values = {k: _text(form, k) or "" for k in ("cohort_id", "model", "depth", "image_size", "epochs",
                                                    "batch_size", "seed")}
        chosen = [e for e in EXPERIMENTS if form.get(f"exp_{e}")]
        values.update({f"exp_{e}": "on" for e in chosen})
        try:
            body = TrainingJobCreate(cohort_id=values["cohort_id"] or 0, model=values["model"] or "resnet18",
                                     depth=values["depth"] or None, image_size=values["image_size"] or 256,
                                     epochs=values["epochs"] or 30, batch_size=values["batch_size"] or None,
                                     seed=values["seed"] or 0, experiments=chosen)
            out = training_api.create_training_job(body, session, who.actor)
        except (ValidationError, RadcohortError, HTTPException) as exc:
            session.rollback()
            return _training_page(request, who, session, values, _errors(exc), _status(exc))
        msg = f"Training job {out.id} queued." + (f" {out.note}" if out.note else "")
        if out.jobs:
            msg = f"Depth ladder queued: jobs {', '.join(map(str, out.jobs))}." + (f" {out.note}" if out.note else "")
        return flash_redirect(request, f"/training/{out.id}", msg)

    def _job_ctx(session, job_id):
        job = jobs.get_job(session, job_id)
        out = training_api._out(session, job, settings)
        m = job.metrics if job.status == "completed" else None
        ctx: dict = {"job": out, "active": out.status in ACTIVE_JOB, "metrics": m,
                     "loss_chart": charts.curves(out.history, ("loss",), title="loss per epoch"),
                     "acc_chart": charts.curves(out.history, ("train_accuracy", "val_accuracy"), y_max=100,
                                                title="accuracy per epoch (%)", percent=True)}
        if m:
            per = m.get("per_class") or []
            ctx["class_bars"] = charts.hbars([(r["class"], r.get("accuracy") or 0, f"{(r.get('accuracy') or 0):.1f} %")
                                              for r in per], max_value=100, title="accuracy per class")
            cm = m.get("confusion_matrix") or {}
            peak = max((max(row) for row in cm.get("matrix") or [[0]]), default=0) or 1
            ctx["cm"] = {"labels": cm.get("labels") or [], "matrix": cm.get("matrix") or [], "peak": peak}
            exps = {k: v for k, v in (m.get("experiments") or {}).items() if isinstance(v, dict)}
            ctx["experiments"] = exps
            ctx["exp_rows"] = [{"class": r["class"], "test": r.get("accuracy"),
                                **{k: next((x.get("accuracy") for x in v.get("per_class") or []
                                            if x.get("class") == r["class"]), None) for k, v in exps.items()}}
                               for r in per]
        if (job.params or {}).get("depth_ladder"):
            ctx["ladder"] = jobs.ladder(session, job_id)
        return ctx

    @app.get("/training/{job_id}", include_in_schema=False)
    def training_job_page(request: Request, who: Who, session: SessionDep, job_id: int):
        return render(request, "training_job.html", who=who, **_job_ctx(session, job_id))

    @app.get("/training/{job_id}/live", include_in_schema=False)
    def training_job_live(request: Request, who: Who, session: SessionDep, job_id: int):
        return render(request, "_training_live.html", who=who, **_job_ctx(session, job_id))

    @app.post("/training/{job_id}/cancel", include_in_schema=False)
    def training_cancel(request: Request, who: Who, form: Form, session: SessionDep, job_id: int):
        try:
            training_api.cancel_training_job(job_id, session, who.actor)
        except NotFound:
            raise
        except RadcohortError as exc:
            session.rollback()
            return flash_redirect(request, f"/training/{job_id}", f"Not possible: {exc.message}")
        return flash_redirect(request, f"/training/{job_id}", f"Training job {job_id}: cancel requested.")

    @app.get("/training/{job_id}/artifacts/{name}", include_in_schema=False)
    def training_artifact(request: Request, who: Who, session: SessionDep, job_id: int, name: str):
        return training_api.get_training_artifact(job_id, name, session, settings)

    @app.get("/training/{job_id}/report", include_in_schema=False)
    def training_report(request: Request, who: Who, session: SessionDep, job_id: int):
        return training_api.get_training_report(job_id, session, settings)

    # ================================================================== models
    @app.get("/models", include_in_schema=False)
    def models_page(request: Request, who: Who, session: SessionDep):
        total, rows = predict.list_models(session, limit=200)
        return render(request, "models.html", who=who, total=total,
                      items=[model_api.ModelOut(**predict.model_view(m)) for m in rows])

    @app.get("/models/{model_id}", include_in_schema=False)
    def model_page(request: Request, who: Who, session: SessionDep, model_id: int):
        m = model_api.ModelOut(**predict.model_view(predict.get_model(session, model_id)))
        return render(request, "model.html", who=who, m=m, result=None)

    @app.post("/models/{model_id}/predict", include_in_schema=False)
    def model_predict(request: Request, who: Who, form: Form, session: SessionDep, ctx: CtxDep, model_id: int):
        m = model_api.ModelOut(**predict.model_view(predict.get_model(session, model_id)))
        upload = form.get("file")
        if not isinstance(upload, UploadFile) or not upload.filename:
            return render(request, "model.html", status=422, who=who, m=m, result=None,
                          errors=["choose a DICOM file to upload"])
        try:
            result = model_api.predict_upload(model_id, request, session, ctx, who.actor, file=upload)
        except RadcohortError as exc:
            return render(request, "model.html", status=exc.status_code, who=who, m=m, result=None,
                          errors=[exc.message])
        probs = sorted(result.probabilities.items(), key=lambda kv: -kv[1])
        chart = charts.hbars([(k, v * 100, f"{v * 100:.1f} %") for k, v in probs], max_value=100,
                             title="class probabilities")
        return render(request, "model.html", who=who, m=m, result=result, chart=chart, probabilities=probs,
                      filename=upload.filename)

    # ================================================================== worklists, a cohort's exports
    research.register(app, settings, _cohort_page)
