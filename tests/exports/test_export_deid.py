"""De-identified DICOM export of a frozen cohort (issue #17 item 3) and who may export (item 5).

Every exported element is scanned for the identifiers seeded into the source files; dciodvfy (dicom3tools)
checks that the export adds no IOD error to what the source already had."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import subprocess
import zipfile

import pydicom
import pytest

from app.db.models import AuditEvent
from app.privacy import patient_key
from tests.exports.conftest import H, wait_export


def _export(client, cohort_id, headers=None, **body):
    r = client.post(f"/api/v1/cohorts/{cohort_id}/exports", headers=headers or H["exporter"],
                    json={"format": "dicom-deid", **body})
    assert r.status_code == 202, r.text
    done = wait_export(client, r.json()["id"], headers or H["exporter"])
    assert done["status"] == "done", done
    z = client.get(f"/api/v1/exports/{done['id']}/download", headers=headers or H["exporter"])
    assert z.status_code == 200 and z.headers["content-type"] == "application/zip"
    return done, zipfile.ZipFile(io.BytesIO(z.content))


def _all_strings(ds) -> list[str]:
    out = []

    def walk(d):
        for el in d:
            if el.VR == "SQ":
                for item in el.value:
                    walk(item)
            elif el.VR not in ("OB", "OW", "OF", "OD", "OL", "UN") or el.tag.group != 0x7FE0:
                out.append(f"{el.tag} {el.value!r}")
    walk(ds.file_meta)
    walk(ds)
    return out


def test_deid_export_leaks_no_seeded_identifier(export_env, tmp_path):
    client, ctx, cid, identifiers, originals = export_env
    done, z = _export(client, cid)
    names = z.namelist()
    dcms = [n for n in names if n.endswith(".dcm")]
    assert {"manifest.csv", "dataset_card.json", "README.md"} <= set(names)
    assert len(dcms) == done["exported"] > 0
    manifest = list(csv.DictReader(io.StringIO(z.read("manifest.csv").decode())))
    assert len(manifest) == len(dcms)
    cohort_manifest = client.get(f"/api/v1/cohorts/{cid}/manifest", headers=H["exporter"]).text
    cohort_keys = {r["patient_key"] for r in csv.DictReader(io.StringIO(cohort_manifest))}
    key = ctx.settings.get_pseudonym_key()
    needles = sorted({s for s in identifiers if len(s) >= 4})
    for name in dcms:
        raw = z.read(name)
        for s in needles:  # the raw bytes too: nothing hides in a value pydicom would not show
            assert s.encode() not in raw, f"{s!r} in {name}"
        ds = pydicom.dcmread(io.BytesIO(raw))
        text = "\n".join(_all_strings(ds))
        for s in needles:
            assert s not in text, f"{s!r} in {name}"
        # the manifest's pseudonym, derived from the deployment key
        assert ds.PatientID in cohort_keys and len(ds.PatientID) == 64
        assert not [t for t in ds.keys() if t.is_private]
        assert ds.PatientIdentityRemoved == "YES"
        assert "PS3.15 Annex E Basic Application Confidentiality Profile" in ds.DeidentificationMethod
        assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
        codes = {c.CodeValue for c in ds.DeidentificationMethodCodeSequence}
        assert codes == {"113100", "113105", "113107", "113108"}
        assert ds.DeidentificationMethod
        assert ds.PatientSex in ("M", "F", "O") and re.fullmatch(r"\d{3}[DWMY]", ds.PatientAge)  # characteristics
        assert ds.PatientBirthDate == ""
        assert "ImageComments" not in ds and "RequestAttributesSequence" not in ds
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.SOPInstanceUID in {r["sop_instance_uid"] for r in manifest}
    # pair each export with its source through the deployment's UID map: dates shifted (62-730 days
    # back, by one offset per patient, so intervals hold), descriptions kept, pseudonym = manifest's
    from app.exports.deid import Deidentifier

    uid_map = Deidentifier(key)._uids
    exported = {pydicom.dcmread(io.BytesIO(z.read(n))).SOPInstanceUID: n for n in dcms}
    paired = 0
    for sop, path in originals.items():
        name = exported.get(uid_map._new_ui(sop))
        if name is None:
            continue
        src, out = pydicom.dcmread(path), pydicom.dcmread(io.BytesIO(z.read(name)))
        shift = {(_day(src.get(kw)) - _day(out.get(kw))).days for kw in ("StudyDate", "SeriesDate", "ContentDate")
                 if src.get(kw)}
        assert len(shift) == 1 and 62 <= shift.pop() // 1 <= 731
        assert out.StudyDescription and out.PatientSex == src.PatientSex
        assert out.PatientID == patient_key(key, str(src.PatientID), str(src.get("IssuerOfPatientID", "") or ""))
        paired += 1
    assert paired == len(dcms)


def _day(da):
    import datetime as dt

    return dt.datetime.strptime(str(da), "%Y%m%d")


def test_same_uids_and_pseudonyms_in_a_second_export(export_env):
    client, _ctx, cid, _ids, _orig = export_env
    _a, za = _export(client, cid)
    _b, zb = _export(client, cid)
    ma = sorted(csv.reader(io.StringIO(za.read("manifest.csv").decode())))
    mb = sorted(csv.reader(io.StringIO(zb.read("manifest.csv").decode())))
    assert ma == mb  # deterministic: same remapped UIDs, same patient keys, same files


def test_dciodvfy_finds_no_new_error(export_env):
    if shutil.which("dciodvfy") is None:
        pytest.fail("dciodvfy is not installed: apt-get install dicom3tools (.ci/common.sh does)")
    client, _ctx, cid, _ids, originals = export_env
    _done, z = _export(client, cid)
    by_number = {}
    for p in originals.values():
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        by_number[(str(ds.PatientSex), str(ds.get("PatientAge")), str(ds.StudyDescription).split()[1])] = p

    def errors(path) -> set[str]:
        out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        lines = (out.stdout + out.stderr).splitlines()
        return {re.sub(r"<[^>]*>$", "", ln).strip() for ln in lines if ln.startswith("Error")} | \
            {ln for ln in lines if ln.startswith("Error") and "<" not in ln}

    tmp = _ctx.settings.data_dir / "dciodvfy"
    tmp.mkdir()
    baseline = set()
    for p in originals.values():
        baseline |= {e for e in errors(p)}
    checked = 0
    for name in (n for n in z.namelist() if n.endswith(".dcm")):
        f = tmp / f"{checked}.dcm"
        f.write_bytes(z.read(name))
        out = subprocess.run(["dciodvfy", str(f)], capture_output=True, text=True, timeout=60)
        text = out.stdout + out.stderr
        for ln in text.splitlines():
            assert not re.search(r"Deidentification|PatientIdentityRemoved|LongitudinalTemporal", ln), ln
        new = errors(f) - baseline
        assert not new, f"{name}: dciodvfy errors the source did not have: {sorted(new)}"
        checked += 1
    assert checked > 0


def test_burned_in_excluded_or_flagged(export_env):
    client, ctx, cid, _ids, originals = export_env
    members = [r["sop_instance_uid"] for r in
               csv.DictReader(io.StringIO(client.get(f"/api/v1/cohorts/{cid}/manifest", headers=H["all"]).text))]
    states = {u: str(pydicom.dcmread(originals[u], stop_before_pixels=True).get("BurnedInAnnotation", "")) for u in members}
    clean = [u for u in members if states[u] == "NO"]
    # one member says nothing about burned-in text on a modality that often burns it in
    ds = pydicom.dcmread(originals[clean[0]])
    del ds.BurnedInAnnotation
    ds.Modality = "US"
    ds.save_as(originals[clean[0]])
    yes = sum(1 for u in members if states[u] == "YES")
    done, z = _export(client, cid)
    assert done["excluded"] == {k: v for k, v in (("burned_in_annotation", yes), ("burned_in_unknown", 1)) if v}
    assert done["exported"] == len(members) - yes - 1 and "flagged.csv" not in z.namelist()
    done2, z2 = _export(client, cid, burned_in="flag")
    assert done2["exported"] == len(members) and done2["excluded"] == {}
    assert done2["flagged"] == {k: v for k, v in (("burned_in_annotation", yes), ("burned_in_unknown", 1)) if v}
    rows = list(csv.DictReader(io.StringIO(z2.read("flagged.csv").decode())))
    assert sorted(r["reason"] for r in rows) == sorted(["burned_in_annotation"] * yes + ["burned_in_unknown"])
    for r in rows:
        flagged_ds = pydicom.dcmread(io.BytesIO(z2.read(r["file"])))
        assert flagged_ds.PatientIdentityRemoved == "NO"  # burned-in text may still name the patient
    others = [n for n in z2.namelist() if n.endswith(".dcm") and n not in {r["file"] for r in rows}]
    assert others and all(pydicom.dcmread(io.BytesIO(z2.read(n))).PatientIdentityRemoved == "YES" for n in others)
    card = json.loads(z2.read("dataset_card.json"))
    assert card["flagged"] == done2["flagged"] and card["deidentification"]["burned_in_text"].startswith("flag")


def test_scopes_and_audit(export_env):
    client, ctx, cid, _ids, _orig = export_env
    url = f"/api/v1/cohorts/{cid}/exports"
    r = client.post(url, headers=H["reader"], json={"format": "dicom-deid"})
    assert r.status_code == 403 and "'export'" in r.json()["detail"]
    r = client.post(url, headers=H["exporter"], json={"format": "dicom"})
    assert r.status_code == 403 and "export-identified" in r.json()["detail"]
    r = client.post(url, headers=H["exporter"], json={"format": "tiff"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "format"
    r = client.post(url, headers=H["exporter"], json={"format": "png", "image_size": 3})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "image_size"
    assert client.post("/api/v1/cohorts/999/exports", headers=H["exporter"],
                       json={"format": "png"}).status_code == 404
    # identified output with export-identified: the original files, audited as identified
    done, z = _export(client, cid, headers=H["ident"], format="dicom")
    assert done["format"] == "dicom"
    # a token without export-identified can neither read nor download it
    assert client.get(f"/api/v1/exports/{done['id']}/download", headers=H["exporter"]).status_code == 403
    assert client.get(f"/api/v1/exports/{done['id']}", headers=H["exporter"]).status_code == 403
    with ctx.sessions() as s:
        events = [(e.actor, e.action, e.target, e.details) for e in s.query(AuditEvent).order_by(AuditEvent.id)]
    refused = [e for e in events if e[1] == "export.refused"]
    assert {(e[0], e[3]["missing_scope"]) for e in refused} >= {("token:reader", "export"),
                                                               ("token:exporter", "export-identified")}
    created = [e for e in events if e[1] == "export.create"]
    assert created[-1][0] == "token:ident" and created[-1][3]["profile"] == "identified" \
        and created[-1][3]["cohort"] == cid
    assert any(e[1] == "export.download" and e[0] == "token:ident" for e in events)
    # the list leaves identified exports out for a token that may not read them
    assert done["id"] not in [e["id"] for e in client.get("/api/v1/exports", headers=H["exporter"]).json()["items"]]
    assert done["id"] in [e["id"] for e in client.get("/api/v1/exports", headers=H["ident"]).json()["items"]]
