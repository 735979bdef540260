"""Acceptance of issue #18 item 2: a 400 MB unauthenticated body costs the server < 50 MB of memory.

A real `radcohort serve` (API + Storage SCP, one process) runs in a subprocess; a raw socket streams
400 MB at it without a token (with a Content-Length, and chunked without one) and an authenticated
one over the JSON limit. The server's peak RSS is read from /proc/PID/status (VmHWM, reset through
/proc/PID/clear_refs before each body) and sampled while the body streams: the measure is the server
process's, not pytest's.
"""

from __future__ import annotations

import os
import select
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from app.devtools.orthanc import free_port
from tests.conftest import listening_process

RADCOHORT = str(Path(sys.executable).with_name("radcohort"))
TOKEN = "mem-test-token"
BODY = 400 * 2**20
BUDGET = 50 * 2**20


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{key} not in /proc/{pid}/status")


class _Peak:
    """The server's peak RSS over a block: VmHWM reset on entry (when the kernel lets us), and VmRSS
    sampled every 5 ms as a second opinion."""

    def __init__(self, pid: int):
        self.pid, self.samples, self._stop = pid, [], threading.Event()

    def __enter__(self):
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")  # 5: reset the peak RSS (VmHWM)
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False
        self.start_rss = _status_kb(self.pid, "VmRSS") * 1024
        self._t = threading.Thread(target=self._sample, daemon=True)
        self._t.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.samples.append(_status_kb(self.pid, "VmRSS") * 1024)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max([*self.samples, _status_kb(self.pid, "VmRSS") * 1024])
        if self.hwm_reset:
            self.peak = max(self.peak, _status_kb(self.pid, "VmHWM") * 1024)

    @property
    def growth(self) -> int:
        return self.peak - self.start_rss


def _stream(port: int, path: str, headers: dict[str, str], total: int, chunked: bool) -> tuple[bytes, int]:
    """Send a request head, then up to `total` body bytes until the server answers or closes.
    Returns (what the server answered, body bytes sent)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
            *(f"{k}: {v}" for k, v in headers.items())]
    head.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {total}")
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
    chunk = b"[" + b"1," * (2**19 - 1) + b"1"  # 1 MB of valid JSON-ish bytes
    answer, sent = b"", 0
    try:
        while sent < total:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:  # keep sending after the answer: the client means to push all of it
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
            piece = chunk[: total - sent]
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            sent += len(piece)
        sock.settimeout(30)
        while b"\r\n\r\n" not in answer:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed while we were still sending: what we want
    finally:
        sock.close()
    return answer, sent


@pytest.fixture
def server(tmp_path):
    port = free_port()
    env = {**os.environ, "RADCOHORT_DATABASE_URL": f"sqlite:///{tmp_path / 'rc.db'}",
           "RADCOHORT_DATA_DIR": str(tmp_path / "data"), "RADCOHORT_API_PORT": str(port),
           "RADCOHORT_SCP_PORT": str(free_port()), "RADCOHORT_API_TOKENS": TOKEN,
           "RADCOHORT_PSEUDONYM_KEY": "k", "RADCOHORT_LOG_LEVEL": "WARNING"}
    with listening_process([RADCOHORT, "serve"], env, port, cwd=tmp_path, what="radcohort serve") as proc:
        yield proc.pid, port


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("path", ["/api/v1/cohorts", "/api/v1/models/1/predict"])
def test_400_mb_unauthenticated_body_costs_the_server_under_50_mb(server, chunked, path):
    pid, port = server
    with _Peak(pid) as peak:
        answer, sent = _stream(port, path, {}, BODY, chunked)
    assert peak.start_rss > 50 * 2**20  # the real server's RSS
    assert peak.growth < BUDGET, f"server grew by {peak.growth / 2**20:.1f} MB (sent {sent / 2**20:.0f} MB)"
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert b"missing or invalid bearer token" in answer
    print(f"\n{path} chunked={chunked}: server RSS {peak.start_rss / 2**20:.0f} MB, peak growth "
          f"{peak.growth / 2**20:.1f} MB, body sent {sent / 2**20:.0f} MB, VmHWM reset={peak.hwm_reset}")


def test_400_mb_authenticated_json_body_is_413_and_costs_under_50_mb(server):
    """Streamed without a Content-Length: the JSON route's 1 MB limit stops it while it arrives."""
    pid, port = server
    with _Peak(pid) as peak:
        answer, sent = _stream(port, "/api/v1/cohorts", {"Authorization": f"Bearer {TOKEN}"}, BODY, True)
    assert peak.growth < BUDGET, f"server grew by {peak.growth / 2**20:.1f} MB"
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
