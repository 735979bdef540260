"""DICOM matching on our side (app.dicom.matching): what an honest PACS would have matched."""

from __future__ import annotations

from datetime import date, datetime, time

import pytest
from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import DA, PersonName

from app.dicom.matching import matches, mismatched_keys, verify


@pytest.mark.parametrize("wanted", ["", "*", None, "  "])
def test_universal_matching_matches_anything_even_a_missing_attribute(wanted):
    assert matches("BodyPartExamined", wanted, "KNEE") is True
    assert matches("BodyPartExamined", wanted, None) is True


@pytest.mark.parametrize("answer", [None, "", "   ", [], b"\x00"])
def test_a_missing_or_empty_answer_cannot_be_verified(answer):
    assert matches("BodyPartExamined", "CHEST", answer) is None
    assert matches("StudyDate", "20110101-20161231", answer) is None


@pytest.mark.parametrize("wanted,answer,expected", [
    ("CHEST", "CHEST", True),
    ("CHEST", "CHEST ", True),  # padding is not significant
    ("CHEST", "KNEE", False),
    ("CHEST", "chest", False),  # CS is case-sensitive
    ("CHEST", "CHESTX", False),
    ("CH*", "CHEST", True),
    ("*EST", "CHEST", True),
    ("C?EST", "CHEST", True),
    ("C?EST", "CHHEST", False),
    ("*", "ANY", True),
    ("C.EST", "CHEST", False),  # regex characters are literal
    ("KNEE\\CHEST", "CHEST", True),  # a list of alternatives
    ("KNEE\\HAND", "CHEST", False),
])
def test_single_value_wildcards_and_lists(wanted, answer, expected):
    assert matches("BodyPartExamined", wanted, answer) is expected


def test_multi_valued_answers_match_when_any_value_does():
    assert matches("ModalitiesInStudy", "DX", MultiValue(str, ["CR", "DX"])) is True
    assert matches("ModalitiesInStudy", "DX", ["CR", "DX"]) is True
    assert matches("ModalitiesInStudy", "DX", "CR\\DX") is True  # as a raw string
    assert matches("ModalitiesInStudy", "MR", ["CR", "DX"]) is False
    assert matches("ModalitiesInStudy", "MR\\DX", "CR\\DX") is True
    assert matches("ModalitiesInStudy", "D?", ["CR", "DX"]) is True


@pytest.mark.parametrize("wanted,answer,expected", [
    ("20120304", "20120304", True),
    ("20120304", "20120305", False),
    ("20110101-20161231", "20110101", True),
    ("20110101-20161231", "20161231", True),
    ("20110101-20161231", "20170101", False),
    ("20110101-20161231", "20101231", False),
    ("-19561231", "19400101", True),
    ("-19561231", "19570101", False),
    ("20200101-", "20251231", True),
    ("20200101-", "20191231", False),
    ("20110101-20161231", "2012.03.04", True),  # ACR-NEMA style in old archives
    ("20110101-20111231\\20130101-20131231", "20130606", True),
    ("20110101-20111231\\20130101-20131231", "20120606", False),
])
def test_dates_and_date_ranges(wanted, answer, expected):
    assert matches("StudyDate", wanted, answer) is expected


def test_date_objects_from_pydicom_are_understood():
    assert matches("StudyDate", "20110101-20161231", date(2012, 3, 4)) is True
    assert matches("StudyDate", "20110101-20161231", date(2017, 3, 4)) is False
    assert matches("PatientBirthDate", "19810102-19961231", DA("19900101")) is True
    assert matches("PatientBirthDate", "19810102-19961231", DA("19700101")) is False


@pytest.mark.parametrize("wanted,answer,expected", [
    ("0800-1200", "093015.123", True),
    ("0800-1200", "120030", True),  # '12' as the upper bound covers the whole minute 12:00
    ("0800-1200", "130000", False),
    ("0800-1200", "075959.999", False),
    ("-0800", "070000", True),
    ("1300-", "125959", False),
    ("09", "093015", True),  # a partial time stands for the whole hour
    ("09", "103015", False),
    ("093015", "093015.5", True),
])
def test_times_and_time_ranges(wanted, answer, expected):
    assert matches("StudyTime", wanted, answer) is expected
    assert matches("StudyTime", "0800-1200", time(9, 30)) is True


