"""Worklists: upload (parse + store rows), resolve every row by C-FIND (dry run), retrieve the found
studies as one retrieval, and the per-row result as CSV.

Identifying keys (PatientID, AccessionNumber) make an identified search: the caller needs the
`find-identified` scope to upload, resolve or see them, and each such step is audited (key type and
counts, never values). Rows are written in bulk (Core inserts/updates), never one ORM object per row.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from collections import defaultdict

from sqlalchemy import bindparam, func, insert, select, update
from sqlalchemy.orm import Session

from app import audit
from app.db.base import session_scope
from app.db.models import Retrieval, RetrievalItem, Worklist, WorklistRow
from app.errors import Conflict, DicomError, InvalidInput, NotFound
from app.worklists.parse import IDENTIFYING_KEY_TYPES, ParsedWorklist, parse

log = logging.getLogger("radcohort.worklists")
ROW_STATUSES = ("pending", "found", "not_found", "ambiguous", "invalid", "refused")
_CHUNK = 1000


def needs_identified(key_type: str) -> bool:
    return key_type in IDENTIFYING_KEY_TYPES


def upload(session: Session, data: bytes, filename: str | None, column: str | None, actor: str) -> dict:
    """Parse and store a worklist; {"id", "rows", "key_type", "invalid", "warnings"}."""
    return store(session, parse(data, filename, column), filename, actor)


def store(session: Session, parsed: ParsedWorklist, filename: str | None, actor: str) -> dict:
    """Store a parsed worklist and its rows (bulk insert); audited."""
    wl = Worklist(filename=(filename or "")[:255] or None, key_type=parsed.key_type, status="uploaded",
                  row_count=len(parsed.rows), summary={"warnings": parsed.warnings}, actor=actor)
    session.add(wl)
    session.flush()
    rows = [{"worklist_id": wl.id, "row": r.row, "key": r.key, "filters": r.filters, "status": r.status,
             "studies": [], "detail": r.detail} for r in parsed.rows]
    for i in range(0, len(rows), _CHUNK):
        session.execute(insert(WorklistRow), rows[i:i + _CHUNK])
    invalid = sum(1 for r in parsed.rows if r.status == "invalid")
    wl.summary = {"warnings": parsed.warnings, "counts": {"pending": len(rows) - invalid, "invalid": invalid}}
    audit.record(session, actor, "worklist.upload", target=f"worklist:{wl.id}", key_type=parsed.key_type,
                 rows=len(rows), invalid=invalid, identified=needs_identified(parsed.key_type))
    session.flush()
    return {"id": wl.id, "rows": len(rows), "key_type": parsed.key_type, "invalid": invalid,
            "warnings": parsed.warnings}


def list_worklists(session: Session, limit: int, offset: int) -> tuple[int, list[dict]]:
    """(total, newest first page) with the counts per row status kept in the summary."""
    total = session.scalar(select(func.count()).select_from(Worklist)) or 0
    items = [{"id": w.id, "filename": w.filename, "key_type": w.key_type, "status": w.status, "node": w.node_name,
              "total": w.row_count, "counts": (w.summary or {}).get("counts", {}), "retrieval_id": w.retrieval_id,
              "created_at": w.created_at}
             for w in session.scalars(select(Worklist).order_by(Worklist.id.desc()).limit(limit).offset(offset))]
    return total, items


def get_worklist(session: Session, worklist_id: int) -> Worklist:
    wl = session.get(Worklist, worklist_id)
    if wl is None:
        raise NotFound(f"worklist {worklist_id} not found")
    return wl


def _rows(session: Session, worklist_id: int):
    t = WorklistRow.__table__
    return session.execute(select(t.c.id, t.c.row, t.c.key, t.c.filters, t.c.status, t.c.studies, t.c.detail)
                           .where(t.c.worklist_id == worklist_id).order_by(t.c.row))


def view(session: Session, wl: Worklist, *, show_keys: bool, limit: int | None = None, offset: int = 0) -> dict:
    """The worklist with its rows; `key` only for a caller allowed to see identifiers (else null)."""
    counts = dict(session.execute(select(WorklistRow.status, func.count()).where(WorklistRow.worklist_id == wl.id)
                                  .group_by(WorklistRow.status)).all())
    rows = []
    for i, (_id, row, key, filters, status, studies, detail) in enumerate(_rows(session, wl.id)):
        if i < offset or (limit is not None and len(rows) >= limit):
            continue
        shown_key = key if (show_keys or not needs_identified(wl.key_type)) else None
        # free text typed next to a hidden identifier may repeat it: hidden with it
        rows.append({"row": row, "key_type": wl.key_type, "key": shown_key,
                     "filters": filters if shown_key is not None or key is None
                     else {k: v for k, v in filters.items() if k != "StudyDescription"},
                     "status": status, "studies": studies or [], "detail": detail})
    return {"id": wl.id, "filename": wl.filename, "key_type": wl.key_type, "status": wl.status,
            "node": wl.node_name, "total": wl.row_count, "counts": counts,
            "warnings": (wl.summary or {}).get("warnings", []), "retrieval_id": wl.retrieval_id,
            "error": wl.error, "created_at": wl.created_at, "rows": rows}


def start_resolve(session: Session, wl: Worklist, node_name: str, actor: str) -> int:
    """Mark the worklist resolving on `node_name` (validated) and queue its durable resolve job (app.jobs) in
    the caller's transaction; returns the job id."""
    from app.jobs.queue import enqueue
    from app.retrievals.nodes import get_node

    get_node(session, node_name)
    if wl.status == "resolving":
        raise Conflict(f"worklist {wl.id} is being resolved")
    wl.status, wl.node_name, wl.error = "resolving", node_name, None
    audit.record(session, actor, "worklist.resolve", target=f"worklist:{wl.id}", node=node_name,
                 key_type=wl.key_type, identified=needs_identified(wl.key_type))
    session.flush()
    return enqueue(session, "worklist_resolve", {"worklist_id": wl.id}, target=f"worklist:{wl.id}", actor=actor).id


