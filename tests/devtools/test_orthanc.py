"""app.devtools.orthanc: the test peer picks new ports when another process took the ones it chose."""

from __future__ import annotations

import socket

import pytest

import app.devtools.orthanc as orthanc_mod
from app.devtools.orthanc import OrthancServer, orthanc_binary


@pytest.fixture
def held_port():
    """A loopback port another process (here: this one) is listening on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.orthanc
def test_a_port_taken_between_pick_and_bind_is_picked_again(tmp_path, held_port, monkeypatch):
    if not orthanc_binary():
        pytest.fail("Orthanc is not installed: run .ci/run or `apt-get install orthanc`")
    real = orthanc_mod.free_port
    picks = iter([held_port])  # the race: the first "free" port is in use by the time Orthanc binds
    monkeypatch.setattr(orthanc_mod, "free_port", lambda: next(picks, None) or real())
    srv = OrthancServer(tmp_path / "auto").start()
    try:
        assert srv.dicom_port != held_port and srv.instance_count() == 0
        assert b"already in use" in (tmp_path / "auto" / "orthanc.log").read_bytes()  # it did hit the race
    finally:
        srv.discard()
    # a port the caller chose is not changed behind its back: a clear error instead
    with pytest.raises(RuntimeError, match="port is in use"):
        OrthancServer(tmp_path / "fixed", dicom_port=held_port).start()
