"""Storage SCP over real sockets: dcmtk storescu, a real Orthanc and pynetdicom as senders."""

from __future__ import annotations

import io
import json
import subprocess
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.filewriter import write_file_meta_info
from pynetdicom import AE, _config
from sqlalchemy import func, select, text

from app.db.models import Instance, PacsNode, Patient, Study
from app.dicom.scp import STATUS_INVALID_UID, STATUS_MALFORMED, STATUS_SINK_FAILED, STATUS_WRITE_FAILED
from app.wiring import storage_scp
from app.store import file_meta_end
from tests.conftest import testdata as sample_file
from tests.dicom.helpers import make_cr

SENDER = "SENDER"


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset of a Part 10 file (everything after the file meta)."""
    with open(path, "rb") as f:
        off = file_meta_end(f)
        f.seek(off)
        return f.read()


def pixel_tail(path: Path) -> bytes:
    """The bytes from the Pixel Data element (explicit VR LE) to the end of the file."""
    raw = path.read_bytes()
    i = raw.find(b"\xe0\x7f\x10\x00OB")
    assert i > 0
    return raw[i:]


def add_node(ctx, name: str, aet: str, host: str = "127.0.0.1", port: int = 104) -> None:
    with ctx.sessions() as s:
        s.add(PacsNode(name=name, ae_title=aet, host=host, port=port))
        s.commit()


def count(ctx, model=Instance) -> int:
    with ctx.sessions() as s:
        return s.scalar(select(func.count()).select_from(model))


def store_files(ctx) -> list[Path]:
    return sorted(p for p in ctx.settings.store_dir.rglob("*") if p.is_file())


@pytest.fixture
def scp(ctx):
    add_node(ctx, "sender", SENDER)
    server = storage_scp(ctx).start()
    yield server
    server.stop()


def send(port: int, datasets, aet: str = SENDER) -> list[int]:
    """C-STORE datasets (or Part 10 paths, sent without decoding) in one association."""
    ae = AE(aet)
    ae.acse_timeout = ae.dimse_timeout = 20
    for d in datasets:
        ds = dcmread(d, stop_before_pixels=True) if isinstance(d, Path) else d
        ae.add_requested_context(ds.SOPClassUID if "SOPClassUID" in ds else ds.file_meta.MediaStorageSOPClassUID,
                                 ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="RADCOHORT")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(d).Status) for d in datasets]
    finally:
        assoc.release()


def test_storescu_files_are_stored_and_indexed(ctx, scp):
    """dcmtk re-encodes what it sends (explicit sequence lengths, no trailing padding), so the
    check here is element equality; bit-exactness is checked with raw senders below."""
    uncompressed, j2k = sample_file("RG3_UNCR.dcm"), sample_file("RG1_J2KR.dcm")
    for path, opt in ((uncompressed, "-xe"), (j2k, "-xv")):
        r = subprocess.run(["storescu", opt, "-aet", SENDER, "-aec", "RADCOHORT", "127.0.0.1", str(scp.port),
                            str(path)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
    with ctx.sessions() as s:
        rows = {i.sop_instance_uid: i for i in s.scalars(select(Instance))}
    assert len(rows) == 2
    for path in (uncompressed, j2k):
        src = dcmread(path, stop_before_pixels=True)
        row = rows[src.SOPInstanceUID]
        stored = ctx.settings.store_dir / row.file_path
        assert row.file_path == f"{src.StudyInstanceUID}/{src.SeriesInstanceUID}/{src.SOPInstanceUID}.dcm"
        got, want = dcmread(stored), dcmread(path)
        for ds in (got, want):
            if "DataSetTrailingPadding" in ds:
                del ds.DataSetTrailingPadding
        assert got == want
        assert row.transfer_syntax_uid == src.file_meta.TransferSyntaxUID
        assert row.file_size == stored.stat().st_size
        assert row.source_node == "sender"
        assert row.modality == "CR" and row.rows == src.Rows
    # no temp files left behind
    assert not list(ctx.settings.store_dir.rglob(".tmp-*"))


@pytest.mark.parametrize("chunked_recv", [False, True])
def test_raw_sender_bytes_are_kept_bit_exact(ctx, scp, monkeypatch, chunked_recv):
    # the sender streams the file's dataset bytes undecoded; the SCP receives in memory or,
    # for huge instances, chunked into a temp file
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", chunked_recv)
    files = [sample_file("RG1_J2KR.dcm"), sample_file("RG3_UNCR.dcm")]
    assert send(scp.port, files) == [0, 0]
    with ctx.sessions() as s:
        rows = {i.sop_instance_uid: i.file_path for i in s.scalars(select(Instance))}
    for path in files:
        uid = dcmread(path, stop_before_pixels=True).SOPInstanceUID
        assert dataset_bytes(ctx.settings.store_dir / rows[uid]) == dataset_bytes(path)


def test_orthanc_cstore_of_jpeg2000_arrives_untranscoded(ctx, orthanc):
    add_node(ctx, "orthanc", orthanc.aet, port=orthanc.dicom_port)
    j2k = sample_file("RG1_J2KR.dcm")
    with storage_scp(ctx) as server:
        assert server.port == ctx.settings.scp_port
        oid = orthanc.upload(j2k)["ID"]
        job = orthanc.rest("POST", "/modalities/radcohort/store",
                           json.dumps({"Resources": [oid], "Synchronous": True}).encode())
        assert job is not None
    src = dcmread(j2k, stop_before_pixels=True)
    with ctx.sessions() as s:
        row = s.scalars(select(Instance)).one()
    assert row.sop_instance_uid == src.SOPInstanceUID
    assert row.transfer_syntax_uid == "1.2.840.10008.1.2.4.90"
    assert row.source_node == "orthanc"
    stored = ctx.settings.store_dir / row.file_path
    # Orthanc (DCMTK) re-encodes sequence lengths when it sends, so the header bytes may differ from
    # the uploaded file; the JPEG 2000 pixel data must arrive byte for byte (no transcode, no decode)
    assert pixel_tail(stored) == pixel_tail(j2k)
    assert dcmread(stored) == dcmread(j2k)


def test_unknown_calling_ae_is_rejected_at_association(ctx, scp):
    ae = AE("STRANGER")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", scp.port)
    assert assoc.is_rejected and not assoc.is_established
    # the SCP keeps serving known AEs
    assert send(scp.port, [make_cr()]) == [0]


def test_host_check_rejects_known_ae_from_another_host(tmp_path, ctx):
    ctx.settings.scp_check_host = True
    add_node(ctx, "faraway", "FARAWAY", host="192.0.2.10")
    add_node(ctx, "local", "LOCAL", host="localhost")
    with storage_scp(ctx) as server:
        ae = AE("FARAWAY")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.1.2.1")
        assert ae.associate("127.0.0.1", server.port).is_rejected
        assert send(server.port, [make_cr()], aet="LOCAL") == [0]


def test_echo(ctx, scp):
    ae = AE(SENDER)
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", scp.port)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()


@pytest.mark.parametrize("field", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
def test_path_traversal_uid_is_refused_and_nothing_escapes(tmp_path, ctx, scp, field):
    ds = make_cr()
    setattr(ds, field, "1.2/../../../../evil")
    if field == "SOPInstanceUID":
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    before = {p for p in tmp_path.rglob("*")}
    assert send(scp.port, [ds]) == [STATUS_INVALID_UID]
    created = {p for p in tmp_path.rglob("*")} - before
    assert not [p for p in created if "evil" in p.name or not p.is_relative_to(ctx.settings.data_dir)]
    assert store_files(ctx) == [] and count(ctx) == 0


def _malformed_file(tmp_path: Path) -> Path:
    """A Part 10 file whose dataset is garbage (valid file meta, explicit VR LE declared)."""
    good = make_cr()
    buf = io.BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, good.file_meta)
    # a tag with an element length running far past the end of the data
    buf.write(b"\x08\x00\x16\x00UI\xff\x7f" + b"1.2.3" + b"\xde\xad\xbe\xef" * 5)
    p = tmp_path / "bad.dcm"
    p.write_bytes(buf.getvalue())
    return p


def test_malformed_dataset_gets_failure_and_scp_keeps_serving(tmp_path, ctx, scp, monkeypatch):
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send the bytes as they are
    bad = _malformed_file(tmp_path)
    ae = AE(SENDER)
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", scp.port)
    status = assoc.send_c_store(bad).Status
    assoc.release()
    assert status == STATUS_MALFORMED
    assert store_files(ctx) == []
    # the next store (new association) succeeds
    assert send(scp.port, [make_cr()]) == [0]
    assert count(ctx) == 1


def test_same_sop_twice_gives_one_file_and_one_row(ctx, scp):
    ds = make_cr()
    assert send(scp.port, [ds]) == [0]
    assert send(scp.port, [ds, ds]) == [0, 0]
    assert len(store_files(ctx)) == 1
    assert count(ctx) == 1 and count(ctx, Study) == 1 and count(ctx, Patient) == 1


def test_write_failure_is_out_of_resources_and_nothing_indexed(ctx, scp):
    ds = make_cr()
    # a real OSError: a file sits where the study directory must go
    ctx.settings.store_dir.mkdir(parents=True, exist_ok=True)
    (ctx.settings.store_dir / ds.StudyInstanceUID).write_bytes(b"not a directory")
    assert send(scp.port, [ds]) == [STATUS_WRITE_FAILED]
    assert count(ctx) == 0


def test_index_failure_is_out_of_resources_then_resend_completes(ctx, scp):
    ds = make_cr()
    with ctx.engine.begin() as conn:  # a real DB fault: the table is gone
        conn.execute(text("ALTER TABLE instances RENAME TO instances_away"))
    try:
        assert send(scp.port, [ds]) == [STATUS_SINK_FAILED]
    finally:
        with ctx.engine.begin() as conn:
            conn.execute(text("ALTER TABLE instances_away RENAME TO instances"))
    # the file was written (on disk before any row), the resend is idempotent and indexes it
    assert len(store_files(ctx)) == 1 and count(ctx) == 0
    assert send(scp.port, [ds]) == [0]
    assert len(store_files(ctx)) == 1 and count(ctx) == 1


JAPANESE = [
    (["ISO_IR 192"], "山田^太郎=やまだ^たろう", "胸部正面"),
    (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう", "膝関節正面（右）"),
]


@pytest.mark.parametrize("charset,name,desc", JAPANESE)
def test_japanese_text_reads_back_from_the_index(any_ctx, charset, name, desc):
    add_node(any_ctx, "sender", SENDER)
    ds = make_cr(patient_name=name, study_description=desc, series_description="肘関節（左）")
    ds.SpecificCharacterSet = charset
    with storage_scp(any_ctx) as server:
        assert send(server.port, [ds]) == [0]
    with any_ctx.sessions() as s:
        p = s.scalars(select(Patient)).one()
        st = s.scalars(select(Study)).one()
        row = s.scalars(select(Instance)).one()
    assert p.patient_name == name
    assert st.study_description == desc
    # the stored file decodes the same way (raw bytes kept, charset honoured)
    back = dcmread(any_ctx.settings.store_dir / row.file_path)
    assert str(back.PatientName) == name and back.StudyDescription == desc


def test_junk_values_do_not_refuse_the_instance_and_labels_are_applied(ctx, scp):
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    ds = make_cr(body_part="CHEST")
    ds._dict[0x00200013] = RawDataElement(Tag(0x00200013), "IS", 2, b"x1", 0, False, True)
    assert send(scp.port, [ds]) == [0]
    with ctx.sessions() as s:
        row = s.scalars(select(Instance)).one()
    assert row.instance_number is None
    # the labels stage's labeler is wired in at SCP start-up
    assert row.label_body_part == "CHEST" and row.ruleset_version


def test_chunked_receive_moves_the_streamed_file_into_place(ctx, monkeypatch):
    import tempfile

    # the SCP switches these process-wide; restore them after the test
    monkeypatch.setattr(tempfile, "tempdir", tempfile.tempdir)
    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", False)
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    add_node(ctx, "sender", SENDER)
    j2k = sample_file("RG1_J2KR.dcm")
    with storage_scp(ctx, chunked=True) as server:
        assert send(server.port, [j2k]) == [0]
        assert send(server.port, [j2k]) == [0]  # again: kept once, the streamed copy discarded
    incoming = ctx.settings.store_dir / ".incoming"
    assert incoming.is_dir() and list(incoming.iterdir()) == []
    with ctx.sessions() as s:
        row = s.scalars(select(Instance)).one()
    stored = ctx.settings.store_dir / row.file_path
    assert dataset_bytes(stored) == dataset_bytes(j2k)
    assert row.file_size == stored.stat().st_size
    assert len(store_files(ctx)) == 1


def test_node_lookup_failure_rejects_the_association(ctx):
    add_node(ctx, "sender", SENDER)
    with storage_scp(ctx) as server:
        with ctx.engine.begin() as conn:  # the node table cannot be read: fail closed
            conn.execute(text("ALTER TABLE pacs_nodes RENAME TO pacs_nodes_away"))
        try:
            ae = AE(SENDER)
            ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.1.2.1")
            assert ae.associate("127.0.0.1", server.port).is_rejected
        finally:
            with ctx.engine.begin() as conn:
                conn.execute(text("ALTER TABLE pacs_nodes_away RENAME TO pacs_nodes"))
        time.sleep(2.1)  # past the node cache
        assert send(server.port, [make_cr()]) == [0]
