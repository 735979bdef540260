"""app.retry: the one retry layer shared by the DIMSE SCU and the DICOMweb client."""

import logging

import pytest

from app.errors import PermanentDicomError, RetriableDicomError
from app.retry import RetryPolicy

log = logging.getLogger("test.retry")


def test_retriable_errors_are_retried_then_raised_with_capped_growing_delays():
    slept: list[float] = []
    calls = []

    def fail():
        calls.append(1)
        raise RetriableDicomError("busy")

    with pytest.raises(RetriableDicomError):
        RetryPolicy(retries=5, backoff=1.0, max_backoff=4.0, sleep=slept.append).run("op", fail, log)
    assert len(calls) == 6 and len(slept) == 5
    assert all(0.5 * min(4.0, 2**i) <= d <= 1.5 * min(4.0, 2**i) for i, d in enumerate(slept))


def test_success_after_a_transient_failure_and_permanent_errors_are_not_retried():
    slept: list[float] = []
    seq = iter([RetriableDicomError("reset"), "ok"])

    def flaky():
        v = next(seq)
        if isinstance(v, Exception):
            raise v
        return v

    assert RetryPolicy(retries=3, sleep=slept.append).run("op", flaky, log) == "ok" and len(slept) == 1

    calls = []

    def refused():
        calls.append(1)
        raise PermanentDicomError("unknown destination")

    with pytest.raises(PermanentDicomError):
        RetryPolicy(retries=3, sleep=slept.append).run("op", refused, log)
    assert calls == [1] and len(slept) == 1
