"""Probes, cohort pulls, exports, worklist resolves and retrievals are durable jobs: with an API that runs no
background work they wait queued (their own answers unchanged), a cancel of a queued job settles the kind's
own row, and a runner (the one `radcohort worker` runs) carries them out."""

from __future__ import annotations

import socket
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from app.api import create_app
from app.db.base import session_scope
from app.db.models import Cohort, Job, Retrieval, utcnow
from app.devtools.orthanc import free_port
from app.jobs.runner import JobRunner
from tests.conftest import _migrated_ctx, make_settings


@pytest.fixture
def quiet_api(tmp_path):
    """(client, ctx) of an API that runs no jobs, a node 'dead' where nothing listens; fast DICOM failures."""
    settings = make_settings(tmp_path, api_runs_jobs=False, dicom_timeout=3.0, dicom_retries=0,
                             arrival_timeout=2.0)
    for ctx in _migrated_ctx(settings):
        with TestClient(create_app(settings, ctx)) as client:
            r = client.post("/api/v1/pacs-nodes", json={"name": "dead", "ae_title": "DEAD", "host": "127.0.0.1",
                                                        "port": free_port()})
            assert r.status_code == 201, r.text
            yield client, ctx


def _jobs(client, kind: str) -> list[dict]:
    return client.get("/api/v1/jobs", params={"kind": kind}).json()["items"]


def _run(ctx, *queues: str) -> None:
    JobRunner(ctx, list(queues), poll=0.05).run_until_idle(timeout=120)


def test_a_cohort_pull_is_a_job_its_id_the_jobs(quiet_api):
    client, ctx = quiet_api
    body = {"node": "dead", "taxonomy": "xr10", "per_class": 5, "study_date": "20120101-20121231"}
    first = client.post("/api/v1/cohorts/pull", json=body)
    assert first.status_code == 202 and first.json()["status"] == "queued", first.text
    pid = first.json()["id"]
    assert [j["id"] for j in _jobs(client, "cohort_pull")] == [pid]
    assert client.post(f"/api/v1/jobs/{pid}/cancel").json()["status"] == "cancelled"
    assert client.get(f"/api/v1/cohorts/pulls/{pid}").json()["status"] == "cancelled"

    second = client.post("/api/v1/cohorts/pull", json=body).json()["id"]
    _run(ctx, "cohort")
    pull = client.get(f"/api/v1/cohorts/pulls/{second}").json()
    # the PACS does not answer: the pull ends partial with the reason, as before it was a job
    assert pull["status"] == "partial" and pull["report"]["stopped"] == "find_failed" and "C-FIND" in pull["error"]
    assert client.get(f"/api/v1/jobs/{second}").json()["status"] == "succeeded"
    assert client.get(f"/api/v1/cohorts/pulls/{second + 100}").status_code == 404


def test_a_worklist_resolve_is_a_job(quiet_api):
    client, ctx = quiet_api
    data = b"StudyInstanceUID\n1.2.3.4\n1.2.3.5\n"
    wl = client.post("/api/v1/worklists", files={"file": ("w.csv", data)}).json()
    assert client.post(f"/api/v1/worklists/{wl['id']}/resolve", json={"node": "dead"}).status_code == 202
    job = _jobs(client, "worklist_resolve")[0]
    assert job["status"] == "queued" and job["payload"] == {"worklist_id": wl["id"]}
    assert client.get(f"/api/v1/worklists/{wl['id']}").json()["status"] == "resolving"
    assert client.post(f"/api/v1/jobs/{job['id']}/cancel").status_code == 200
    got = client.get(f"/api/v1/worklists/{wl['id']}").json()
    assert got["status"] == "failed" and "cancelled" in got["error"]  # not left 'resolving' forever

    assert client.post(f"/api/v1/worklists/{wl['id']}/resolve", json={"node": "dead"}).status_code == 202
    _run(ctx, "worklist")
    got = client.get(f"/api/v1/worklists/{wl['id']}").json()
    assert got["status"] == "resolved" and got["counts"] == {"refused": 2}
    assert [j["status"] for j in _jobs(client, "worklist_resolve")] == ["succeeded", "cancelled"]


