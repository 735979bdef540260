"""Run the probe and keep its findings with the node (`options["capabilities"]`)."""

from __future__ import annotations

import logging
import threading

from sqlalchemy.orm import Session

from app import audit
from app.config import Settings
from app.db.models import PacsNode
from app.probe.probe import effective_find_cap, preferred_method, probe_node

log = logging.getLogger("radcohort.probe")


def probe_and_store(session: Session, settings: Settings, node: PacsNode, actor: str) -> dict:
    """Probe `node` and store the capabilities on it (flushes; the caller commits)."""
    caps = probe_node(settings, node)
    url = (node.options or {}).get("dicomweb_url")
    if url:
        caps["dicomweb"] = probe_dicomweb(settings, url)
    node.options = {**(node.options or {}), "capabilities": caps}  # a new dict: JSON columns track assignment
    session.flush()
    audit.record(session, actor, "pacs_node.probe", node.name, echo=caps["echo"].get("ok"),
                 find_cap=caps.get("find_cap"), get=caps["get"].get("works"))
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


def summary(node: PacsNode) -> dict:
    """What the planner will do with this node, from its stored options."""
    opts = node.options or {}
    method, why = preferred_method(opts, node.retrieve_method or "move")
    return {"capabilities": opts.get("capabilities") or {}, "planner": {
        "method": method, "method_reason": why, "find_cap": effective_find_cap(opts)}}


def probe_in_background(ctx, name: str) -> threading.Thread:
    """Probe a freshly added node without holding up the request (errors only logged)."""

    def run() -> None:
        from app.retrievals.nodes import get_node

        try:
            with ctx.sessions() as s:
                probe_and_store(s, ctx.settings, get_node(s, name), "system")
                s.commit()
        except Exception as exc:  # noqa: BLE001 - a failed probe must not affect the node
            log.warning("probe of node %s failed: %s", name, exc)

    t = threading.Thread(target=run, name=f"probe-{name}", daemon=True)
    t.start()
    return t
