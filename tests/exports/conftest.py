"""A small real cohort on disk: synthetic radiographs with identifiers seeded into every place a
careless export would leak them (descriptions, comments, private tags, nested sequences)."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from app.api import create_app
from app.labels.service import load_labeler
from app.index.ingest import index_directory
from app.synth.generate import generate
from tests.conftest import _migrated_ctx, make_settings

ALL, EXPORTER, IDENT, READER = "all-tok", "exp-tok", "ident-tok", "read-tok"
TOKENS = (f"admin:{ALL}:read+retrieve+train+export+find-identified+export-identified,"
          f"exporter:{EXPORTER}:read+export,ident:{IDENT}:read+export+export-identified,reader:{READER}:read")
H = {name: {"Authorization": f"Bearer {tok}"} for name, tok in
     (("all", ALL), ("exporter", EXPORTER), ("ident", IDENT), ("reader", READER))}


def seed_identifiers(path: Path, i: int) -> list[str]:
    """Write identifiers into `path` where Annex E says they may hide; returns every identifying
    string of the file (original ones included)."""
    ds = pydicom.dcmread(path)
    family = str(ds.PatientName).split("^")[0]
    pid = str(ds.PatientID)
    ds.StudyDescription = f"{ds.StudyDescription} {family}"
    ds.ImageComments = f"patient {pid} called back"
    ds.OtherPatientIDs = f"MRN{pid}X"
    ds.ReferringPhysicianName = f"HOUSE{i}^GREGORY"
    ds.PatientAddress = f"{i} SECRETSTREET LANE"
    ds.InstitutionName = "SAINT SECRETIA HOSPITAL"
    ds.add_new(0x00091010, "LO", "ACME PRIVATE")
    ds.add_new(0x00091001, "LO", f"priv{pid}")
    req = Dataset()
    req.AccessionNumber = str(ds.AccessionNumber)
    req.RequestedProcedureID = f"RPID{pid}"
    ds.RequestAttributesSequence = Sequence([req])
    ds.save_as(path)
    return [str(ds.PatientName), family, pid, str(ds.AccessionNumber), str(ds.PatientBirthDate),
            f"MRN{pid}X", f"HOUSE{i}", "SECRETSTREET", "SECRETIA", f"RPID{pid}",
            str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)]


@pytest.fixture
def export_env(tmp_path, db_url):
    """(client, ctx, cohort id, identifiers, {sop uid: original path}); SQLite and PostgreSQL."""
    settings = make_settings(tmp_path, db_url, api_tokens=TOKENS)
    for ctx in _migrated_ctx(settings):
        gen = settings.store_dir / "syn"
        generate(gen, per_class=2, seed=7, taxonomy="xr10", size="64x64", workers=1, syntaxes=["explicit"])
        identifiers: list[str] = []
        originals = {}
        for i, p in enumerate(sorted(gen.rglob("*.dcm"))):
            identifiers += seed_identifiers(p, i)
            originals[str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)] = p
        (gen / "truth.csv").unlink()  # the generator's answer key: not a DICOM file
        res = index_directory(ctx, labeler=load_labeler(ctx.sessions, None))
        assert res.inserted == len(originals) and not res.unreadable
        with TestClient(create_app(settings, ctx)) as client:
            r = client.post("/api/v1/cohorts", headers=H["all"],
                            json={"taxonomy": "xr10", "split": {"train": 0.5, "test": 0.5}, "seed": 1})
            assert r.status_code == 201, r.text
            yield client, ctx, r.json()["id"], identifiers, originals


def wait_export(client, export_id: int, headers, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = client.get(f"/api/v1/exports/{export_id}", headers=headers)
        assert r.status_code == 200, r.text
        if r.json()["status"] in ("done", "failed"):
            return r.json()
        time.sleep(0.2)
    raise AssertionError(f"export {export_id} did not finish: {r.json()}")