def settle_resolve(session: Session, worklist_id: int, status: str, error: str | None) -> None:
    """Its job ended without `resolve` recording the end (cancelled while queued, runners lost): say so."""
    wl = session.get(Worklist, worklist_id)
    if wl is None or wl.status != "resolving":
        return
    wl.status, wl.error = "failed", (error or status)[:500]
    session.flush()


_RETURN = ("StudyInstanceUID", "StudyDate", "ModalitiesInStudy", "StudyDescription", "AccessionNumber", "PatientID")


def resolve(ctx, worklist_id: int, checkpoint=None) -> dict:
    """C-FIND every row that is not invalid (study level) and record found / not_found / ambiguous /
    refused with the study UIDs; answers that contradict the query (a PACS ignoring a key) are dropped
    by app.dicom.matching.verify. One PACS failure marks its row refused; the others go on.
    `checkpoint()` (a job's) is called before each write of results and may raise to stop the resolve
    (a cancel ends it failed 'cancelled'; a hand-over leaves it resolving for the next runner)."""
    from app.jobs.runner import JobCancelled, JobStopped
    from app.dicom.matching import verify
    from app.dicom.scu import DicomClient
    from app.policy.find_gate import FindGate, PacsUnreachable
    from app.retrievals.nodes import get_node

    def nap(seconds: float) -> None:
        """A backoff wait that still sees a cancel (the job's checkpoint) every second."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if checkpoint is not None:
                checkpoint()
            time.sleep(min(1.0, left))

    with session_scope(ctx.sessions) as s:
        wl = get_worklist(s, worklist_id)
        node = get_node(s, wl.node_name)
        # the node's etiquette: association slots shared with its retrievals, adaptive backoff
        gate = FindGate(ctx, node, sleep=nap)
        client = DicomClient(ctx.settings, node, sleep=gate.retry_sleep)
        key_type = wl.key_type
        todo = [(rid, key, filters) for rid, _row, key, filters, status, _st, _d in _rows(s, worklist_id)
                if status != "invalid"]
    updates: list[dict] = []

    def flush() -> None:
        if not updates:
            return
        with session_scope(ctx.sessions) as s:
            s.execute(update(WorklistRow.__table__).where(WorklistRow.__table__.c.id == bindparam("rid"))
                      .values(status=bindparam("st"), studies=bindparam("uids"), detail=bindparam("det")), updates)
        updates.clear()

    try:
        if key_type == "StudyInstanceUID":
            todo = _resolve_uid_lists(gate, client, todo, updates, flush)
        for n, (rid, key, filters) in enumerate(todo):
            if checkpoint is not None:
                checkpoint()
            query = {key_type: key, **filters}
            try:
                res = gate.find(client, "STUDY", query, return_keys=_RETURN)
            except PacsUnreachable as exc:
                # stop paying a growing backoff per row: the rows not tried stay pending for a later resolve
                updates.append({"rid": rid, "st": "refused", "uids": [], "det": f"PACS: {exc}"[:500]})
                flush()
                raise _Unreachable(f"the PACS could not be reached for {gate.unreachable_stop} rows in a row; "
                                   f"{len(todo) - n - 1} row(s) not tried: resolve again later") from exc
            except DicomError as exc:
                updates.append({"rid": rid, "st": "refused", "uids": [], "det": f"PACS: {exc.message}"[:500]})
                continue
            uids, dropped = [], 0
            for ans in res.results:
                v = verify(query, ans)
                uid = str(ans.get("StudyInstanceUID", "") or "")
                if v.ok and uid and uid not in uids:
                    uids.append(uid)
                elif not v.ok:
                    dropped += 1
            det = []
            if dropped:
                det.append(f"{dropped} answer(s) contradicting the query ignored")
            if res.capped:
                det.append("the PACS cut the answer short")
            status = "found" if len(uids) == 1 else "not_found" if not uids else "ambiguous"
            if status == "ambiguous":
                det.insert(0, f"{len(uids)} studies match; narrow the row by date, modality or description")
            updates.append({"rid": rid, "st": status, "uids": uids, "det": "; ".join(det) or None})
            if len(updates) >= 200:
                flush()
        flush()
        final, error, stop = "resolved", None, False
    except JobStopped:
        flush()  # what was resolved stays; the job goes back to the queue, or to the runner that took it over
        raise
    except JobCancelled:
        flush()
        final, error, stop = "failed", "cancelled", True
    except _Unreachable as exc:
        final, error, stop = "failed", str(exc), False
    except Exception as exc:  # noqa: BLE001 - recorded on the worklist; rows already resolved stay
        log.exception("worklist %s: resolve failed", worklist_id)
        flush()
        final, error, stop = "failed", f"{type(exc).__name__}: {exc}"[:500], False
    with session_scope(ctx.sessions) as s:
        wl = get_worklist(s, worklist_id)
        wl.status, wl.error = final, error
        counts = dict(s.execute(select(WorklistRow.status, func.count()).where(WorklistRow.worklist_id == worklist_id)
                                .group_by(WorklistRow.status)).all())
        wl.summary = {**(wl.summary or {}), "counts": counts, "pacs": gate.stats}
    if stop:
        raise JobCancelled("cancelled")
    return counts


UID_LIST = 100


class _Unreachable(Exception):
    """The resolve stopped: the PACS could not be reached for several rows in a row."""


def _resolve_uid_lists(gate, client, todo: list, updates: list, flush) -> list:
    """StudyInstanceUID rows without filters, UID_LIST at a time by UID list matching (one association
    per hundred rows instead of one per row). Returns the rows left for one C-FIND each: those with
    filters, and every row of a list the PACS refused or answered with nothing (a PACS without list
    matching answers nothing; a row then costs its own C-FIND)."""
    from app.dicom.matching import verify
    from app.errors import DicomError
    from app.policy.find_gate import PacsUnreachable

    plain = [t for t in todo if not t[2]]
    rest = [t for t in todo if t[2]]
    for i in range(0, len(plain), UID_LIST):
        chunk = plain[i:i + UID_LIST]
        try:
            res = gate.find(client, "STUDY", {"StudyInstanceUID": "\\".join(k for _r, k, _f in chunk)},
                            return_keys=("StudyInstanceUID",))
        except PacsUnreachable:
            return rest + plain[i:]  # the row loop tries these one by one and stops on the same verdict
        except DicomError:
            rest += chunk
            continue
        got = {str(a.get("StudyInstanceUID", "") or "") for a in res.results}
        if not got or res.capped:
            rest += chunk
            continue
        for rid, key, _f in chunk:
            ok = key in got and any(verify({"StudyInstanceUID": key}, a).ok for a in res.results
                                    if str(a.get("StudyInstanceUID", "")) == key)
            updates.append({"rid": rid, "st": "found" if ok else "not_found", "uids": [key] if ok else [],
                            "det": None})
        if len(updates) >= 200:
            flush()
    return rest


def create_retrieval(session: Session, wl: Worklist, actor: str, include_ambiguous: bool = False):
    """One retrieval of every found (and optionally ambiguous) row's studies, by StudyInstanceUID list."""
    from app.retrievals.service import create_retrieval as create

    if wl.status != "resolved":
        raise Conflict(f"worklist {wl.id} is {wl.status}: resolve it (POST .../resolve) and wait for 'resolved'")
    wanted = ("found", "ambiguous") if include_ambiguous else ("found",)
    uids: list[str] = []
    seen = set()
    for _id, _row, _key, _f, status, studies, _d in _rows(session, wl.id):
        if status in wanted:
            for u in studies or []:
                if u not in seen:
                    seen.add(u)
                    uids.append(u)
    if not uids:
        raise InvalidInput("no row resolved to a study: nothing to retrieve")
    r = create(session, wl.node_name, {"StudyInstanceUID": "\\".join(uids)}, actor)
    wl.retrieval_id = r.id
    audit.record(session, actor, "worklist.retrieve", target=f"worklist:{wl.id}", retrieval=r.id, studies=len(uids))
    session.flush()
    return r