def test_an_export_is_a_job_and_a_cancelled_one_says_so(quiet_api):
    from app.exports import service

    client, ctx = quiet_api
    with session_scope(ctx.sessions) as s:
        cohort = Cohort(taxonomy_name="t", taxonomy={"classes": []}, seed=0, params={}, summary={}, excluded={})
        s.add(cohort)
        s.flush()
        exp = service.create_export(s, cohort.id, {"format": "png"}, actor="test")
        # as if the process that created it had stopped: its queued job still runs it, so not 'interrupted'
        exp.report = {"runner": f"{socket.gethostname()}:{2**22 + 12345}"}
        job_id = service.queue_export(s, exp.id, "test")
        export_id = exp.id
    assert client.get(f"/api/v1/exports/{export_id}").json()["status"] == "queued"
    assert client.post(f"/api/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    got = client.get(f"/api/v1/exports/{export_id}").json()
    assert got["status"] == "cancelled" and got["error"] == "cancelled before it started"


def test_a_retrieval_is_a_job_and_one_nobody_runs_is_queued_again(quiet_api):
    from app.retrievals.service import queue_orphans

    client, ctx = quiet_api
    r = client.post("/api/v1/retrievals", json={"node": "dead", "query": {"StudyDate": "20120101"}})
    assert r.status_code == 202 and r.json()["status"] == "queued", r.text
    rid = r.json()["id"]
    (job,) = _jobs(client, "retrieval")
    assert job["payload"] == {"retrieval_id": rid} and "StudyDate" not in str(job)  # the query stays on its row
    assert client.post(f"/api/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
    assert client.get(f"/api/v1/retrievals/{rid}").json()["status"] == "cancelled"

    assert client.post(f"/api/v1/retrievals/{rid}/retry").status_code == 202
    _run(ctx, "retrieval")
    got = client.get(f"/api/v1/retrievals/{rid}").json()
    assert got["status"] == "failed" and got["error"]
    newest = _jobs(client, "retrieval")[0]
    assert newest["status"] == "failed" and newest["error"] == got["error"]

    # a retrieval whose process stopped before a job existed for it (a CLI run): queued again, once
    with session_scope(ctx.sessions) as s:
        s.execute(update(Retrieval).where(Retrieval.id == rid).values(
            status="running", runner_id="gone:1:x", heartbeat_at=utcnow() - timedelta(hours=1)))
    assert queue_orphans(ctx) == [rid]
    assert queue_orphans(ctx) == []  # its job is queued: not twice
    with ctx.sessions() as s:
        assert s.scalar(select(Job.status).where(Job.target == f"retrieval:{rid}").order_by(Job.id.desc())) == "queued"


def test_a_probe_waiting_for_a_worker_is_not_judged_interrupted_by_its_age(quiet_api):
    from datetime import datetime, timezone

    from app.db.models import PacsNode

    client, ctx = quiet_api
    job_id = client.post("/api/v1/pacs-nodes/dead/probe").json()["probe"]["job_id"]
    with session_scope(ctx.sessions) as s:
        node = s.scalar(select(PacsNode).where(PacsNode.name == "dead"))
        long_ago = (datetime.now(timezone.utc) - timedelta(hours=1)).isoformat()
        node.options = {**node.options, "probe": {**node.options["probe"], "started_at": long_ago}}
    state = client.get("/api/v1/pacs-nodes/dead/probe").json()["probe"]
    assert state["status"] == "running" and state["job_id"] == job_id  # queued: its job ends it, not its age
    _run(ctx, "probe")
    state = client.get("/api/v1/pacs-nodes/dead/probe").json()["probe"]
    assert state["status"] == "failed" and "C-ECHO" in state["error"]


def test_a_pulls_cancel_also_cancels_its_running_retrieval(quiet_api):
    from app.jobs import queue as q

    client, ctx = quiet_api
    rid = client.post("/api/v1/retrievals", json={"node": "dead", "query": {"StudyDate": "20120101"}}).json()["id"]
    pid = client.post("/api/v1/cohorts/pull", json={"node": "dead", "taxonomy": "xr10", "per_class": 5}).json()["id"]
    with session_scope(ctx.sessions) as s:  # as its runner has it: running, inside retrieval `rid`
        job = q.claim_next(s, "here:1:x", "cohort", stale_after=30)
        assert job.id == pid
        q.set_progress(s, pid, "here:1:x", job.attempts, {"current_retrieval": rid})
    r = client.post(f"/api/v1/jobs/{pid}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "running" and r.json()["cancel_requested"]
    assert client.get(f"/api/v1/retrievals/{rid}").json()["status"] == "cancelled"
