"""Issue #12 behaviours of the engine: PS3.16 codes, refinement with both sources, ages a registry
would accept, views (spelled out, oblique, several), the added sources, species, overlays."""

from __future__ import annotations

import pytest

from app.labels.engine import BUILTIN_RULES, RuleSet, RulesError, compute_labels, load_rules
from app.labels.overlay import validate_overlay


@pytest.fixture(scope="module")
def rules() -> RuleSet:
    return load_rules()


def test_every_code_is_the_standards_concept(rules):
    from pydicom.sr.codedict import codes

    assert rules.code("body_part", "KNEE") == "SCT:72696002"
    assert rules.code("body_part", "LEG") == "SCT:30021000"  # BodyPartExamined LEG is the lower leg
    assert rules.code("view", "PA") == "SCT:272479007" and rules.code("laterality", "L") == "SCT:7771000"
    cid4031 = {getattr(codes.CID4031, n).value for n in codes.CID4031.dir()}
    missing = [v for v in rules.vocabulary["body_part"] if rules.code("body_part", v) is None]
    assert missing == []
    off_cid = [v for v in rules.vocabulary["body_part"] if rules.code("body_part", v).split(":")[1] not in cid4031]
    assert off_cid == ["SCAPHOID"]  # CID 4031 has no scaphoid: its SNOMED CT bone structure
    data = __import__("yaml").safe_load(BUILTIN_RULES.read_text(encoding="utf-8"))
    data["codes"]["body_part"]["KNEE"] = "CID4031.Kneee"
    with pytest.raises(ValueError, match="not a DICOM PS3.16 concept"):
        RuleSet(data)


@pytest.mark.parametrize("fields, body_part", [
    ({"series_description": "XR HUMERUS RT"}, "HUMERUS"),
    ({"series_description": "FEMUR AP"}, "FEMUR"),
    ({"series_description": "FOREARM 2 VIEWS"}, "FOREARM"),
    ({"study_description": "TIB/FIB LEFT"}, "LEG"),
    ({"study_description": "LOWER LEG"}, "LEG"),
    ({"study_description": "LOWER LIMB"}, "LOWERLIMB"),
    ({"study_description": "SCAPHOID VIEWS"}, "SCAPHOID"),
    ({"study_description": "THUMB"}, "THUMB"),
    ({"study_description": "FINGERS"}, "FINGER"),
    ({"study_description": "GREAT TOE"}, "TOE"),
    ({"study_description": "FOREFOOT"}, "FOOT"),
    ({"study_description": "CALCANEUS AXIAL"}, "CALCANEUS"),
    ({"study_description": "PATELLA SKYLINE"}, "PATELLA"),
    ({"study_description": "THORACOLUMBAR SPINE"}, "TLSPINE"),
    ({"series_description": "膝蓋骨軸位"}, "PATELLA"),  # not the knee inside it
    ({"series_description": "胸腰椎"}, "TLSPINE"),  # not the lumbar spine inside it
    ({"series_description": "下腿骨 正面"}, "LEG"),
    ({"series_description": "舟状骨"}, "SCAPHOID"),
    ({"series_description": "足関節"}, "ANKLE"),  # not the foot (足) inside it
])
def test_long_bones_and_sub_parts(rules, fields, body_part):
    assert compute_labels(fields, rules).body_part == body_part


def test_a_generic_tag_is_refined_and_both_sources_are_named(rules):
    r = compute_labels({"body_part_examined": "EXTREMITY", "study_description": "TIB/FIB"}, rules)
    assert (r.body_part, r.conflicts) == ("LEG", [])
    assert r.sources["body_part"] == "text:StudyDescription[TIB/FIB]"
    assert r.sources["body_part_refines"] == "EXTREMITY from tag:BodyPartExamined"
    assert r.sources["body_part_code"] == "SCT:30021000"
    # a real CR (pydicom's RG3): EXTREMITY refined by the reader's exam menu
    r = compute_labels({"body_part_examined": "EXTREMITY",
                        "acquisition_device_processing_description": "[LOWER LEG         ]"}, rules)
    assert r.body_part == "LEG" and r.sources["body_part"].startswith("text:AcquisitionDeviceProcessingDescription")
    # two unrelated parts are still a conflict, not a refinement
    r = compute_labels({"body_part_examined": "EXTREMITY", "series_description": "CHEST"}, rules)
    assert [c["label"] for c in r.conflicts] == ["body_part"]


