"""Retrieval leases: one runner at a time, and a retrieval left by a stopped process is taken over."""

from __future__ import annotations

import time
from datetime import timedelta

from sqlalchemy import select, update

from app.db.models import AuditEvent, Retrieval, utcnow
from app.retrievals.lease import Lease, orphans
from app.retrievals.nodes import create_node
from app.retrievals.schemas import NodeIn
from app.retrievals.service import create_retrieval


def _retrieval(ctx) -> int:
    with ctx.sessions() as s:
        create_node(s, NodeIn(name="pacs", ae_title="PACS", host="127.0.0.1", port=104), "test")
        rid = create_retrieval(s, "pacs", {"StudyDate": "20120101"}, "test").id
        s.commit()
    return rid


def _row(ctx, rid: int) -> Retrieval:
    with ctx.sessions() as s:
        r = s.get(Retrieval, rid)
        s.expunge(r)
        return r


def _age(ctx, rid: int, seconds: float, **values) -> None:
    """As if the lease had last been renewed `seconds` ago (its process stopped then)."""
    with ctx.sessions() as s:
        s.execute(update(Retrieval).where(Retrieval.id == rid)
                  .values(heartbeat_at=utcnow() - timedelta(seconds=seconds), **values))
        s.commit()


def test_one_holder_at_a_time_and_a_stale_lease_is_taken_over(any_ctx):
    ctx = any_ctx
    ctx.settings.retrieval_heartbeat_s, ctx.settings.retrieval_stale_s = 0.2, 30.0
    rid = _retrieval(ctx)
    assert orphans(ctx) == []  # fresh and unclaimed: its own process is about to claim it
    with Lease(ctx, rid) as a:
        assert a.held and _row(ctx, rid).runner_id == a.runner_id
        with Lease(ctx, rid) as b:
            assert not b.held  # a live holder keeps it
        assert _row(ctx, rid).runner_id == a.runner_id  # b's exit released nothing
        beat = _row(ctx, rid).heartbeat_at
        time.sleep(0.7)
        assert _row(ctx, rid).heartbeat_at > beat  # renewed while it runs
        assert orphans(ctx) == []

        # a's process "stops": its lease ages past the stale time and c takes over
        a._stop.set()
        a._thread.join()
        _age(ctx, rid, 31, status="running")
        assert orphans(ctx) == [rid]
        with Lease(ctx, rid) as c:
            assert c.held and _row(ctx, rid).runner_id == c.runner_id
            assert orphans(ctx) == []
        # c finished: released, and a (were it still alive) cannot clear c's work
        assert _row(ctx, rid).runner_id is None
    with ctx.sessions() as s:
        takeovers = list(s.scalars(select(AuditEvent).where(AuditEvent.action == "retrieval.takeover")))
    assert [(t.actor, t.target) for t in takeovers] == [("system", str(rid))]
    assert takeovers[0].details["previous_runner"] == a.runner_id


def test_a_holder_that_lost_its_lease_notices(any_ctx):
    ctx = any_ctx
    ctx.settings.retrieval_heartbeat_s, ctx.settings.retrieval_stale_s = 0.1, 30.0
    rid = _retrieval(ctx)
    with Lease(ctx, rid) as a:
        with ctx.sessions() as s:  # another process took it over while a was stalled
            s.execute(update(Retrieval).where(Retrieval.id == rid).values(runner_id="elsewhere:1:x"))
            s.commit()
        assert a.lost.wait(5)
    assert _row(ctx, rid).runner_id == "elsewhere:1:x"  # a's exit leaves the new holder's lease alone


def test_finished_and_unleased_old_retrievals(any_ctx):
    ctx = any_ctx
    ctx.settings.retrieval_stale_s = 30.0
    rid = _retrieval(ctx)
    with ctx.sessions() as s:  # queued long ago by a process that died before it claimed it
        s.execute(update(Retrieval).where(Retrieval.id == rid).values(created_at=utcnow() - timedelta(minutes=5)))
        s.commit()
    assert orphans(ctx) == [rid]
    for status in ("completed", "partial", "failed", "cancelled"):
        _age(ctx, rid, 600, status=status, runner_id="gone:1:x")
        assert orphans(ctx) == [], status
    _age(ctx, rid, 600, status="paused", runner_id="gone:1:x")
    assert orphans(ctx) == [rid]  # a paused one waits in its runner: it needs one too
