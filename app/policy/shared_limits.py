"""Token buckets in the database: a node's instances/min and MB/s hold across every process that retrieves
from it (RADCOHORT_SHARED_NODE_LIMITS), not only within one.

Same contract as app.policy.limits.TokenBucket (take may run into debt; a fresh bucket starts empty), with
the state in a `node_buckets` row: refill and take are one UPDATE (the row's lock serialises concurrent
takers, on SQLite the database's write lock), so two workers against one PACS together stay within its rate.
Time is the clock's wall time (`now()`), the only time two processes (or hosts) share.
"""

from __future__ import annotations

from sqlalchemy import case, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from app.db.base import session_scope
from app.db.models import NodeBucket
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
