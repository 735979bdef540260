"""Adaptive backoff: slow down when the PACS pushes back, speed up again when it recovers.

Pressure is anything the SCU retries (0xA7xx out of resources, a transiently rejected
association, a timeout or abort). Each pressure signal raises the level by one; the delay
before the next retrieve is `initial_s * factor**(level-1)` (capped at `max_s`); every
`recover_after` successful retrieves in a row lower the level by one until there is no delay.
The level also decays with time (one level per `decay_s` without pushback): it is the node's
state, shared by the jobs of this process, and a burst of 0xA7xx yesterday must not make today's
first job wait minutes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class BackoffConfig:
    initial_s: float = 1.0
    factor: float = 2.0
    max_s: float = 300.0
    recover_after: int = 3
    decay_s: float = 60.0


class AdaptiveBackoff:
    def __init__(self, config: BackoffConfig | None = None, monotonic: Callable[[], float] = time.monotonic):
        self.config = config or BackoffConfig()
        self._level = 0
        self.events = 0
        self._ok = 0
        self._lock = threading.Lock()
        self._monotonic = monotonic
        self._since = monotonic()  # when the level last changed

    def _decay(self) -> None:
        if self._level and self.config.decay_s > 0:
            now = self._monotonic()
            steps = int((now - self._since) // self.config.decay_s)
            if steps:
                self._level = max(0, self._level - steps)
                self._since += steps * self.config.decay_s

    @property
    def level(self) -> int:
        with self._lock:
            self._decay()
            return self._level

    def pressure(self) -> None:
        with self._lock:
            self._decay()
            self._level = min(self._level + 1, 32)
            self._since = self._monotonic()
            self.events += 1
            self._ok = 0

    def success(self) -> None:
        with self._lock:
            self._decay()
            if self._level == 0:
                return
            self._ok += 1
            if self._ok >= self.config.recover_after:
                self._level -= 1
                self._since = self._monotonic()
                self._ok = 0

    def delay(self) -> float:
        with self._lock:
            self._decay()
            if self._level == 0:
                return 0.0
            c = self.config
            return min(c.max_s, c.initial_s * c.factor ** (self._level - 1))


class BackoffRegistry(dict):
    """node name -> AdaptiveBackoff: one per process (AppContext.shared(BackoffRegistry))."""


def node_backoff(ctx, node_name: str, config: BackoffConfig) -> AdaptiveBackoff:
    """One backoff state per node in this process (the PACS's load is shared by all our jobs)."""
    reg = ctx.shared(BackoffRegistry)
    cur = reg.get(node_name)
    if cur is None or cur.config != config:
        cur = reg[node_name] = AdaptiveBackoff(config)
    return cur
