"""The README's API walk-through, run literally: from nothing to per-class metrics.

The blocks marked `<!-- walkthrough -->` in README.md run in order in one bash, in an empty directory,
as a reader would type them; a block marked `<!-- walkthrough: background -->` (a terminal of its own in
the README: `radcohort serve`, `radcohort worker`) runs in the background. Only the ports differ, through
the variables the README itself exports (RADCOHORT_API_PORT, RADCOHORT_SCP_PORT, PACS_PORT). Real
processes throughout: the README's sandbox Orthanc, `radcohort serve`, `radcohort worker`, curl.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from app.devtools.orthanc import free_port, orthanc_binary

sys.path.insert(0, str(Path(__file__).parent))
from walkthrough import blocks, script  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.worker, pytest.mark.orthanc]
pytest.importorskip("torch")
pytest.importorskip("timm")

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
XR10 = ["W", "Ps", "LtE", "RtE", "LtK", "RtK", "C20F", "C20M", "C60F", "C60M"]


def test_readme_marks_the_whole_walk_through():
    """Every step from the PACS to the metrics is in a marked block (nothing a reader needs is skipped)."""
    code = "\n".join(c for _bg, c in blocks(README))
    for needle in ("radcohort sandbox-pacs --port", "radcohort synth", "radcohort seed", "radcohort serve",
                   "radcohort worker", "/api/v1/pacs-nodes", "/api/v1/retrievals", '"ModalitiesInStudy": "CR\\\\DX"',
                   "label_body_part=", "/api/v1/cohorts", "/api/v1/training-jobs", "radcohort jobs follow 1",
                   "/metrics", "/predict", "radcohort sandbox-pacs --stop"):
        assert needle in code, needle
    assert [bg for bg, _c in blocks(README)].count(True) == 2  # serve and worker, each in its own terminal


def _env(api: int, scp: int, pacs: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADCOHORT_")}  # a reader's defaults
    env.update(RADCOHORT_API_PORT=str(api), RADCOHORT_SCP_PORT=str(scp), PACS_PORT=str(pacs),
               PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2")
    # appended, as .ci/common.sh does: the venv's console scripts (radcohort) after the system's tools
    env["PATH"] = f"{env.get('PATH', '')}:{Path(sys.executable).parent}"
    return env


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM what the walk-through left running (serve, worker), SIGKILL what does not stop."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def test_readme_walkthrough_reaches_per_class_metrics(tmp_path):
    if not orthanc_binary():
        pytest.fail("Orthanc is not installed: run .ci/test or `apt-get install orthanc`")
    api, scp, pacs = free_port(), free_port(), free_port()
    work = tmp_path / "walk"
    work.mkdir()
    (work / "walkthrough.sh").write_text(script(README))
    env = _env(api, scp, pacs)
    t0 = time.monotonic()
    with open(work / "out.log", "wb") as out:
        proc = subprocess.Popen(["bash", "walkthrough.sh"], cwd=work, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        try:
            rc = proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            rc = None
        output = (work / "out.log").read_text(errors="replace")
        logs = {p.name: p.read_text(errors="replace")[-3000:] for p in work.glob("bg-*.log")}
        assert rc == 0, f"walk-through exit {rc}\n--- output\n{output[-6000:]}\n--- background\n{logs}"
        elapsed = time.monotonic() - t0

        # the steps answered what the README says they answer, never an API error
        assert not [line for line in output.splitlines() if line.startswith('{"detail"')], output[-4000:]
        assert '{"ok":true' in output and "sandbox PACS stopped" in output
        assert '"workers":{"alive":0' in output and "no worker is running" in output  # before the worker started
        assert '"status":"completed","expected":100,"received":100' in output
        worker_log = next(v for k, v in logs.items() if "worker started" in v)
        assert "training job 1: epoch 10/10" in worker_log and "training job 1: completed" in worker_log

        # the per-class metrics, read the way step 8 reads them and checked against themselves
        metrics = json.loads((work / "metrics-1.json").read_text())
        per_class = metrics["per_class"]
        assert [r["class"] for r in per_class] == XR10
        n_test = sum(r["n"] for r in per_class)
        assert n_test > 0 and all(r["n"] >= 1 for r in per_class)
        for r in per_class:
            assert r["accuracy"] == pytest.approx(100.0 * r["correct"] / r["n"])
            assert 0.0 <= r["confidence_mean"] <= 1.0
            assert f'{r["class"]:<6} n={r["n"]:3d}' in output  # step 8's table
        assert metrics["overall_accuracy"] == pytest.approx(100.0 * sum(r["correct"] for r in per_class) / n_test)
        assert metrics["experiments"] == {}  # none unless asked for
        assert "overall accuracy" in output and "| class | n | accuracy % |" in output  # follow's table, report

        # the services are still up (the reader Ctrl-Cs them last): the job and the health as the API has them
        with httpx.Client(base_url=f"http://127.0.0.1:{api}", timeout=10) as c:
            job = c.get("/api/v1/training-jobs/1").json()
            assert job["status"] == "completed" and len(job["history"]) == 10
            assert all(h["val_accuracy"] is not None for h in job["history"])  # a held-out validation split
            health = c.get("/health").json()
            assert health["workers"]["alive"] == 1 and health["workers"]["queues"] == [  # every queue by default
                "cohort", "export", "probe", "retrieval", "scoring", "training", "worklist"]
            predicted = c.get("/api/v1/models").json()
            assert predicted["total"] == 1 and predicted["items"][0]["classes"] == XR10
        assert '{"class":"' in output  # step 9's prediction
        assert elapsed < 240, f"the walk-through took {elapsed:.0f} s"
    finally:
        if proc.poll() is None:
            proc.kill()
        _stop_group(proc)
        subprocess.run([sys.executable, "-c", "from app.cli import main; main()", "sandbox-pacs", "--stop"],
                       cwd=work, env=env, capture_output=True, timeout=60)
