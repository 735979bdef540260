"""An injectable clock: wall time for windows, monotonic time and sleep for limits.

Tests pass a FakeClock so a window that closes at 07:00 can be crossed without waiting hours.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime: ...  # aware UTC datetime
    def monotonic(self) -> float: ...
    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(timezone.utc)

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


class FakeClock:
    """Virtual time: `sleep` advances it at once (optionally also really sleeping `real_sleep` s)."""

    def __init__(self, start: datetime, real_sleep: float = 0.0):
        if start.tzinfo is None:
            raise ValueError("FakeClock needs an aware datetime")
        self._now = start.astimezone(timezone.utc)
        self._mono = 0.0
        self._lock = threading.Lock()
        self.real_sleep = real_sleep
        self.slept = 0.0

    def now(self) -> datetime:
        with self._lock:
            return self._now

    def monotonic(self) -> float:
        with self._lock:
            return self._mono

    def advance(self, seconds: float = 0.0, **kw) -> None:
        delta = timedelta(seconds=seconds, **kw).total_seconds()
        with self._lock:
            self._now += timedelta(seconds=delta)
            self._mono += delta

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            self.advance(seconds)
            self.slept += seconds
        if self.real_sleep:
            time.sleep(self.real_sleep)  # let other threads (the API, the test) run


SYSTEM_CLOCK = SystemClock()
