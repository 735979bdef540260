"""Node policy edits and retrieval control (pause/resume/cancel/urgent); repositories flush only."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy.orm import Session

from app import audit
from app.db.models import PacsNode, Retrieval
from app.errors import Conflict, InvalidInput
from app.policy.schema import NodePatch, policy_of, protocol_of
from app.probe.probe import effective_find_cap, preferred_method


def patch_node(session: Session, node: PacsNode, patch: NodePatch, actor: str) -> PacsNode:
    """Apply a PATCH: policy (replaced whole), protocol, DICOMweb URL, retrieve method."""
    opts = dict(node.options or {})
    fields = patch.model_fields_set
    if "policy" in fields:
        if patch.policy is None:
            opts.pop("policy", None)
        else:
            opts["policy"] = patch.policy.model_dump(mode="json")
    if "dicomweb_url" in fields:
        if patch.dicomweb_url:
            opts["dicomweb_url"] = patch.dicomweb_url.rstrip("/")
        else:
            opts.pop("dicomweb_url", None)
    if "protocol" in fields and patch.protocol:
        opts["protocol"] = patch.protocol
    if protocol_of(opts) in ("dicomweb", "both") and not opts.get("dicomweb_url"):
        raise InvalidInput(f"protocol '{protocol_of(opts)}' needs a dicomweb_url (e.g. http://pacs:8042/dicom-web)")
    if "retrieve_method" in fields and patch.retrieve_method:
        node.retrieve_method = patch.retrieve_method
    node.options = opts  # a new dict: JSON columns track assignment, not mutation
    session.flush()
    audit.record(session, actor, "pacs_node.update", node.name, fields=sorted(fields))
    return node


def node_settings(node: PacsNode, now: datetime | None = None) -> dict:
    """The node's etiquette as the API shows it: policy, protocol, window state, planner choice."""
    opts = node.options or {}
    policy = policy_of(opts)
    is_open, change = policy.schedule().state(now or datetime.now(timezone.utc))
    method, why = preferred_method(opts, node.retrieve_method or "move")
    return {"protocol": protocol_of(opts), "dicomweb_url": opts.get("dicomweb_url"),
            "policy": policy.model_dump(mode="json"),
            "window": {"open": is_open, "changes_at": change},
            "planner": {"method": method, "method_reason": why, "find_cap": effective_find_cap(opts)},
            "capabilities": opts.get("capabilities")}


# ---------------------------------------------------------------------- retrieval control
ACTIVE = ("queued", "running")


def mark_urgent(session: Session, r: Retrieval, node: PacsNode, actor: str) -> None:
    if not policy_of(node.options).urgent.allowed:
        raise InvalidInput(f"urgent: node '{node.name}' does not allow urgent retrievals")
    r.report = {**(r.report or {}), "urgent": True}
    session.flush()
    audit.record(session, actor, "retrieval.urgent", str(r.id), node=node.name)


def pause(session: Session, r: Retrieval, actor: str) -> Retrieval:
    """A running job stops at its next study/series boundary; a queued one does not start."""
    if r.status not in ACTIVE:
        raise Conflict(f"retrieval {r.id} is {r.status}: only a queued or running one can be paused")
    r.status = "paused"
    session.flush()
    audit.record(session, actor, "retrieval.pause", str(r.id))
    return r


def resume(session: Session, r: Retrieval, actor: str) -> Retrieval:
    if r.status != "paused":
        raise Conflict(f"retrieval {r.id} is {r.status}, not paused")
    r.status = "running" if r.started_at is not None else "queued"
    session.flush()
    audit.record(session, actor, "retrieval.resume", str(r.id))
    return r


def cancel(session: Session, r: Retrieval, actor: str) -> Retrieval:
    """The runner stops at its next boundary and reports what it got; a queued one never starts."""
    if r.status not in (*ACTIVE, "paused"):
        raise Conflict(f"retrieval {r.id} is {r.status}: nothing to cancel")
    if r.started_at is None:
        r.finished_at = datetime.now(timezone.utc)
        r.error = "cancelled by the user before it started"
    r.status = "cancelled"
    session.flush()
    audit.record(session, actor, "retrieval.cancel", str(r.id))
    return r
