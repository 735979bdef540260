"""Batch scoring through the real worker and its child (CPU): every indexed radiograph scored once, the same
answer as a single-image prediction, undecodable files and out-of-domain images recorded, a stale job resumed
after its cursor, cancel, a lost claim writing nothing, and a deleted model taking its scores along."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import func, select

from app.db.base import session_scope
from app.db.models import Cohort, InstanceScore, ScoringJob, TrainedModel, TrainingJob
from app.labels.service import make_labeler
from tests.factories.index_rows import add_index_rows
from app.training import jobs, scoring
from tests.factories.training import write_tiny_dicom

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
from models.predict import Classifier  # noqa: E402
from models.registry import build_model  # noqa: E402
from app.training.worker import Worker  # noqa: E402

pytestmark = pytest.mark.worker
CLASSES = ["CLeft", "CRight"]


def fake_model(ctx, *, arch: str = "resnet10t", image_size: int = 32, classes=CLASSES, seed: int = 0) -> int:
    """A registered model with a real (untrained, seeded) checkpoint, on a cohort whose classes are knees."""
    torch.manual_seed(seed)
    net = build_model(arch, len(classes))
    with session_scope(ctx.sessions) as s:
        cohort = Cohort(taxonomy_name="tiny", taxonomy={"name": "tiny", "classes": [
            {"name": c, "where": {"body_part": "KNEE"}} for c in classes]}, summary={})
        s.add(cohort)
        s.flush()
        job = TrainingJob(cohort_id=cohort.id, status="completed", params={}, metrics={"overall_accuracy": 0})
        s.add(job)
        s.flush()
        rd = ctx.settings.runs_dir / f"job-{job.id}"
        rd.mkdir(parents=True)
        torch.save({"model": net.state_dict(), "classes": list(classes), "arch": {"model": arch, "depth": None},
                    "image_size": image_size, "normalize": {"mean": 0.5, "std": 0.25}}, rd / "model.pt")
        m = TrainedModel(job_id=job.id, architecture=arch, classes=list(classes), path=f"runs/job-{job.id}/model.pt",
                         card={"cohort_id": cohort.id})
        s.add(m)
        s.flush()
        return m.id


def index_images(ctx, n: int, *, size: int = 32, extra: bool = True) -> dict[str, dict]:
    """n CR knees in the store and the index (labelled), plus, with `extra`, a DX chest (scored, outside the
    domain), a CT (not scored) and an undecodable CR file. Returns uid -> record."""
    recs = []
    for i in range(n):
        rel = f"score/{i}.dcm"
        uid = write_tiny_dicom(ctx.settings.store_dir / rel, ("left", "right")[i % 2], size=size, seed=i)
        recs.append({"patient_id": f"P{i}", "sop_instance_uid": uid, "file_path": rel, "modality": "CR",
                     "body_part_examined": "KNEE"})
    if extra:
        for name, modality, part in (("chest", "DX", "CHEST"), ("ct", "CT", "KNEE")):
            rel = f"score/{name}.dcm"
            uid = write_tiny_dicom(ctx.settings.store_dir / rel, "top", size=size, seed=999)
            recs.append({"patient_id": name, "sop_instance_uid": uid, "file_path": rel, "modality": modality,
                         "body_part_examined": part})
        rel = "score/broken.dcm"
        (ctx.settings.store_dir / rel).write_bytes(b"not a DICOM file\n" * 20)
        recs.append({"patient_id": "broken", "sop_instance_uid": "1.2.3.4.5.6.7", "file_path": rel,
                     "modality": "CR", "body_part_examined": "KNEE"})
    with session_scope(ctx.sessions) as s:
        add_index_rows(s, recs, make_labeler(s))
    return {r["sop_instance_uid"]: r for r in recs}


def _queue(ctx, model_id: int, **kw) -> int:
    with session_scope(ctx.sessions) as s:
        return scoring.create_job(s, ctx.settings, model_id, "test", **kw).id


def _job(ctx, job_id: int) -> ScoringJob:
    with session_scope(ctx.sessions) as s:
        return s.get(ScoringJob, job_id)


def _scores(ctx, model_id: int) -> dict[str, InstanceScore]:
    with session_scope(ctx.sessions) as s:
        rows = s.scalars(select(InstanceScore).where(InstanceScore.model_id == model_id))
        return {r.sop_instance_uid: r for r in rows}


def test_every_radiograph_is_scored_like_a_single_prediction(any_ctx):
    ctx = any_ctx
    mid = fake_model(ctx)
    recs = index_images(ctx, 70)
    jid = _queue(ctx, mid, batch_size=16)
    outcomes = Worker(ctx, poll=0.1, tick=0.2).run(once=True)
    assert [(o.job_id, o.status, o.kind) for o in outcomes] == [(jid, "completed", "scoring")]
    job = _job(ctx, jid)
    assert (job.status, job.total, job.done, job.failed) == ("completed", 72, 72, 1), job.error
    assert job.progress["out_of_domain"] == 1 and job.progress["images_per_second"] > 0
    scores = _scores(ctx, mid)
    ct = next(u for u, r in recs.items() if r["modality"] == "CT")
    assert set(scores) == set(recs) - {ct}  # every CR/DX instance once, the CT not at all
    broken = scores["1.2.3.4.5.6.7"]
    assert broken.predicted_class is None and broken.confidence is None and "DICOM" in broken.error
    chest = next(s for u, s in scores.items() if recs[u]["body_part_examined"] == "CHEST")
    assert chest.in_domain is False and chest.predicted_class in CLASSES
    assert all(s.in_domain for u, s in scores.items() if recs[u]["body_part_examined"] == "KNEE"
               and u != "1.2.3.4.5.6.7")
    # the batch path answers what a single-image prediction answers
    with session_scope(ctx.sessions) as s:
        clf = Classifier(ctx.settings.data_dir / s.get(TrainedModel, mid).path)
    for uid in list(scores)[:10]:
        if scores[uid].error:
            continue
        single = clf.predict_file(ctx.settings.store_dir / recs[uid]["file_path"])
        assert single["class"] == scores[uid].predicted_class
        assert single["confidence"] == pytest.approx(scores[uid].confidence, abs=1e-5)
    # a second job replaces the first one's rows (one row per model and instance)
    jid2 = _queue(ctx, mid)
    Worker(ctx, poll=0.1, tick=0.2).run(once=True)
    again = _scores(ctx, mid)
    assert len(again) == len(scores) and {s.job_id for s in again.values()} == {jid2}


def test_a_stale_job_resumes_after_its_cursor(ctx):
    mid = fake_model(ctx)
    index_images(ctx, 30, extra=False)
    jid = _queue(ctx, mid)
    with session_scope(ctx.sessions) as s:  # a worker claimed it, wrote its first 10 and vanished
        from app.db.models import Instance

        ids = list(s.scalars(select(Instance.id).order_by(Instance.id)))
        assert jobs.claim_next(s, "dead-worker", table=ScoringJob).id == jid
        owned, _ = scoring.write_batch(s, jid, "dead-worker", mid, [], cursor=ids[9], done=10, failed=0,
                                       progress={"out_of_domain": 0})
        assert owned
    with session_scope(ctx.sessions) as s:
        assert jobs.claim_next(s, "other", table=ScoringJob) is None  # its heartbeat is fresh
    time.sleep(1)
    outcomes = Worker(ctx, poll=0.1, tick=0.2, stale_after=0.5).run(once=True)
    assert [(o.job_id, o.status) for o in outcomes] == [(jid, "completed")]
    job = _job(ctx, jid)
    assert (job.status, job.attempts, job.total, job.done) == ("completed", 2, 30, 30)
    # only what came after the cursor was scored by the second attempt
    assert len(_scores(ctx, mid)) == 20


def test_cancel_stops_a_running_job_after_its_batch(ctx):
    mid = fake_model(ctx, arch="resnet18", image_size=192)
    index_images(ctx, 400, extra=False)
    jid = _queue(ctx, mid, batch_size=4)
    worker = Worker(ctx, poll=0.1, tick=0.2)
    out: list = []
    t = threading.Thread(target=lambda: out.extend(worker.run(once=True)), daemon=True)
    t.start()
    end = time.monotonic() + 120
    while _job(ctx, jid).done == 0 and time.monotonic() < end:
        time.sleep(0.1)
    assert _job(ctx, jid).done > 0, _job(ctx, jid).error
    with session_scope(ctx.sessions) as s:
        assert scoring.cancel_job(s, mid, "test").status == "running"
    t.join(60)
    assert not t.is_alive(), "the scoring job did not stop after cancel"
    assert [(o.job_id, o.status) for o in out] == [(jid, "cancelled")]
    job = _job(ctx, jid)
    assert job.status == "cancelled" and 0 < job.done < 400
    assert len(_scores(ctx, mid)) == job.done  # what was written stays, and matches the progress
    with session_scope(ctx.sessions) as s, pytest.raises(Exception, match="already cancelled"):
        scoring.cancel_job(s, mid, "test")


def test_a_worker_that_lost_its_claim_writes_nothing(any_ctx):
    ctx = any_ctx
    mid = fake_model(ctx)
    jid = _queue(ctx, mid)
    row = {"sop_instance_uid": "1.2.3", "predicted_class": "CLeft", "confidence": 0.9, "in_domain": True,
           "error": None}
    with session_scope(ctx.sessions) as s:
        assert jobs.claim_next(s, "w1", table=ScoringJob).id == jid
    with session_scope(ctx.sessions) as s:
        assert scoring.write_batch(s, jid, "w2", mid, [row], cursor=5, done=1, failed=0, progress={}) == (False, False)
    assert _scores(ctx, mid) == {}
    with session_scope(ctx.sessions) as s:
        assert scoring.write_batch(s, jid, "w1", mid, [row], cursor=5, done=1, failed=0, progress={}) == (True, False)
    assert _scores(ctx, mid)["1.2.3"].predicted_class == "CLeft"
    with session_scope(ctx.sessions) as s:  # the same instance again: replaced, not duplicated
        scoring.write_batch(s, jid, "w1", mid, [{**row, "predicted_class": "CRight"}], cursor=6, done=2, failed=0,
                            progress={})
    assert [s.predicted_class for s in _scores(ctx, mid).values()] == ["CRight"]


def test_deleting_a_model_takes_its_scores_and_jobs(any_ctx):
    ctx = any_ctx
    from app.training.predict import delete_model

    mid = fake_model(ctx)
    with session_scope(ctx.sessions) as s:
        path = ctx.settings.data_dir / s.get(TrainedModel, mid).path
    jid = _queue(ctx, mid)
    with session_scope(ctx.sessions) as s:
        jobs.claim_next(s, "w1", table=ScoringJob)
        scoring.write_batch(s, jid, "w1", mid, [{"sop_instance_uid": "1.2.3", "predicted_class": "CLeft",
                                                 "confidence": 0.9, "in_domain": True, "error": None}],
                            cursor=1, done=1, failed=0, progress={})
    with session_scope(ctx.sessions) as s:
        delete_model(s, ctx.settings, mid)
    with session_scope(ctx.sessions) as s:
        assert s.scalar(select(func.count()).select_from(InstanceScore)) == 0
        assert s.scalar(select(func.count()).select_from(ScoringJob)) == 0
        # the worker that was running it lost it: its next write is refused
        assert scoring.write_batch(s, jid, "w1", mid, [], cursor=2, done=2, failed=0, progress={}) == (False, False)
    assert not path.exists()


_POISON: dict = {}


def _crashing_decode(task):
    """Stands in for a codec that crashes its process on one hostile file (inherited by the forked pool)."""
    import os

    from app.training import score_run as child

    if task[0] == _POISON.get("path"):
        os._exit(139)
    return child._real_decode(task)


def test_a_decoder_crash_costs_one_image_not_the_job(ctx, monkeypatch):
    from app.training import score_run as child

    mid = fake_model(ctx)
    recs = index_images(ctx, 40, extra=False)
    poison = sorted(recs)[7]
    _POISON["path"] = str(ctx.settings.store_dir.resolve() / recs[poison]["file_path"])
    monkeypatch.setattr(child, "_real_decode", child._decode, raising=False)
    monkeypatch.setattr(child, "_decode", _crashing_decode)
    jid = _queue(ctx, mid, batch_size=8)
    with session_scope(ctx.sessions) as s:
        job = scoring.claim_next(s, "w1")
        spec = scoring.build_spec(s, ctx.settings, job, "w1")
    spec["workers"] = 2
    assert child.run(spec, ctx.settings.database_url) == child.EXIT_OK
    scores = _scores(ctx, mid)
    assert len(scores) == 40 and scores[poison].error == child._Decoder.CRASHED
    assert all(s.predicted_class for u, s in scores.items() if u != poison)  # the images it broke were redone
    job = _job(ctx, jid)
    assert (job.done, job.failed) == (40, 1)
