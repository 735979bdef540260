"""Scale-out on PostgreSQL: two stateless API processes (RADCOHORT_API_RUNS_JOBS=false) queue probes, two
`radcohort worker --queues probe` processes run them; every job runs once, on a worker, never on an API."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from app.devtools.orthanc import free_port
from tests.conftest import make_settings
from tests.dicom.helpers import make_studies, upload_all

ROOT = Path(__file__).resolve().parents[2]
RADCOHORT = str(Path(sys.executable).with_name("radcohort"))
PROBES = 8


def _start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([RADCOHORT, *args], cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def test_two_apis_and_two_workers_on_postgresql_run_each_job_once(tmp_path, pg_database, orthanc_factory):
    from app.db.migrate import upgrade

    settings = make_settings(tmp_path, pg_database)
    upgrade(settings.database_url)
    # Orthanc knows our AE as a move destination (else the probe's test move waits out its timeouts)
    orthanc = orthanc_factory(modalities={"radcohort": (settings.ae_title, "127.0.0.1", settings.scp_port)})
    make_studies(tmp_path / "gen", ["20120101"], instances_per_series=1)
    upload_all(orthanc, sorted((tmp_path / "gen").iterdir()))
    env = {**os.environ, "RADCOHORT_DATABASE_URL": settings.database_url, "RADCOHORT_DATA_DIR": str(settings.data_dir),
           "RADCOHORT_PSEUDONYM_KEY": "k", "RADCOHORT_API_RUNS_JOBS": "false", "RADCOHORT_LOG_LEVEL": "WARNING"}
    ports = [free_port(), free_port()]
    procs: list[subprocess.Popen] = []
    try:
        for i, port in enumerate(ports):
            procs.append(_start(["serve", "--no-scp", "--port", str(port)], env, tmp_path / f"api{i}.log"))
        workers = [_start(["worker", "--queues", "probe"], env, tmp_path / f"worker{i}.log") for i in range(2)]
        procs += workers
        apis = [httpx.Client(base_url=f"http://127.0.0.1:{p}", timeout=30) for p in ports]
        deadline = time.monotonic() + 90
        for api in apis:
            while True:
                try:
                    if api.get("/health").json()["workers"]["alive"] == 2:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
                    "\n".join(f.read_text()[-1500:] for f in tmp_path.glob("*.log"))
                time.sleep(0.3)
        job_ids = []
        for k in range(PROBES):
            api = apis[k % 2]  # the requests alternate between the two APIs
            r = api.post("/api/v1/pacs-nodes", json={"name": f"pacs{k}", "ae_title": orthanc.aet,
                                                      "host": "127.0.0.1", "port": orthanc.dicom_port})
            assert r.status_code == 201, r.text
            r = api.post(f"/api/v1/pacs-nodes/pacs{k}/probe")
            assert r.status_code == 202, r.text
            job_ids.append(r.json()["probe"]["job_id"])
        deadline = time.monotonic() + 180
        while True:
            jobs = [apis[0].get(f"/api/v1/jobs/{j}").json() for j in job_ids]
            if all(j["status"] not in ("queued", "running") for j in jobs):
                break
            assert time.monotonic() < deadline, jobs
            time.sleep(0.5)
        probes = [apis[1].get(f"/api/v1/pacs-nodes/pacs{k}/probe").json()["probe"] for k in range(PROBES)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
    logs = {f.name: f.read_text() for f in tmp_path.glob("*.log")}
    assert [j["status"] for j in jobs] == ["succeeded"] * PROBES, (jobs, logs)
    assert all(j["attempts"] == 1 for j in jobs)  # claimed once each: no double work, no takeover
    pids = {str(w.pid) for w in workers}
    assert {j["runner"].split(":")[1] for j in jobs} <= pids  # run by the workers, not the APIs
    for j in job_ids:  # each worker's console names the jobs it ran: every job once in all
        assert sum(text.count(f"job {j} (probe): succeeded") for name, text in logs.items()
                   if name.startswith("worker")) == 1
    assert [p["status"] for p in probes] == ["completed"] * PROBES
