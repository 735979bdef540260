"""Adaptive backoff: slow down when the PACS pushes back, speed up again when it recovers.

Pressure is anything the SCU retries (0xA7xx out of resources, a transiently rejected
association, a timeout or abort). Each pressure signal raises the level by one; the delay
before the next retrieve is `initial_s * factor**(level-1)` (capped at `max_s`); every
`recover_after` successful retrieves in a row lower the level by one until there is no delay.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass
class BackoffConfig:
    initial_s: float = 1.0
    factor: float = 2.0
    max_s: float = 300.0
    recover_after: int = 3


class AdaptiveBackoff:
    def __init__(self, config: BackoffConfig | None = None):
        self.config = config or BackoffConfig()
        self.level = 0
        self.events = 0
        self._ok = 0
        self._lock = threading.Lock()

    def pressure(self) -> None:
        with self._lock:
            self.level = min(self.level + 1, 32)
            self.events += 1
            self._ok = 0

    def success(self) -> None:
        with self._lock:
            if self.level == 0:
                return
            self._ok += 1
            if self._ok >= self.config.recover_after:
                self.level -= 1
                self._ok = 0

    def delay(self) -> float:
        with self._lock:
            if self.level == 0:
                return 0.0
            c = self.config
            return min(c.max_s, c.initial_s * c.factor ** (self.level - 1))


def node_backoff(extras: dict, node_name: str, config: BackoffConfig) -> AdaptiveBackoff:
    """One backoff state per node in this process (the PACS's load is shared by all our jobs)."""
    reg = extras.setdefault("policy_backoff", {})
    cur = reg.get(node_name)
    if cur is None or cur.config != config:
        cur = reg[node_name] = AdaptiveBackoff(config)
    return cur
