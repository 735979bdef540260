"""Retrieval records and the in-process pool that runs them in the background."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from sqlalchemy import event, func, select
from sqlalchemy.orm import Session

from app import audit
from app.context import AppContext
from app.db.models import Retrieval
from app.dicom.queries import validate_query
from app.errors import Conflict, InvalidInput, NotFound
from app.retrievals.nodes import get_node
from app.retrievals.schemas import RetrievalOut

log = logging.getLogger("radcohort.retrievals")

MAX_CONCURRENT = 4


def create_retrieval(session: Session, node_name: str, query: dict, actor: str) -> Retrieval:
    """A queued retrieval (validated node and query); the caller commits and then submits it."""
    node = get_node(session, node_name)
    q = validate_query(query)
    if not any(v for v in q.values()):
        raise InvalidInput("query: give at least one matching value (a whole-PACS retrieval is refused)")
    r = Retrieval(node_name=node.name, query=q, method=node.retrieve_method, status="queued", expected=0,
                  received=0, skipped=0, failed=0, missing=[], failed_uids=[], report={})
    session.add(r)
    session.flush()
    audit.record(session, actor, "retrieval.create", str(r.id), node=node.name, query_keys=sorted(q))
    return r


def requeue_retrieval(session: Session, retrieval_id: int, actor: str) -> Retrieval:
    """Queue a finished retrieval again: it lists anew and fetches only what is not indexed."""
    r = get_retrieval(session, retrieval_id)
    if r.status in ("queued", "running", "paused"):  # paused: its runner is still waiting
        raise Conflict(f"retrieval {retrieval_id} is {r.status}")
    r.status = "queued"
    r.error = None
    session.flush()
    audit.record(session, actor, "retrieval.retry", str(r.id), node=r.node_name)
    return r


def get_retrieval(session: Session, retrieval_id: int) -> Retrieval:
    r = session.get(Retrieval, retrieval_id)
    if r is None:
        raise NotFound(f"no retrieval {retrieval_id}")
    return r


def list_retrievals(session: Session, limit: int = 50, offset: int = 0) -> tuple[list[Retrieval], int]:
    total = session.scalar(select(func.count()).select_from(Retrieval)) or 0
    rows = session.scalars(select(Retrieval).order_by(Retrieval.created_at.desc(), Retrieval.id.desc())
                           .limit(limit).offset(offset))
    return list(rows), int(total)


def to_out(r: Retrieval) -> RetrievalOut:
    return RetrievalOut(id=r.id, node=r.node_name, query=r.query or {}, method=r.method, status=r.status,
                        expected=r.expected or 0, received=r.received or 0, skipped=r.skipped or 0,
                        failed=r.failed or 0, missing=list(r.missing or []), error=r.error,
                        report=r.report or {}, created_at=r.created_at, started_at=r.started_at,
                        finished_at=r.finished_at)


class RetrievalManager:
    """A small thread pool in the API process; each job runs with its own sessions."""

    def __init__(self, ctx: AppContext, max_workers: int = MAX_CONCURRENT):
        self.ctx = ctx
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="retrieval")
        self.futures: dict[int, Future] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._supervisor: threading.Thread | None = None

    def submit(self, retrieval_id: int) -> Future:
        with self._lock:
            fut = self._pool.submit(self._run, retrieval_id)
            self.futures = {k: f for k, f in self.futures.items() if not f.done()}
            self.futures[retrieval_id] = fut
            return fut

    def adopt_orphans(self) -> list[int]:
        """Submit the unfinished retrievals that no live process runs (app.retrievals.lease);
        each one's run claims it first, so a race with another process runs it once."""
        from app.retrievals.lease import orphans

        with self._lock:
            mine = {k for k, f in self.futures.items() if not f.done()}
        adopted = [rid for rid in orphans(self.ctx) if rid not in mine]
        for rid in adopted:
            log.warning("retrieval %s was left unfinished by a stopped process: resuming it", rid)
            self.submit(rid)
        return adopted

    def start_supervision(self) -> None:
        """At start-up and then every heartbeat: take over retrievals left by stopped processes."""
        if self._supervisor is not None:
            return

        def loop() -> None:
            while True:
                try:
                    self.adopt_orphans()
                except Exception as exc:  # noqa: BLE001 - the database may be down for a moment
                    log.warning("looking for orphaned retrievals failed: %s", type(exc).__name__)
                if self._stop.wait(self.ctx.settings.retrieval_heartbeat_s):
                    return

        self._supervisor = threading.Thread(target=loop, name="retrieval-supervisor", daemon=True)
        self._supervisor.start()

    def _run(self, retrieval_id: int) -> None:
        from app.retrievals.runner import run_retrieval

        try:
            run_retrieval(self.ctx, retrieval_id)
        except Exception as exc:  # noqa: BLE001 - never leave a job 'running' behind
            log.exception("retrieval %s crashed", retrieval_id)
            from datetime import datetime, timezone

            from sqlalchemy import update

            with self.ctx.sessions() as s:
                s.execute(update(Retrieval).where(Retrieval.id == retrieval_id).values(
                    status="failed", error=f"internal error: {type(exc).__name__}: {exc}"[:4000],
                    finished_at=datetime.now(timezone.utc)))
                s.commit()

    def submit_after_commit(self, session: Session, retrieval_id: int) -> None:
        """Start the job once the request's transaction has committed (so the runner sees the row)."""
        event.listen(session, "after_commit", lambda _s: self.submit(retrieval_id), once=True)

    def shutdown(self, wait: bool = True) -> None:
        self._stop.set()
        self._pool.shutdown(wait=wait, cancel_futures=not wait)


def get_manager(ctx: AppContext) -> RetrievalManager:
    """The process's retrieval pool, created on first use."""
    return ctx.shared("retrievals", lambda: RetrievalManager(ctx))
