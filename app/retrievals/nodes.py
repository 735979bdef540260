"""PACS node records: create, list, get, delete (repositories flush; the caller commits)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app import audit
from app.db.models import PacsNode
from app.errors import Conflict, NotFound
from app.retrievals.schemas import NodeIn


def create_node(session: Session, data: NodeIn, actor: str) -> PacsNode:
    if session.scalar(select(PacsNode.id).where(PacsNode.name == data.name)) is not None:
        raise Conflict(f"a PACS node named '{data.name}' already exists")
    node = PacsNode(name=data.name, ae_title=data.ae_title, host=data.host, port=data.port,
                    retrieve_method=data.retrieve_method,
                    options={"find_limit": data.find_limit} if data.find_limit else {})
    session.add(node)
    session.flush()
    audit.record(session, actor, "pacs_node.create", data.name, ae_title=data.ae_title, host=data.host,
                 port=data.port, retrieve_method=data.retrieve_method)
    return node


def list_nodes(session: Session) -> list[PacsNode]:
    return list(session.scalars(select(PacsNode).order_by(PacsNode.name)))


def get_node(session: Session, name: str) -> PacsNode:
    node = session.scalar(select(PacsNode).where(PacsNode.name == name))
    if node is None:
        raise NotFound(f"no PACS node named '{name}'")
    return node


def delete_node(session: Session, name: str, actor: str) -> None:
    node = get_node(session, name)
    session.delete(node)
    session.flush()
    audit.record(session, actor, "pacs_node.delete", name)


def remember_echo(session: Session, node: PacsNode, *, ok: bool, elapsed_ms: float | None = None,
                  error: str | None = None, actor: str = "system") -> None:
    """Keep the node's last C-ECHO verdict (`options["last_echo"]`), shown by the web console."""
    from datetime import datetime, timezone

    node.options = {**(node.options or {}), "last_echo": {
        "ok": ok, "elapsed_ms": round(elapsed_ms, 2) if elapsed_ms is not None else None,
        "error": (error or None) and error[:300], "at": datetime.now(timezone.utc).isoformat(), "by": actor}}
    session.flush()
