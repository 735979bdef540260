"""Planning retrieves (pure): batch whole studies, name only missing instances, split on refusal."""

from __future__ import annotations

from app.retrievals.expected import ExpectedInstance, date_bounds
from app.retrievals.plan import Unit, _split, plan_units, query_depth


def expected(n_studies: int, n_series: int = 2, n_inst: int = 2) -> dict[str, ExpectedInstance]:
    out = {}
    for a in range(n_studies):
        for b in range(n_series):
            for c in range(n_inst):
                sop = f"1.{a}.{b}.{c}"
                out[sop] = ExpectedInstance(sop, f"1.{a}.{b}", f"1.{a}")
    return out


def test_whole_studies_go_in_batches():
    exp = expected(120, 1, 1)
    units = plan_units(list(exp.values()), exp, "STUDY")
    assert [u.level for u in units] == ["STUDY"] * 3
    assert [len(u.studies) for u in units] == [50, 50, 20]
    assert units[0].keys["StudyInstanceUID"].split("\\")[:2] == ["1.0", "1.1"]
    assert sorted(u for x in units for u in x.sops) == sorted(exp)


def test_only_missing_instances_are_named():
    exp = expected(2)
    missing = [e for k, e in exp.items() if k != "1.0.0.0"]  # one instance of study 1.0 is indexed
    units = plan_units(missing, exp, "STUDY")
    by_level = {u.level: u for u in units}
    assert by_level["STUDY"].studies == ["1.1"]  # untouched study: whole
    assert by_level["SERIES"].studies == ["1.0"] and by_level["SERIES"].series == ["1.0.1"]
    assert by_level["IMAGE"].keys == {"StudyInstanceUID": "1.0", "SeriesInstanceUID": "1.0.0",
                                      "SOPInstanceUID": "1.0.0.1"}


def test_series_level_query_never_moves_whole_studies():
    exp = expected(2)
    assert query_depth({"StudyDate": "20120101", "Modality": "CR", "PatientName": ""}) == "SERIES"
    units = plan_units(list(exp.values()), exp, "SERIES")
    assert [u.level for u in units] == ["SERIES", "SERIES"]
    assert all(len(u.series) == 2 and len(u.studies) == 1 for u in units)
    assert query_depth({"InstanceNumber": "1"}) == "IMAGE"
    assert {u.level for u in plan_units(list(exp.values()), exp, "IMAGE")} == {"IMAGE"}


def test_refused_or_short_batches_split_to_single_uids_then_series():
    exp = expected(3)
    (batch,) = plan_units(list(exp.values()), exp, "STUDY")
    singles = _split(batch, exp)
    assert [u.studies for u in singles] == [["1.0"], ["1.1"], ["1.2"]] and all(u.level == "STUDY" for u in singles)
    per_series = _split(singles[0], exp)
    assert [(u.level, u.series) for u in per_series] == [("SERIES", ["1.0.0"]), ("SERIES", ["1.0.1"])]
    assert _split(per_series[0], exp) == []
    only = _split(batch, exp, only={"1.2.0.0"})
    assert [(u.studies, u.sops) for u in only] == [(["1.2"], ["1.2.0.0"])]
    assert Unit("IMAGE", ["1"], ["1.1"], ["1.1.1"]).batched is False


def test_date_bounds():
    assert [d.isoformat() for d in date_bounds("20110101-20161231")] == ["2011-01-01", "2016-12-31"]
    assert date_bounds("20110101")[0] == date_bounds("20110101")[1]
    assert date_bounds("-20110101")[0].year == 1900 and date_bounds("20110101-")[1].year == 2099
