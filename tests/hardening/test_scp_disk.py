"""Disk space and partial files (issue #18 items 5 and 6) against the real StorageSCP.

A real tmpfs fills up (ENOSPC in the middle of a chunked receive), a free-space reserve larger than
the disk, associations aborted, stalled and broken in the middle of a dataset, stale temp files.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pynetdicom import AE, _config
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF
from sqlalchemy import func, select

from app.db.models import Instance
from app.dicom.scp import STATUS_WRITE_FAILED
from app.wiring import storage_scp
from tests.conftest import make_settings, tmpfs_mounted
from tests.dicom.helpers import CR_STORAGE, make_cr
from tests.hardening.loadkit import sender_ctx

SENDER = "SENDER"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def big_cr(mb: float, seed: int = 1):
    ds = make_cr(seed=seed)
    side = int((mb * 2**20 / 2) ** 0.5)
    ds.Rows = ds.Columns = side
    ds.PixelData = os.urandom(side * side * 2)
    return ds


def _count(ctx) -> int:
    with ctx.sessions() as s:
        return s.scalar(select(func.count()).select_from(Instance))


def _assoc(port: int, timeout: float = 30):
    ae = AE(SENDER)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(CR_STORAGE, EXPLICIT_LE)
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="RADCOHORT")
    assert assoc.is_established
    return assoc


def _leftovers(store: Path) -> list[Path]:
    """Files that are not a stored instance: temp files, chunked receives."""
    return [p for p in store.rglob("*") if p.is_file() and (p.suffix != ".dcm" or ".incoming" in p.parts)]


@pytest.fixture
def chunked_flag(monkeypatch):
    import tempfile

    from pynetdicom import dimse_messages

    # storage_scp(chunked=True) switches these process-wide; restore them after the test
    monkeypatch.setattr(tempfile, "tempdir", tempfile.tempdir)
    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", False)
    monkeypatch.setattr(dimse_messages, "NamedTemporaryFile", dimse_messages.NamedTemporaryFile)


@pytest.fixture
def tiny_tmpfs(tmp_path):
    with tmpfs_mounted(tmp_path / "data" / "store", "3m") as mnt:
        yield mnt


def test_disk_full_during_a_chunked_receive_is_0xA700_not_an_abort(tmp_path, tiny_tmpfs, chunked_flag):
    s = make_settings(tmp_path, scp_min_free_mb=0)  # no reserve: the receive itself hits ENOSPC
    ctx = sender_ctx(s, "sender", SENDER)
    scp = storage_scp(ctx, chunked=True).start()
    try:
        batch = [big_cr(1.2, seed=i) for i in range(5)]  # ~1.2 MB each into 3 MB (.incoming is on it too)
        assoc = _assoc(scp.port)
        try:
            statuses = [int(assoc.send_c_store(d).Status) for d in batch]
            assert assoc.is_established  # never an aborted association
            assert assoc.send_c_echo().Status == 0
        finally:
            assoc.release()
        assert STATUS_WRITE_FAILED in statuses and 0 in statuses, [hex(x) for x in statuses]
        assert set(statuses) <= {0, STATUS_WRITE_FAILED}
        with ctx.sessions() as sess:
            indexed = set(sess.scalars(select(Instance.sop_instance_uid)))
        on_disk = {p.stem for p in tiny_tmpfs.rglob("*.dcm") if ".incoming" not in p.parts}
        assert indexed == on_disk == {d.SOPInstanceUID for d, st in zip(batch, statuses) if st == 0}
        assert _leftovers(tiny_tmpfs) == [], "partial files left"
    finally:
        scp.stop()
        ctx.close()


@pytest.mark.parametrize("chunked", [False, True], ids=["memory", "chunked"])
def test_free_space_reserve_refuses_before_writing(tmp_path, chunked, chunked_flag):
    s = make_settings(tmp_path, scp_min_free_mb=10**9)  # a reserve no disk here has
    ctx = sender_ctx(s, "sender", SENDER)
    scp = storage_scp(ctx, chunked=chunked).start()
    try:
        assoc = _assoc(scp.port)
        try:
            assert [int(assoc.send_c_store(make_cr(seed=i)).Status) for i in range(3)] == [STATUS_WRITE_FAILED] * 3
            assert assoc.send_c_echo().Status == 0
        finally:
            assoc.release()
        assert _count(ctx) == 0
        assert [p for p in s.store_dir.rglob("*") if p.is_file()] == []
    finally:
        scp.stop()
        ctx.close()


def test_health_reports_storage_below_the_threshold(tmp_path):
    from app.api import create_app
    from app.context import AppContext
    from app.db.migrate import upgrade

    for threshold, ok in ((0, True), (10**9, False)):
        s = make_settings(tmp_path, health_min_free_mb=threshold)
        s.ensure_dirs()
        upgrade(s.database_url)
        ctx = AppContext.build(s)
        try:
            with TestClient(create_app(s, ctx)) as client:
                body = client.get("/health").json()
        finally:
            ctx.close()
        assert body["storage"]["ok"] is ok and body["storage"]["free_bytes"] > 0
        assert body["status"] == ("ok" if ok else "degraded")


# ----------------------------------------------------------------------------- partial files
def _raw_store_pdus(assoc, ds, max_pdu: int = 16384) -> list[bytes]:
    """The encoded P-DATA-TF PDUs of a C-STORE of `ds` on the association's first storage context."""
    from io import BytesIO

    from pynetdicom.dsutils import encode

    cx = next(c for c in assoc.accepted_contexts if c.abstract_syntax == CR_STORAGE)
    req = C_STORE()
    req.MessageID, req.Priority = 1, 2
    req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = CR_STORAGE, ds.SOPInstanceUID
    req.DataSet = BytesIO(encode(ds, False, True))  # explicit VR little endian
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    out = []
    for prim in msg.encode_msg(cx.context_id, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(prim)
        out.append(pdu.encode())
    return out


def _incoming_files(store: Path) -> list[Path]:
    inc = store / ".incoming"
    return sorted(inc.iterdir()) if inc.is_dir() else []


def _wait(pred, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


@pytest.mark.parametrize("how", ["abort", "close", "invalid-pdu", "stall"])
def test_a_store_cut_in_the_middle_leaves_no_partial_file(tmp_path, monkeypatch, chunked_flag, how):
    s = make_settings(tmp_path)
    ctx = sender_ctx(s, "sender", SENDER)
    scp = storage_scp(ctx, chunked=True)
    make_ae = scp.make_ae

    def short_network_timeout():  # a stalled peer is cut after the network timeout (60 s in production)
        ae = make_ae()
        ae.network_timeout = 2.0
        return ae

    monkeypatch.setattr(scp, "make_ae", short_network_timeout)
    scp.start()
    try:
        assoc = _assoc(scp.port, timeout=30)
        pdus = _raw_store_pdus(assoc, big_cr(2))
        sock = assoc.dul.socket.socket
        for pdu in pdus[: len(pdus) // 2]:  # the command and half the dataset
            sock.sendall(pdu)
        assert _wait(lambda: _incoming_files(s.store_dir) != [], 5), "the chunked receive never started"
        if how == "abort":
            assoc.abort()
        elif how == "close":
            sock.shutdown(2)
        elif how == "invalid-pdu":
            sock.sendall(struct.pack(">BBI", 0x09, 0, 4) + b"\0\0\0\0")  # no such PDU type
        # "stall": send nothing more; the SCP's network timeout (2 s here) ends it
        assert _wait(lambda: _incoming_files(s.store_dir) == [], 8), (how, _incoming_files(s.store_dir))
        if assoc.is_established:
            assoc.abort()
        assert _leftovers(s.store_dir) == [] and _count(ctx) == 0
        ok = _assoc(scp.port)  # and it still serves
        assert int(ok.send_c_store(make_cr()).Status) == 0
        ok.release()
    finally:
        scp.stop()
        ctx.close()


def test_stale_partial_files_are_swept_while_running(tmp_path, chunked_flag):
    s = make_settings(tmp_path, scp_partial_max_age_s=2.0)  # swept every second
    ctx = sender_ctx(s, "sender", SENDER)
    scp = storage_scp(ctx, chunked=True).start()
    try:
        old = time.time() - 3600
        stale = [s.store_dir / ".incoming" / "tmpabc.dcm", s.store_dir / "1.2.3" / "4.5.6" / ".tmp-x.part",
                 s.store_dir / ".conflicts" / "1.2.3.4" / ".tmp-y.part"]
        for p in stale:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"partial")
            os.utime(p, (old, old))
        assert _wait(lambda: not any(p.exists() for p in stale), 5), [p for p in stale if p.exists()]
        # a file being written (fresh) is not touched by a sweep with the default age
        fresh = s.store_dir / ".incoming" / "tmpnew.dcm"
        fresh.write_bytes(b"receiving")
        scp.settings.scp_partial_max_age_s = 300
        assert scp.sweep() == 0 and fresh.exists()
        fresh.unlink()
        assert int(_send_one(scp.port)) == 0
    finally:
        scp.stop()
        ctx.close()


def _send_one(port: int) -> int:
    a = _assoc(port)
    try:
        return int(a.send_c_store(make_cr()).Status)
    finally:
        a.release()


def test_concurrent_senders_and_aborts_leave_nothing_behind(tmp_path, chunked_flag):
    """Good stores and aborted ones interleaved on several associations: every kept file is indexed."""
    s = make_settings(tmp_path)
    ctx = sender_ctx(s, "sender", SENDER)
    scp = storage_scp(ctx, chunked=True).start()
    try:
        def good(i):
            a = _assoc(scp.port)
            try:
                assert [int(a.send_c_store(make_cr(seed=100 * i + k)).Status) for k in range(5)] == [0] * 5
            finally:
                a.release()

        def cut(i):
            a = _assoc(scp.port)
            pdus = _raw_store_pdus(a, big_cr(1, seed=i))
            for pdu in pdus[: len(pdus) // 2]:
                a.dul.socket.socket.sendall(pdu)
            time.sleep(0.2)
            a.abort()

        threads = [threading.Thread(target=f, args=(i,)) for i in range(3) for f in (good, cut)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert _wait(lambda: _leftovers(s.store_dir) == [], 5), _leftovers(s.store_dir)
        assert _count(ctx) == 15
    finally:
        scp.stop()
        ctx.close()
