"""The worker against the real training run (CPU, tiny cohort): completion, failure, cancel, SIGKILL ->
stale reclaim -> resume from the checkpoint, SIGTERM -> job back in the queue, torchrun with 2 gloo ranks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from app.db.base import session_scope
from app.db.models import CohortMember, TrainedModel, TrainingJob
from app.training import jobs
from app.training.params import TrainingJobCreate
from tests.factories.training import make_tiny_cohort

pytest.importorskip("torch")
pytest.importorskip("timm")
from app.training.worker import MARK_ENV, Worker  # noqa: E402

pytestmark = pytest.mark.worker
ROOT = Path(__file__).resolve().parents[2]
TINY = dict(model="resnet10t", image_size=32, batch_size=16, workers=1, experiments=[], augment={"rotation": 0})


def _queue(ctx, per_class: int = 12, undecodable: int = 0, **params) -> int:
    with session_scope(ctx.sessions) as s:
        cid = make_tiny_cohort(s, ctx.settings, per_class=per_class, size=32, undecodable=undecodable)
        return jobs.create_jobs(s, TrainingJobCreate(cohort_id=cid, **{**TINY, **params}), "test")[0].id


def _job(ctx, job_id: int) -> TrainingJob:
    with session_scope(ctx.sessions) as s:
        return s.get(TrainingJob, job_id)


def _events(ctx, job_id: int) -> list[dict]:
    path = jobs.run_dir(ctx.settings, job_id) / "progress.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _wait(cond, timeout: float, what: str, proc: subprocess.Popen | None = None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = cond()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"worker exited ({proc.returncode}) before {what}")
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def _marked_pids(ctx, job_id: int) -> list[int]:
    needle = f"{MARK_ENV}={jobs.run_dir(ctx.settings, job_id).resolve()}".encode() + b"\0"
    pids = []
    for p in Path("/proc").glob("[0-9]*"):
        try:
            if needle in (p / "environ").read_bytes():
                pids.append(int(p.name))
        except OSError:
            pass
    return pids


def _worker_proc(ctx, *args: str) -> subprocess.Popen:
    env = {**os.environ, "RADCOHORT_DATABASE_URL": ctx.settings.database_url,
           "RADCOHORT_DATA_DIR": str(ctx.settings.data_dir), "RADCOHORT_PSEUDONYM_KEY": "k", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", "from app.cli import main; main()", "worker", "--poll", "0.2", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _in_thread(worker: Worker) -> tuple[threading.Thread, list]:
    out: list = []
    t = threading.Thread(target=lambda: out.extend(worker.run(once=True)), daemon=True)
    t.start()
    return t, out


def test_job_runs_to_completion_and_reports_the_undecodable_file(any_ctx):
    ctx = any_ctx
    jid = _queue(ctx, undecodable=1, epochs=2, experiments=["rotate90"])
    outcomes = Worker(ctx, poll=0.2, tick=0.3).run(once=True)
    assert [(o.job_id, o.status) for o in outcomes] == [(jid, "completed")]
    job = _job(ctx, jid)
    assert job.status == "completed" and job.error is None
    assert [h["epoch"] for h in job.history] == [1, 2] and job.epoch == 2 and job.device
    assert job.progress["skipped_count"] == 1 and job.progress["skipped"][0]["sop_instance_uid"]
    assert set(job.metrics) >= {"overall_accuracy", "per_class", "confusion_matrix", "misclassified"}
    assert "rotate90" in job.metrics["experiments"]
    with session_scope(ctx.sessions) as s:
        model = s.scalar(select(TrainedModel).where(TrainedModel.job_id == jid))
        assert model.classes == ["CLeft", "CRight"] and model.card["cohort_id"] == job.cohort_id
        assert (ctx.settings.data_dir / model.path).is_file()
    spec = json.loads((jobs.run_dir(ctx.settings, jid) / "spec.json").read_text())
    assert spec["meta"]["ruleset_version"] == "tiny-1" and spec["meta"]["code_version"]
    assert spec["items"] and all(Path(it["path"]).is_absolute() for it in spec["items"])


def test_failed_run_stores_the_error(ctx):
    jid = _queue(ctx, epochs=1)
    with session_scope(ctx.sessions) as s:  # no training images left: models.run must fail clearly
        for m in s.scalars(select(CohortMember).where(CohortMember.split == "train")):
            m.split = "test"
    outcomes = Worker(ctx, poll=0.2, tick=0.3).run(once=True)
    assert outcomes[0].status == "failed"
    job = _job(ctx, jid)
    assert job.status == "failed" and "usable training image" in job.error


def test_cancel_running_job_stops_the_run(ctx):
    jid = _queue(ctx, epochs=200)
    worker = Worker(ctx, poll=0.2, tick=0.3)
    thread, outcomes = _in_thread(worker)
    _wait(lambda: _job(ctx, jid).epoch >= 1, 120, "the first epoch")
    with session_scope(ctx.sessions) as s:
        assert jobs.cancel_job(s, jid, "test").status == "running"
    thread.join(60)
    assert not thread.is_alive(), "the run did not stop after cancel"
    assert [(o.job_id, o.status) for o in outcomes] == [(jid, "cancelled")]
    job = _job(ctx, jid)
    assert job.status == "cancelled" and job.epoch < 200
    assert (jobs.run_dir(ctx.settings, jid) / "CANCEL").exists()
    assert _marked_pids(ctx, jid) == []


def test_killed_worker_job_is_reclaimed_and_resumes_from_its_checkpoint(ctx):
    epochs = 8
    jid = _queue(ctx, epochs=epochs)
    # 1. worker A is SIGKILLed mid-job: its training child dies with it, the job stays 'running'
    a = _worker_proc(ctx)
    _wait(lambda: any(e.get("event") == "epoch" and e["epoch"] >= 2 for e in _events(ctx, jid)), 180,
          "epoch 2", a)
    a.kill()
    a.wait(10)
    _wait(lambda: not _marked_pids(ctx, jid), 15, "the orphaned training child to die")
    killed_at = max(e["epoch"] for e in _events(ctx, jid) if e.get("event") == "epoch")
    assert killed_at < epochs and _job(ctx, jid).status == "running"

    # 2. worker B reclaims the stale job and resumes; SIGTERM gives the job back to the queue
    b = _worker_proc(ctx, "--stale-after", "2")
    _wait(lambda: any(e.get("event") == "resume" for e in _events(ctx, jid)), 120, "the resume", b)
    resumed = [e for e in _events(ctx, jid) if e.get("event") == "resume"][0]
    assert resumed["from_epoch"] >= 3  # not from scratch
    b.send_signal(signal.SIGTERM)
    assert b.wait(60) == 0, b.stdout.read()
    job = _job(ctx, jid)
    assert job.status in ("queued", "completed")
    if job.status == "queued":
        assert job.worker_id is None and job.attempts == 2
        assert not _marked_pids(ctx, jid)
        # 3. worker C finishes it
        c = _worker_proc(ctx, "--once")
        assert c.wait(300) == 0, c.stdout.read()
    job = _job(ctx, jid)
    assert job.status == "completed", job.error
    # every epoch is reported once, including one checkpointed in the instant before a kill (the resume
    # event carries the checkpoint's history)
    assert [h["epoch"] for h in job.history] == list(range(1, epochs + 1))
    with session_scope(ctx.sessions) as s:
        assert s.scalar(select(func.count()).select_from(TrainedModel).where(TrainedModel.job_id == jid)) == 1
    assert sum(1 for e in _events(ctx, jid) if e.get("event") == "done") == 1


def test_torchrun_with_two_gloo_ranks_completes(ctx):
    jid = _queue(ctx, epochs=2)
    outcomes = Worker(ctx, poll=0.2, tick=0.3, nproc=2).run(once=True)
    job = _job(ctx, jid)
    assert outcomes[0].status == "completed", job.error or (jobs.run_dir(ctx.settings, jid) / "worker.log").read_text()[-3000:]
    config = json.loads((jobs.run_dir(ctx.settings, jid) / "config.json").read_text())
    assert config["resolved"]["world_size"] == 2
    assert "torch.distributed.run" in (jobs.run_dir(ctx.settings, jid) / "worker.log").read_text()
    assert [h["epoch"] for h in job.history] == [1, 2]


def test_worker_that_lost_its_claim_stops_its_run(ctx):
    jid = _queue(ctx, epochs=200)
    thread, outcomes = _in_thread(Worker(ctx, poll=0.2, tick=0.3))
    _wait(lambda: _job(ctx, jid).epoch >= 1, 120, "the first epoch")
    with session_scope(ctx.sessions) as s:  # as if another worker had reclaimed it
        s.get(TrainingJob, jid).worker_id = "someone-else"
    thread.join(60)
    assert not thread.is_alive()
    assert [(o.job_id, o.status) for o in outcomes] == [(jid, "lost")]
    assert _job(ctx, jid).worker_id == "someone-else" and _job(ctx, jid).status == "running"
    assert _marked_pids(ctx, jid) == []


def test_worker_publishes_itself_prints_epochs_and_holds_out_validation(ctx):
    """The workers row lives while the worker runs (with its registry); the console gets every epoch; the
    per-epoch val_accuracy comes from patients held out of train, the test split stays as the cohort has it."""
    from app.training import workers

    with session_scope(ctx.sessions) as s:
        cid = make_tiny_cohort(s, ctx.settings, per_class=12, size=32, split=(0.8, 0.0, 0.2))
        jid = jobs.create_jobs(s, TrainingJobCreate(cohort_id=cid, **{**TINY, "epochs": 2, "val_fraction": 0.2}),
                               "test")[0].id
    lines: list[str] = []
    worker = Worker(ctx, poll=0.2, tick=0.3, say=lines.append)
    t, out = _in_thread(worker)

    def published():
        with session_scope(ctx.sessions) as s:
            return [workers.view(w) for w in workers.alive(s)]

    (row,) = _wait(published, 60, "the worker's row")
    assert row["id"] == worker.worker_id and row["queues"] == ["training", "scoring"] and row["models"] > 100
    with session_scope(ctx.sessions) as s:
        names, source = workers.offered_models(s)
    assert source == "workers" and {"resnet10t", "radcohort_cnn4", "vgg19_bn"} <= set(names)
    t.join(300)
    assert [(o.job_id, o.status) for o in out] == [(jid, "completed")]
    assert published() == []  # a worker that exits takes its row with it
    assert any(f"training job {jid}: epoch 2/2" in line and "val acc" in line for line in lines), lines
    assert any(line.startswith(f"training job {jid}: completed: overall accuracy") for line in lines), lines
    spec = json.loads((jobs.run_dir(ctx.settings, jid) / "spec.json").read_text())
    with session_scope(ctx.sessions) as s:
        frozen = {m.sop_instance_uid: m.split for m in s.scalars(select(CohortMember).where(CohortMember.cohort_id == cid))}
    for cls in ("CLeft", "CRight"):
        mine = [it for it in spec["items"] if it["class"] == cls]
        assert sum(it["split"] == "val" for it in mine) == 2  # 20 % of 10 training patients
        assert all(frozen[it["sop_instance_uid"]] == ("test" if it["split"] == "test" else "train") for it in mine)
    assert "val_fraction" not in spec["params"] and all("patient_key" not in it for it in spec["items"])
    job = _job(ctx, jid)
    assert all(h["val_accuracy"] is not None for h in job.history)
