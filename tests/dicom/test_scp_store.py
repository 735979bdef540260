"""The UID-keyed store: UID validation, containment, atomic idempotent raw writes, header parsing."""

from __future__ import annotations

import io

import pytest
from pydicom import dcmread
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian

from app.store import DicomStore, file_meta_end, parse_header, validate_uid
from app.errors import InvalidInput
from tests.dicom.helpers import make_cr


@pytest.mark.parametrize("uid", ["1.2.3", "1.2.840.10008.5.1.4.1.1.1", "0.1", "1.2.3\x00", "2.25.0"])
def test_valid_uids(uid):
    assert validate_uid(uid) == uid.rstrip("\x00")


@pytest.mark.parametrize("uid", ["", "1.2/../../x", "../1.2", "1..2", ".1.2", "1.2.", "1.02", "1.2.a",
                                 "1" * 65, "1.2 3", "/etc/passwd", "1.2\\3", None])
def test_invalid_uids(uid):
    with pytest.raises(InvalidInput):
        validate_uid(uid)


def _encoded(ds) -> tuple:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    raw = buf.getvalue()
    off = file_meta_end(io.BytesIO(raw))
    return ds.file_meta, raw[off:]


def test_write_raw_is_exact_atomic_and_idempotent(tmp_path):
    store = DicomStore(tmp_path / "store")
    ds = make_cr()
    meta, body = _encoded(ds)
    sf = store.write_raw(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, meta, body)
    assert not sf.existed and sf.transfer_syntax_uid == meta.TransferSyntaxUID
    p = store.path(sf.relpath)
    assert p.stat().st_size == sf.size
    assert p.read_bytes().endswith(body)
    assert dcmread(p).PixelData == ds.PixelData
    # a second write of the same SOP keeps the first file
    again = store.write_raw(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, meta, b"other")
    assert again.existed and p.read_bytes().endswith(body)
    assert store.exists(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert [x.name for x in p.parent.iterdir()] == [p.name]  # no temp files


def test_write_raw_failure_leaves_no_partial_file(tmp_path):
    store = DicomStore(tmp_path / "store")
    ds = make_cr()
    meta, _ = _encoded(ds)

    class Broken(io.RawIOBase):
        def readable(self):
            return True

        def readinto(self, b):
            raise OSError("connection lost")

    with pytest.raises(OSError):
        store.write_raw(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, meta, Broken())
    assert [p for p in (tmp_path / "store").rglob("*") if p.is_file()] == []


def test_path_refuses_escape(tmp_path):
    store = DicomStore(tmp_path / "store")
    with pytest.raises(InvalidInput):
        store.path("../outside.dcm")
    with pytest.raises(InvalidInput):
        store.relpath("1.2", "1.2/../..", "1.3")


@pytest.mark.parametrize("ts", [DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian])
def test_parse_header_handles_deflated_and_big_endian(ts):
    ds = make_cr(patient_name="Doe^John")
    ds.file_meta.TransferSyntaxUID = ts
    meta, body = _encoded(ds)
    hdr = parse_header(body, ts)
    assert hdr.SOPInstanceUID == ds.SOPInstanceUID and str(hdr.PatientName) == "Doe^John"
    assert "PixelData" not in hdr


def test_parse_header_rejects_garbage():
    with pytest.raises(ValueError, match="truncated"):
        parse_header(b"\x08\x00\x16\x00UI\xff\x7f1.2.3", "1.2.840.10008.1.2.1")


@pytest.mark.parametrize("ts", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", ExplicitVRBigEndian])
def test_pixel_length_check_reads_raw_image_description_under_every_encoding(ts):
    """The image description is read from the raw elements (no pydicom conversion) under implicit,
    explicit little and big endian; the check then agrees with the converted values."""
    from app.store import PixelDataMismatch, expected_pixel_bytes

    ds = make_cr()
    ds.Rows, ds.Columns, ds.BitsAllocated = 300, 200, 16
    ds.PixelData = bytes(300 * 200 * 2)
    ds.file_meta.TransferSyntaxUID = ts
    _meta, body = _encoded(ds)
    hdr = parse_header(body, ts)  # the pixel data length matches
    assert expected_pixel_bytes(parse_header(body, ts)) == 300 * 200 * 2
    assert (hdr.Rows, hdr.Columns) == (300, 200)  # converted afterwards, the same values
    ds.Rows = 301  # now the description claims more than the pixel data holds
    _meta, body = _encoded(ds)
    with pytest.raises(PixelDataMismatch):
        parse_header(body, ts)


def test_a_chunked_receive_queues_write_back_as_it_arrives_and_keeps_every_byte(tmp_path):
    """With fsync on, the receive file hands each MB to the kernel's write-back while it arrives (so
    that the fdatasync before Success waits for the tail only); with fsync off it does not."""
    import os
    import sys

    from app.dicom import scp
    from app.store import _sync_file_range

    payload = os.urandom(3 * 2**20 + 12345)
    for fsync in (True, False):
        store = DicomStore(tmp_path / f"store-{fsync}", fsync=fsync)
        store.incoming_dir.mkdir(parents=True)
        scp._IncomingFile.store, scp._IncomingFile.min_free_bytes = store, 0
        try:
            f = scp._IncomingFile(dir=str(store.incoming_dir))
            for k in range(0, len(payload), 256 * 1024):
                assert f.write(payload[k:k + 256 * 1024]) == len(payload[k:k + 256 * 1024])
            wb = f._writeback
            f.close()
        finally:
            scp._IncomingFile.store = None
        assert open(f.name, "rb").read() == payload
        if not fsync:
            assert wb is None
        elif sys.platform.startswith("linux"):
            assert _sync_file_range is not None
            assert wb.written == len(payload) and wb.done == 3 * 2**20  # whole MBs queued, the tail left to fdatasync
