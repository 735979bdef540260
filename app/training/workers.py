"""Live workers: each `radcohort worker` writes its row on start and on every poll (no torch here).

The API reads this table to say whether a worker is alive (/health, a queued job's `note`) and to
validate a training request's model against what the live workers offer.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from app.db.models import WorkerProcess

log = logging.getLogger("radcohort.workers")

# a worker heartbeats every poll (2 s by default) and every few seconds while it trains
ALIVE_SECONDS = 60.0
QUEUES = ("training", "scoring")
NO_WORKER_NOTE = "queued — no worker is running: start `radcohort worker`"
# torch-free copy of the names a worker offers for sure (models/registry.py adds every timm name);
# used to validate requests while no worker has published its registry
BUILTIN_MODELS = (
    "radcohort_cnn4", "radcohort_resnet64", "resnet10t", "resnet14t", "resnet18", "resnet26", "resnet34",
    "resnet50", "resnet101", "vgg11_bn", "vgg16_bn", "vgg19_bn", "densenet121", "efficientnet_b0",
    "efficientnet_b1", "mobilenetv3_small_100", "mobilenetv3_large_100", "convnext_tiny", "regnety_008",
)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _aware(dt: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes for timezone-aware columns
    return dt.replace(tzinfo=timezone.utc) if dt is not None and dt.tzinfo is None else dt


# ---------------------------------------------------------------- worker side
def register(session: Session, worker_id: str, hostname: str, pid: int, capabilities: dict) -> None:
    """Insert (or refresh) this worker's row."""
    now = utcnow()
    row = session.get(WorkerProcess, worker_id)
    if row is None:
        session.add(WorkerProcess(id=worker_id, hostname=hostname[:255], pid=pid, started_at=now,
                                  heartbeat_at=now, capabilities=capabilities))
    else:
        row.heartbeat_at, row.capabilities = now, capabilities
    session.flush()


def heartbeat(session: Session, worker_id: str, busy_job: int | None = None) -> bool:
    """Refresh the heartbeat; False when the row is gone (the caller re-registers)."""
    res = session.execute(update(WorkerProcess).where(WorkerProcess.id == worker_id)
                          .values(heartbeat_at=utcnow()))
    return res.rowcount == 1


def unregister(session: Session, worker_id: str) -> None:
    session.execute(delete(WorkerProcess).where(WorkerProcess.id == worker_id))


# ---------------------------------------------------------------- API side
def alive(session: Session, within: float = ALIVE_SECONDS) -> list[WorkerProcess]:
    cutoff = utcnow() - timedelta(seconds=within)
    return list(session.scalars(select(WorkerProcess).where(WorkerProcess.heartbeat_at >= cutoff)
                                .order_by(WorkerProcess.started_at)))


def any_alive(session: Session) -> bool:
    return bool(alive(session))


def offered_models(session: Session) -> tuple[list[str], str]:
    """(model names, source): the union of what live workers published, else the built-in list."""
    names: set[str] = set()
    for w in alive(session):
        names.update((w.capabilities or {}).get("models") or [])
    if names:
        return sorted(names), "workers"
    return sorted(BUILTIN_MODELS), "built-in"


def view(w: WorkerProcess) -> dict:
    caps = w.capabilities or {}
    return {"id": w.id, "hostname": w.hostname, "pid": w.pid, "started_at": _aware(w.started_at),
            "heartbeat_at": _aware(w.heartbeat_at), "queues": caps.get("queues") or list(QUEUES),
            "device": caps.get("device"), "models": len(caps.get("models") or []),
            "error": caps.get("error")}


def health(ctx) -> dict | None:
    """The `workers` part of /health (None when the database cannot be read)."""
    try:
        with ctx.sessions() as s:
            rows = [view(w) for w in alive(s)]
    except Exception as exc:  # noqa: BLE001 - health must answer whatever the DB does
        log.warning("workers not readable for /health: %s", type(exc).__name__)
        return None
    queues = sorted({q for r in rows for q in r["queues"]})
    for r in rows:
        for k in ("started_at", "heartbeat_at"):
            r[k] = r[k].isoformat() if r[k] else None
        for k in ("id", "hostname", "pid"):  # /health is open even with tokens set: no host names
            r.pop(k)
    return {"alive": len(rows), "queues": queues, "items": rows,
            "note": None if rows else "no worker is running: queued training jobs wait; start `radcohort worker`"}
