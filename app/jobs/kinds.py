"""The built-in job kinds: thin handlers over the existing service functions.

Payloads hold ids and options only (never a patient identifier): a retrieval's query stays on its row.
"""

from __future__ import annotations

from app.jobs.handlers import PERIODIC, Handler, register
from app.jobs.runner import JobCancelled, JobFailed, JobRun


# ---------------------------------------------------------------- probe (queue probe)
def _probe(run: JobRun) -> dict:
    from app.probe.service import run_probe_job

    error = run_probe_job(run.ctx, run.payload["node"], run.actor or "system")
    if error:
        raise JobFailed(error)
    return {"node": run.payload["node"]}


def _probe_settle(session, job, status, error) -> None:
    from app.probe.service import settle_probe

    settle_probe(session, job.payload.get("node"), error or status)


# ---------------------------------------------------------------- cohort pull (queue cohort)
def _pull(run: JobRun) -> dict:
    from app.cohorts.pull_runner import pull_to_quota

    p = run.payload

    def progress(cls, rid, status, received, counts) -> None:
        run.progress(force=True, class_name=cls, retrieval=rid, retrieval_status=status, counts=counts)
        run.poll_cancel()  # a cancel cancels the running retrieval too: seen here at once, not a heartbeat later
        run.checkpoint()  # between two retrievals: cancel or hand over here

    def starting(rid: int) -> None:
        run.progress(force=True, current_retrieval=rid)

    return pull_to_quota(run.ctx, p["node"], p["taxonomy"], int(p["per_class"]), p["study_date"],
                         max_rounds=int(p.get("max_rounds") or 200), actor=run.actor or "system", progress=progress,
                         on_retrieval=starting)


def _pull_cancel(session, job, actor) -> None:
    """A pull waits for its running retrieval: cancel that one too, so the pull stops at its next boundary."""
    from app.retrievals.service import cancel_for_job

    rid = (job.progress or {}).get("current_retrieval")
    if rid:
        cancel_for_job(session, int(rid), actor)


# ---------------------------------------------------------------- export (queue export)
def _export(run: JobRun) -> dict:
    from app.db.models import Export
    from app.exports.service import run_export

    with run.ctx.sessions() as s:
        exp = s.get(Export, int(run.payload["export_id"]))
        status = exp.status if exp is not None else "gone"
    if status not in ("queued", "running"):  # ended already (an earlier attempt died after recording it)
        return {"export_id": run.payload["export_id"], "status": status}
    rep = run_export(run.ctx, int(run.payload["export_id"]), checkpoint=run.checkpoint)
    return {"export_id": run.payload["export_id"], "exported": rep.get("exported"), "excluded": rep.get("excluded")}


def _export_settle(session, job, status, error) -> None:
    from app.exports.service import settle_export

    settle_export(session, int(job.payload["export_id"]), status, error)


# ---------------------------------------------------------------- worklist resolve (queue worklist)
def _resolve(run: JobRun) -> dict:
    from app.worklists.service import get_worklist, resolve

    wid = int(run.payload["worklist_id"])
    counts = resolve(run.ctx, wid, checkpoint=run.checkpoint)
    with run.ctx.sessions() as s:
        wl = get_worklist(s, wid)
        if wl.status == "failed":
            raise JobFailed(wl.error or "resolve failed")
    return {"worklist_id": wid, "counts": counts}


def _resolve_settle(session, job, status, error) -> None:
    from app.worklists.service import settle_resolve

    settle_resolve(session, int(job.payload["worklist_id"]), status, error)


# ---------------------------------------------------------------- retrieval (queue retrieval)
def _retrieval(run: JobRun) -> dict:
    from app.retrievals.service import run_retrieval_job

    out = run_retrieval_job(run.ctx, int(run.payload["retrieval_id"]))
    if out["status"] == "cancelled":
        raise JobCancelled(out.get("error") or "cancelled")
    if out["status"] == "failed":
        raise JobFailed(out.get("error") or "retrieval failed")
    return out


def _retrieval_settle(session, job, status, error) -> None:
    from app.retrievals.service import settle_retrieval

    settle_retrieval(session, int(job.payload["retrieval_id"]), status, error)


def _retrieval_cancel(session, job, actor) -> None:
    from app.retrievals.service import cancel_for_job

    cancel_for_job(session, int(job.payload["retrieval_id"]), actor)


def _adopt_retrievals(ctx) -> None:
    from app.retrievals.service import queue_orphans

    queue_orphans(ctx)


register(Handler("probe", "probe", _probe, settle=_probe_settle, slots=2))
register(Handler("cohort_pull", "cohort", _pull, on_cancel=_pull_cancel, slots=1))  # pulls contend for the same PACS: one at a time
register(Handler("export", "export", _export, settle=_export_settle, slots=1))  # exports compete for the disk
register(Handler("worklist_resolve", "worklist", _resolve, settle=_resolve_settle, slots=2))
register(Handler("retrieval", "retrieval", _retrieval, settle=_retrieval_settle, on_cancel=_retrieval_cancel,
                 slots=4))
PERIODIC["retrieval"] = _adopt_retrievals
