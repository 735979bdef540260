"""Storage-time checks and transfer syntax choice (issue #18 item 7, issue #11 item 4), real SCP.

Datasets are crafted byte by byte and sent undecoded (STORE_SEND_CHUNKED_DATASET), so what the SCP
receives is exactly what the test wrote; dcmtk `storescu` is the second sender.
"""

from __future__ import annotations

import io
import struct
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import JPEG2000Lossless
from pynetdicom import AE, _config
from sqlalchemy import select

from app.db.models import Instance
from app.dicom.scp import STATUS_MALFORMED, STATUS_NOT_IMAGE
from app.wiring import storage_scp
from tests.conftest import testdata as sample_file
from tests.dicom.helpers import CR_STORAGE, make_cr
from tests.dicom.test_scp import SENDER, add_node, count, dataset_bytes, store_files

EXPLICIT_LE, IMPLICIT_LE = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"


@pytest.fixture
def scp(ctx, monkeypatch):
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send the file's bytes as they are
    add_node(ctx, "sender", SENDER)
    server = storage_scp(ctx).start()
    yield server
    server.stop()


def _part10(path: Path, ds, body: bytes, ts: str = EXPLICIT_LE) -> Path:
    """A Part 10 file: `ds`'s file meta declaring `ts`, then `body` as the dataset bytes."""
    ds.file_meta.TransferSyntaxUID = ts
    buf = io.BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, ds.file_meta)
    path.write_bytes(buf.getvalue() + body)
    return path


def _encoded(ds, implicit: bool = False) -> bytes:
    """The dataset bytes of `ds` encoded explicit (default) or implicit VR little endian."""
    buf = io.BytesIO()
    ds.file_meta.TransferSyntaxUID = IMPLICIT_LE if implicit else EXPLICIT_LE
    ds.save_as(buf, enforce_file_format=True)
    raw = buf.getvalue()
    return raw[raw.index(b"DICM") + 4:][_meta_len(raw):]


def _meta_len(raw: bytes) -> int:
    i = raw.index(b"DICM") + 4
    return 12 + struct.unpack("<I", raw[i + 8:i + 12])[0]


def _send(port: int, paths, ts: str = EXPLICIT_LE) -> list[int]:
    ae = AE(SENDER)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context(CR_STORAGE, ts)
    assoc = ae.associate("127.0.0.1", port, ae_title="RADCOHORT")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(p).Status) for p in paths]
    finally:
        assoc.release()


def test_implicit_vr_bytes_on_an_explicit_context_are_refused(tmp_path, ctx, scp):
    ds = make_cr()
    p = _part10(tmp_path / "implicit.dcm", ds, _encoded(ds, implicit=True), ts=EXPLICIT_LE)
    assert _send(scp.port, [p]) == [STATUS_MALFORMED]
    assert store_files(ctx) == [] and count(ctx) == 0
    # the same bytes on an implicit context are fine
    assert _send(scp.port, [_part10(tmp_path / "ok.dcm", ds, _encoded(ds, implicit=True), ts=IMPLICIT_LE)],
                 ts=IMPLICIT_LE) == [0]


@pytest.mark.parametrize("tail", [b"\x01\x02\x03", b"garbage after the pixel data" * 10,
                                  struct.pack("<HH", 0x0008, 0x0018) + b"UI\x04\x001.23"])  # an element out of order
def test_trailing_garbage_is_refused(tmp_path, ctx, scp, tail):
    ds = make_cr()
    p = _part10(tmp_path / "tail.dcm", ds, _encoded(ds) + tail)
    assert _send(scp.port, [p]) == [STATUS_MALFORMED]
    assert store_files(ctx) == [] and count(ctx) == 0


def test_trailing_padding_element_is_accepted(tmp_path, ctx, scp):
    ds = make_cr()
    pad = struct.pack("<HH", 0xFFFC, 0xFFFC) + b"OB\x00\x00" + struct.pack("<I", 6) + b"\x00" * 6
    p = _part10(tmp_path / "pad.dcm", ds, _encoded(ds) + pad)
    assert _send(scp.port, [p]) == [0]
    assert count(ctx) == 1


def test_a_digital_signatures_sequence_after_the_pixel_data_is_accepted(tmp_path, ctx, scp):
    """(FFFA,FFFA) SQ of undefined length after the Pixel Data is valid DICOM, not trailing garbage."""
    ds = make_cr()
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + struct.pack("<HH", 0x0400, 0x0005) + b"US\x02\x00\x01\x00" \
        + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    sq = struct.pack("<HH", 0xFFFA, 0xFFFA) + b"SQ\x00\x00" + struct.pack("<I", 0xFFFFFFFF) + item \
        + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    assert _send(scp.port, [_part10(tmp_path / "sig.dcm", ds, _encoded(ds) + sq)]) == [0]
    # the same sequence cut short is not
    cut = make_cr()
    assert _send(scp.port, [_part10(tmp_path / "sig2.dcm", cut, _encoded(cut) + sq[:-8])]) == [STATUS_MALFORMED]
    assert count(ctx) == 1


