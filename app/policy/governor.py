"""The gate a retrieval passes at every study/series boundary: control, window, backoff, limits.

`Governor` is the one place a retrieval waits: for the user (pause/resume/cancel, read from the
retrieval's status so the API and the runner need no other channel), for the node's transfer
window (unless the retrieval is urgent and the node's rules allow it; audited), for adaptive
backoff after the PACS pushed back, and for the token buckets. What it waited for, and how often
it backed off, goes into the retrieval's report.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from collections.abc import Iterator
from datetime import datetime

from sqlalchemy import select, update

from app import audit
from app.db.models import Retrieval
from app.policy.backoff import node_backoff
from app.policy.clock import SYSTEM_CLOCK, Clock
from app.policy.limits import node_limits
from app.policy.schema import policy_of

log = logging.getLogger("radcohort.policy")

PAUSED = "paused"
CANCELLED = "cancelled"


class Cancelled(Exception):
    """The user cancelled the retrieval; the runner stops at this boundary."""


class Governor:
    def __init__(self, ctx, node, retrieval_id: int, *, clock: Clock | None = None, poll_s: float = 2.0,
                 urgent: bool | None = None):
        self.ctx = ctx
        self.node_name = node.name
        self.id = retrieval_id
        self.clock = clock or SYSTEM_CLOCK
        self.poll_s = poll_s
        self.policy = policy_of(getattr(node, "options", None))
        self.schedule = self.policy.schedule()
        if urgent is None:
            with ctx.sessions() as s:
                rep = s.scalar(select(Retrieval.report).where(Retrieval.id == retrieval_id)) or {}
            urgent = bool(rep.get("urgent"))
        self.urgent = urgent and self.policy.urgent.allowed
        self.limits = node_limits(ctx, node.name, self.policy, self.clock)
        self.backoff = node_backoff(ctx, node.name, self.policy.backoff.config())
        if self.urgent and self.policy.urgent.bypass_rate_limits:
            self.limits_instances = self.limits_bytes = None
        else:
            self.limits_instances, self.limits_bytes = self.limits.instances, self.limits.bytes
        self._lock = threading.Lock()
        self.stats = {"window_wait_s": 0.0, "window_waits": 0, "paused_s": 0.0, "backoffs": 0,
                      "backoff_wait_s": 0.0, "rate_wait_s": 0.0, "window_overrides": 0}
        self._fetch_t0: float | None = None
        self._fetch_t1: float | None = None
        self._waiting_until: str | None = None

    # ------------------------------------------------------------------ control channel
    def _status(self) -> str | None:
        with self.ctx.sessions() as s:
            return s.scalar(select(Retrieval.status).where(Retrieval.id == self.id))

    def _write_report(self) -> None:
        """Merge the gate's figures into the stored report (the API shows a waiting job's state)."""
        with self.ctx.sessions() as s:
            r = s.get(Retrieval, self.id)
            if r is not None:
                r.report = {**(r.report or {}), **self.report()}
                s.commit()

    def cancelled_now(self) -> bool:
        return self._status() == CANCELLED

    def sleep(self, seconds: float) -> None:
        """Every wait of a retrieval: in slices, so that a cancel or pause is seen within poll_s."""
        end = self.clock.monotonic() + seconds
        while True:
            left = end - self.clock.monotonic()
            if left <= 0:
                return
            self.clock.sleep(min(left, max(self.poll_s, 0.05)))
            self.check_control()

    def check_control(self) -> None:
        """Raise Cancelled, or wait here while the user has the retrieval paused."""
        status = self._status()
        if status == CANCELLED:
            raise Cancelled()
        if status != PAUSED:
            return
        log.info("retrieval %s paused by the user", self.id)
        t0 = self.clock.monotonic()
        while status == PAUSED:
            self.clock.sleep(min(self.poll_s, 1.0))
            status = self._status()
        self.stats["paused_s"] += self.clock.monotonic() - t0
        if status == CANCELLED:
            raise Cancelled()

    def claim_start(self) -> bool:
        """queued -> running once the user and the window allow; False if it is no longer ours to
        run (another state came meanwhile); Cancelled if the user cancelled it."""
        while True:
            self.check_control()
            self.wait_for_window()
            with self.ctx.sessions() as s:
                n = s.execute(update(Retrieval).where(Retrieval.id == self.id,
                                                      Retrieval.status.in_(("queued", "running")))
                              .values(status="running")).rowcount
                s.commit()
            if n:
                return True
            if self._status() not in (PAUSED, CANCELLED):
                return False  # finished or re-queued elsewhere: leave it alone

    # ------------------------------------------------------------------ windows
    def wait_for_window(self) -> None:
        open_, change = self.schedule.state(self.clock.now())
        if open_:
            return
        if self.urgent and self.policy.urgent.bypass_windows:
            if not self.stats["window_overrides"]:
                with self.ctx.sessions() as s:
                    audit.record(s, "system", "retrieval.window_override", str(self.id), node=self.node_name,
                                 reason="urgent")
                    s.commit()
            self.stats["window_overrides"] += 1
            return
        if change is None:
            raise Cancelled("the node's transfer windows never open")  # stops as cancelled, with the reason
        self.stats["window_waits"] += 1
        log.info("retrieval %s waits for %s's transfer window (opens %s)", self.id, self.node_name, change)
        t0 = self.clock.monotonic()
        while True:
            now = self.clock.now()
            open_, change = self.schedule.state(now)
            if open_:
                break
            self._waiting_until = change.isoformat() if change else None
            self._write_report()
            remaining = (change - now).total_seconds() if change else self.poll_s
            self.clock.sleep(min(max(remaining, 0.001), self.poll_s))
            self.check_control()
        self.stats["window_wait_s"] += self.clock.monotonic() - t0
        self._waiting_until = None
        self._write_report()

    # ------------------------------------------------------------------ per unit
    @property
    def unit_max(self) -> int | None:
        """Instances per retrieve so the instance bucket can pace the job (None: no limit)."""
        return self.limits.unit_max if self.limits_instances is not None else None

    def before_unit(self, n_instances: int) -> None:
        """At a study/series boundary: user control, window, backoff delay, token buckets."""
        if self._fetch_t0 is None:
            self._fetch_t0 = self.clock.monotonic()
        self.check_control()
        self.wait_for_window()
        delay = self.backoff.delay()
        if delay:
            self.stats["backoff_wait_s"] += delay
            self.sleep(delay)
        wait = 0.0
        if self.limits_bytes is not None:
            wait = max(wait, self.limits_bytes.debt_wait())
        if self.limits_instances is not None and n_instances:
            wait = max(wait, self.limits_instances.take(n_instances))
        if wait:
            self.stats["rate_wait_s"] += wait
            self.sleep(wait)

    def after_unit(self, ok: bool, nbytes: int = 0) -> None:
        if ok:
            self.backoff.success()
        if self.limits_bytes is not None and nbytes:
            self.limits_bytes.take(nbytes)
        self._fetch_t1 = self.clock.monotonic()

    def pressure(self) -> None:
        """The PACS pushed back (a retriable failure at the end of the retry layer)."""
        self.backoff.pressure()
        with self._lock:
            self.stats["backoffs"] += 1

    def retry_sleep(self, seconds: float) -> None:
        """The SCU's retry layer sleep: every retry is pushback; wait at least the adaptive delay."""
        self.pressure()
        wait = max(seconds, self.backoff.delay())
        with self._lock:
            self.stats["backoff_wait_s"] += wait
        self.sleep(wait)

    @contextmanager
    def association(self) -> Iterator[None]:
        with self.limits.association():
            yield

    # ------------------------------------------------------------------ report
    def report(self) -> dict:
        rep = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in self.stats.items()}
        rep["urgent"] = self.urgent
        rep["backoff_level"] = self.backoff.level
        if self._fetch_t0 is not None and self._fetch_t1 is not None:
            rep["fetch_s"] = round(self._fetch_t1 - self._fetch_t0, 3)
        rep["waiting_for_window_until"] = self._waiting_until
        return rep


def next_window_change(node, now: datetime) -> tuple[bool, datetime | None]:
    """For the API: (open now, when that changes) of a node's transfer windows."""
    return policy_of(getattr(node, "options", None)).schedule().state(now)
