"""Headers: realistic variants at sensible rates, header errors at the configured rate, truth kept apart."""

from __future__ import annotations

import datetime as dt
import unicodedata
from collections import Counter

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.pixels import apply_voi_lut

from app.synth.generate import generate, read_truth
from app.synth.headers import BODY_PARTS, HEADER_ERRORS, TERMS, build_dataset, plan

N_PER_CLASS = 100


def _headers(taxonomy: str, rate: float, seed: int = 5):
    out = []
    for p in plan(taxonomy, N_PER_CLASS, seed, rate):
        ds, _ = build_dataset(p, seed, np.random.default_rng([seed, p.index, 1]), (64, 80))
        out.append((p, ds))
    return out


def _texts(ds) -> str:
    return " | ".join(str(ds.get(k, "")) for k in ("SeriesDescription", "StudyDescription", "ProtocolName",
                                                    "AcquisitionDeviceProcessingDescription"))


def _desc_side(ds) -> set[str]:
    """Which sides the descriptions name (English or Japanese, full-width folded by NFKC)."""
    t = unicodedata.normalize("NFKC", _texts(ds)).upper()
    sides = set()
    for tok, side in (("左", "L"), ("右", "R"), ("(L)", "L"), ("(R)", "R"), (" LT", "L"), (" RT", "R"),
                      ("LEFT", "L"), ("RIGHT", "R"), ("L ", "L"), ("R ", "R")):
        if tok in t or t.startswith(tok.strip() + " "):
            sides.add(side)
    return sides


@pytest.fixture(scope="module")
def xr10():
    return _headers("xr10", 0.2)


def test_header_errors_at_the_configured_rate_and_visible_in_the_header(xr10):
    n = len(xr10)
    kinds = Counter(p.header_error for p, _ in xr10)
    rate = 1 - kinds[""] / n
    assert abs(rate - 0.2) < 4 * (0.2 * 0.8 / n) ** 0.5
    assert set(kinds) - {""} == set(HEADER_ERRORS)
    for p, ds in xr10:
        valid_parts = BODY_PARTS[p.region][0]
        if p.header_error == "body_part_wrong":
            assert ds.BodyPartExamined not in valid_parts and ds.BodyPartExamined != ""
        elif p.header_error == "body_part_blank":
            assert ds.BodyPartExamined == ""
            assert not any(term in _texts(ds) for lang in TERMS[p.region] for term in lang)
        else:
            assert ds.BodyPartExamined in valid_parts + [""]
        if p.side:
            expected = {"L": "R", "R": "L"}[p.side] if p.header_error == "laterality_swapped" else p.side
            tags = {ds.get("Laterality"), ds.get("ImageLaterality")} - {None}
            assert tags <= {expected}
            if not tags:  # laterality only in the descriptions
                assert expected in _desc_side(ds)


def test_no_errors_when_rate_is_zero():
    assert all(p.header_error == "" for p in plan("xr10", 30, 1, 0.0))


def test_header_variants_all_appear(xr10):
    dss = [ds for _, ds in xr10] + [ds for _, ds in _headers("xr5", 0.0)]
    assert {ds.SOPClassUID for ds in dss} == {"1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1"}
    assert {"CHEST", "THORAX", "SKULL", "SINUS", "PNS", "KNEE", "ELBOW", "EXTREMITY", ""} <= {
        ds.BodyPartExamined for ds in dss}
    assert {ds.PatientSex for ds in dss} == {"M", "F", "O", ""}
    assert len(set(ds.Manufacturer for ds in dss)) >= 5
    assert {ds.PhotometricInterpretation for ds in dss} == {"MONOCHROME1", "MONOCHROME2"}
    bits = {int(ds.BitsStored) for ds in dss}
    assert min(bits) == 10 and max(bits) == 16 and len(bits) >= 4
    ages = Counter("PatientAge" in ds for ds in dss)
    assert ages[True] > 0.4 * len(dss) and ages[False] > 0.2 * len(dss)
    assert all("PatientBirthDate" in ds for ds in dss)
    texts = " ".join(_texts(ds) for ds in dss)
    for term in ("胸部正面", "膝関節正面（右）", "肘関節正面（左）", "副鼻腔", "ウォーターズ法", "頭部正面", "CHEST PA",
                 "KNEE AP"):
        assert term in texts, term
    assert any(0xFF61 <= ord(c) <= 0xFF9F for c in texts)  # half-width katakana
    assert any(0xFF21 <= ord(c) <= 0xFF5A for c in texts)  # full-width Latin
    assert any("=" in str(ds.PatientName) for ds in dss)  # Japanese ideographic/phonetic groups
    lat = Counter(("Laterality" in ds, "ImageLaterality" in ds) for p, ds in xr10 if p.side)
    assert set(lat) == {(True, False), (False, True), (True, True), (False, False)}
    for ds in dss:
        non_ascii = any(ord(c) > 127 for el in ds if el.VR in ("LO", "SH", "PN", "ST", "LT")
                        for c in str(el.value))
        if non_ascii:
            assert ds.SpecificCharacterSet == "ISO_IR 192"
        assert "20110101" <= ds.StudyDate <= "20161231"


def test_patients_follow_up_and_cross_classes_and_chest_truth_is_consistent(xr10):
    studies = Counter()
    classes: dict[str, set] = {}
    for p, ds in xr10:
        studies[ds.PatientID] += 1
        classes.setdefault(ds.PatientID, set()).add(p.true_class)
        if p.region == "chest":
            birth = dt.datetime.strptime(ds.PatientBirthDate, "%Y%m%d").date()
            when = dt.datetime.strptime(ds.StudyDate, "%Y%m%d").date()
            age = when.year - birth.year - ((when.month, when.day) < (birth.month, birth.day))
            lo = int(p.true_class[1:3])
            assert lo <= age <= lo + 9 and p.patient.sex == p.true_class[3]
    assert sum(1 for c in studies.values() if c > 1) > 20
    assert sum(1 for c in classes.values() if len(c) > 1) > 10


def test_sidecar_matches_the_files_and_truth_stays_out_of_headers(tmp_path):
    s = generate(tmp_path, 4, seed=2, size="64x80", workers=1, header_error_rate=0.3)
    rows = read_truth(tmp_path)
    files = sorted((tmp_path / "dicom").rglob("*.dcm"))
    assert len(rows) == len(files) == s.count == 40
    assert not list(tmp_path.rglob("*.tmp"))
    for row in rows:
        ds = dcmread(tmp_path / row["file"], stop_before_pixels=True)
        assert ds.SOPInstanceUID == row["sop_instance_uid"]
        assert ds.StudyInstanceUID == row["study_uid"]
        assert ds.SeriesInstanceUID == row["series_uid"]
        assert ds.PatientID == row["patient_id"]
        assert ds.file_meta.TransferSyntaxUID == row["transfer_syntax"]
        values = " ".join(str(el.value) for el in ds.iterall() if el.VR in ("LO", "SH", "CS", "ST", "LT", "UT"))
        assert row["true_class"] not in values.split()
    assert sum(1 for r in rows if r["header_error"]) == sum(s.header_errors.values())
    dss = [dcmread(tmp_path / r["file"]) for r in rows]
    assert any("WindowCenter" in ds for ds in dss) and any("VOILUTSequence" in ds for ds in dss)
    for ds in dss:
        if "VOILUTSequence" in ds:  # the LUT is usable: it maps the stored range onto its output bits
            out = apply_voi_lut(ds.pixel_array, ds)
            assert out.max() <= (1 << int(ds.VOILUTSequence[0].LUTDescriptor[2])) - 1 and out.std() > 0
