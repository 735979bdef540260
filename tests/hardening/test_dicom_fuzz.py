"""DICOM fuzzing of our Storage SCP over real sockets.

Corrupted, truncated and random datasets, wrong and unknown VRs, huge declared lengths, UIDs with
path characters, unknown SOP classes, unknown calling AE titles and associations that never
release. Properties: every C-STORE gets a status (Success only when the file and its index row
exist), the association survives a bad dataset, nothing is written outside the store, and the SCP
still serves afterwards.
"""

from __future__ import annotations

import io
import random
import socket
import struct
import time
from pathlib import Path

import pytest
from pydicom.filewriter import write_file_meta_info
from pynetdicom import AE, _config
from sqlalchemy import select

from app.db.models import Instance, PacsNode
from app.dicom.scp import (STATUS_INVALID_UID, STATUS_MALFORMED, STATUS_NOT_IMAGE, STATUS_SINK_FAILED,
                           STATUS_SUCCESS, STATUS_UID_MISMATCH, STATUS_WRITE_FAILED)
from app.wiring import storage_scp
from tests.conftest import listening_process
from tests.dicom.helpers import CR_STORAGE, make_cr

SENDER = "FUZZER"
KNOWN = {STATUS_SUCCESS, STATUS_MALFORMED, STATUS_INVALID_UID, STATUS_UID_MISMATCH, STATUS_WRITE_FAILED,
         STATUS_SINK_FAILED, STATUS_NOT_IMAGE}
EXPLICIT_LE = "1.2.840.10008.1.2.1"


@pytest.fixture
def scp(ctx):
    with ctx.sessions() as s:
        s.add(PacsNode(name="fuzzer", ae_title=SENDER, host="127.0.0.1", port=104))
        s.commit()
    server = storage_scp(ctx).start()
    yield server
    server.stop()


