"""Token buckets (instances/min, bytes/s) and per-node association limits, shared in-process.

Every retrieval of a node takes from the same buckets and semaphore (kept in the context: ctx.shared(LimitsRegistry)), so two
jobs against one PACS together stay within its limits. With RADCOHORT_SHARED_NODE_LIMITS the rate
buckets (instances/min, MB/s) and the association slots (max_associations) live in the database
instead (app.policy.shared_limits) and hold across every process.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from collections.abc import Iterator

from app.policy.clock import Clock


class TokenBucket:
    """`rate` tokens per second up to `capacity`; takes may run into debt, later takes wait it off.

    Taking before work with debt allowed keeps the long-run rate at `rate` exactly whatever the
    unit sizes; starting empty (the default) means a fresh job never bursts above the rate.
    """

    def __init__(self, rate: float, capacity: float, clock: Clock, initial: float = 0.0):
        if rate <= 0 or capacity <= 0:
            raise ValueError("rate and capacity must be positive")
        self.rate = rate
        self.capacity = capacity
        self.clock = clock
        self.tokens = min(initial, capacity)
        self._t = clock.monotonic()
        self._lock = threading.Lock()

    def _refill(self) -> None:
        t = self.clock.monotonic()
        self.tokens = min(self.capacity, self.tokens + (t - self._t) * self.rate)
        self._t = t

    def take(self, n: float) -> float:
        """Take `n` tokens now; returns the seconds the caller must wait before using them."""
        with self._lock:
            self._refill()
            self.tokens -= n
            return max(0.0, -self.tokens / self.rate)

    def debt_wait(self) -> float:
        """Seconds until the bucket is out of debt (0 when it is not)."""
        with self._lock:
            self._refill()
            return max(0.0, -self.tokens / self.rate)


class NodeLimits:
    """The shared limiters of one node (rebuilt when its policy changes)."""

    def __init__(self, key: tuple, max_associations: int, instances_per_minute: float | None,
                 mb_per_second: float | None, clock: Clock, unit_seconds: float = 2.0, bucket=None,
                 shared_slots=None):
        self.key = key
        self.slots = threading.BoundedSemaphore(max_associations)
        self.shared_slots = shared_slots  # app.policy.shared_limits.SharedSlots: the slots of every process
        self.max_associations = max_associations
        # bucket(kind, rate, capacity): a shared (database) bucket instead of this process's own
        make = bucket or (lambda _kind, rate, capacity: TokenBucket(rate, capacity, clock))
        self.instances = None
        self.unit_max = None
        if instances_per_minute:
            per_s = instances_per_minute / 60.0
            self.unit_max = max(1, int(per_s * unit_seconds))  # instances per retrieve
            self.instances = make("instances", per_s, self.unit_max)
        self.bytes = make("bytes", mb_per_second * 1e6, mb_per_second * 1e6) if mb_per_second else None

    @contextmanager
    def association(self) -> Iterator[None]:
        self.slots.acquire()
        try:
            if self.shared_slots is None:
                yield
            else:
                with self.shared_slots.held():
                    yield
        finally:
            self.slots.release()


_registry_lock = threading.Lock()


class LimitsRegistry(dict):
    """node name -> NodeLimits: one per process (AppContext.shared(LimitsRegistry))."""


def node_limits(ctx, node_name: str, policy, clock: Clock) -> NodeLimits:
    """The process's limiter for a node, rebuilt when the node's limits (or the clock) change."""
    key = (policy.max_associations, policy.instances_per_minute, policy.mb_per_second, id(clock))
    reg = ctx.shared(LimitsRegistry)
    with _registry_lock:
        cur = reg.get(node_name)
        if cur is None or cur.key != key:
            shared, slots = None, None
            if ctx.settings.shared_node_limits:  # buckets and slots in the database, for every process
                from app.policy.shared_limits import SharedSlots, SharedTokenBucket

                shared = (lambda kind, rate, capacity:  # noqa: E731
                          SharedTokenBucket(ctx.sessions, node_name, kind, rate, capacity, clock))
                s = ctx.settings
                slots = SharedSlots(ctx.sessions, node_name, policy.max_associations, clock,
                                    heartbeat_s=s.jobs_heartbeat_s, stale_s=s.jobs_stale_s)
            cur = reg[node_name] = NodeLimits(key, policy.max_associations, policy.instances_per_minute,
                                              policy.mb_per_second, clock, bucket=shared, shared_slots=slots)
        return cur
