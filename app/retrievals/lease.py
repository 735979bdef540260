"""Who runs a retrieval: a lease in its row (runner_id + heartbeat_at).

A retrieval started through the API is a durable job (kind "retrieval", app.jobs) that a job runner (the
API's, or `radcohort worker --queues retrieval`) claims; the job's lease says which runner runs it, this
lease says which thread of which process is inside the retrieval right now. A CLI run or a cohort pull
runs retrievals in its own thread with this lease alone. A process that stops (crash, SIGKILL, host
reboot) leaves its retrievals `queued`, `running` or `paused` with a lease that is no longer renewed:
its job is taken over by the next claim (the job lease of a retrieval goes stale after
`retrieval_stale_s` too), and one without a job is queued again by the runners serving the retrieval
queue (app.retrievals.service.queue_orphans). Run again, it lists anew and fetches only what is not
indexed yet. The claim is one compare-and-set UPDATE, so two processes never run one retrieval at once.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from datetime import timedelta

from sqlalchemy import and_, or_, select, update

from app import audit
from app.context import AppContext
from app.db.base import session_scope
from app.db.models import Retrieval, utcnow

log = logging.getLogger("radcohort.retrievals")

UNFINISHED = ("queued", "running", "paused")


def new_runner_id() -> str:
    """host:pid:random, unique per run (so that a re-run in the same process is a new holder)."""
    return f"{socket.gethostname()[:48]}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def _cutoff(ctx: AppContext):
    return utcnow() - timedelta(seconds=ctx.settings.retrieval_stale_s)


def _stale(cutoff):
    return or_(Retrieval.heartbeat_at.is_(None), Retrieval.heartbeat_at < cutoff)


def orphans(ctx: AppContext) -> list[int]:
    """Unfinished retrievals that nobody is running: a stale lease, or none at all for longer than
    the stale time (a fresh one without a lease is about to be claimed by the process that made it)."""
    cutoff = _cutoff(ctx)
    with ctx.sessions() as s:
        return list(s.scalars(select(Retrieval.id).where(
            Retrieval.status.in_(UNFINISHED),
            or_(and_(Retrieval.runner_id.is_(None), Retrieval.created_at < cutoff),
                and_(Retrieval.runner_id.is_not(None), _stale(cutoff))))
            .order_by(Retrieval.id)))


class Lease:
    """Hold a retrieval's lease while it runs: claim, renew every heartbeat, release at the end.

    `held` is False when another live process holds it (then nothing must run)."""

    def __init__(self, ctx: AppContext, retrieval_id: int):
        self.ctx, self.id = ctx, retrieval_id
        self.runner_id = new_runner_id()
        self.held = False
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def claim(self) -> bool:
        with session_scope(self.ctx.sessions) as s:
            previous = s.scalar(select(Retrieval.runner_id).where(Retrieval.id == self.id))
            n = s.execute(update(Retrieval).where(Retrieval.id == self.id,
                                                  or_(Retrieval.runner_id.is_(None), _stale(_cutoff(self.ctx))))
                          .values(runner_id=self.runner_id, heartbeat_at=utcnow())).rowcount
            if n and previous:
                # the process that held it stopped without finishing it
                log.warning("retrieval %s: taking over from a stopped runner", self.id)
                audit.record(s, "system", "retrieval.takeover", str(self.id), previous_runner=previous,
                             runner=self.runner_id)
        self.held = bool(n)
        return self.held

    def _beat(self) -> None:
        while not self._stop.wait(self.ctx.settings.retrieval_heartbeat_s):
            try:
                with session_scope(self.ctx.sessions) as s:
                    n = s.execute(update(Retrieval).where(Retrieval.id == self.id,
                                                          Retrieval.runner_id == self.runner_id)
                                  .values(heartbeat_at=utcnow())).rowcount
            except Exception as exc:  # noqa: BLE001 - a database blip must not kill the heartbeat
                log.warning("retrieval %s: heartbeat failed (%s); retrying", self.id, type(exc).__name__)
                continue
            if not n:
                log.warning("retrieval %s: lease lost to another process", self.id)
                self.lost.set()
                return

    def __enter__(self) -> "Lease":
        if self.claim():
            self._thread = threading.Thread(target=self._beat, name=f"lease-{self.id}", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with session_scope(self.ctx.sessions) as s:
            s.execute(update(Retrieval).where(Retrieval.id == self.id, Retrieval.runner_id == self.runner_id)
                      .values(runner_id=None, heartbeat_at=None))