def part10(ds) -> tuple[bytes, bytes]:
    """(preamble + file meta, encoded dataset) of a generated instance."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    raw = buf.getvalue()
    head = io.BytesIO()
    head.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(head, ds.file_meta)
    h = head.getvalue()
    assert raw.startswith(h)
    return h, raw[len(h):]


def find_elem(body: bytes, group: int, elem: int) -> int:
    i = body.find(struct.pack("<HH", group, elem))
    assert i >= 0
    return i


def mutations(seed: int = 7) -> list[tuple[str, str, bytes]]:
    """(name, sop uid, Part 10 bytes) of hostile variants of small valid CR instances."""
    rng = random.Random(seed)
    out = []

    def new_uid() -> str:  # one length for every UID: the flips below land on the same elements every run
        return f"1.2.826.0.1.3680043.10.{rng.randrange(10**15, 10**16)}"

    def fresh():
        ds = make_cr(seed=rng.randrange(1000), sop_uid=new_uid(), study_uid=new_uid(), series_uid=new_uid())
        head, body = part10(ds)
        return ds.SOPInstanceUID, head, bytearray(body)

    for cut in (3, 9, 40, 200, -4000, -1):  # inside a tag, a header value, the pixel data
        uid, head, body = fresh()
        out.append((f"truncated@{cut}", uid, head + bytes(body[:cut])))
    uid, head, body = fresh()
    out.append(("empty dataset", uid, head))
    # huge declared lengths: a short-form VR at 0xFFFF, the pixel data at ~4 GiB
    uid, head, body = fresh()
    i = find_elem(body, 0x0010, 0x0010)
    body[i + 6:i + 8] = b"\xff\xff"
    out.append(("PatientName length 0xFFFF", uid, head + bytes(body)))
    uid, head, body = fresh()
    i = find_elem(body, 0x7FE0, 0x0010)
    body[i + 8:i + 12] = struct.pack("<I", 0xFFFFFFF0)
    out.append(("PixelData length 4 GiB", uid, head + bytes(body)))
    # wrong and unknown VRs
    for tag, vr in (((0x0008, 0x0020), b"US"), ((0x0028, 0x0010), b"DA"), ((0x0010, 0x0010), b"ZZ"),
                    ((0x0010, 0x0010), b"SQ"), ((0x0008, 0x0060), b"OB"), ((0x0020, 0x000D), b"FD")):
        uid, head, body = fresh()
        i = find_elem(body, *tag)
        body[i + 4:i + 6] = vr
        out.append((f"({tag[0]:04X},{tag[1]:04X}) as {vr.decode()}", uid, head + bytes(body)))
    # random bytes for the whole dataset, then random flips in the header region
    uid, head, body = fresh()
    out.append(("random dataset", uid, head + rng.randbytes(3000)))
    for k in range(30):
        uid, head, body = fresh()
        end = find_elem(body, 0x7FE0, 0x0010)
        for _ in range(rng.randint(1, 8)):
            body[rng.randrange(end)] = rng.randrange(256)
        out.append((f"flips#{k}", uid, head + bytes(body)))
    return out


# every seeded case's status, pinned (46 cases; mutations() is deterministic: fixed seed, fixed-length UIDs)
PINNED = {
    'truncated@3': '0xc212', 'truncated@9': '0xc210', 'truncated@40': '0xc212',
    'truncated@200': '0xc210', 'truncated@-4000': '0xc210', 'truncated@-1': '0xc210',
    'empty dataset': '0xc212', 'PatientName length 0xFFFF': '0xc210', 'PixelData length 4 GiB': '0xc210',
    '(0008,0020) as US': '0x0', '(0028,0010) as DA': '0xa900', '(0010,0010) as ZZ': '0x0',
    '(0010,0010) as SQ': '0xc210', '(0008,0060) as OB': '0xc210', '(0020,000D) as FD': '0xc212',
    'random dataset': '0xc210', 'flips#0': '0xc210', 'flips#1': '0xa900',
    'flips#2': '0xc213', 'flips#3': '0xc210', 'flips#4': '0xc210',
    'flips#5': '0xc210', 'flips#6': '0xc210', 'flips#7': '0xc210',
    'flips#8': '0xc210', 'flips#9': '0xc210', 'flips#10': '0x0',
    'flips#11': '0xc210', 'flips#12': '0xc210', 'flips#13': '0xc210',
    'flips#14': '0xc210', 'flips#15': '0xc210', 'flips#16': '0xc210',
    'flips#17': '0xc210', 'flips#18': '0xc210', 'flips#19': '0xc213',
    'flips#20': '0xc210', 'flips#21': '0xc212', 'flips#22': '0xc210',
    'flips#23': '0xc210', 'flips#24': '0xc212', 'flips#25': '0xc210',
    'flips#26': '0xc210', 'flips#27': '0x0', 'flips#28': '0xc210',
    'flips#29': '0xc210',
}


def _files_outside_store(root: Path, store: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() and store not in p.parents and not p.name.startswith("rc.db")
            and p.name != "pseudonym.key"}


def _send_files(port: int, paths: list[Path], aet: str = SENDER) -> list[int]:
    ae = AE(aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context(CR_STORAGE, EXPLICIT_LE)
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="RADCOHORT")
    assert assoc.is_established
    try:
        statuses = []
        for p in paths:
            rsp = assoc.send_c_store(p)
            assert "Status" in rsp, f"no status for {p.name} (association {assoc.is_aborted and 'aborted'})"
            statuses.append(int(rsp.Status))
        assert assoc.send_c_echo().Status == 0  # the association survived every bad dataset
        return statuses
    finally:
        assoc.release()


def test_hostile_datasets_get_statuses_and_nothing_escapes(tmp_path, ctx, scp, monkeypatch):
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send the bytes exactly as crafted
    cases = mutations()
    files = []
    for n, (name, _uid, blob) in enumerate(cases):
        p = tmp_path / "fuzz" / f"{n:03d}.dcm"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(blob)
        files.append(p)
    before = _files_outside_store(tmp_path, ctx.settings.store_dir)
    statuses = _send_files(scp.port, files)
    with ctx.sessions() as s:
        indexed = set(s.scalars(select(Instance.sop_instance_uid)))
    stored = {p.stem: p for p in ctx.settings.store_dir.rglob("*.dcm")}
    results = {}
    for (name, uid, blob), st in zip(cases, statuses):
        results[name] = hex(st)
        assert st in KNOWN, (name, hex(st))
        if st == STATUS_SUCCESS:
            assert uid in indexed and uid in stored, name
            assert stored[uid].read_bytes().endswith(blob[blob.find(b"DICM") + 4:][-64:]), name
        else:
            assert uid not in indexed and uid not in stored, (name, hex(st))
    # the whole table, pinned: a changed outcome is a decision, not noise
    assert len(results) == len(PINNED) == 46
    assert {k: v for k, v in results.items() if PINNED.get(k) != v} == {}, results
    # bad input is the sender's fault (0xA9xx/0xCxxx), never "out of resources" (0xA7xx)
    assert not {k: v for k, v in results.items() if v.startswith("0xa7")}, results
    for name in ("truncated@3", "truncated@9", "truncated@-4000", "truncated@-1", "PixelData length 4 GiB",
                 "PatientName length 0xFFFF", "random dataset", "empty dataset", "(0010,0010) as SQ"):
        assert results[name] != hex(STATUS_SUCCESS), (name, results)
    assert len(stored) == len(indexed) == statuses.count(STATUS_SUCCESS)
    # nothing outside the store, no temp files left in it
    assert _files_outside_store(tmp_path, ctx.settings.store_dir) - before == set()
    assert not [p for p in ctx.settings.store_dir.rglob("*") if p.is_file() and p.suffix != ".dcm"]
    # and it still serves
    good = make_cr()
    assert _send_files(scp.port, [_write(tmp_path / "good.dcm", good)]) == [0]


def _write(path: Path, ds) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("uid", ["1.2/../../../../etc/evil", "..", "1.2.3\\..\\..\\evil", "1.2.3/evil",
                                 "/tmp/evil", "1.2." + "9" * 80, "1.2.3\x00/../evil", "1.2.840.10008.~evil"])
def test_uids_with_path_characters_write_nothing(tmp_path, ctx, scp, monkeypatch, uid):
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    ds = make_cr()
    ds.StudyInstanceUID = uid
    before = {p for p in Path("/tmp").glob("*evil*")}
    st = _send_files(scp.port, [_write(tmp_path / "u.dcm", ds)])
    assert st == [STATUS_INVALID_UID]
    assert not list(ctx.settings.store_dir.rglob("*.dcm"))
    assert {p for p in Path("/tmp").glob("*evil*")} == before
    assert not [p for p in tmp_path.rglob("*evil*")]


def test_unknown_sop_class_is_not_accepted_and_nothing_stored(ctx, scp):
    ae = AE(SENDER)
    ae.add_requested_context("1.2.3.4.5.6.7.8.9", EXPLICIT_LE)  # no such storage class
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.88.11", EXPLICIT_LE)  # a real class we do not keep
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="RADCOHORT")
    if assoc.is_established:
        assert assoc.accepted_contexts == []
        ds = make_cr()
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.3.4.5.6.7.8.9"
        with pytest.raises(ValueError):  # no accepted context: the sender cannot even send it
            assoc.send_c_store(ds)
        assoc.release()
    assert not list(ctx.settings.store_dir.rglob("*.dcm"))


@pytest.mark.parametrize("aet", ["NOBODY", "fuzzer", " ", "A" * 16, "FUZZER\\X"])
def test_unknown_calling_ae_titles_are_rejected(ctx, scp, aet):
    ae = AE(aet if aet.strip() and "\\" not in aet else "NOBODY2")
    if not aet.strip() or "\\" in aet:
        ae.require_calling_aet = []
    ae.add_requested_context(CR_STORAGE, EXPLICIT_LE)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="RADCOHORT")
    assert assoc.is_rejected, aet
    assert not list(ctx.settings.store_dir.rglob("*.dcm"))


def _assoc_rq_prefix() -> bytes:
    """The first bytes of an A-ASSOCIATE-RQ PDU declaring far more data than ever comes."""
    return b"\x01\x00" + struct.pack(">I", 100000) + b"\x00\x01\x00\x00" + b"RADCOHORT".ljust(16)


def test_idle_and_half_open_connections_are_dropped_and_scp_keeps_serving(tmp_path, ctx, monkeypatch):
    """Peers that connect and say nothing, stop mid-PDU, or associate and go silent.

    The SCP's ACSE timeout (dicom_timeout) drops the first two; an established association that goes
    silent is aborted after the network timeout (60 s in production; shortened here).
    """
    ctx.settings.dicom_timeout = 2.0
    with ctx.sessions() as s:
        s.add(PacsNode(name="fuzzer", ae_title=SENDER, host="127.0.0.1", port=104))
        s.commit()
    server = storage_scp(ctx)
    make_ae = server.make_ae

    def short_network_timeout():
        ae = make_ae()
        ae.network_timeout = 3.0
        return ae

    monkeypatch.setattr(server, "make_ae", short_network_timeout)
    server.start()
    try:
        silent = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(20)]
        half = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(10)]
        for h in half:
            h.sendall(_assoc_rq_prefix())
        ae = AE(SENDER)
        ae.add_requested_context(CR_STORAGE, EXPLICIT_LE)
        ae.network_timeout = 60
        idle = ae.associate("127.0.0.1", server.port, ae_title="RADCOHORT")
        assert idle.is_established
        # while they hang, a real sender is still served
        p = _write(tmp_path / "ok.dcm", make_cr())
        assert _send_files(server.port, [p]) == [0]
        # and all of them are cut within the timeouts
        deadline = time.monotonic() + 15
        for sk in silent + half:
            sk.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                while sk.recv(65536):  # whatever the SCP sends (an A-ABORT/A-ASSOCIATE-RJ), then EOF
                    pass
            except (TimeoutError, socket.timeout):
                pytest.fail("an idle connection was never dropped")
            except ConnectionResetError:
                pass
            sk.close()
        while idle.is_alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not idle.is_established, "a silent association was never aborted"
        while server._server.active_associations and time.monotonic() < deadline + 5:
            time.sleep(0.2)
        assert server._server.active_associations == []
        p2 = _write(tmp_path / "ok2.dcm", make_cr())
        assert _send_files(server.port, [p2]) == [0]
    finally:
        server.stop()


def test_encapsulated_pixel_data_cut_short_is_refused_and_the_whole_file_accepted(tmp_path, ctx, scp, monkeypatch):
    from pydicom import dcmread

    from tests.conftest import testdata

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    src = testdata("RG1_J2KR.dcm")
    ds = dcmread(src, stop_before_pixels=True)
    raw = src.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(raw[:-5000])  # ends inside the last JPEG 2000 fragment
    ae = AE(SENDER)
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="RADCOHORT")
    assert assoc.is_established
    try:
        assert int(assoc.send_c_store(cut).Status) == STATUS_MALFORMED
        assert not list(ctx.settings.store_dir.rglob("*.dcm"))
        assert int(assoc.send_c_store(src).Status) == STATUS_SUCCESS
    finally:
        assoc.release()
    assert [p.stem for p in ctx.settings.store_dir.rglob("*.dcm")] == [ds.SOPInstanceUID]


def _status_kb(pid: int, key: str) -> int:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith(key + ":"))
    return int(line.split()[1])


@pytest.fixture
def scp_process(ctx, tmp_path):
    """`radcohort scp` in its own process (its memory is measured apart from pytest's), knowing SENDER."""
    import os
    import sys

    with ctx.sessions() as s:
        s.add(PacsNode(name="fuzzer", ae_title=SENDER, host="127.0.0.1", port=104))
        s.commit()
    st = ctx.settings
    env = {**os.environ, "RADCOHORT_DATABASE_URL": st.database_url, "RADCOHORT_DATA_DIR": str(st.data_dir),
           "RADCOHORT_SCP_PORT": str(st.scp_port), "RADCOHORT_PSEUDONYM_KEY": "k", "RADCOHORT_LOG_LEVEL": "WARNING"}
    with listening_process([str(Path(sys.executable).with_name("radcohort")), "scp"], env, st.scp_port,
                           cwd=tmp_path, what="radcohort scp") as proc:
        yield proc.pid, st.scp_port


def test_a_pdu_far_over_our_maximum_closes_the_connection_without_buffering_it(ctx, scp_process):
    """pynetdicom would read a whole PDU into memory: a peer ignoring our maximum PDU is cut off at the
    PDU's header. Proven on a separate `radcohort scp` process: the connection closes long before the
    256 MB payload is through, and that process's peak RSS (VmHWM, reset first) barely moves.
    With the guard off (RADCOHORT_MAX_PDU=0) the SCP reads on, and both asserts fail."""
    pid, port = scp_process
    ae = AE(SENDER)
    ae.add_requested_context(CR_STORAGE, EXPLICIT_LE)
    assoc = ae.associate("127.0.0.1", port, ae_title="RADCOHORT")
    assert assoc.is_established
    sock = assoc.dul.socket.socket
    n = 256 * 2**20
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the SCP process's peak RSS
    rss_before = _status_kb(pid, "VmRSS")
    sock.sendall(struct.pack(">BBI", 4, 0, n) + struct.pack(">IBB", n - 4, 1, 0))
    sent, closed = 6, False
    sock.settimeout(20)
    try:
        while sent < n:
            sock.sendall(b"\0" * 2**20)
            sent += 2**20
    except OSError:
        closed = True  # the SCP closed the connection while we were still sending
    # closed at the PDU header: what got through is what the kernel's socket buffers took, not the PDU
    assert closed and sent < 32 * 2**20, f"sent {sent / 2**20:.0f} MB of a {n / 2**20:.0f} MB PDU, closed={closed}"
    grown = _status_kb(pid, "VmHWM") - rss_before
    assert grown < 16 * 1024, f"the SCP process's peak RSS grew by {grown / 1024:.0f} MB"
    assoc.abort()
    good = _write(Path(ctx.settings.data_dir) / "ok.dcm", make_cr())
    assert _send_files(port, [good]) == [0]  # and it still serves
