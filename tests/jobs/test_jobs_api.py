"""The jobs API (GET /api/v1/jobs, /jobs/{id}, POST /jobs/{id}/cancel), and an API that runs no background work
(api_runs_jobs=false): its jobs wait in the queue until a `radcohort worker` process runs them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fastapi.testclient import TestClient

from app.api import create_app
from app.devtools.orthanc import free_port
from tests.conftest import _migrated_ctx, make_settings

ROOT = Path(__file__).resolve().parents[2]
RADCOHORT = str(Path(sys.executable).with_name("radcohort"))


def _node(client, name: str, port: int, ae: str = "ORTHANC") -> None:
    r = client.post("/api/v1/pacs-nodes", json={"name": name, "ae_title": ae, "host": "127.0.0.1", "port": port})
    assert r.status_code == 201, r.text


def _wait_job(client, job_id: int, timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while (body := client.get(f"/api/v1/jobs/{job_id}").json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, body
        time.sleep(0.2)
    return body


def test_jobs_are_listed_read_and_cancelled_through_the_api(client):
    _node(client, "dead", free_port())  # nothing listens: the probe fails on C-ECHO
    r = client.post("/api/v1/pacs-nodes/dead/probe")
    assert r.status_code == 202, r.text
    job_id = r.json()["probe"]["job_id"]
    body = _wait_job(client, job_id)
    assert body["kind"] == "probe" and body["queue"] == "probe" and body["target"] == "pacs_node:dead"
    assert body["status"] == "failed" and "C-ECHO" in body["error"] and body["attempts"] == 1
    assert body["payload"] == {"node": "dead"} and body["finished_at"] and body["runner"]
    assert client.get("/api/v1/pacs-nodes/dead/probe").json()["probe"]["status"] == "failed"

    listed = client.get("/api/v1/jobs", params={"kind": "probe"}).json()
    assert listed["total"] == 1 and [j["id"] for j in listed["items"]] == [job_id]
    assert client.get("/api/v1/jobs", params={"status": "succeeded"}).json()["total"] == 0
    assert client.get("/api/v1/jobs", params={"status": "nope"}).status_code == 422
    assert client.post(f"/api/v1/jobs/{job_id}/cancel").status_code == 409  # finished already
    assert client.get("/api/v1/jobs/999999").status_code == 404
    assert client.post("/api/v1/jobs/999999/cancel").status_code == 404


def test_an_api_without_background_work_leaves_jobs_queued_until_a_worker_runs_them(tmp_path, orthanc_factory):
    from tests.dicom.helpers import make_studies, upload_all

    settings = make_settings(tmp_path, api_runs_jobs=False)
    orthanc = orthanc_factory(modalities={"radcohort": (settings.ae_title, "127.0.0.1", settings.scp_port)})
    make_studies(tmp_path / "gen", ["20120101"], instances_per_series=1)
    upload_all(orthanc, sorted((tmp_path / "gen").iterdir()))
    for ctx in _migrated_ctx(settings):
        with TestClient(create_app(settings, ctx)) as client:
            _node(client, "pacs", orthanc.dicom_port, orthanc.aet)
            _node(client, "other", free_port())
            r = client.post("/api/v1/pacs-nodes/pacs/probe")
            assert r.status_code == 202 and r.json()["probe"]["status"] == "running", r.text
            job_id = r.json()["probe"]["job_id"]
            other = client.post("/api/v1/pacs-nodes/other/probe").json()["probe"]["job_id"]
            time.sleep(2.0)  # an API that ran jobs would have claimed both by now
            body = client.get(f"/api/v1/jobs/{job_id}").json()
            assert body["status"] == "queued" and body["attempts"] == 0 and body["runner"] is None
            assert "radcohort worker --queues probe" in body["note"]

            # a queued job is cancelled at once, and its node says so
            r = client.post(f"/api/v1/jobs/{other}/cancel")
            assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
            state = client.get("/api/v1/pacs-nodes/other/probe").json()["probe"]
            assert state["status"] == "failed" and "cancelled" in state["error"]

            env = {**os.environ, "RADCOHORT_DATABASE_URL": settings.database_url,
                   "RADCOHORT_DATA_DIR": str(settings.data_dir), "RADCOHORT_PSEUDONYM_KEY": "test-pseudonym-key",
                   "RADCOHORT_SCP_PORT": str(settings.scp_port)}
            log = open(tmp_path / "worker.log", "w")
            worker = subprocess.Popen([RADCOHORT, "worker", "--queues", "probe"], cwd=ROOT, env=env, stdout=log,
                                      stderr=subprocess.STDOUT)
            try:
                body = _wait_job(client, job_id, timeout=120)
                health = client.get("/health").json()["workers"]
            finally:
                worker.send_signal(signal.SIGTERM)
                worker.wait(60)
                log.close()
            text = (tmp_path / "worker.log").read_text()
            assert body["status"] == "succeeded" and body["attempts"] == 1, (body, text[-2000:])
            assert body["runner"] and body["runner"].split(":")[1] == str(worker.pid)  # the worker ran it
            probe = client.get("/api/v1/pacs-nodes/pacs/probe").json()
            assert probe["probe"]["status"] == "completed" and probe["capabilities"]["echo"]["ok"]
            assert health["alive"] == 1 and health["queues"] == ["probe"]
            assert f"job {job_id} (probe): succeeded" in text
            assert client.get(f"/api/v1/jobs/{other}").json()["status"] == "cancelled"  # never run


def test_worker_queues_option(tmp_path):
    """An unknown queue is refused by name; --once runs what is queued on its queues, then exits."""
    from app.db.base import session_scope
    from app.jobs.queue import enqueue
    from app.retrievals.nodes import create_node
    from app.retrievals.schemas import NodeIn

    settings = make_settings(tmp_path, dicom_timeout=2.0, dicom_retries=0)
    env = {**os.environ, "RADCOHORT_DATABASE_URL": settings.database_url, "RADCOHORT_DATA_DIR": str(settings.data_dir),
           "RADCOHORT_PSEUDONYM_KEY": "k", "RADCOHORT_DICOM_TIMEOUT": "2", "RADCOHORT_DICOM_RETRIES": "0"}
    bad = subprocess.run([RADCOHORT, "worker", "--queues", "probe,gpu"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "unknown gpu" in bad.stderr, bad.stderr
    for ctx in _migrated_ctx(settings):
        with session_scope(ctx.sessions) as s:
            create_node(s, NodeIn(name="dead", ae_title="DEAD", host="127.0.0.1", port=free_port()), "test")
            probe = enqueue(s, "probe", {"node": "dead"}, target="pacs_node:dead").id
            export = enqueue(s, "export", {"export_id": 1}, target="export:1").id
        done = subprocess.run([RADCOHORT, "worker", "--queues", "probe", "--once"], env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"job {probe} (probe): failed: no answer to C-ECHO" in done.stdout
        from app.db.models import Job

        with ctx.sessions() as s:
            assert s.get(Job, probe).status == "failed" and s.get(Job, export).status == "queued"  # not its queue
