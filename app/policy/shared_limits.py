"""Token buckets and association slots in the database: a node's instances/min, MB/s and max_associations
hold across every process that retrieves
from it (RADCOHORT_SHARED_NODE_LIMITS), not only within one.

Same contract as app.policy.limits.TokenBucket (take may run into debt; a fresh bucket starts empty), with
the state in a `node_buckets` row: refill and take are one UPDATE (the row's lock serialises concurrent
takers, on SQLite the database's write lock), so two workers against one PACS together stay within its rate.
Time is the clock's wall time (`now()`), the only time two processes (or hosts) share. The association
limit (`max_associations`) is `node_slots` rows claimed under a lease (SharedSlots).
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import cast

from sqlalchemy import CursorResult, case, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from app.db.base import session_scope
from app.db.models import NodeBucket, NodeSlot
from app.policy.clock import Clock


class SharedTokenBucket:
    """`rate` tokens per second up to `capacity`, kept in the node_buckets row (node, kind)."""

    def __init__(self, sessions: sessionmaker[Session], node: str, kind: str, rate: float, capacity: float,
                 clock: Clock):
        if rate <= 0 or capacity <= 0:
            raise ValueError("rate and capacity must be positive")
        self.sessions, self.node, self.kind = sessions, node, kind
        self.rate, self.capacity, self.clock = rate, capacity, clock

    def _now(self) -> float:
        return self.clock.now().timestamp()

    def _ensure(self, s: Session, now: float) -> None:
        insert = (postgresql.insert if s.get_bind().dialect.name == "postgresql" else sqlite.insert)(NodeBucket)
        s.execute(insert.values(node_name=self.node, kind=self.kind, tokens=0.0, updated=now)
                  .on_conflict_do_nothing())

    def take(self, n: float) -> float:
        """Take `n` tokens now; returns the seconds the caller must wait before using them."""
        now = self._now()
        T = NodeBucket
        # a clock behind the row's (another host's) refills nothing rather than taking tokens back
        elapsed = case((T.updated < now, now - T.updated), else_=0.0)
        refilled = T.tokens + elapsed * self.rate
        with session_scope(self.sessions) as s:
            self._ensure(s, now)
            s.execute(update(T).where(T.node_name == self.node, T.kind == self.kind).values(
                tokens=case((refilled > self.capacity, self.capacity), else_=refilled) - n,
                updated=case((T.updated < now, now), else_=T.updated)))
            tokens = s.scalar(select(T.tokens).where(T.node_name == self.node, T.kind == self.kind))
        return max(0.0, -float(tokens or 0.0) / self.rate)

    def debt_wait(self) -> float:
        """Seconds until the bucket is out of debt (0 when it is not)."""
        with self.sessions() as s:
            row = s.execute(select(NodeBucket.tokens, NodeBucket.updated).where(
                NodeBucket.node_name == self.node, NodeBucket.kind == self.kind)).first()
        if row is None:
            return 0.0
        tokens = min(self.capacity, row.tokens + max(0.0, self._now() - row.updated) * self.rate)
        return max(0.0, -tokens / self.rate)


class SharedSlots:
    """A node's `max_associations` across processes: slot rows claimed by compare-and-set under a lease.

    `acquire()` blocks (polling) until a slot is free or its holder's lease is older than `stale_s` (a
    stopped process); held slots are renewed every `heartbeat_s` by one thread per object."""

    def __init__(self, sessions: sessionmaker[Session], node: str, size: int, clock: Clock, *,
                 heartbeat_s: float = 5.0, stale_s: float = 30.0, poll_s: float = 0.1):
        self.sessions, self.node, self.size, self.clock = sessions, node, size, clock
        self.heartbeat_s, self.stale_s, self.poll_s = heartbeat_s, stale_s, poll_s
        self._held: dict[int, str] = {}  # slot -> holder id
        self._lock = threading.Lock()
        self._beat: threading.Thread | None = None

    def _now(self) -> float:
        return self.clock.now().timestamp()

    def _ensure(self, s: Session) -> None:
        insert = (postgresql.insert if s.get_bind().dialect.name == "postgresql" else sqlite.insert)(NodeSlot)
        s.execute(insert.values([{"node_name": self.node, "slot": i, "holder": None, "heartbeat": None}
                                 for i in range(self.size)]).on_conflict_do_nothing())

    def try_acquire(self) -> int | None:
        """Claim a free (or stale) slot now; its number, or None when all are held."""
        holder = f"{os.getpid()}:{uuid.uuid4().hex[:16]}"
        now = self._now()
        T = NodeSlot
        with session_scope(self.sessions) as s:
            self._ensure(s)
            for i in range(self.size):
                res = s.execute(update(T).where(T.node_name == self.node, T.slot == i, or_(
                    T.holder.is_(None), T.heartbeat < now - self.stale_s)).values(holder=holder, heartbeat=now))
                n = cast(CursorResult, res).rowcount
                if n == 1:
                    with self._lock:
                        self._held[i] = holder
                    self._start_beat()
                    return i
        return None

    def acquire(self) -> int:
        while True:
            slot = self.try_acquire()
            if slot is not None:
                return slot
            time.sleep(self.poll_s)

    def release(self, slot: int) -> None:
        with self._lock:
            holder = self._held.pop(slot, None)
        if holder is None:
            return
        with session_scope(self.sessions) as s:
            s.execute(update(NodeSlot).where(NodeSlot.node_name == self.node, NodeSlot.slot == slot,
                                             NodeSlot.holder == holder).values(holder=None, heartbeat=None))

    @contextmanager
    def held(self) -> Iterator[int]:
        slot = self.acquire()
        try:
            yield slot
        finally:
            self.release(slot)

    def _start_beat(self) -> None:
        with self._lock:
            if self._beat is not None and self._beat.is_alive():
                return
            self._beat = threading.Thread(target=self._renew, name=f"slots-{self.node}", daemon=True)
            self._beat.start()

    def _renew(self) -> None:
        while True:
            time.sleep(self.heartbeat_s)
            with self._lock:
                held = dict(self._held)
            if not held:
                return
            try:
                with session_scope(self.sessions) as s:
                    for slot, holder in held.items():
                        s.execute(update(NodeSlot).where(NodeSlot.node_name == self.node, NodeSlot.slot == slot,
                                                         NodeSlot.holder == holder).values(heartbeat=self._now()))
            except Exception:  # noqa: BLE001 - a database blip: the next beat tries again
                continue
