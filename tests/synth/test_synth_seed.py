"""Seeding a PACS: a real Orthanc receives exactly what `push` reports; failures are never counted as stored."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind
from pydicom.uid import ExplicitVRLittleEndian
from typer.testing import CliRunner

from app.devtools.orthanc import free_port
from app.dicom.push import dicom_files, push
from app.synth.generate import generate, read_truth

pytestmark = pytest.mark.orthanc


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate(out, 2, seed=21, size="64x80", workers=1, header_error_rate=0.2)
    return out


def _find(orthanc, calling_aet: str, level: str, **keys) -> list[Dataset]:
    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", orthanc.dicom_port, ae_title=orthanc.aet)
    assert assoc.is_established
    q = Dataset()
    q.QueryRetrieveLevel = level
    for k, v in keys.items():
        setattr(q, k, v)
    out = []
    for status, ident in assoc.send_c_find(q, StudyRootQueryRetrieveInformationModelFind):
        assert status and status.Status in (0x0000, 0xFF00, 0xFF01), status
        if status.Status in (0xFF00, 0xFF01):
            out.append(ident)
    assoc.release()
    return out


def test_seed_orthanc_and_count_by_c_find(orthanc, settings, collection):
    rows = read_truth(collection)
    seen = []
    result = push(dicom_files(collection / "dicom"), "127.0.0.1", orthanc.dicom_port, orthanc.aet,
                  settings.ae_title, associations=3, progress=lambda d, n: seen.append((d, n)))
    assert result.ok, result.failed
    assert result.stored == result.total == len(rows) == 20
    assert seen[-1] == (20, 20)
    studies = _find(orthanc, settings.ae_title, "STUDY", StudyInstanceUID="", NumberOfStudyRelatedInstances="")
    assert {s.StudyInstanceUID for s in studies} == {r["study_uid"] for r in rows}
    assert sum(int(s.NumberOfStudyRelatedInstances) for s in studies) == len(rows)
    # a patient with follow-ups: every one of their studies is there
    by_patient: dict[str, set] = {}
    for r in rows:
        by_patient.setdefault(r["patient_id"], set()).add(r["study_uid"])
    pid, expected = max(by_patient.items(), key=lambda kv: len(kv[1]))
    got = _find(orthanc, settings.ae_title, "STUDY", PatientID=pid, StudyInstanceUID="")
    assert {s.StudyInstanceUID for s in got} == expected
    # pushing again: Orthanc keeps one copy and still answers Success, so counts stay exact
    again = push(dicom_files(collection / "dicom"), "127.0.0.1", orthanc.dicom_port, orthanc.aet,
                 settings.ae_title, associations=2)
    assert again.ok and orthanc.instance_count() == 20


def test_unreachable_pacs_fails_every_file(collection):
    files = dicom_files(collection / "dicom")
    result = push(files, "127.0.0.1", free_port(), "NOBODY", associations=2, timeout=3)
    assert result.stored == 0 and not result.ok
    assert files and len(result.failed) == len(files)
    assert all("association" in why for _, why in result.failed)


def test_refused_contexts_and_failure_statuses_are_failures(collection, tmp_path):
    """An SCP that accepts only explicit VR little endian and fails some stores with 0xA700."""
    rows = read_truth(collection)
    explicit = [r for r in rows if r["transfer_syntax"] == ExplicitVRLittleEndian]
    doomed = {explicit[0]["sop_instance_uid"]}
    stored: list[str] = []

    def on_store(event):
        uid = event.request.AffectedSOPInstanceUID
        if uid in doomed:
            return 0xA700
        stored.append(uid)
        return 0x0000

    scp = AE(ae_title="PICKY")
    for sop in ("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1"):
        scp.add_supported_context(sop, [ExplicitVRLittleEndian])
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        (collection / "notes.txt").write_text("not DICOM")
        result = push(dicom_files(collection), "127.0.0.1", port, "PICKY", associations=2)
    finally:
        server.shutdown()
        (collection / "notes.txt").unlink()
    assert result.total == len(rows)
    assert result.stored == len(explicit) - 1 == len(stored)
    assert len(result.failed) == len(rows) - result.stored
    reasons = dict(result.failed)
    assert sum("0xA700" in why for why in reasons.values()) == 1
    assert sum("no presentation context" in why for why in reasons.values()) == len(rows) - len(explicit)
    assert [p for p, _ in result.skipped] == [str(collection / "notes.txt")]


def test_cli_seed_by_node_name(orthanc, ctx, collection, monkeypatch):
    from app.cli import cli
    from app.db.models import PacsNode

    with ctx.sessions() as s:
        s.add(PacsNode(name="pacs1", ae_title=orthanc.aet, host="127.0.0.1", port=orthanc.dicom_port))
        s.commit()
    monkeypatch.setenv("RADCOHORT_DATABASE_URL", ctx.settings.database_url)
    monkeypatch.setenv("RADCOHORT_DATA_DIR", str(ctx.settings.data_dir))
    runner = CliRunner()
    r = runner.invoke(cli, ["seed", str(collection), "--node", "pacs1", "--associations", "2"])
    assert r.exit_code == 0, r.output
    assert "20/20 stored" in r.output
    assert orthanc.instance_count() == 20
    r = runner.invoke(cli, ["seed", str(collection), "--node", "nope"])
    assert r.exit_code == 2 and "no PACS node named" in r.output
    r = runner.invoke(cli, ["seed", str(collection), "--host", "127.0.0.1", "--port", str(free_port()),
                            "--aet", "X", "--timeout", "2"])
    assert r.exit_code == 1 and "0/20 stored" in r.output


def test_cli_seed_with_synth_generates_then_pushes(orthanc, tmp_path):
    from app.cli import cli

    out = tmp_path / "gen"
    r = CliRunner().invoke(cli, ["seed", str(out), "--synth", "--per-class", "1", "--taxonomy", "xr5", "--size",
                                 "64x80", "--seed", "3", "--syntaxes", "explicit,rle", "--host", "127.0.0.1",
                                 "--port", str(orthanc.dicom_port), "--aet", orthanc.aet])
    assert r.exit_code == 0, r.output
    rows = read_truth(out)
    assert len(rows) == 5 and {x["transfer_syntax"] for x in rows} <= {"1.2.840.10008.1.2.1", "1.2.840.10008.1.2.5"}
    assert "5/5 stored" in r.output and orthanc.instance_count() == 5
