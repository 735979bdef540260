"""Transfer windows (time zones, midnight wrap, DST), token buckets and adaptive backoff."""

from __future__ import annotations

from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

from app.policy.backoff import AdaptiveBackoff, BackoffConfig
from app.policy.clock import FakeClock
from app.policy.limits import TokenBucket
from app.policy.schema import NodePolicy

TOKYO = ZoneInfo("Asia/Tokyo")
NIGHTS_AND_WEEKENDS = [{"days": ["mon", "tue", "wed", "thu", "fri"], "start": "19:00", "end": "07:00"},
                       {"days": ["sat", "sun"], "start": "00:00", "end": "24:00"}]


def sched(windows=NIGHTS_AND_WEEKENDS, tz="Asia/Tokyo"):
    return NodePolicy(timezone=tz, windows=windows).schedule()


def at(*args, tz=TOKYO):
    return datetime(*args, tzinfo=tz)


def test_weeknights_wrap_past_midnight_and_weekends_are_open():
    s = sched()
    # 2026-11-23 is a Monday
    assert s.state(at(2026, 11, 23, 12, 0)) == (False, at(2026, 11, 23, 19, 0))
    assert s.state(at(2026, 11, 23, 19, 0)) == (True, at(2026, 11, 24, 7, 0))
    assert s.is_open(at(2026, 11, 24, 6, 59))  # Tuesday morning: still Monday's window
    assert not s.is_open(at(2026, 11, 24, 7, 0))
    # Friday night runs into the weekend: one merged interval to Monday 00:00 (Sunday is no weeknight)
    assert s.state(at(2026, 11, 27, 20, 0)) == (True, at(2026, 11, 30, 0, 0))
    assert s.is_open(at(2026, 11, 29, 12, 0))


def test_window_is_in_the_nodes_zone_not_utc():
    s = sched()
    # 12:00 UTC is 21:00 in Tokyo (open); 02:00 UTC is 11:00 in Tokyo (closed)
    assert s.is_open(datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc))
    assert not s.is_open(datetime(2026, 11, 24, 2, 0, tzinfo=timezone.utc))


def test_dst_moves_the_window_with_local_time():
    s = sched([{"days": ["sun"], "start": "01:00", "end": "05:00"}], tz="Europe/Berlin")
    # 2026-10-25: clocks go back at 03:00 CEST -> 02:00 CET; the window lasts 5 real hours
    start = datetime(2026, 10, 25, 1, 0, tzinfo=ZoneInfo("Europe/Berlin"))
    is_open, closes = s.state(start)
    assert is_open and (closes - start).total_seconds() == 5 * 3600


def test_no_windows_is_always_open():
    assert sched([]).state(at(2026, 11, 23, 12, 0)) == (True, None)


@pytest.mark.parametrize("bad", [
    {"timezone": "Mars/Base"},
    {"windows": [{"days": ["mon"], "start": "25:00", "end": "07:00"}]},
    {"windows": [{"days": ["monday"], "start": "19:00", "end": "07:00"}]},
    {"windows": [{"days": [], "start": "19:00", "end": "07:00"}]},
    {"instances_per_minute": 0},
    {"max_associations": 0},
    {"unknown": 1},
])
def test_bad_policies_are_refused_with_a_field(bad):
    with pytest.raises(ValidationError) as err:
        NodePolicy.model_validate(bad)
    assert err.value.errors()[0]["loc"]


def test_token_bucket_paces_to_its_rate_with_debt():
    clock = FakeClock(datetime(2026, 1, 1, tzinfo=timezone.utc))
    b = TokenBucket(rate=10.0, capacity=10, clock=clock)  # starts empty: no burst
    done = 0
    for _ in range(30):  # 30 units of 10 = 300 tokens at 10/s -> 30 s
        clock.sleep(b.take(10))
        done += 10
    assert clock.monotonic() == pytest.approx(30.0)
    # a big unit runs into debt; the next take waits it off
    clock.sleep(b.take(50))
    assert b.debt_wait() == 0.0
    assert clock.monotonic() == pytest.approx(35.0)


def test_backoff_slows_down_on_pressure_and_recovers():
    b = AdaptiveBackoff(BackoffConfig(initial_s=1.0, factor=2.0, max_s=5.0, recover_after=2))
    assert b.delay() == 0.0
    for _ in range(4):
        b.pressure()
    assert (b.level, b.delay(), b.events) == (4, 5.0, 4)  # 1, 2, 4, 8 -> capped at 5
    for _ in range(2):
        b.success()
    assert b.delay() == 4.0
    for _ in range(6):
        b.success()
    assert b.delay() == 0.0 and b.level == 0