@pytest.mark.parametrize("wanted,answer,expected", [
    ("20110101-20111231", "20110615083000", True),
    ("20110101-20111231", "20120615083000", False),
    ("20110615080000-20110615090000", "20110615083000.5+0100", True),
    ("2011", "20110615", True),
    ("2011", "20120615", False),
    ("-2011", "20101231235959", True),
])
def test_date_times(wanted, answer, expected):
    assert matches("AcquisitionDateTime", wanted, answer) is expected
    assert matches("AcquisitionDateTime", "2011", datetime(2011, 6, 15, 8, 30)) is True


def test_uids_match_exactly_or_by_list():
    assert matches("StudyInstanceUID", "1.2.3", "1.2.3") is True
    assert matches("StudyInstanceUID", "1.2.3", "1.2.30") is False
    assert matches("StudyInstanceUID", "1.2.3\\1.2.4", "1.2.4") is True
    assert matches("StudyInstanceUID", "1.2.3\\1.2.4", "1.2.5") is False


def test_numbers_person_names_and_unknown_keywords():
    assert matches("SeriesNumber", "3", "3") is True
    assert matches("SeriesNumber", "3", 3) is True
    assert matches("SeriesNumber", "3", "03") is True
    assert matches("SeriesNumber", "3", "4") is False
    assert matches("PatientName", "doe^*", PersonName("DOE^JOHN")) is True  # PN: case-insensitive
    assert matches("PatientName", "SMITH*", PersonName("DOE^JOHN")) is False
    assert matches("NotAKeyword", "X*", "XY") is True
    assert matches("PixelRepresentation", "0", 0) is True  # 'US or SS' compares as a number
    assert matches("ReferencedStudySequence", "1.2.3", [Dataset()]) is None  # sequences: cannot verify


def test_sex_values():
    assert matches("PatientSex", "F", "F") is True
    assert matches("PatientSex", "F", "M") is False
    assert matches("PatientSex", "F", "") is None  # an empty PatientSex: unknown, not 'not F'


def _answer(**kw) -> Dataset:
    ds = Dataset()
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


def test_verify_a_dataset_answer():
    q = {"QueryRetrieveLevel": "SERIES", "StudyDate": "20110101-20161231", "Modality": "CR",
         "BodyPartExamined": "CHEST", "PatientSex": "F", "StudyInstanceUID": "", "SeriesInstanceUID": ""}
    good = _answer(QueryRetrieveLevel="SERIES", StudyDate="20120304", Modality="CR", BodyPartExamined="CHEST",
                   PatientSex="F", StudyInstanceUID="1.2.3", SeriesInstanceUID="1.2.3.4")
    assert verify(q, good) == (True, [])
    assert mismatched_keys(q, good) == []

    wrong_part = _answer(StudyDate="20120304", Modality="CR", BodyPartExamined="KNEE", PatientSex="F")
    assert verify(q, wrong_part) == (False, [])
    assert mismatched_keys(q, wrong_part) == ["BodyPartExamined"]

    # a PACS that does not return PatientSex (dcmqrscp) or returns it empty: cannot be verified
    no_sex = _answer(StudyDate="20120304", Modality="CR", BodyPartExamined="CHEST")
    ok, unverifiable = verify(q, no_sex)
    assert ok and unverifiable == ["PatientSex"]
    empty_sex = _answer(StudyDate="20120304", Modality="CR", BodyPartExamined="CHEST", PatientSex="")
    assert verify(q, empty_sex) == (True, ["PatientSex"])
    # a contradiction wins over the unverifiable keys
    assert verify(q, _answer(StudyDate="20190101", Modality="CR")) == (False, ["BodyPartExamined", "PatientSex"])


def test_verify_a_dict_answer_and_multi_valued_elements():
    ds = _answer(ModalitiesInStudy=["CR", "DX"], StudyDate="20120304")
    ok, unverifiable = verify({"ModalitiesInStudy": "DX"}, ds)
    assert ok and not unverifiable
    assert verify({"ModalitiesInStudy": "MR"}, ds).ok is False
    assert verify({"Modality": "CR", "PatientSex": "M"}, {"Modality": "CR", "PatientSex": None}) == (True, ["PatientSex"])
    assert verify({}, ds) == (True, [])
