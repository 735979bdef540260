"""The control channel (status column) and the gate's report writes, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone

import pytest

from app.db.models import Retrieval
from app.errors import Conflict
from app.policy import service as control
from app.policy.clock import FakeClock
from app.policy.governor import Cancelled, Governor
from app.retrievals.nodes import create_node, get_node
from app.retrievals.schemas import NodeIn
from app.retrievals.service import create_retrieval


def setup(ctx, options=None) -> tuple[object, int]:
    with ctx.sessions() as s:
        node = create_node(s, NodeIn(name="pacs", ae_title="PACS", host="127.0.0.1", port=104), "t")
        node.options = options or {}
        rid = create_retrieval(s, "pacs", {"StudyDate": "20120101"}, "t").id
        s.commit()
        node = get_node(s, "pacs")
        s.expunge(node)
    return node, rid


def act(ctx, rid, fn):
    with ctx.sessions() as s:
        fn(s, s.get(Retrieval, rid), "t")
        s.commit()


def status(ctx, rid) -> str:
    with ctx.sessions() as s:
        return s.get(Retrieval, rid).status


def test_paused_before_start_waits_then_resumes(any_ctx):
    node, rid = setup(any_ctx)
    act(any_ctx, rid, control.pause)
    gate = Governor(any_ctx, node, rid, clock=FakeClock(datetime(2026, 1, 1, tzinfo=timezone.utc), real_sleep=0.02))
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("claimed", gate.claim_start()))
    t.start()
    time.sleep(0.3)
    assert t.is_alive() and status(any_ctx, rid) == "paused"  # it does not start while paused
    act(any_ctx, rid, control.resume)
    t.join(10)
    assert out == {"claimed": True} and status(any_ctx, rid) == "running"
    assert gate.report()["paused_s"] > 0
    with pytest.raises(Conflict):
        act(any_ctx, rid, control.resume)


def test_cancel_reaches_a_waiting_gate_and_window_wait_is_reported(any_ctx):
    node, rid = setup(any_ctx, {"policy": {"windows": [{"days": ["sat"], "start": "00:00", "end": "01:00"}]}})
    clock = FakeClock(datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc), real_sleep=0.02)  # a Monday
    gate = Governor(any_ctx, node, rid, clock=clock, poll_s=600)
    err = {}

    def run():
        try:
            gate.claim_start()
        except Cancelled as exc:
            err["cancelled"] = exc

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 10
    while True:  # the waiting job tells the API until when it waits
        with any_ctx.sessions() as s:
            until = (s.get(Retrieval, rid).report or {}).get("waiting_for_window_until")
        if until or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert until and until.startswith("2026-11-28T00:00")
    act(any_ctx, rid, control.cancel)
    t.join(10)
    assert "cancelled" in err and status(any_ctx, rid) == "cancelled"
