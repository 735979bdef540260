"""`radcohort train`, `jobs list|follow|cancel`, `models list`: validated as the API validates, readable
errors (field: message, no pydantic URL), follow's exit code by status. No torch (no worker runs)."""

from __future__ import annotations

from typer.testing import CliRunner

from app.cli import cli
from app.db.base import session_scope
from app.db.models import TrainedModel, TrainingJob
from app.training import jobs
from tests.factories.training import make_tiny_cohort


def _env(ctx, monkeypatch) -> None:
    monkeypatch.setenv("RADCOHORT_DATABASE_URL", ctx.settings.database_url)
    monkeypatch.setenv("RADCOHORT_DATA_DIR", str(ctx.settings.data_dir))
    monkeypatch.setenv("RADCOHORT_PSEUDONYM_KEY", "k")


def test_train_validates_queues_lists_and_cancels(ctx, monkeypatch):
    _env(ctx, monkeypatch)
    with session_scope(ctx.sessions) as s:
        cid = make_tiny_cohort(s, ctx.settings, per_class=6, size=16)
    run = CliRunner().invoke
    r = run(cli, ["train", str(cid), "--epochs", "0", "--model", "Res Net"])
    assert r.exit_code == 2
    assert "epochs: Input should be greater than or equal to 1" in r.output and "model: " in r.output
    assert "pydantic" not in r.output and "https://" not in r.output
    r = run(cli, ["train", str(cid), "--model", "resnet81"])
    assert r.exit_code == 2 and "model: unknown model 'resnet81'" in r.output and "resnet18" in r.output
    r = run(cli, ["train", "999"])
    assert r.exit_code == 2 and "cohort 999 not found" in r.output
    r = run(cli, ["train", str(cid), "--model", "resnet10t", "--epochs", "2", "--image-size", "64",
                  "--experiment", "rotate90"])
    assert r.exit_code == 0, r.output
    assert "training job 1 queued; no worker is running: start `radcohort worker`" in r.output
    with session_scope(ctx.sessions) as s:
        job = jobs.get_job(s, 1)
        assert job.params["experiments"] == ["rotate90"] and job.params["image_size"] == 64
        assert job.params["epochs"] == 2 and job.params["val_fraction"] == 0.1
    r = run(cli, ["jobs", "list"])
    assert r.exit_code == 0 and "1 job(s)" in r.output and "queued" in r.output and "resnet10t" in r.output
    r = run(cli, ["jobs", "follow", "1", "--timeout", "1", "--poll", "0.2"])
    assert r.exit_code == 4 and "no worker is running" in r.output  # says why it is not moving
    r = run(cli, ["jobs", "cancel", "1"])
    assert r.exit_code == 0 and "training job 1: cancelled" in r.output
    r = run(cli, ["jobs", "follow", "1"])
    assert r.exit_code == 3  # cancelled
    r = run(cli, ["jobs", "cancel", "1"])
    assert r.exit_code == 2 and "already cancelled" in r.output


def test_follow_prints_epochs_and_the_per_class_table_of_a_finished_job(ctx, monkeypatch):
    _env(ctx, monkeypatch)
    with session_scope(ctx.sessions) as s:
        cid = make_tiny_cohort(s, ctx.settings, per_class=6, size=16)
        metrics = {"overall_accuracy": 75.0, "per_class": [
            {"class": "CLeft", "n": 2, "correct": 2, "accuracy": 100.0, "confidence_mean": 0.9, "confidence_sd": 0.01},
            {"class": "CRight", "n": 2, "correct": 1, "accuracy": 50.0, "confidence_mean": 0.7, "confidence_sd": None}]}
        history = [{"epoch": e, "loss": 1.0 / e, "train_accuracy": 50.0 + e, "val_accuracy": 40.0 + e,
                    "images_per_second": 100.0} for e in (1, 2)]
        done = TrainingJob(cohort_id=cid, status="completed", params={"model": "resnet10t"}, epochs=2, epoch=2,
                           history=history, metrics=metrics)
        failed = TrainingJob(cohort_id=cid, status="failed", params={}, error="ValueError: boom")
        s.add_all([done, failed])
        s.flush()
        s.add(TrainedModel(job_id=done.id, architecture="resnet10t", classes=["CLeft", "CRight"], path="x",
                           card={"metrics": {"overall_accuracy": 75.0}}))
        ids = (done.id, failed.id)
    run = CliRunner().invoke
    r = run(cli, ["jobs", "follow", str(ids[0])])
    assert r.exit_code == 0, r.output
    assert "epoch 1/2  loss 1.0000  train acc 51.0%  val acc 41.0%  100 img/s" in r.output
    assert "epoch 2/2" in r.output and "CRight      2       1       50.0  0.700 ± -" in r.output
    assert "overall accuracy: 75.0 %" in r.output
    r = run(cli, ["jobs", "follow", str(ids[1])])
    assert r.exit_code == 1 and "error: ValueError: boom" in r.output
    r = run(cli, ["models", "list"])
    assert r.exit_code == 0 and "1 model(s)" in r.output and "resnet10t" in r.output and "75.0%" in r.output
    r = run(cli, ["models", "list", "--architectures"])
    assert r.exit_code == 0 and "(built-in)" in r.output and "resnet10t" in r.output


def test_version_and_no_bool_placeholders_in_help():
    run = CliRunner().invoke
    r = run(cli, ["--version"])
    assert r.exit_code == 0 and r.output.startswith("radcohort ")
    for args in (["worker", "--help"], ["train", "--help"], ["cohort", "create", "--help"], ["serve", "--help"]):
        r = run(cli, args)
        assert r.exit_code == 0 and "<bool>" not in r.output, args
