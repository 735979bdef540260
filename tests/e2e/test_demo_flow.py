"""The demo flow at a tiny size: real Orthanc, real `radcohort serve` and `worker` processes, REST only.

This is the integration test of everything: synth -> seed -> node -> echo -> retrieve -> index ->
labels -> cohort -> train -> metrics -> report, then a second run that must reuse and fetch nothing.
"""

from __future__ import annotations

import csv
import io
import socket
from pathlib import Path

import pydicom
import pytest

from app.demo.runner import DemoOptions, run_demo

pytestmark = [pytest.mark.slow, pytest.mark.orthanc, pytest.mark.worker]

XR10 = ["W", "Ps", "LtE", "RtE", "LtK", "RtK", "C20F", "C20M", "C60F", "C60M"]
# tiny and fast: a few patients per class, small images, one epoch
SYNTH_ARGS: list[str] = []  # --size small is the demo default
PER_CLASS = 10


def _port_closed(url: str) -> bool:
    host, port = url.split("//")[1].split(":")
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, int(port))) != 0


def _synthetic_identities(demo_dir: Path) -> set[str]:
    ids: set[str] = set()
    for p in demo_dir.glob("synth-*/**/*.dcm"):
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        ids.add(str(ds.get("PatientID", "")))
        ids.add(str(ds.get("PatientName", "")))
    ids.discard("")
    return ids


def test_demo_flow_end_to_end_and_rerun(tmp_path):
    demo_dir = tmp_path / "demo"
    lines: list[str] = []
    seen: dict = {}

    def after(client, res):
        """Checks made over the API while the services are still up."""
        seen["base_url"] = str(client.base_url).rstrip("/")
        n_files = sum(1 for _ in demo_dir.glob("synth-*/**/*.dcm"))
        seen["n_files"] = n_files
        # retrieval: complete and exact
        r = res.retrieval
        assert r["status"] == "completed" and r["expected"] == n_files
        assert r["received"] + r["skipped"] == n_files and not r["missing"] and not r["failed"]
        # the index holds every instance, with labels, without names
        page = client.get("/api/v1/instances", params={"limit": 5}).json()
        assert page["total"] == n_files
        for item in page["items"]:
            assert "labels" in item and "patient_name" not in item and "PatientName" not in item
        # the cohort: 10 xr10 classes, each on both sides, no patient on two sides
        cohort = res.cohort
        assert [c["name"] for c in cohort["classes"]] == XR10
        manifest = client.get(f"/api/v1/cohorts/{cohort['id']}/manifest")
        assert manifest.status_code == 200
        rows = list(csv.DictReader(io.StringIO(manifest.text)))
        assert {"sop_instance_uid", "class", "split", "patient_key"} <= set(rows[0])
        sides: dict[str, set] = {}
        for row in rows:
            sides.setdefault(row["patient_key"], set()).add(row["split"])
        assert all(len(s) == 1 for s in sides.values()), "a patient on two sides of the split"
        assert len(sides) == len(rows), "one image per patient"
        identities = _synthetic_identities(demo_dir)
        assert identities and not any(row["patient_key"] in identities for row in rows)
        assert not any(i in manifest.text for i in identities if len(i) > 3)
        n_test = sum(1 for row in rows if row["split"] == "test")
        assert n_test == sum(c["test"] for c in cohort["classes"])
        seen["n_test"] = n_test
        # the report over the API
        rep = client.get(f"/api/v1/training-jobs/{res.job['id']}/report")
        assert rep.status_code == 200 and "W" in rep.text
        png = client.get(f"/api/v1/training-jobs/{res.job['id']}/artifacts/confusion.png")
        assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"

    opts = DemoOptions(demo_dir=demo_dir, per_class=PER_CLASS, synth_args=SYNTH_ARGS, epochs=1, image_size=32,
                       model="resnet10t", batch_size=16, experiments=["rotate90"], device="cpu",
                       retrieval_timeout=300, training_timeout=600, say=lines.append)
    first = run_demo(opts, after=after)
    out = "\n".join(lines)

    # training and the study's metrics, consistent with themselves and with the cohort
    job, m = first.flow.job, first.flow.metrics
    assert job["status"] == "completed" and len(job["history"]) == 1
    per_class = m["per_class"]
    assert [r["class"] for r in per_class] == XR10
    assert sum(r["n"] for r in per_class) == seen["n_test"]
    for r in per_class:
        assert r["accuracy"] == pytest.approx(100.0 * r["correct"] / r["n"])
        assert 0.0 <= r["confidence_mean"] <= 1.0
        assert (r["confidence_sd"] is None) if r["n"] < 2 else r["confidence_sd"] >= 0.0  # SD needs two
    total_correct = sum(r["correct"] for r in per_class)
    assert m["overall_accuracy"] == pytest.approx(100.0 * total_correct / seen["n_test"])
    cm = m["confusion_matrix"]
    assert cm["labels"] == XR10
    assert sum(map(sum, cm["matrix"])) == seen["n_test"]
    assert [cm["matrix"][i][i] for i in range(10)] == [r["correct"] for r in per_class]
    assert "rotate90" in m["experiments"]
    assert isinstance(m["header_suspects"], list)

    # what the user sees: Table 2, overall accuracy, suspects, the report path
    assert "confidence mean ± SD" in out and "overall accuracy:" in out and "header suspects" in out
    for cls in XR10:
        assert any(line.startswith(cls + " ") for line in out.splitlines())
    assert first.report_path is not None and first.report_path.exists()
    assert f"report: {first.report_path}" in out
    assert list(first.report_path.parent.glob("*.png")), "report without its figures"
    assert first.summary_path.exists()

    # every process the demo started is gone
    assert _port_closed(seen["base_url"])

    # second run: nothing regenerated, nothing seeded or fetched twice
    lines.clear()
    second = run_demo(opts)
    out2 = "\n".join(lines)
    assert "reusing" in out2 and "not seeding again" in out2
    r2 = second.flow.retrieval
    assert r2["status"] == "completed" and r2["received"] == 0 and r2["skipped"] == seen["n_files"]
    assert second.flow.job["status"] == "completed"