def results_csv(session: Session, wl: Worklist, *, show_keys: bool) -> str:
    """Per row: row, key_type, key (identifying keys only for find-identified), status, studies, detail, and
    after a retrieval the instances received / failed for the row's studies."""
    per_study: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    retrieval_status = None
    if wl.retrieval_id:
        retrieval_status = session.scalar(select(Retrieval.status).where(Retrieval.id == wl.retrieval_id))
        t = RetrievalItem.__table__
        for study, state, n in session.execute(select(t.c.study_instance_uid, t.c.state, func.count())
                                               .where(t.c.retrieval_id == wl.retrieval_id)
                                               .group_by(t.c.study_instance_uid, t.c.state)):
            per_study[study][state] += n
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(("row", "key_type", "key", "status", "studies", "detail", "retrieval_id", "retrieval_status",
                "instances_received", "instances_failed"))
    for _id, row, key, _filters, status, studies, detail in _rows(session, wl.id):
        shown = key if (show_keys or not needs_identified(wl.key_type)) else ""
        got = sum(per_study[u].get("received", 0) + per_study[u].get("skipped", 0) for u in studies or [])
        bad = sum(per_study[u].get("failed", 0) + per_study[u].get("missing", 0) for u in studies or [])
        w.writerow((row, wl.key_type, shown, status, " ".join(studies or []), detail or "",
                    wl.retrieval_id or "", retrieval_status or "", got if wl.retrieval_id else "",
                    bad if wl.retrieval_id else ""))
    return buf.getvalue()