@pytest.mark.parametrize("rows,cols,frames,pixels", [
    (65535, 65535, None, 1024),  # the case: a huge image declared, 1 KB sent
    (64, 64, None, 64 * 64 * 2 - 512),  # a little short of 64 x 64 x 16 bit
    (64, 64, 2, 64 * 64 * 2),  # two frames declared, one sent
])
def test_pixel_data_not_matching_the_image_description_is_refused(tmp_path, ctx, scp, rows, cols, frames, pixels):
    ds = make_cr()
    ds.Rows, ds.Columns = rows, cols
    if frames:
        ds.NumberOfFrames = frames
    ds.PixelData = bytes(pixels)
    p = _part10(tmp_path / "px.dcm", ds, _encoded(ds))
    assert _send(scp.port, [p]) == [STATUS_NOT_IMAGE]
    assert store_files(ctx) == [] and count(ctx) == 0  # never stored, never indexed as an image


def test_multiframe_with_all_frames_is_accepted(tmp_path, ctx, scp):
    ds = make_cr()
    ds.NumberOfFrames = 3
    ds.PixelData = bytes(64 * 64 * 2 * 3)
    assert _send(scp.port, [_part10(tmp_path / "mf.dcm", ds, _encoded(ds))]) == [0]


def test_encapsulated_pixel_data_without_fragments_is_refused(tmp_path, ctx, scp):
    src = sample_file("RG1_J2KR.dcm")
    raw = src.read_bytes()
    i = raw.index(b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff")
    empty = raw[:i + 12] + struct.pack("<HHI", 0xFFFE, 0xE000, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    p = tmp_path / "nofrag.dcm"
    p.write_bytes(empty)
    ds = dcmread(src, stop_before_pixels=True)
    ae = AE(SENDER)
    ae.add_requested_context(ds.SOPClassUID, JPEG2000Lossless)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="RADCOHORT")
    assert assoc.is_established
    try:
        assert int(assoc.send_c_store(p).Status) == STATUS_NOT_IMAGE
        assert int(assoc.send_c_store(src).Status) == 0  # the whole file is fine
    finally:
        assoc.release()
    assert count(ctx) == 1


# ----------------------------------------------------------------------------- transfer syntax choice
def test_the_senders_first_proposed_syntax_is_accepted_and_kept_bit_exact(ctx, scp):
    """One context [JPEG 2000, Explicit LE, Implicit LE]: JPEG 2000 is accepted, stored as sent."""
    j2k = sample_file("RG1_J2KR.dcm")
    ds = dcmread(j2k, stop_before_pixels=True)
    ae = AE(SENDER)
    ae.add_requested_context(ds.SOPClassUID, [JPEG2000Lossless, EXPLICIT_LE, IMPLICIT_LE])
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="RADCOHORT")
    assert assoc.is_established
    try:
        assert [cx.transfer_syntax[0] for cx in assoc.accepted_contexts] == [JPEG2000Lossless]
        assert int(assoc.send_c_store(j2k).Status) == 0
    finally:
        assoc.release()
    # and a sender preferring Explicit LE gets Explicit LE (its order, not ours)
    ae2 = AE(SENDER)
    ae2.add_requested_context(ds.SOPClassUID, [IMPLICIT_LE, EXPLICIT_LE, JPEG2000Lossless])
    a2 = ae2.associate("127.0.0.1", scp.port, ae_title="RADCOHORT")
    assert [cx.transfer_syntax[0] for cx in a2.accepted_contexts] == [IMPLICIT_LE]
    a2.release()
    with ctx.sessions() as s:
        row = s.scalars(select(Instance)).one()
    stored = ctx.settings.store_dir / row.file_path
    assert row.transfer_syntax_uid == JPEG2000Lossless
    assert dcmread(stored, stop_before_pixels=True).file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert dataset_bytes(stored) == dataset_bytes(j2k)  # bit-identical dataset


def test_storescu_proposing_jpeg2000_first_in_one_context_stores_it_compressed(tmp_path, ctx, scp):
    """dcmtk `storescu -xv +C -R`: one presentation context [JPEG 2000 lossless, uncompressed...].

    storescu re-encodes what it reads (explicit sequence lengths), so the file it sends is first put
    in dcmtk's own encoding with `dcmconv` (same transfer syntax): then what it sends is that file."""
    j2k = tmp_path / "j2k_dcmtk.dcm"
    subprocess.run(["dcmconv", str(sample_file("RG1_J2KR.dcm")), str(j2k)], check=True, timeout=60)
    r = subprocess.run(["storescu", "-xv", "+C", "-R", "-d", "-aet", SENDER, "-aec", "RADCOHORT", "127.0.0.1",
                        str(scp.port), str(j2k)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout + r.stderr
    # it did offer the uncompressed syntaxes in the same context, and JPEG 2000 was accepted
    proposed = out[out.index("BEGIN A-ASSOCIATE-RQ"):out.index("END A-ASSOCIATE-RQ")]
    assert "=JPEG2000LosslessOnly" in proposed and "=LittleEndianExplicit" in proposed, proposed
    accepted = out[out.index("BEGIN A-ASSOCIATE-AC"):]
    assert "Context ID:        1 (Accepted)" in accepted and "Context ID:        3" not in accepted
    assert "Accepted Transfer Syntax: =JPEG2000LosslessOnly" in accepted, accepted[:2000]
    with ctx.sessions() as s:
        row = s.scalars(select(Instance)).one()
    stored = ctx.settings.store_dir / row.file_path
    assert row.transfer_syntax_uid == JPEG2000Lossless
    # no transcoding, no re-encoding on our side: byte for byte the dataset storescu sent
    assert dataset_bytes(stored) == dataset_bytes(j2k)
    assert dcmread(stored).PixelData == dcmread(sample_file("RG1_J2KR.dcm")).PixelData
