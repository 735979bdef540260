"""Pull to quota: retrieve a taxonomy's candidates from a PACS until each class has its quota.

For every class whose count (a cohort preview over the current index: one image per patient,
files present, patients in two classes excluded) is below `per_class`, its planned C-FIND
queries (app.cohorts.pull.plan_queries) are retrieved one study-date slice at a time,
sequentially, re-counting after each retrieval. A class stops when its quota is met or every
query x slice has been retrieved (`exhausted`: the PACS has no more for it). Slicing by study date
bounds the overshoot: a retrieval brings everything it names, so a whole-range retrieval would bring
the whole PACS's worth of a class at once.

Never move first and filter later: one SERIES C-FIND per planned query (per slice when the answer is
capped), then every answer is checked on our side against every matching value of the class
(app.dicom.matching.verify: a PACS that ignores PatientSex or BodyPartExamined answers series that
do not match). Only the series that match are retrieved, by explicit Study/Series Instance UIDs; an
answer that lacks an attribute we must check cannot be verified and is not retrieved (the class's
`checked` report counts them per key). Keys the node's probe found ignored are not even sent
(app.cohorts.pull.plan_queries).

Retrievals are ordinary Retrieval rows run in this thread under the node's policy
(app.retrievals.runner.run_retrieval), so they show in /api/v1/retrievals and are audited there.
Pulls started through the API are durable jobs (kind "cohort_pull", queue "cohort", app.jobs): the
pull's id is its job's id, its state and report live on the job row, and a pull whose runner stopped
is taken over and run again (it re-counts first, so it fetches only what is still short).
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from app import audit
from app.cohorts.pull import parse_date_range, plan_queries
from app.cohorts.service import create_cohort
from app.cohorts.taxonomies import get_taxonomy
from app.context import AppContext
from app.db.base import session_scope
from app.dicom.matching import verify
from app.dicom.scu import DicomClient
from app.errors import DicomError, InvalidInput, NotFound
from app.labels.service import get_rules
from app.retrievals.nodes import get_node
from app.retrievals.runner import run_retrieval
from app.retrievals.service import create_retrieval

log = logging.getLogger("radcohort.cohorts.pull")

DEFAULT_RANGE = "20110101-20161231"
DEFAULT_SLICES = 6
DEFAULT_MAX_ROUNDS = 200
# series named in one retrieval (a UID list stays well under the 64 KiB a UI value may hold)
MAX_SERIES_PER_RETRIEVAL = 200


def date_slices(study_date_range: str | tuple, n: int) -> list[str]:
    """The range cut into at most n contiguous, non-overlapping 'YYYYMMDD-YYYYMMDD' slices."""
    start, end = parse_date_range(study_date_range)
    days = (end - start).days + 1
    n = max(1, min(n, days))
    out, lo = [], start
    for i in range(n):
        hi = start + timedelta(days=(days * (i + 1)) // n - 1)
        out.append(f"{lo:%Y%m%d}-{hi:%Y%m%d}")
        lo = hi + timedelta(days=1)
    return out


def _checked() -> dict:
    return {"answers": 0, "matched": 0, "mismatched": 0, "unverifiable": 0, "duplicates": 0,
            "unverifiable_keys": {}, "capped_finds": 0}


def verified_series(answers, wanted: dict[str, str], checked: dict) -> dict[str, tuple[str, str]]:
    """The series among C-FIND `answers` that match every value of `wanted` on our side:
    {SeriesInstanceUID: (StudyInstanceUID, StudyDate)}; tallies into `checked`."""
    out: dict[str, tuple[str, str]] = {}
    seen: set[str] = set()
    for ds in answers:
        checked["answers"] += 1
        series, study = str(ds.get("SeriesInstanceUID", "") or ""), str(ds.get("StudyInstanceUID", "") or "")
        if series in seen:  # a PACS that repeats rows (one per instance)
            checked["duplicates"] += 1
            continue
        seen.add(series)
        ok, missing = verify(wanted, ds)
        if not series or not study:
            missing = [*missing, *(k for k, v in (("SeriesInstanceUID", series), ("StudyInstanceUID", study))
                                   if not v)]
        if not ok:
            checked["mismatched"] += 1
        elif missing:
            checked["unverifiable"] += 1
            for k in missing:
                checked["unverifiable_keys"][k] = checked["unverifiable_keys"].get(k, 0) + 1
        else:
            checked["matched"] += 1
            out[series] = (study, str(ds.get("StudyDate", "") or ""))
    return out


def _in_window(date: str, window: str) -> bool:
    return len(date) >= 8 and window[:8] <= date[:8] <= window[9:]


def _retrieval_queries(series: dict[str, tuple[str, str]], lists: bool) -> list[dict[str, str]]:
    """Explicit UIDs: a few hundred series per retrieval, or one per series for a PACS that
    refuses UID lists."""
    uids = sorted(series)
    size = MAX_SERIES_PER_RETRIEVAL if lists else 1
    out = []
    for i in range(0, len(uids), size):
        chunk = uids[i:i + size]
        studies = sorted({series[u][0] for u in chunk})
        out.append({"StudyInstanceUID": "\\".join(studies), "SeriesInstanceUID": "\\".join(chunk)})
    return out


def class_counts(ctx: AppContext, taxonomy_name: str) -> dict[str, int]:
    """Per class, the patients a cohort build would select now (preview, no quota, files checked)."""
    with ctx.sessions() as s:
        out = create_cohort(s, {"taxonomy": taxonomy_name, "preview": True}, pseudonym_key=b"",
                            store_dir=ctx.settings.store_dir, rules=get_rules(ctx.settings.label_rules))
    return {c["name"]: c["selected"] for c in out["classes"]}


def pull_to_quota(ctx: AppContext, node_name: str, taxonomy_name: str, per_class: int,
                  study_date_range: str | tuple = DEFAULT_RANGE, max_rounds: int = DEFAULT_MAX_ROUNDS,
                  actor: str = "cli", slices: int = DEFAULT_SLICES, progress=None,
                  on_retrieval=None) -> dict[str, Any]:
    """Retrieve until every class has `per_class` patients or its queries are exhausted.

    Returns {"classes": {name: {before, after, quota, retrievals: [ids], exhausted, rounds: [{window,
    retrieval, series, status}], checked: {answers, matched, mismatched, unverifiable, duplicates,
    unverifiable_keys: {key: n}, capped_finds}, not_sent: [keys]}},
    "retrievals": n, "stopped": "done" | "max_rounds" | "find_failed" | "retrieval_failed", "error"}.
    At most `max_rounds` retrievals are started in all. `progress(class, retrieval id, status, received,
    counts)` is called after each retrieval, `on_retrieval(retrieval id)` before it runs.
    """
    if per_class < 1:
        raise InvalidInput("per_class: must be at least 1")
    if max_rounds < 1:
        raise InvalidInput("max_rounds: must be at least 1")
    try:
        windows = date_slices(study_date_range, slices)
    except ValueError as exc:
        raise InvalidInput(f"study_date: {exc}") from exc
    with session_scope(ctx.sessions) as s:
        node = get_node(s, node_name)  # NotFound before anything starts
        client = DicomClient(ctx.settings, node)
        caps = dict((node.options or {}).get("capabilities") or {})
        taxonomy = get_taxonomy(s, taxonomy_name)
        audit.record(s, actor, "cohort.pull.start", f"taxonomy:{taxonomy_name}", node=node_name,
                     per_class=per_class, study_date=windows[0][:8] + "-" + windows[-1][9:])
    lists = not (caps.get("uid_lists_refused") or (caps.get("uid_lists") or {}).get("find") is False)
    plan = plan_queries(taxonomy, study_date_range, get_rules(ctx.settings.label_rules), capabilities=caps)
    counts = class_counts(ctx, taxonomy_name)
    report: dict[str, dict] = {c: {"before": n, "after": n, "quota": per_class, "retrievals": [], "exhausted": False,
                                   "rounds": [], "checked": _checked(), "not_sent": []}
                               for c, n in counts.items()}
    rounds, stopped, error = 0, "done", None
    fetched: set[str] = set()  # series already named in a retrieval of this pull
    whole = f"{windows[0][:8]}-{windows[-1][9:]}"

    def short(name: str) -> bool:
        return report[name]["after"] < per_class

    for name in report:
        checked = report[name]["checked"]
        for planned in (q for q in plan if q["class"] == name):
            if not short(name) or stopped != "done":
                break
            query, wanted = planned["query"], planned["verify"]
            report[name]["not_sent"] = sorted(set(report[name]["not_sent"]) | set(planned["not_sent"]))
            try:
                res = client.find("SERIES", {**query, "StudyDate": whole} if query.get("StudyDate") else query)
            except DicomError as exc:
                stopped, error = "find_failed", f"C-FIND failed: {exc.message}"
                break
            checked["capped_finds"] += int(res.capped)
            capped = res.capped and bool(query.get("StudyDate"))  # without a date sent, slices cannot help
            found = {} if capped else verified_series(res.results, {**wanted, "StudyDate": whole}, checked)
            for window in windows:
                if not short(name) or stopped != "done":
                    break
                if capped:  # the whole range was cut short: ask this slice alone
                    try:
                        part = client.find("SERIES", {**query, "StudyDate": window} if query.get("StudyDate")
                                           else query)
                    except DicomError as exc:
                        stopped, error = "find_failed", f"C-FIND failed: {exc.message}"
                        break
                    checked["capped_finds"] += int(part.capped)
                    here = verified_series(part.results, {**wanted, "StudyDate": window}, checked)
                else:
                    here = {u: v for u, v in found.items() if _in_window(v[1], window)}
                here = {u: v for u, v in here.items() if u not in fetched}  # another query named it already
                for rq in _retrieval_queries(here, lists):
                    if not short(name):
                        break
                    if rounds >= max_rounds:
                        stopped = "max_rounds"
                        break
                    with session_scope(ctx.sessions) as s:
                        rid = create_retrieval(s, node_name, rq, actor).id
                    rounds += 1
                    fetched.update(rq["SeriesInstanceUID"].split("\\"))
                    if on_retrieval:
                        on_retrieval(rid)  # the one running now (a job's cancel is passed on to it)
                    r = run_retrieval(ctx, rid)
                    report[name]["retrievals"].append(rid)
                    report[name]["rounds"].append({"window": window, "retrieval": rid,
                                                   "series": rq["SeriesInstanceUID"].count("\\") + 1,
                                                   "status": r.status})
                    counts = class_counts(ctx, taxonomy_name)  # a knee query brings right knees too: recount all
                    for c, n in counts.items():
                        report[c]["after"] = n
                    if progress:
                        progress(name, rid, r.status, r.received, counts)
                    if r.status in ("failed", "cancelled"):
                        stopped, error = "retrieval_failed", f"retrieval {rid} {r.status}: {r.error or ''}".strip()
                        break
        if stopped != "done":
            break
        report[name]["exhausted"] = short(name)  # every verified series of every query was retrieved
    out = {"node": node_name, "taxonomy": taxonomy_name, "per_class": per_class, "retrievals": rounds,
           "stopped": stopped, "error": error, "classes": report}
    with session_scope(ctx.sessions) as s:
        audit.record(s, actor, "cohort.pull.finish", f"taxonomy:{taxonomy_name}", node=node_name,
                     retrievals=rounds, stopped=stopped,
                     short=sorted(c for c, v in report.items() if v["after"] < per_class))
    return out


# job status -> the pull's status in the API (PullOut): a finished job says whether the quota was met
_PULL_STATUS = {"queued": "queued", "running": "running", "failed": "failed", "cancelled": "cancelled"}


def start_pull(session, node: str, taxonomy: str, per_class: int, study_date: str, actor: str,
               max_rounds: int = DEFAULT_MAX_ROUNDS) -> dict:
    """Queue a pull as a durable job in the caller's transaction; its PullOut shape (status queued)."""
    from app.jobs.queue import enqueue

    job = enqueue(session, "cohort_pull", {"node": node, "taxonomy": taxonomy, "per_class": per_class,
                                           "study_date": study_date, "max_rounds": max_rounds},
                  target=f"taxonomy:{taxonomy}"[:128], actor=actor)
    return pull_view(job)


