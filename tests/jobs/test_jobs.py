"""Durable jobs (app.jobs): the runner's lifecycle in process, then real runner processes — one killed with
SIGKILL mid-job and taken over, two on PostgreSQL never running one job twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import select

from app.db.base import session_scope
from app.db.models import AuditEvent, Job
from app.jobs import queue as q
from app.jobs.runner import JobRunner
from tests.jobs.kinds import QUEUE, register_all

ROOT = Path(__file__).resolve().parents[2]
register_all()


def _enqueue(ctx, kind: str, payload: dict | None = None) -> int:
    with session_scope(ctx.sessions) as s:
        return q.enqueue(s, kind, payload or {}, target=f"test:{kind}", actor="test").id


def _job(ctx, job_id: int) -> Job:
    with ctx.sessions() as s:
        job = s.get(Job, job_id)
        s.expunge(job)
        return job


def _wait(ctx, job_id: int, until, timeout: float = 60.0) -> Job:
    deadline = time.monotonic() + timeout
    while True:
        job = _job(ctx, job_id)
        if until(job):
            return job
        assert time.monotonic() < deadline, (job.status, job.progress, job.error)
        time.sleep(0.05)


def _audit(ctx, action: str) -> list[AuditEvent]:
    with ctx.sessions() as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.id)))


def _fast(ctx) -> None:
    ctx.settings.jobs_heartbeat_s, ctx.settings.jobs_stale_s = 0.1, 1.5


# ------------------------------------------------------------------ in one process
def test_a_job_runs_once_and_ends_succeeded_with_its_result(any_ctx):
    ctx = any_ctx
    _fast(ctx)
    jid = _enqueue(ctx, "test.record")
    assert _job(ctx, jid).status == "queued"
    JobRunner(ctx, [QUEUE]).run_until_idle(timeout=30)
    job = _job(ctx, jid)
    assert (job.status, job.result, job.attempts, job.error) == ("succeeded", {"ran": True}, 1, None)
    assert job.started_at is not None and job.finished_at is not None
    assert [e.target for e in _audit(ctx, "test.ran")] == [f"job:{jid}"]
    JobRunner(ctx, [QUEUE]).run_until_idle(timeout=30)  # nothing left: not run again
    assert len(_audit(ctx, "test.ran")) == 1


def test_a_handler_that_raises_ends_failed_with_the_reason(any_ctx):
    ctx = any_ctx
    _fast(ctx)
    jid = _enqueue(ctx, "test.fail", {"why": "disk full"})
    JobRunner(ctx, [QUEUE]).run_until_idle(timeout=30)
    job = _job(ctx, jid)
    assert job.status == "failed" and job.attempts == 1
    assert job.error == "ValueError: the handler could not go on (disk full)"


def test_cancel_a_queued_and_a_running_job(any_ctx):
    ctx = any_ctx
    _fast(ctx)
    queued = _enqueue(ctx, "test.record")
    with session_scope(ctx.sessions) as s:
        assert q.cancel_job(s, queued, "test").status == "cancelled"
    running = _enqueue(ctx, "test.steps", {"steps": 200, "delay": 0.05})
    runner = JobRunner(ctx, [QUEUE], poll=0.05).start()
    try:
        _wait(ctx, running, lambda j: j.status == "running" and (j.progress or {}).get("step", 0) >= 2)
        with session_scope(ctx.sessions) as s:
            job = q.cancel_job(s, running, "test")
            assert job.status == "running" and job.cancel_requested
        job = _wait(ctx, running, lambda j: j.status != "running", timeout=30)
    finally:
        runner.stop(grace=5)
    assert job.status == "cancelled" and job.finished_at is not None
    assert job.progress["step"] < 200  # stopped at a checkpoint, not run to its end
    assert _job(ctx, queued).status == "cancelled" and not _audit(ctx, "test.ran")  # the queued one never ran
    with session_scope(ctx.sessions) as s:
        from app.errors import Conflict

        with pytest.raises(Conflict):
            q.cancel_job(s, running, "test")
    assert [e.details["status_before"] for e in _audit(ctx, "job.cancel")] == ["queued", "running"]


def test_a_stale_lease_is_taken_over_and_the_old_holder_cannot_write(any_ctx):
    ctx = any_ctx
    jid = _enqueue(ctx, "test.record")
    with session_scope(ctx.sessions) as s:
        first = q.claim_next(s, "gone:1:a", QUEUE, stale_after=30)
        assert first.id == jid and first.attempts == 1
    with session_scope(ctx.sessions) as s:  # a live holder keeps it
        assert q.claim_next(s, "other:2:b", QUEUE, stale_after=30) is None
    time.sleep(0.3)
    with session_scope(ctx.sessions) as s:  # its heartbeat is older than 0.2 s: taken over
        second = q.claim_next(s, "other:2:b", QUEUE, stale_after=0.2)
        assert second.id == jid and second.attempts == 2 and second.runner_id == "other:2:b"
    with session_scope(ctx.sessions) as s:
        assert not q.finish(s, jid, "gone:1:a", 1, "succeeded")  # the stopped holder's late end is refused
        assert q.heartbeat(s, "gone:1:a", {jid: 1}) == {jid: (False, False)}
        assert q.finish(s, jid, "other:2:b", 2, "succeeded", result={"ok": 1})
    assert _job(ctx, jid).status == "succeeded"
    takeovers = _audit(ctx, "job.takeover")
    assert [(t.target, t.details["previous_runner"]) for t in takeovers] == [(f"job:{jid}", "gone:1:a")]


def test_a_job_whose_runners_keep_dying_ends_failed(any_ctx):
    ctx = any_ctx
    jid = _enqueue(ctx, "test.record")
    for n in range(q.MAX_ATTEMPTS):
        with session_scope(ctx.sessions) as s:
            assert q.claim_next(s, f"dies:{n}:x", QUEUE, stale_after=0.01) is not None
        time.sleep(0.05)
    with session_scope(ctx.sessions) as s:
        assert q.claim_next(s, "next:9:x", QUEUE, stale_after=0.01) is None
    job = _job(ctx, jid)
    assert job.status == "failed" and f"lost {q.MAX_ATTEMPTS} times" in job.error


def test_worker_queues_are_checked():
    from app.errors import InvalidInput

    assert q.parse_queues(None) == list(q.ALL_QUEUES) and q.parse_queues("all") == list(q.ALL_QUEUES)
    assert q.parse_queues("probe, export,probe") == ["probe", "export"]
    with pytest.raises(InvalidInput, match="unknown gpu"):
        q.parse_queues("probe,gpu")


# ------------------------------------------------------------------ runner processes
class RunnerProcess:
    """tests/jobs/worker_proc.py: a JobRunner in its own process, on the test's database."""

    def __init__(self, ctx, tmp_path: Path, name: str):
        self.log_path = tmp_path / f"{name}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.jobs.worker_proc", ctx.settings.database_url,
                                      str(ctx.settings.data_dir), QUEUE], cwd=ROOT, stdout=self.log,
                                     stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        deadline = time.monotonic() + 60
        while "ready" not in self.text():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.text()
            time.sleep(0.05)
        self.runner_id = self.text().split("runner ", 1)[1].split(" ready", 1)[0]

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def test_a_runner_killed_mid_job_is_taken_over_and_the_job_finishes(any_ctx, tmp_path):
    ctx = any_ctx
    jid = _enqueue(ctx, "test.steps", {"steps": 40, "delay": 0.05})
    a = RunnerProcess(ctx, tmp_path, "a")
    b = None
    try:
        _wait(ctx, jid, lambda j: j.runner_id == a.runner_id and (j.progress or {}).get("step", 0) >= 5)
        a.kill9()
        at_kill = _job(ctx, jid)
        assert at_kill.status == "running" and at_kill.runner_id == a.runner_id
        b = RunnerProcess(ctx, tmp_path, "b")
        job = _wait(ctx, jid, lambda j: j.status not in q.UNFINISHED, timeout=90)
    finally:
        a.stop()
        if b is not None:
            b.stop()
    assert job.status == "succeeded" and job.attempts == 2 and job.runner_id == b.runner_id, job.error
    assert job.result["resumed_from"] >= 5  # the new holder went on from the progress the old one recorded
    steps = [(e.details["step"], e.details["runner"]) for e in _audit(ctx, "test.step")]
    assert {s for s, _r in steps} == set(range(40))
    assert {r for _s, r in steps} == {a.runner_id, b.runner_id}
    # b ran only what a had not recorded (a step a did after its last progress write may repeat once)
    assert len(steps) - 40 <= 1, Counter(s for s, _r in steps)
    assert [t.details["previous_runner"] for t in _audit(ctx, "job.takeover")] == [a.runner_id]


def test_two_runner_processes_on_postgresql_never_run_one_job_twice(pg_ctx, tmp_path):
    ctx = pg_ctx
    procs = [RunnerProcess(ctx, tmp_path, "a"), RunnerProcess(ctx, tmp_path, "b")]
    try:
        ids = [_enqueue(ctx, "test.record") for _ in range(50)]
        for jid in ids:
            _wait(ctx, jid, lambda j: j.status not in q.UNFINISHED, timeout=120)
    finally:
        for p in procs:
            p.stop()
    ran = Counter(e.target for e in _audit(ctx, "test.ran"))
    assert ran == Counter({f"job:{jid}": 1 for jid in ids})
    with ctx.sessions() as s:
        rows = list(s.scalars(select(Job).where(Job.id.in_(ids))))
    assert {j.status for j in rows} == {"succeeded"} and {j.attempts for j in rows} == {1}
    by = Counter(j.runner_id for j in rows)
    assert set(by) <= {p.runner_id for p in procs}, by
