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


# ------------------------------------------------------------------ association slots
HOLD_S, THREADS, ROUNDS = 0.3, 3, 3


def _associations(url: str, data_dir: str, shared: bool, barrier, out) -> None:
    import threading

    from app.config import Settings
    from app.context import AppContext
    from app.policy.clock import SystemClock
    from app.policy.limits import node_limits

    ctx = AppContext.build(Settings(_env_file=None, database_url=url, data_dir=data_dir, pseudonym_key="k",
                                    shared_node_limits=shared, jobs_heartbeat_s=0.2, jobs_stale_s=5.0))
    policy = SimpleNamespace(max_associations=2, instances_per_minute=None, mb_per_second=None)
    limits = node_limits(ctx, "pacs", policy, SystemClock())
    spans: list[tuple[float, float]] = []

    def one() -> None:
        for _ in range(ROUNDS):
            with limits.association():  # what the governor wraps every C-FIND/C-MOVE/C-GET in
                t = time.time()
                time.sleep(HOLD_S)
                spans.append((t, time.time()))

    try:
        barrier.wait(60)
        threads = [threading.Thread(target=one) for _ in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        out.put(spans)
        ctx.close()


def _most_at_once(ctx, shared: bool) -> int:
    spawn = mp.get_context("spawn")
    barrier, out = spawn.Barrier(2), spawn.Queue()
    procs = [spawn.Process(target=_associations, args=(ctx.settings.database_url, str(ctx.settings.data_dir),
                                                       shared, barrier, out)) for _ in range(2)]
    for p in procs:
        p.start()
    spans = [s for _ in procs for s in out.get(timeout=180)]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert len(spans) == 2 * THREADS * ROUNDS
    events = sorted([(a, 1) for a, _b in spans] + [(b, -1) for _a, b in spans], key=lambda e: (e[0], e[1]))
    most = now = 0
    for _t, d in events:
        now += d
        most = max(most, now)
    return most


def test_two_processes_share_one_nodes_association_slots(any_ctx):
    assert _most_at_once(any_ctx, shared=True) <= 2  # max_associations 2, whichever process holds them


def test_without_shared_limits_each_process_has_its_own_slots(tmp_path):
    from tests.conftest import _migrated_ctx, make_settings

    for ctx in _migrated_ctx(make_settings(tmp_path)):
        assert _most_at_once(ctx, shared=False) > 2  # the control: 2 per process


def test_a_stopped_holders_slot_is_free_again_once_its_lease_is_stale(any_ctx):
    from sqlalchemy import update

    from app.db.models import NodeSlot
    from app.policy.clock import SystemClock
    from app.policy.shared_limits import SharedSlots

    ctx = any_ctx
    a = SharedSlots(ctx.sessions, "pacs", 1, SystemClock(), heartbeat_s=0.1, stale_s=2.0)
    b = SharedSlots(ctx.sessions, "pacs", 1, SystemClock(), heartbeat_s=0.1, stale_s=2.0)
    assert a.try_acquire() == 0
    time.sleep(0.5)
    assert b.try_acquire() is None  # a live holder (renewed) keeps it
    a.release(0)
    assert b.try_acquire() == 0
    with a.sessions() as s:  # b's process "stops": its lease is no longer renewed
        b._held.clear()
        s.execute(update(NodeSlot).values(heartbeat=time.time() - 10))
        s.commit()
    assert a.try_acquire() == 0


# ------------------------------------------------------------------ real retrievals, two processes, one PACS
def test_two_processes_retrieving_from_one_pacs_stay_within_its_instances_per_minute(tmp_path, orthanc_factory):
    """Two `radcohort retrieve` processes each retrieve 30 instances from one Orthanc whose policy allows
    600/min (10/s): with shared limits the 60 arrive over about 4 s (paced one after another, 20 per
    retrieve at 2, 4, 5 and 6 s); each process pacing itself alone would let both bring theirs at 2 and 3 s."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from sqlalchemy import func, select

    from app.db.base import session_scope
    from app.db.models import Instance, Retrieval
    from app.retrievals.nodes import create_node
    from app.retrievals.schemas import NodeIn
    from app.wiring import storage_scp
    from tests.conftest import _migrated_ctx, make_settings
    from tests.dicom.helpers import make_studies, upload_all

    settings = make_settings(tmp_path, shared_node_limits=True, arrival_timeout=10.0)
    orthanc = orthanc_factory(modalities={"radcohort": (settings.ae_title, "127.0.0.1", settings.scp_port)})
    studies = make_studies(tmp_path / "gen", ["20120101", "20130101"], instances_per_series=30)
    upload_all(orthanc, sorted((tmp_path / "gen").iterdir()))
    radcohort = str(Path(sys.executable).with_name("radcohort"))
    env = {**os.environ, "RADCOHORT_DATABASE_URL": settings.database_url, "RADCOHORT_DATA_DIR": str(settings.data_dir),
           "RADCOHORT_PSEUDONYM_KEY": "test-pseudonym-key", "RADCOHORT_SHARED_NODE_LIMITS": "true",
           "RADCOHORT_SCP_PORT": str(settings.scp_port), "RADCOHORT_LOG_LEVEL": "WARNING"}
    for ctx in _migrated_ctx(settings):
        with session_scope(ctx.sessions) as s:
            node = create_node(s, NodeIn(name="pacs", ae_title=orthanc.aet, host="127.0.0.1",
                                         port=orthanc.dicom_port), "test")
            node.options = {"policy": {"instances_per_minute": 600}}
        with storage_scp(ctx):  # one receiver for both (as `radcohort serve` would be)
            procs = [subprocess.Popen([radcohort, "retrieve", "pacs", "-q", f"StudyInstanceUID={st.study_uid}"],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                     for st in studies]
            outs = [p.communicate(timeout=180)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs
        with ctx.sessions() as s:
            assert list(s.scalars(select(Retrieval.status))) == ["completed", "completed"]
            assert s.scalar(select(func.count()).select_from(Instance)) == 60
            first, last = s.execute(select(func.min(Instance.received_at), func.max(Instance.received_at))).one()
        span = (last - first).total_seconds()
        assert span >= 3.0, f"60 instances arrived over {span:.1f} s: above 600/min"