@pytest.mark.parametrize("fields, age, flag", [
    ({"patient_age": "51"}, 51.0, None),
    ({"patient_age": "051Y"}, 51.0, None),
    ({"patient_age": "411"}, None, "outside 0-120"),
    ({"patient_age": "130Y"}, None, "outside 0-120"),
    ({"patient_birth_date": "18000101", "study_date": "20080101"}, None, "placeholder"),
    ({"patient_birth_date": "19000101", "study_date": "20190101"}, None, "placeholder"),
    ({"patient_birth_date": "18800101", "study_date": "20020101"}, None, "outside 0-120"),  # 122 years
    ({"patient_age": "000Y", "patient_birth_date": "00000000", "study_date": "20100101"}, None, "not confirmed"),
    ({"patient_age": "000Y"}, None, "not confirmed"),
    ({"patient_age": "000Y", "patient_birth_date": "20100301", "study_date": "20100401"}, 0.0, None),
    ({"patient_birth_date": "20100101", "study_date": "20080101"}, None, "after StudyDate"),
    ({"patient_birth_date": "20101301", "study_date": "20120101"}, None, "not a valid date"),
    ({"patient_age": "411", "patient_birth_date": "19570301", "study_date": "20080301"}, 51.0, "outside 0-120"),
])
def test_ages_a_registry_would_accept(rules, fields, age, flag):
    r = compute_labels(fields, rules)
    if age is None:
        assert r.age_years is None and r.age_band is None
        assert r.sources["age_years"].startswith("flag:") and flag in r.sources["age_years"]
    else:
        assert r.age_years == pytest.approx(age, abs=1e-3) and r.age_band == rules.age_band(age)
    if flag:
        assert flag in r.sources["age_flags"]
    else:
        assert "age_flags" not in r.sources
    assert r.conflicts == []  # a discarded value is a flag, not a conflict that would exclude the image


@pytest.mark.parametrize("fields, view, source", [
    ({"view_position": "POSTEROANTERIOR"}, "PA", "tag:ViewPosition"),
    ({"view_position": "ANTEROPOSTERIOR"}, "AP", "tag:ViewPosition"),
    ({"view_position": "LATERAL"}, "LAT", "tag:ViewPosition"),
    ({"view_position": "RLO"}, "OBLIQUE", "tag:ViewPosition"),
    ({"study_description": "CHEST, PA & LATERAL"}, None, "ambiguous:"),
    ({"study_description": "XR KNEE 3 VIEWS LEFT"}, None, "ambiguous:"),
    ({"series_description": "膝関節 正面・側面"}, None, "ambiguous:"),
    ({"study_description": "CHEST, PA & LATERAL", "view_position": "PA"}, "PA", "tag:ViewPosition"),
    ({"view_position": "AP", "series_description": "KNEE OBLI"}, "OBLIQUE", "text:SeriesDescription[OBLI]"),
    ({"view_position": "AP", "series_description": "KNEE OBLIQUE"}, "OBLIQUE", "text:SeriesDescription[OBLIQUE]"),
    ({"series_description": "RIBS AP OBLIQUE"}, "OBLIQUE", "text:SeriesDescription[OBLIQUE]"),
    ({"performed_procedure_step_description": "CHEST (PORTABLE AP)"}, "AP",
     "text:PerformedProcedureStepDescription[AP]"),
    ({"requested_procedure_description": "胸部 ポータブル正面"}, "AP", "text:RequestedProcedureDescription[ポータブル正面]"),
])
def test_views(rules, fields, view, source):
    r = compute_labels(fields, rules)
    assert r.view == view, r.sources
    assert r.sources.get("view", "").startswith(source)
    assert not any(c["label"] == "view" for c in r.conflicts)


def test_a_single_view_that_disagrees_with_the_tag_is_a_conflict(rules):
    r = compute_labels({"view_position": "AP", "series_description": "CHEST LATERAL"}, rules)
    assert r.view == "AP" and [c["label"] for c in r.conflicts] == ["view"]


