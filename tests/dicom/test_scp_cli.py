"""`radcohort scp --processes N` and `radcohort serve` as real processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from app.devtools.orthanc import free_port
from tests.dicom.helpers import make_cr
from tests.dicom.test_scp import count, send
from tests.hardening.loadkit import sender_ctx

RADCOHORT = str(Path(sys.executable).with_name("radcohort"))


def _env(settings) -> dict:
    env = dict(os.environ)
    env.update(RADCOHORT_DATABASE_URL=settings.database_url, RADCOHORT_DATA_DIR=str(settings.data_dir),
               RADCOHORT_SCP_PORT=str(settings.scp_port), RADCOHORT_API_PORT=str(free_port()),
               RADCOHORT_PSEUDONYM_KEY="k", RADCOHORT_LOG_LEVEL="INFO")
    return env


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else "exited"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"port {port} never opened")


def _stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    return out


@pytest.fixture
def node_ctx(settings):
    ctx = sender_ctx(settings, "sender", "SENDER")
    yield ctx
    ctx.close()


def test_scp_with_two_processes_stores_everything_once(node_ctx, tmp_path):
    settings = node_ctx.settings
    env = {**_env(settings), "RADCOHORT_DICOM_LOG_LEVEL": "INFO"}  # pynetdicom's "Accepting Association"
    proc = subprocess.Popen([RADCOHORT, "scp", "--processes", "2"], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_port(settings.scp_port, proc)
        time.sleep(1.0)
        datasets = [make_cr(seed=i) for i in range(8)]
        for ds in datasets:  # one association each: the kernel spreads them over the processes
            assert send(settings.scp_port, [ds]) == [0]
        assert send(settings.scp_port, datasets[:2]) == [0, 0]  # resend: idempotent
    finally:
        out = _stop(proc)
    assert proc.returncode == 0, out
    listening_pids = {line.split()[3] for line in out.splitlines() if "listening on" in line}
    assert len(listening_pids) == 2, out
    # round-robin hand-over: both processes served associations
    serving_pids = {line.split()[3] for line in out.splitlines() if "Accepting Association" in line}
    assert serving_pids == listening_pids, out
    assert count(node_ctx) == 8
    assert len([p for p in settings.store_dir.rglob("*.dcm")]) == 8


def test_serve_runs_api_and_scp_in_one_process(node_ctx, tmp_path):
    settings = node_ctx.settings
    env = _env(settings)
    api = int(env["RADCOHORT_API_PORT"])
    proc = subprocess.Popen([RADCOHORT, "serve"], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    failure = None
    try:
        _wait_port(api, proc)
        _wait_port(settings.scp_port, proc)
        ds = make_cr(patient_name="Never^Shown")
        assert send(settings.scp_port, [ds]) == [0]
        with urllib.request.urlopen(f"http://127.0.0.1:{api}/api/v1/instances", timeout=30) as r:
            body = json.loads(r.read())
    except (AssertionError, OSError) as exc:
        failure = exc
    finally:
        out = _stop(proc)
    if failure is not None:
        pytest.fail(f"{failure!r}\n--- radcohort serve output ---\n{out}")
    assert [i["sop_instance_uid"] for i in body["items"]] == [ds.SOPInstanceUID]
    assert "Never" not in json.dumps(body) and "Never" not in out


@pytest.mark.parametrize("processes", [1, 2])
def test_scp_process_serves_storescu_while_64_idle_connections_are_open(node_ctx, tmp_path, processes):
    """Issue #18 item 1 end to end: `radcohort scp` (one process, or two behind the dispatcher) with
    64 silent TCP connections open stores from dcmtk `storescu` at once; the silent ones are closed
    within the handshake timeout."""
    settings = node_ctx.settings
    env = {**_env(settings), "RADCOHORT_SCP_HANDSHAKE_TIMEOUT": "3"}
    proc = subprocess.Popen([RADCOHORT, "scp", "--processes", str(processes)], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    idle: list[socket.socket] = []
    try:
        _wait_port(settings.scp_port, proc)
        idle = [socket.create_connection(("127.0.0.1", settings.scp_port)) for _ in range(64)]
        path = tmp_path / "one.dcm"
        make_cr().save_as(path, enforce_file_format=True)
        t0 = time.monotonic()
        r = subprocess.run(["storescu", "-aet", "SENDER", "-aec", "RADCOHORT", "127.0.0.1", str(settings.scp_port),
                            str(path)], capture_output=True, text=True, timeout=30)
        took = time.monotonic() - t0
        assert r.returncode == 0, r.stdout + r.stderr
        assert count(node_ctx) == 1
        assert took < 3.0, took  # served at once, not after the silent ones timed out
        deadline = time.monotonic() + 8
        for sk in idle:  # every silent connection is closed by the SCP within the handshake timeout
            sk.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                while sk.recv(4096):
                    pass
            except ConnectionResetError:
                pass
            except TimeoutError:
                pytest.fail("a silent connection was still open after the handshake timeout")
    finally:
        for sk in idle:
            sk.close()
        out = _stop(proc)
    assert proc.returncode == 0, out