def pull_view(job) -> dict:
    """A cohort_pull job in the shape of the pull API (PullOut)."""
    from app.jobs.queue import view

    v, p = view(job), job.payload or {}
    report = job.result if job.status == "succeeded" else None
    status = _PULL_STATUS.get(job.status) or ("completed" if (report or {}).get("stopped") == "done" else "partial")
    return {"id": job.id, "status": status, "node": p.get("node"), "taxonomy": p.get("taxonomy"),
            "per_class": p.get("per_class"), "study_date": p.get("study_date"), "created_at": v["created_at"],
            "finished_at": v["finished_at"], "report": report,
            "error": (report or {}).get("error") if report is not None else job.error}


def get_pull(session, pull_id: int) -> dict:
    from app.db.models import Job

    job = session.get(Job, pull_id)
    if job is None or job.kind != "cohort_pull":
        raise NotFound(f"no cohort pull {pull_id}")
    return pull_view(job)


def check_request(ctx: AppContext, node: str, taxonomy: str, study_date: str) -> None:
    """Validate a pull request up front (so the API answers 4xx, not a failed background job)."""
    try:
        parse_date_range(study_date)
    except ValueError as exc:
        raise InvalidInput(f"study_date: {exc}") from exc
    with ctx.sessions() as s:
        get_node(s, node)
        get_taxonomy(s, taxonomy)
