"""A node's rate limit across processes (RADCOHORT_SHARED_NODE_LIMITS): two worker processes pacing their
retrievals against one PACS together stay within its instances/min; with per-process buckets each alone
would (twice the rate in all)."""

from __future__ import annotations

import multiprocessing as mp
import time
from types import SimpleNamespace

import pytest

PER_MINUTE = 1200  # 20 instances/s
UNITS, UNIT = 10, 5  # each process: 10 retrieves of 5 instances


def _worker(url: str, data_dir: str, shared: bool, barrier, out) -> None:
    from app.config import Settings
    from app.context import AppContext
    from app.policy.clock import SystemClock
    from app.policy.limits import node_limits

    ctx = AppContext.build(Settings(_env_file=None, database_url=url, data_dir=data_dir, pseudonym_key="k",
                                    shared_node_limits=shared))
    clock = SystemClock()
    policy = SimpleNamespace(max_associations=2, instances_per_minute=PER_MINUTE, mb_per_second=None)
    limits = node_limits(ctx, "pacs", policy, clock)
    uses = []
    try:
        barrier.wait(60)
        for _ in range(UNITS):
            clock.sleep(limits.instances.take(UNIT))  # what the governor does before each retrieve
            uses.append(time.time())
    finally:
        out.put(uses)
        ctx.close()


def _run_two(ctx, shared: bool) -> float:
    """Seconds from the start until the last of both processes' 100 instances may be fetched."""
    spawn = mp.get_context("spawn")
    barrier, out = spawn.Barrier(3), spawn.Queue()
    procs = [spawn.Process(target=_worker, args=(ctx.settings.database_url, str(ctx.settings.data_dir), shared,
                                                 barrier, out)) for _ in range(2)]
    for p in procs:
        p.start()
    barrier.wait(120)
    t0 = time.time()
    uses = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert all(len(u) == UNITS for u in uses)
    return max(max(u) for u in uses) - t0


def test_two_processes_share_one_nodes_instances_per_minute(any_ctx):
    ctx = any_ctx
    # 100 instances at 20/s from an empty bucket: the last may go at 5 s, whoever takes them
    elapsed = _run_two(ctx, shared=True)
    assert elapsed >= 4.6, f"{2 * UNITS * UNIT} instances in {elapsed:.2f} s: above {PER_MINUTE}/min"
    assert elapsed < 15, elapsed


def test_without_shared_limits_each_process_has_its_own_rate(tmp_path):
    """The control: per-process buckets let two processes fetch at twice the node's rate."""
    from tests.conftest import _migrated_ctx, make_settings

    for ctx in _migrated_ctx(make_settings(tmp_path)):
        elapsed = _run_two(ctx, shared=False)
    assert elapsed < 4.0, elapsed


def test_a_shared_bucket_matches_the_in_process_one(any_ctx):
    """Same arithmetic as TokenBucket: starts empty, refills at the rate up to the capacity, debt waits."""
    from datetime import datetime, timezone

    from app.policy.clock import FakeClock
    from app.policy.limits import TokenBucket
    from app.policy.shared_limits import SharedTokenBucket

    clock = FakeClock(datetime(2026, 1, 1, tzinfo=timezone.utc))
    mine = TokenBucket(10.0, 20, clock)
    shared = SharedTokenBucket(any_ctx.sessions, "pacs", "instances", 10.0, 20, clock)
    other = SharedTokenBucket(any_ctx.sessions, "other", "instances", 10.0, 20, clock)
    assert shared.debt_wait() == 0.0
    for n, advance in ((5, 0), (5, 0.2), (1, 10.0), (30, 0), (0, 1.0)):
        clock.advance(advance)
        assert shared.take(n) == pytest.approx(mine.take(n))
        assert shared.debt_wait() == pytest.approx(mine.debt_wait())
    assert other.take(1) == pytest.approx(0.1)  # another node's bucket is its own
