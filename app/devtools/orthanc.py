"""Start a real Orthanc (Debian package) on free loopback ports with the config from orthanc/."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ORTHANC_CONFIG = Path(__file__).resolve().parents[2] / "orthanc" / "orthanc.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def orthanc_binary() -> str | None:
    return shutil.which("Orthanc") or (
        "/usr/sbin/Orthanc" if os.path.exists("/usr/sbin/Orthanc") else None
    )


class _PortTaken(Exception):
    """Orthanc could not bind one of its ports."""


@dataclass
class OrthancServer:
    """A running Orthanc process; `modalities` maps name -> (AET, host, port)."""

    workdir: Path
    dicom_port: int = 0
    http_port: int = 0
    aet: str = "ORTHANC"
    modalities: dict[str, tuple[str, str, int]] = field(default_factory=dict)
    overrides: dict = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def config(self) -> dict:
        cfg = json.loads(ORTHANC_CONFIG.read_text())
        storage = self.workdir / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        cfg.update(
            DicomAet=self.aet,
            DicomPort=self.dicom_port,
            HttpPort=self.http_port,
            StorageDirectory=str(storage),
            IndexDirectory=str(storage),
            RemoteAccessAllowed=False,
            DicomModalities={
                name: {"AET": aet, "Host": host, "Port": port, "AllowEcho": True, "AllowFind": True,
                       "AllowMove": True, "AllowGet": True, "AllowStore": True}
                for name, (aet, host, port) in self.modalities.items()
            },
        )
        cfg.update(self.overrides)
        return cfg

    def start(self, timeout: float = 30.0) -> "OrthancServer":
        binary = orthanc_binary()
        if not binary:
            raise RuntimeError("Orthanc is not installed (apt-get install orthanc)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        pick_dicom, pick_http = not self.dicom_port, not self.http_port
        for attempt in range(3):
            # a free port can be taken by another process between our pick and Orthanc's bind: pick again
            if pick_dicom:
                self.dicom_port = free_port()
            if pick_http:
                self.http_port = free_port()
            try:
                return self._launch(binary, timeout)
            except _PortTaken:
                if not (pick_dicom or pick_http) or attempt == 2:
                    raise RuntimeError(f"Orthanc exited early (a port is in use), see "
                                       f"{self.workdir / 'orthanc.log'}") from None
        raise AssertionError("unreachable")

    def _launch(self, binary: str, timeout: float) -> "OrthancServer":
        cfg_path = self.workdir / "orthanc.json"
        cfg_path.write_text(json.dumps(self.config(), indent=2))
        log_path = self.workdir / "orthanc.log"
        start = log_path.stat().st_size if log_path.exists() else 0
        log = open(log_path, "ab")
        self.proc = subprocess.Popen([binary, str(cfg_path)], stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                with open(log_path, "rb") as f:
                    f.seek(start)
                    if b"already in use" in f.read():
                        raise _PortTaken()
                raise RuntimeError(f"Orthanc exited early, see {log_path}")
            try:
                with urllib.request.urlopen(self.url + "/system", timeout=1) as r:
                    if r.status == 200 and self._dicom_listening():
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("Orthanc did not start in time")

    def _dicom_listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.dicom_port), timeout=0.5):
                return True
        except OSError:
            return False

    def stop(self, kill: bool = False) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def discard(self) -> None:
        """End an Orthanc whose data is thrown away (tests): SIGKILL, no clean shutdown. A clean stop()
        waits 2.5-3.4 s for Orthanc to flush an index nobody will read again."""
        self.stop(kill=True)

    def restart(self) -> None:
        """Stop and start again on the same ports and storage."""
        self.stop()
        self.start()

    # --- REST helpers (tests, seeding) --------------------------------------------------
    def rest(self, method: str, path: str, data: bytes | None = None, timeout: float = 60) -> object:
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/dicom")
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read()
        return json.loads(body) if body else None

    def upload(self, path: Path) -> dict:
        return self.rest("POST", "/instances", Path(path).read_bytes())  # type: ignore[return-value]

    def instance_count(self) -> int:
        return int(self.rest("GET", "/statistics")["CountInstances"])  # type: ignore[index]

    def __enter__(self) -> "OrthancServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
