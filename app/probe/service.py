"""Run the probe and keep its findings with the node (`options["capabilities"]`).

Through the API a probe is a durable background job (kind "probe", app.jobs): its state is also kept
with the node, `options["probe"]` = {"status": "running"|"completed"|"failed", "started_at", "finished_at",
"error", "summary", "job_id"}.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone

from sqlalchemy.orm import Session

from app import audit
from app.config import Settings
from app.db.models import PacsNode
from app.dicom.scu import Node
from app.probe.probe import effective_find_cap, preferred_method, probe_node

log = logging.getLogger("radcohort.probe")

# capabilities retrievals write (app.retrievals.runner._remember) that a probe must not forget
LEARNT_BY_RETRIEVALS = ("uid_lists_refused", "study_retrieve_refused", "find_uid_lists_unanswered")
# a probe 'running' for longer than this was interrupted (the process ended under it)
STALE_AFTER = timedelta(minutes=15)


def probe_and_store(session: Session, settings: Settings, node: PacsNode, actor: str) -> dict:
    """Probe `node` in this thread and store the capabilities on it (flushes; the caller commits)."""
    started = _now()
    caps = probe_node(settings, node)
    _store(session, settings, node, caps, actor)
    node.options = {**(node.options or {}), "probe": {"status": "completed", "started_at": started,
                                                      "finished_at": _now(), "error": None,
                                                      "summary": caps.get("summary")}}
    session.flush()
    return summary(node)


def probe_dicomweb(settings: Settings, url: str) -> dict:
    """Does the DICOMweb service answer a one-result QIDO query?"""
    from app.dicomweb.client import DicomwebNode
    from app.errors import DicomError

    try:
        ms = DicomwebNode(url, timeout=settings.dicom_timeout, retries=0).echo()
        return {"ok": True, "elapsed_ms": round(ms, 2)}
    except DicomError as exc:
        return {"ok": False, "error": exc.message}
    except (ValueError, OSError) as exc:  # a stored URL requests cannot parse (InvalidURL is a ValueError)
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}


def summary(node: PacsNode) -> dict:
    """What the planner will do with this node, from its stored options."""
    opts = node.options or {}
    method, why = preferred_method(opts, node.retrieve_method or "move")
    caps = opts.get("capabilities") or {}
    return {"capabilities": caps, "planner": {"method": method, "method_reason": why,
                                              "find_cap": effective_find_cap(opts)},
            "summary": caps.get("summary"), "probe": probe_state(node)}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def probe_state(node: PacsNode) -> dict:
    """The node's last probe job: status, times, error and one-line summary ('never' if none ran)."""
    state = dict((node.options or {}).get("probe") or {"status": "never"})
    # a probe run as a durable job ends through its job (taken over, or settled failed); only a probe
    # without one (before jobs existed) is judged interrupted by its age
    if state.get("status") == "running" and state.get("started_at") and not state.get("job_id"):
        if datetime.now(timezone.utc) - datetime.fromisoformat(state["started_at"]) > STALE_AFTER:
            state.update(status="failed", error="interrupted (the probe did not finish)")
    if "summary" not in state:
        state["summary"] = ((node.options or {}).get("capabilities") or {}).get("summary")
    return state


def mark_running(node: PacsNode) -> bool:
    """Record a probe as running (flushes nothing); False when one is already running."""
    if probe_state(node).get("status") == "running":
        return False
    node.options = {**(node.options or {}), "probe": {"status": "running", "started_at": _now(),
                                                      "finished_at": None, "error": None}}
    return True


def run_probe_job(ctx, name: str, actor: str = "system") -> str | None:
    """Probe `name` and record the job's outcome with the node; a node that does not answer C-ECHO
    keeps its previous capabilities and the job fails with the reason (returned; None: completed)."""
    from app.retrievals.nodes import get_node

    error, caps = None, None
    try:
        with ctx.sessions() as s:
            node = get_node(s, name)
            if (node.options or {}).get("probe", {}).get("status") != "running":
                mark_running(node)
                s.commit()
            target = Node.of(node)  # detached: no session held open during the network work
        caps = probe_node(ctx.settings, target)
        if not caps["echo"].get("ok"):
            error = f"no answer to C-ECHO ({caps['echo'].get('error')})"
    except Exception as exc:  # noqa: BLE001 - a probe job always ends with a status
        log.warning("probe of node %s failed: %s", name, exc)
        error = f"{type(exc).__name__}: {exc}"[:500]
    try:
        with ctx.sessions() as s:
            node = get_node(s, name)
            if caps is not None and error is None:
                _store(s, ctx.settings, node, caps, actor)
            state = {**probe_state(node), "status": "failed" if error else "completed", "finished_at": _now(),
                     "error": error, "summary": (caps or {}).get("summary")}
            node.options = {**(node.options or {}), "probe": state}
            s.commit()
    except Exception as exc:  # noqa: BLE001 - e.g. the node was deleted meanwhile
        log.warning("probe of node %s: result not recorded: %s", name, exc)
        error = error or f"result not recorded: {type(exc).__name__}"
    return error


def _store(session: Session, settings: Settings, node: PacsNode, caps: dict, actor: str) -> None:
    old = (node.options or {}).get("capabilities") or {}
    for key in LEARNT_BY_RETRIEVALS:
        if old.get(key) and not caps.get(key):
            caps[key] = old[key]
    url = (node.options or {}).get("dicomweb_url")
    if url:
        caps["dicomweb"] = probe_dicomweb(settings, url)
    node.options = {**(node.options or {}), "capabilities": caps}
    session.flush()
    audit.record(session, actor, "pacs_node.probe", node.name, echo=caps["echo"].get("ok"),
                 find_cap=caps.get("find_cap"), get=caps["get"].get("works"), summary=caps.get("summary"))


def queue_probe(session: Session, name: str, actor: str = "system") -> int:
    """Queue a probe job for node `name` in the caller's transaction (its runner: app.jobs); returns its id.
    The node is marked running (flushes nothing)."""
    from app.jobs.queue import enqueue
    from app.retrievals.nodes import get_node

    job = enqueue(session, "probe", {"node": name}, target=f"pacs_node:{name}"[:128], actor=actor)
    node = get_node(session, name)
    mark_running(node)
    node.options = {**(node.options or {}), "probe": {**node.options["probe"], "job_id": job.id}}
    return job.id


def settle_probe(session: Session, name: str | None, error: str) -> None:
    """A probe job ended without its handler recording the outcome (cancelled, its runners lost): say so."""
    from app.db.models import PacsNode
    from sqlalchemy import select

    node = session.scalar(select(PacsNode).where(PacsNode.name == name)) if name else None
    if node is None or ((node.options or {}).get("probe") or {}).get("status") != "running":
        return
    node.options = {**(node.options or {}), "probe": {**node.options["probe"], "status": "failed",
                                                      "finished_at": _now(), "error": error[:500]}}
    session.flush()