def test_source_priority_is_documented_order(rules):
    assert [c for _, c in rules.priority["body_part"]] == [
        "body_part_examined", "series_description", "acquisition_device_processing_description", "protocol_name",
        "performed_procedure_step_description", "study_description", "requested_procedure_description"]
    r = compute_labels({"requested_procedure_description": "XR ANKLE LEFT"}, rules)
    assert (r.body_part, r.laterality) == ("ANKLE", "L")
    r = compute_labels({"performed_procedure_step_description": "KNEE RIGHT", "study_description": "KNEE LEFT"}, rules)
    assert r.laterality == "R" and [c["label"] for c in r.conflicts] == ["laterality"]


@pytest.mark.parametrize("fields, species", [
    ({"study_description": "CANINE LATERAL THORAX"}, "CANINE"),
    ({"patient_species_description": "Canis lupus familiaris", "body_part_examined": "CHEST"}, "CANINE"),
    ({"patient_species_description": "Equus caballus", "series_description": "FOOT LAT"}, "EQUINE"),
    ({"patient_breed_description": "Labrador Retriever", "body_part_examined": "KNEE"}, "NONHUMAN"),
    ({"series_description": "猫 胸部 側面"}, "FELINE"),
])
def test_non_human_patients_get_a_species_and_no_human_body_part(rules, fields, species):
    r = compute_labels(fields, rules)
    assert r.species == species and r.body_part is None
    assert r.sources["body_part"] == f"rule:non_human({species})" and r.sources["species"]
    assert r.as_columns("v")["label_species"] == species


def test_humans_keep_their_labels(rules):
    r = compute_labels({"patient_species_description": "Homo sapiens", "body_part_examined": "CHEST"}, rules)
    assert (r.species, r.body_part) == ("HUMAN", "CHEST")
    r = compute_labels({"body_part_examined": "CHEST", "study_description": "CHEST PA"}, rules)
    assert r.species is None and r.body_part == "CHEST"


def test_misspelt_long_words_read_as_the_term_one_edit_away(rules):
    assert compute_labels({"study_description": "HUMEROUS"}, rules).body_part == "HUMERUS"
    r = compute_labels({"study_description": "BILATRAL HANDS"}, rules)
    assert r.laterality == "B" and r.sources["laterality"] == "text:StudyDescription[BILATRAL~BILATERAL]"
    # short words are never guessed: "HNAD" stays unread (a site overlay can add it)
    assert compute_labels({"study_description": "HNAD RIGHT"}, rules).body_part is None


OVERLAY = """\
extends: builtin
name: site-a
text:
  body_part:
    HAND: [HNAD]
    KNEE: [ニー]
tag_values:
  body_part:
    LOWER EXT: LOWERLIMB
"""


def test_overlay_adds_terms_without_forking(tmp_path, rules):
    p = tmp_path / "overlay.yaml"
    p.write_text(OVERLAY, encoding="utf-8")
    site = load_rules(p)
    assert site.version.startswith("site-a-") and site.version != rules.version
    assert compute_labels({"study_description": "HNAD RIGHT"}, site).body_part == "HAND"
    assert compute_labels({"body_part_examined": "LOWER EXT"}, site).body_part == "LOWERLIMB"
    # everything built in still there
    assert compute_labels({"study_description": "膝関節"}, site).body_part == "KNEE"
    assert len(site.text_terms["body_part"]) == len(rules.text_terms["body_part"]) + 2


@pytest.mark.parametrize("text, line, path, message", [
    (OVERLAY.replace("    HAND: [HNAD]", "    HANDS: [HNAD]"), 5, "text.body_part.HANDS", "not a body_part value"),
    (OVERLAY + "colour: blue\n", 10, "colour", "Extra inputs"),
    (OVERLAY.replace("extends: builtin", "extends: other"), 1, "extends", "builtin"),
    (OVERLAY.replace("    KNEE: [ニー]", "    KNEE: ニー"), 6, "text.body_part.KNEE", "list"),
    ("extends: builtin\ntext: [\n", 3, "(yaml)", ""),
    ("extends: builtin\nmulti_view_patterns: ['(']\n", 2, "multi_view_patterns.0", "regular expression"),
])
def test_overlay_errors_name_their_line(tmp_path, text, line, path, message):
    _, errors = validate_overlay(text)
    assert errors, text
    e = errors[0]
    assert (e["line"], e["path"]) == (line, path) and message in e["message"], errors
    p = tmp_path / "bad.yaml"
    p.write_text(text, encoding="utf-8")
    with pytest.raises(RulesError, match=rf"line {line}[:,]"):  # OverlayError, or the YAML parser's own
        load_rules(p)
