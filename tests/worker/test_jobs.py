"""Job queue semantics on SQLite and PostgreSQL: create, claim (concurrent, SKIP LOCKED), stale reclaim,
cancel, progress folding, completion once."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import func, select, text, update

from app.db.base import session_scope
from app.db.models import AuditEvent, Cohort, TrainedModel, TrainingJob
from app.errors import Conflict, NotFound
from app.training import jobs
from app.training.params import TrainingJobCreate


def _cohort(ctx) -> int:
    with session_scope(ctx.sessions) as s:
        c = Cohort(taxonomy_name="t", taxonomy={"name": "t", "classes": [{"name": "A"}, {"name": "B"}]},
                   summary={"classes": [{"name": n, "train": 4, "test": 1} for n in "AB"]})
        s.add(c)
        s.flush()
        return c.id


def _queue(ctx, n: int, **params) -> list[int]:
    cid = _cohort(ctx)
    with session_scope(ctx.sessions) as s:
        out = []
        for _ in range(n):
            out += [j.id for j in jobs.create_jobs(s, TrainingJobCreate(cohort_id=cid, **params), "test")]
        return out


def _claim(ctx, worker: str, **kw):
    with session_scope(ctx.sessions) as s:
        job = jobs.claim_next(s, worker, **kw)
        return job.id if job else None


def _job(ctx, job_id: int) -> TrainingJob:
    with session_scope(ctx.sessions) as s:
        return s.get(TrainingJob, job_id)


def test_create_checks_cohort_and_depth_ladder_queues_one_job_per_preset(any_ctx):
    with session_scope(any_ctx.sessions) as s:
        with pytest.raises(NotFound):
            jobs.create_jobs(s, TrainingJobCreate(cohort_id=999), "test")
    ids = _queue(any_ctx, 1, experiments=["depth_ladder", "rotate90"], epochs=3)
    assert len(ids) == 4
    rows = [_job(any_ctx, i) for i in ids]
    assert [r.params["depth"] for r in rows] == [4, 19, 34, 64]
    assert all(r.params["experiments"] == ["rotate90"] and r.params["depth_ladder"] == ids for r in rows)
    assert all(r.status == "queued" and r.epochs == 3 for r in rows)
    with session_scope(any_ctx.sessions) as s:
        actions = s.scalars(select(AuditEvent.action)).all()
    assert actions.count("training_job.create") == 4


def test_concurrent_claimers_never_share_a_job(any_ctx):
    ids = _queue(any_ctx, 12)
    claimed: list[tuple[str, int]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def claimer(name: str) -> None:
        try:
            start.wait()
            while (jid := _claim(any_ctx, name)) is not None:
                claimed.append((name, jid))
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    got = [jid for _, jid in claimed]
    assert sorted(got) == sorted(ids), "every job claimed exactly once"
    for name, jid in claimed:
        row = _job(any_ctx, jid)
        assert (row.status, row.worker_id, row.attempts) == ("running", name, 1)


def test_postgres_skip_locked_passes_over_a_locked_job(pg_ctx):
    first, second = _queue(pg_ctx, 2)
    holder = pg_ctx.sessions()
    try:
        # another worker mid-claim: it holds the row lock on the first job
        locked = holder.scalar(select(TrainingJob.id).where(TrainingJob.status == "queued")
                               .order_by(TrainingJob.id).limit(1).with_for_update(skip_locked=True))
        assert locked == first
        with session_scope(pg_ctx.sessions) as s:
            s.execute(text("SET LOCAL lock_timeout = '3s'"))  # blocking instead of skipping would fail here
            job = jobs.claim_next(s, "w2")
            assert job is not None and job.id == second
    finally:
        holder.rollback()
        holder.close()
    assert _claim(pg_ctx, "w1") == first
    assert _claim(pg_ctx, "w3") is None


def test_stale_running_job_is_reclaimed_and_the_old_worker_loses_it(any_ctx):
    (jid,) = _queue(any_ctx, 1)
    assert _claim(any_ctx, "old") == jid
    assert _claim(any_ctx, "new", stale_after=60) is None  # fresh heartbeat: not claimable
    with session_scope(any_ctx.sessions) as s:
        s.execute(update(TrainingJob).values(heartbeat_at=jobs.utcnow() - timedelta(seconds=120)))
    assert _claim(any_ctx, "new", stale_after=60) == jid
    row = _job(any_ctx, jid)
    assert (row.worker_id, row.attempts, row.status) == ("new", 2, "running")
    with session_scope(any_ctx.sessions) as s:
        assert jobs.heartbeat(s, jid, "old") == (False, False)
        assert not jobs.fail_job(s, jid, "old", "late failure from a dead worker")
        assert jobs.heartbeat(s, jid, "new") == (True, False)
    assert _job(any_ctx, jid).status == "running"


def test_job_that_keeps_losing_workers_fails_after_max_attempts(any_ctx):
    (jid,) = _queue(any_ctx, 1)
    for n in range(2):
        assert _claim(any_ctx, f"w{n}", stale_after=1, max_attempts=2) == jid
        with session_scope(any_ctx.sessions) as s:
            s.execute(update(TrainingJob).values(heartbeat_at=jobs.utcnow() - timedelta(seconds=10)))
    assert _claim(any_ctx, "w9", stale_after=1, max_attempts=2) is None
    row = _job(any_ctx, jid)
    assert row.status == "failed" and "lost 2 times" in row.error


def test_release_requeues_and_keeps_attempts(any_ctx):
    (jid,) = _queue(any_ctx, 1)
    _claim(any_ctx, "w1")
    with session_scope(any_ctx.sessions) as s:
        assert jobs.release_job(s, jid, "w1")
    row = _job(any_ctx, jid)
    assert (row.status, row.worker_id, row.attempts) == ("queued", None, 1)
    assert _claim(any_ctx, "w2") == jid
    assert _job(any_ctx, jid).attempts == 2


def test_cancel_queued_at_once_and_running_through_the_worker(any_ctx):
    queued, running = _queue(any_ctx, 2)
    assert _claim(any_ctx, "w1") == queued  # oldest first
    queued, running = running, queued
    with session_scope(any_ctx.sessions) as s:
        assert jobs.cancel_job(s, queued, "alice").status == "cancelled"
        j = jobs.cancel_job(s, running, "alice")
        assert (j.status, j.cancel_requested) == ("running", True)
    assert _claim(any_ctx, "w2") is None  # a cancelled job is never claimed
    with session_scope(any_ctx.sessions) as s:
        assert jobs.heartbeat(s, running, "w1") == (True, True)
        assert jobs.mark_cancelled(s, running, "w1")
    assert _job(any_ctx, running).status == "cancelled"
    with session_scope(any_ctx.sessions) as s:
        with pytest.raises(Conflict):
            jobs.cancel_job(s, running, "alice")
        events = s.execute(select(AuditEvent.action, AuditEvent.actor, AuditEvent.target)
                           .where(AuditEvent.action == "training_job.cancel")).all()
    assert sorted(t for _, _, t in events) == sorted([f"training_job:{queued}", f"training_job:{running}"])
    assert {a for _, a, _ in events} == {"alice"}


def test_stale_job_with_cancel_requested_becomes_cancelled(any_ctx):
    (jid,) = _queue(any_ctx, 1)
    _claim(any_ctx, "dead")
    with session_scope(any_ctx.sessions) as s:
        jobs.cancel_job(s, jid, "alice")
        s.execute(update(TrainingJob).values(heartbeat_at=jobs.utcnow() - timedelta(seconds=120)))
    assert _claim(any_ctx, "w2", stale_after=60) is None
    assert _job(any_ctx, jid).status == "cancelled"


def test_progress_events_fold_into_the_job_and_replays_do_not_duplicate(any_ctx):
    (jid,) = _queue(any_ctx, 1, epochs=3)
    with session_scope(any_ctx.sessions) as s:
        job = jobs.claim_next(s, "w1")
    ep = lambda n, loss: {"event": "epoch", "epoch": n, "epochs": 3, "loss": loss, "train_accuracy": 50.0 + n,  # noqa: E731
                          "val_accuracy": 40.0 + n, "images_per_second": 10.0 * n, "eta_seconds": 9 - n,
                          "device": "cpu"}
    events = [{"event": "preprocess", "done": 5, "total": 10}, ep(1, 0.9),
              {"event": "skipped", "sop_instance_uid": "1.2.3", "reason": "cannot decode"}, ep(2, 0.5)]
    with session_scope(any_ctx.sessions) as s:
        assert jobs.record_progress(s, job, "w1", events) == (True, False)
    # a resumed run replays epoch 2 and adds 3; the skipped report repeats
    with session_scope(any_ctx.sessions) as s:
        jobs.record_progress(s, job, "w1", [ep(2, 0.4), ep(3, 0.2), events[2], {"event": "done"}])
    row = _job(any_ctx, jid)
    assert [h["epoch"] for h in row.history] == [1, 2, 3]
    assert row.history[1]["loss"] == 0.4
    assert (row.epoch, row.device, row.images_per_second) == (3, "cpu", 30.0)
    view = jobs.job_view(row)
    assert (view["loss"], view["train_accuracy"], view["val_accuracy"], view["eta_seconds"]) == (0.2, 53.0, 43.0, 0)
    assert view["skipped_count"] == 1 and view["skipped"][0]["reason"] == "cannot decode"
    assert view["preprocess"] == {"done": 5, "total": 10}


def test_completion_registers_the_model_once(any_ctx):
    (jid,) = _queue(any_ctx, 1)
    kw = dict(metrics={"overall_accuracy": 100.0}, card={"architecture": "resnet10t"}, architecture="resnet10t",
              classes=["A", "B"], model_path=f"runs/job-{jid}/model.pt")
    _claim(any_ctx, "w1")
    with session_scope(any_ctx.sessions) as s:
        assert jobs.complete_job(s, jid, "w1", **kw) is not None
        assert jobs.complete_job(s, jid, "w1", **kw) is None  # no longer running: nothing written
    # a resumed job completing again (e.g. the old worker died after reporting) keeps one model row
    with session_scope(any_ctx.sessions) as s:
        s.execute(update(TrainingJob).values(status="running", worker_id="w2"))
        assert jobs.complete_job(s, jid, "w2", **kw) is not None
        assert s.scalar(select(func.count()).select_from(TrainedModel)) == 1
    row = _job(any_ctx, jid)
    assert (row.status, row.metrics, row.epoch) == ("completed", {"overall_accuracy": 100.0}, row.epochs)
