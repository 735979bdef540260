"""The demo's own parts (fast): Table 2 text, job parameters per device, process-group clean-up."""

from __future__ import annotations

import os
import sys
import time

import pytest

from app.demo.processes import DemoError, Managed, run_step
from app.demo.report import summary, table2
from app.demo.runner import DemoOptions, _key, child_env, synth_code_fingerprint, training_params

METRICS = {
    "overall_accuracy": 90.0,
    "per_class": [
        {"class": "W", "n": 10, "correct": 10, "accuracy": 100.0, "confidence_mean": 0.998, "confidence_sd": 0.001},
        {"class": "C20M", "n": 10, "correct": 8, "accuracy": 80.0, "confidence_mean": 0.9123, "confidence_sd": 0.05},
    ],
    "misclassified": [{"sop_instance_uid": "1.2.3", "true": "C20M", "predicted": "C20F", "confidence": 0.7}],
    "header_suspects": [{"sop_instance_uid": "1.2.4", "header_class": "LtK", "predicted": "RtK", "confidence": 0.995}],
    "experiments": {"rotate90": {"per_class": [{"class": "W", "accuracy": 90.0}, {"class": "C20M", "accuracy": 40.0}]}},
}


def test_table2_has_one_row_per_class_with_accuracy_and_confidence():
    text = table2(METRICS)
    lines = text.splitlines()
    assert len(lines) == 2 + 2
    w, c = lines[2].split(), lines[3].split()
    assert w[:4] == ["W", "10", "10", "100.0"] and "0.998" in w and "0.001" in w
    assert c[:4] == ["C20M", "10", "8", "80.0"] and "0.912" in c
    assert "96.3" in lines[3]  # the study's value beside the run's


def test_summary_reports_overall_misclassified_suspects_and_experiments():
    text = summary(METRICS)
    assert "overall accuracy: 90.0 % over 20 test images" in text
    assert "misclassified: 1" in text and "1.2.3" in text
    assert "header suspects" in text and "1.2.4" in text and "header_class=LtK" in text
    assert "experiment rotate90: mean per-class accuracy 65.0 %" in text


def test_training_params_small_on_cpu_study_on_cuda_and_overrides_win():
    cpu = training_params(DemoOptions(), cuda=False)
    gpu = training_params(DemoOptions(), cuda=True)
    assert cpu["image_size"] < gpu["image_size"] == 256 and gpu["epochs"] == 30 and cpu["model"] != gpu["model"]
    # CPU: no rotation (few images, little time); GPU: the worker's (the study's) augmentation
    assert not cpu["augment"]["rotation"] and "augment" not in gpu
    over = training_params(DemoOptions(epochs=2, image_size=32, model="resnet18", experiments=["rotate90"],
                                       device="cpu"), cuda=True)
    assert (over["epochs"], over["image_size"], over["model"], over["experiments"], over["device"]) == \
        (2, 32, "resnet18", ["rotate90"], "cpu")


def test_demo_content_key_changes_with_the_generator_code(tmp_path, monkeypatch):
    """Content written by an older app/synth must not be reused (it once trained the demo on stale phantoms)."""
    import shutil
    from pathlib import Path

    import app.synth

    src = Path(app.synth.__file__).parent
    fake = tmp_path / "synth"
    shutil.copytree(src, fake, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(app.synth, "__file__", str(fake / "__init__.py"))
    before = synth_code_fingerprint()
    assert before == synth_code_fingerprint()  # stable while the code is unchanged
    key_before = _key(DemoOptions())
    (fake / "render.py").write_text((fake / "render.py").read_text() + "\n# changed\n")
    assert synth_code_fingerprint() != before
    assert _key(DemoOptions()) != key_before
    assert _key(DemoOptions()).startswith("n60-")


def test_child_env_isolates_radcohort_settings(tmp_path):
    env = child_env({"RADCOHORT_DATABASE_URL": "postgresql://prod", "RADCOHORT_API_TOKENS": "t", "PATH": "/bin"},
                    tmp_path / "data", "sqlite:///x.db", 8001, 11113)
    assert env["RADCOHORT_DATABASE_URL"] == "sqlite:///x.db"
    assert env["RADCOHORT_API_TOKENS"] == "t" and env["PATH"] == "/bin"
    assert (env["RADCOHORT_API_PORT"], env["RADCOHORT_SCP_PORT"]) == ("8001", "11113")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_stop_ends_the_child_and_its_own_children(tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    # a child that spawns a grandchild ignoring SIGTERM, as a data loader might
    code = ("import subprocess, sys, time;"
            "p = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
            "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)']);"
            f"open({str(pidfile)!r}, 'w').write(str(p.pid)); time.sleep(600)")
    m = Managed("sleeper", [sys.executable, "-c", code], dict(os.environ), tmp_path, tmp_path / "log").start()
    deadline = time.monotonic() + 20
    while not pidfile.exists() or not pidfile.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child, grandchild = m.proc.pid, int(pidfile.read_text())
    m.stop(timeout=2)
    deadline = time.monotonic() + 5
    while (_alive(child) or _alive(grandchild)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child) and not _alive(grandchild)


def test_run_step_failure_names_the_step_and_shows_the_log(tmp_path):
    with pytest.raises(DemoError, match=r"(?s)step-x failed \(exit 3\).*boom"):
        run_step("step-x", [sys.executable, "-c", "print('boom'); raise SystemExit(3)"], dict(os.environ),
                 tmp_path, tmp_path / "x.log", timeout=60)
    with pytest.raises(DemoError, match="more than 1 s"):
        run_step("slow", [sys.executable, "-c", "import time; time.sleep(30)"], dict(os.environ),
                 tmp_path, tmp_path / "s.log", timeout=1)


def test_check_alive_reports_an_exited_child_with_its_log(tmp_path):
    m = Managed("dies", [sys.executable, "-c", "print('bad config'); raise SystemExit(2)"], dict(os.environ),
                tmp_path, tmp_path / "d.log").start()
    m.proc.wait(30)
    with pytest.raises(DemoError, match=r"(?s)dies exited with code 2.*bad config"):
        m.check_alive()
    m.stop()
