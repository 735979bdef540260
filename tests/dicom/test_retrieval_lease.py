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


# ------------------------------------------------------------------ a real race
# Several processes, each with its own engine and connection pool (as several API processes have),
# released by one barrier to claim the same retrieval at the same moment: exactly one may win.
RACERS, ROUNDS = 4, 12


def _racer(url: str, data_dir: str, rids: list[int], barrier, out) -> None:
    from app.config import Settings
    from app.context import AppContext

    s = Settings(_env_file=None, database_url=url, data_dir=data_dir, pseudonym_key="k",
                 retrieval_heartbeat_s=5.0, retrieval_stale_s=30.0)
    ctx = AppContext.build(s)
    won = []
    try:
        for rid in rids:
            barrier.wait(60)
            lease = Lease(ctx, rid)
            try:
                if lease.claim():
                    won.append((rid, lease.runner_id))
            except Exception as exc:  # noqa: BLE001 - reported to the test: a claim must not crash
                won.append((rid, f"error: {type(exc).__name__}: {exc}"))
    finally:
        out.put(won)
        ctx.close()


def _race(ctx, rids: list[int]) -> dict[int, list[str]]:
    import multiprocessing as mp

    spawn = mp.get_context("spawn")
    barrier, out = spawn.Barrier(RACERS), spawn.Queue()
    procs = [spawn.Process(target=_racer, args=(ctx.settings.database_url, str(ctx.settings.data_dir), rids,
                                                barrier, out)) for _ in range(RACERS)]
    for p in procs:
        p.start()
    results = [out.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    winners: dict[int, list[str]] = {rid: [] for rid in rids}
    for won in results:
        for rid, runner in won:
            winners[rid].append(runner)
    return winners


def test_concurrent_claims_from_several_processes_have_exactly_one_winner(any_ctx):
    ctx = any_ctx
    first = _retrieval(ctx)
    with ctx.sessions() as s:
        rids = [first] + [create_retrieval(s, "pacs", {"StudyDate": f"201201{d:02d}"}, "test").id
                          for d in range(2, ROUNDS + 1)]
        s.commit()
    winners = _race(ctx, rids)
    errors = [r for runners in winners.values() for r in runners if r.startswith("error")]
    assert not errors, errors
    assert {rid: len(runners) for rid, runners in winners.items()} == {rid: 1 for rid in rids}
    for rid, (runner,) in winners.items():
        assert _row(ctx, rid).runner_id == runner  # the row names the one winner


def test_concurrent_takeover_of_a_stale_lease_has_exactly_one_winner(any_ctx):
    """Processes that all see the same stopped runner's lease race to take it over: one wins, one
    takeover is audited."""
    ctx = any_ctx
    first = _retrieval(ctx)
    with ctx.sessions() as s:
        rids = [first] + [create_retrieval(s, "pacs", {"StudyDate": f"201202{d:02d}"}, "test").id
                          for d in range(2, ROUNDS + 1)]
        s.commit()
    for rid in rids:
        _age(ctx, rid, 3600, status="running", runner_id="gone-host:1:dead")
    winners = _race(ctx, rids)
    assert {rid: len(runners) for rid, runners in winners.items()} == {rid: 1 for rid in rids}, winners
    with ctx.sessions() as s:
        takeovers = list(s.scalars(select(AuditEvent.target).where(AuditEvent.action == "retrieval.takeover")))
    assert sorted(takeovers) == sorted(str(r) for r in rids)
