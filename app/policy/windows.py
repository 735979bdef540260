"""Transfer windows in a node's time zone: when may we pull from the PACS?

A window is a set of weekdays plus a start and end time of day in the node's zone. An end at or
before the start runs past midnight into the next day (`mon 19:00-07:00` is Monday 19:00 to
Tuesday 07:00); `00:00-24:00` is the whole day. No windows at all means always open. Times are
computed with zoneinfo, so a DST change moves the window with local time.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_HORIZON_DAYS = 9  # a weekly schedule repeats; look a little more than one week ahead


def parse_hhmm(value: str) -> int:
    """'HH:MM' -> minutes after midnight (0..1440; '24:00' allowed as an end of day)."""
    try:
        hh, mm = value.split(":")
        h, m = int(hh), int(mm)
    except (ValueError, AttributeError):
        raise ValueError(f"time must be HH:MM, got {value!r}") from None
    if not (0 <= h <= 24 and 0 <= m < 60) or (h == 24 and m):
        raise ValueError(f"time must be between 00:00 and 24:00, got {value!r}")
    return h * 60 + m


@dataclass(frozen=True)
class Window:
    days: tuple[int, ...]  # 0 = Monday
    start: int  # minutes after midnight
    end: int

    def occurrences(self, day: date, tz: ZoneInfo) -> list[tuple[datetime, datetime]]:
        """The [start, end) of this window if it starts on `day` (aware datetimes)."""
        if day.weekday() not in self.days:
            return []
        start = _local(day, self.start, tz)
        end_day = day if self.end > self.start else day + timedelta(days=1)
        return [(start, _local(end_day, self.end, tz))]


def _local(day: date, minutes: int, tz: ZoneInfo) -> datetime:
    if minutes >= 1440:
        return datetime.combine(day + timedelta(days=1), time(0), tzinfo=tz)
    return datetime.combine(day, time(minutes // 60, minutes % 60), tzinfo=tz)


class Schedule:
    """The windows of one node; `state(now)` says whether it is open and when that changes."""

    def __init__(self, windows: list[Window], tz: str = "UTC"):
        self.windows = windows
        self.tz = ZoneInfo(tz)

    @classmethod
    def from_policy(cls, windows: list[dict], tz: str) -> "Schedule":
        out = []
        for w in windows:
            days = tuple(DAYS.index(d) for d in w["days"])
            out.append(Window(days, parse_hhmm(w["start"]), parse_hhmm(w["end"])))
        return cls(out, tz)

    def _intervals(self, now: datetime) -> list[tuple[datetime, datetime]]:
        """Merged open intervals from yesterday to the horizon."""
        today = now.astimezone(self.tz).date()
        spans: list[tuple[datetime, datetime]] = []
        for k in range(-1, _HORIZON_DAYS):
            d = today + timedelta(days=k)
            for w in self.windows:
                # in UTC: same-zone datetimes compare and subtract as wall times, wrong across DST
                spans.extend((a.astimezone(timezone.utc), b.astimezone(timezone.utc))
                             for a, b in w.occurrences(d, self.tz))
        spans.sort()
        merged: list[list[datetime]] = []
        for s, e in spans:
            if merged and s <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], e)
            else:
                merged.append([s, e])
        return [(s, e) for s, e in merged]

    def is_open(self, now: datetime) -> bool:
        return self.state(now)[0]

    def state(self, now: datetime) -> tuple[bool, datetime | None]:
        """(open, when it changes): the close time if open, the next open time if closed.

        None for the change time means never (no windows: always open; windows that never
        match: never open)."""
        if not self.windows:
            return True, None
        for s, e in self._intervals(now):
            if s <= now < e:
                return True, e
            if s > now:
                return False, s
        return False, None
