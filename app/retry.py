"""The one retry layer: retriable errors are retried with capped exponential backoff and jitter;
permanent errors (and anything else) go straight up.

The DIMSE SCU (`app.dicom.scu`) and the DICOMweb client (`app.dicomweb.client`) both call it; each maps
its own failures to `RetriableDicomError` / `PermanentDicomError` first. The sleep is injectable so
tests need not wait.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from app.errors import RetriableDicomError

T = TypeVar("T")


@dataclass
class RetryPolicy:
    """`retries` more attempts after the first; delay min(max_backoff, backoff·2^attempt) × U(0.5, 1.5)."""

    retries: int = 3
    backoff: float = 0.5
    max_backoff: float = 10.0
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)

    def delay(self, attempt: int) -> float:
        return min(self.max_backoff, self.backoff * 2**attempt) * random.uniform(0.5, 1.5)

    def run(self, op: str, fn: Callable[[], T], log: logging.Logger) -> T:
        """Call `fn` until it returns, raises a non-retriable error, or the retries are spent."""
        attempt = 0
        while True:
            try:
                return fn()
            except RetriableDicomError as exc:
                if attempt >= self.retries:
                    raise
                delay = self.delay(attempt)
                log.warning("%s failed (%s); retry %d/%d in %.1fs", op, exc.message, attempt + 1, self.retries, delay)
                self.sleep(delay)
                attempt += 1
