"""`radcohort worker` killed with SIGKILL in the middle of an export: a second worker takes the job over once
its lease is stale and finishes the export; the archive is whole and the export is audited done once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import select

from app.api import create_app
from app.db.models import AuditEvent
from app.index.ingest import index_directory
from app.labels.service import load_labeler
from app.synth.generate import generate
from tests.conftest import _migrated_ctx, make_settings

ROOT = Path(__file__).resolve().parents[2]
RADCOHORT = str(Path(sys.executable).with_name("radcohort"))


def _worker(env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([RADCOHORT, "worker", "--queues", "export"], cwd=ROOT, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def test_a_worker_killed_mid_export_is_taken_over_and_the_export_finishes(tmp_path):
    settings = make_settings(tmp_path, api_runs_jobs=False)
    env = {**os.environ, "RADCOHORT_DATABASE_URL": settings.database_url, "RADCOHORT_DATA_DIR": str(settings.data_dir),
           "RADCOHORT_PSEUDONYM_KEY": "test-pseudonym-key", "RADCOHORT_JOBS_HEARTBEAT_S": "0.3",
           "RADCOHORT_JOBS_STALE_S": "2"}
    for ctx in _migrated_ctx(settings):
        generate(settings.store_dir / "syn", per_class=2, seed=7, taxonomy="xr10", size="64x64", workers=1,
                 syntaxes=["explicit"])
        (settings.store_dir / "syn" / "truth.csv").unlink()
        index_directory(ctx, labeler=load_labeler(ctx.sessions, None))
        with TestClient(create_app(settings, ctx)) as client:
            cohort = client.post("/api/v1/cohorts", json={"taxonomy": "xr10", "split": {"train": 0.5, "test": 0.5},
                                                           "seed": 1}).json()
            # large PNGs: each image takes a while to write, so the kill lands mid-export
            exp = client.post(f"/api/v1/cohorts/{cohort['id']}/exports",
                              json={"format": "png", "image_size": 4096}).json()
            job = client.get("/api/v1/jobs", params={"kind": "export"}).json()["items"][0]
            assert job["status"] == "queued" and exp["status"] == "queued"

            first = _worker(env, tmp_path / "a.log")
            second = None
            try:
                deadline = time.monotonic() + 120
                while client.get(f"/api/v1/exports/{exp['id']}").json()["progress"]["done"] < 3:
                    assert time.monotonic() < deadline and first.poll() is None, (tmp_path / "a.log").read_text()
                    time.sleep(0.05)
                first.send_signal(signal.SIGKILL)
                first.wait(30)
                at_kill = client.get(f"/api/v1/exports/{exp['id']}").json()
                assert at_kill["status"] == "running" and at_kill["progress"]["done"] < at_kill["progress"]["total"]
                assert client.get(f"/api/v1/jobs/{job['id']}").json()["status"] == "running"  # a dead holder's lease

                second = _worker(env, tmp_path / "b.log")
                deadline = time.monotonic() + 240
                while (got := client.get(f"/api/v1/exports/{exp['id']}").json())["status"] in ("queued", "running"):
                    assert time.monotonic() < deadline and second.poll() is None, (tmp_path / "b.log").read_text()
                    time.sleep(0.2)
            finally:
                for p in (first, second):
                    if p is not None and p.poll() is None:
                        p.send_signal(signal.SIGTERM)
                        p.wait(60)
            done = client.get(f"/api/v1/jobs/{job['id']}").json()
            assert got["status"] == "done" and done["status"] == "succeeded" and done["attempts"] == 2, (got, done)
            assert done["runner"].split(":")[1] == str(second.pid)
            archive = client.get(f"/api/v1/exports/{exp['id']}/download")
            assert archive.status_code == 200
            (tmp_path / "x.zip").write_bytes(archive.content)
            names = zipfile.ZipFile(tmp_path / "x.zip").namelist()
            assert sum(n.endswith(".png") for n in names) == got["exported"] > 0
        with ctx.sessions() as s:
            actions = list(s.scalars(select(AuditEvent.action).where(AuditEvent.target.in_(
                [f"export:{exp['id']}", f"job:{job['id']}"]))))
        assert actions.count("export.done") == 1 and actions.count("job.takeover") == 1
