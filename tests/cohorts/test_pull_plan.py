"""Pull to quota: the C-FIND plan for a taxonomy (pure)."""

from __future__ import annotations

from datetime import date

import pytest

from app.cohorts.pull import birth_date_range, parse_date_range, plan_queries
from app.cohorts.taxonomies import presets
from app.labels.engine import age_from_dates, load_rules


def test_age_ranges_become_birth_date_ranges():
    start, end = date(2011, 1, 1), date(2016, 12, 31)
    rng = birth_date_range(20, 30, start, end)
    assert rng == "19810102-19961231"
    lo, hi = rng.split("-")
    # the extremes are in the band on some study day; one day beyond is not
    assert age_from_dates(hi, "20161231") == 20.0
    assert age_from_dates(lo, "20110101") < 30 <= age_from_dates("19810101", "20110101")
    assert birth_date_range(60, None, start, end) == "-19561231"
    assert birth_date_range(None, None, start, end) is None


def test_plan_for_xr10():
    qs = plan_queries(presets()["xr10"], "20110101-20161231", load_rules())
    by_class: dict[str, list] = {}
    for q in qs:
        assert q["level"] == "SERIES" and q["query"]["StudyDate"] == "20110101-20161231"
        assert "PatientAge" not in q["query"] and "ViewPosition" not in q["query"]
        by_class.setdefault(q["class"], []).append(q)
    assert set(by_class) == {c["name"] for c in presets()["xr10"]["classes"]}
    c20f = by_class["C20F"]
    assert {q["query"]["Modality"] for q in c20f} == {"CR", "DX"}
    assert {"CHEST", "THORAX", "LUNG"} <= {q["query"]["BodyPartExamined"] for q in c20f}
    assert all(q["query"]["PatientSex"] == "F" and q["query"]["PatientBirthDate"] == "19810102-19961231"
               for q in c20f)
    assert c20f[0]["post_filter"]["view"] == "PA"
    w = by_class["W"]
    parts = {q["query"]["BodyPartExamined"] for q in w}
    assert {"SINUS", "PNS", "SKULL", "HEAD"} <= parts  # Waters views are often tagged SKULL/HEAD
    assert w[0]["post_filter"] == {"view": "WATERS", "body_part": "SINUS"}
    ltk = by_class["LtK"]
    assert ltk[0]["post_filter"]["laterality"] == "L" and "PatientSex" not in ltk[0]["query"]


def test_age_band_and_bad_ranges():
    tax = {"classes": [{"name": "teen", "where": {"body_part": "HAND", "age_band": "10-19", "sex": ["F", "M"]}}]}
    (q,) = plan_queries(tax, ("20200101", "20201231"))
    assert q["query"]["BodyPartExamined"] == "HAND" and "PatientSex" not in q["query"]
    (q,) = plan_queries(tax, ("20200101", "20201231"), load_rules()) [:1]
    assert q["query"]["PatientBirthDate"] == "20000102-20101231"
    assert parse_date_range("20200101-20201231") == (date(2020, 1, 1), date(2020, 12, 31))
    with pytest.raises(ValueError):
        parse_date_range("2020")
    with pytest.raises(ValueError):
        parse_date_range("20210101-20200101")


def test_every_planned_value_is_verified_and_keys_the_node_ignores_are_not_sent():
    tax = {"classes": [{"name": "C20F", "where": {"modality": "CR", "body_part": "CHEST", "sex": "F",
                                                  "age_years": {"min": 20, "max": 29}}}]}
    (q,) = plan_queries(tax, "20110101-20161231")  # never probed: every key is sent, and verified
    assert q["verify"] == {"StudyDate": "20110101-20161231", "PatientSex": "F",
                           "PatientBirthDate": "19810102-19961231", "Modality": "CR", "BodyPartExamined": "CHEST"}
    assert q["not_sent"] == [] and all(q["query"][k] == v for k, v in q["verify"].items())

    # the probe of a dcmqrscp-like node: SERIES-level keys it ignores or refuses are only return keys
    caps = {"keys_not_honoured": {"STUDY": ["ModalitiesInStudy"], "SERIES": ["BodyPartExamined", "PatientSex"]},
            "keys_refused": {"SERIES": ["PatientBirthDate"]}}
    (q,) = plan_queries(tax, "20110101-20161231", capabilities=caps)
    assert q["not_sent"] == ["BodyPartExamined", "PatientBirthDate", "PatientSex"]
    assert {k: q["query"][k] for k in q["not_sent"]} == {"BodyPartExamined": "", "PatientBirthDate": "",
                                                           "PatientSex": ""}
    assert q["query"]["Modality"] == "CR" and q["query"]["StudyDate"] == "20110101-20161231"
    assert q["verify"]["BodyPartExamined"] == "CHEST" and q["verify"]["PatientSex"] == "F"
    # a probe that learnt nothing about keys (no study to test against) withholds nothing
    (q,) = plan_queries(tax, "20110101-20161231", capabilities={"keys_not_honoured": None})
    assert q["not_sent"] == []
