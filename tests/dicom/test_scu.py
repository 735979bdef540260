"""The SCU against a real Orthanc: echo, find at every level (both roots), result caps, errors."""

from __future__ import annotations

import pytest

from app.devtools.orthanc import free_port
from app.dicom.queries import build_identifier, validate_query
from app.dicom.scu import DicomClient, Node
from app.errors import InvalidInput, PermanentDicomError, RetriableDicomError

from tests.dicom.helpers import make_studies, upload_all


def node(orthanc) -> Node:
    return Node("ORTHANC", "127.0.0.1", orthanc.dicom_port, "pacs")


@pytest.fixture
def loaded(orthanc, tmp_path):
    studies = make_studies(tmp_path / "gen", ["20120101", "20130615", "20160101"], series_per_study=2,
                           instances_per_series=2)
    upload_all(orthanc, sorted((tmp_path / "gen").iterdir()))
    return orthanc, studies


# ------------------------------------------------------------------ queries (no network)
def test_identifier_has_level_return_keys_and_matching_values():
    ds = build_identifier("IMAGE", {"StudyDate": "20110101-20161231", "BodyPartExamined": "CHE*",
                                    "SeriesDescription": "PA?"})
    assert ds.QueryRetrieveLevel == "IMAGE"
    assert ds.StudyDate == "20110101-20161231"
    assert ds.BodyPartExamined == "CHE*"
    assert ds.SeriesDescription == "PA?"
    assert "SOPInstanceUID" in ds and ds.SOPInstanceUID in ("", None)


@pytest.mark.parametrize("query, field", [
    ({"NoSuchKeyword": "x"}, "query.NoSuchKeyword"),
    ({"StudyDate": "2011-01-01"}, "query.StudyDate"),
    ({"StudyDate": "20161231-20110101"}, "query.StudyDate"),
    ({"StudyDate": "20110230"}, "query.StudyDate"),
    ({"StudyDate": "2011*"}, "query.StudyDate"),
    ({"StudyInstanceUID": "1.2.abc"}, "query.StudyInstanceUID"),
    ({"SeriesNumber": "one"}, "query.SeriesNumber"),
    ({"ReferencedImageSequence": ""}, "query.ReferencedImageSequence"),
])
def test_bad_queries_name_the_field(query, field):
    with pytest.raises(InvalidInput) as exc:
        validate_query(query)
    assert field in exc.value.message


def test_patient_level_needs_patient_root():
    with pytest.raises(InvalidInput, match="level"):
        build_identifier("PATIENT", {}, root="study")
    assert build_identifier("PATIENT", {}, root="patient").QueryRetrieveLevel == "PATIENT"
    with pytest.raises(InvalidInput, match="level"):
        build_identifier("FRAME", {})


# ------------------------------------------------------------------ against Orthanc
def test_echo(orthanc, settings):
    assert DicomClient(settings, node(orthanc)).echo() > 0


def test_unreachable_is_retriable_and_retried_with_backoff(settings):
    slept: list[float] = []
    client = DicomClient(settings, Node("NOBODY", "127.0.0.1", free_port()), retries=2, backoff=0.1,
                         sleep=slept.append)
    with pytest.raises(RetriableDicomError, match="cannot reach"):
        client.echo()
    assert len(slept) == 2
    assert 0.05 <= slept[0] <= 0.15 and 0.1 <= slept[1] <= 0.3  # exponential with jitter


def test_find_every_level_both_roots(loaded, settings):
    orthanc, studies = loaded
    c = DicomClient(settings, node(orthanc))
    all_sops = {u for st in studies for u in st.sop_uids}
    # study root
    r = c.find("STUDY", {"StudyDate": "20120101-20141231"})
    assert not r.capped and r.status == 0
    assert {d.StudyInstanceUID for d in r.results} == {studies[0].study_uid, studies[1].study_uid}
    r = c.find("SERIES", {"StudyInstanceUID": studies[0].study_uid})
    assert {d.SeriesInstanceUID for d in r.results} == set(studies[0].series)
    assert all(d.Modality == "CR" for d in r.results)
    r = c.find("IMAGE", {"StudyDate": "20110101-20161231", "BodyPartExamined": "CHE*", "SeriesDescription": "P?"})
    assert {d.SOPInstanceUID for d in r.results} == all_sops
    # patient root: PATIENT -> STUDY -> SERIES -> IMAGE
    r = c.find("PATIENT", {"PatientID": "P1"}, root="patient")
    assert [str(d.PatientID) for d in r.results] == ["P1"]
    r = c.find("STUDY", {"PatientID": "P1"}, root="patient")
    assert [d.StudyInstanceUID for d in r.results] == [studies[1].study_uid]
    series_uid = next(iter(studies[1].series))
    r = c.find("SERIES", {"PatientID": "P1", "StudyInstanceUID": studies[1].study_uid}, root="patient")
    assert series_uid in {d.SeriesInstanceUID for d in r.results}
    r = c.find("IMAGE", {"PatientID": "P1", "StudyInstanceUID": studies[1].study_uid,
                         "SeriesInstanceUID": series_uid}, root="patient")
    assert {d.SOPInstanceUID for d in r.results} == set(studies[1].series[series_uid])
    # no match is an empty answer, not an error
    assert c.find("STUDY", {"StudyDate": "19990101"}).results == []


def test_find_detects_the_result_cap(orthanc_factory, settings, tmp_path):
    pacs = orthanc_factory(modalities={"rc": (settings.ae_title, "127.0.0.1", settings.scp_port)},
                           overrides={"LimitFindResults": 2})
    make_studies(tmp_path / "gen", ["20120101", "20120102", "20120103"], instances_per_series=1)
    upload_all(pacs, sorted((tmp_path / "gen").iterdir()))
    c = DicomClient(settings, node(pacs))
    r = c.find("STUDY", {"StudyDate": "20120101-20121231"})
    assert r.capped and len(r.results) == 2
    assert not c.find("STUDY", {"StudyDate": "20120101"}).capped


def test_unknown_move_destination_is_permanent(loaded, settings):
    orthanc, studies = loaded
    c = DicomClient(settings, node(orthanc), retries=3, sleep=lambda s: pytest.fail("permanent errors are not retried"))
    with pytest.raises(PermanentDicomError) as exc:
        c.move("STUDY", {"StudyInstanceUID": studies[0].study_uid}, destination="NOWHERE")
    # the standard says 0xA801; Orthanc 1.10 answers 0xC000 ("Unknown modality for AET") — both permanent
    assert exc.value.status in (0xA801, 0xC000)


@pytest.mark.parametrize("status, kind", [(0xA801, PermanentDicomError), (0xA900, PermanentDicomError),
                                          (0xC000, PermanentDicomError), (0xA700, RetriableDicomError),
                                          (0xA702, RetriableDicomError)])
def test_status_classification(status, kind):
    from app.dicom.scu import _failure

    err = _failure("C-MOVE", Node("X", "h", 1), status)
    assert type(err) is kind and err.status == status


def test_calling_ae_unknown_to_the_pacs_fails_clearly(loaded, settings):
    orthanc, _ = loaded
    settings.ae_title = "STRANGER"
    c = DicomClient(settings, node(orthanc), retries=0)
    with pytest.raises(RetriableDicomError, match="allowed to query"):
        c.find("STUDY", {"StudyDate": "20120101"})


@pytest.mark.parametrize("n", [1, 3, 7, 8, 9, 20, 127, 200])
def test_get_contexts_fit_the_limit_and_leave_no_expected_class_out(n):
    from app.dicom.scp import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES
    from app.dicom.scu import storage_contexts_for_get

    classes = [f"1.2.826.0.1.3680043.10.780.{i}" for i in range(n)]
    cxs = storage_contexts_for_get(127, classes)
    assert len(cxs) <= 127
    by_class: dict[str, list[list[str]]] = {}
    for cx in cxs:
        by_class.setdefault(cx.abstract_syntax, []).append(list(cx.transfer_syntax))
    for sop in classes[:127]:
        groups = by_class[sop]
        offered = [ts for g in groups for ts in g]
        assert sorted(offered) == sorted(TRANSFER_SYNTAXES)  # every syntax, each once
        if len(groups) > 1:  # then uncompressed and JPEG 2000 lossless have contexts of their own
            assert ["1.2.840.10008.1.2.1"] in groups and ["1.2.840.10008.1.2.4.90"] in groups
    if n <= 7:  # room for one context per syntax, and the rest of our SCP's classes after them
        assert all(len(by_class[sop]) == len(TRANSFER_SYNTAXES) for sop in classes)
        assert set(STORAGE_SOP_CLASSES) <= set(by_class) or len(cxs) == 127


# ------------------------------------------------------------------ the listing's lanes
def test_a_listing_walks_studies_over_several_associations_with_the_same_result(loaded, settings):
    """list_expected(lanes=3): the studies' series and image finds go out at once (within the lanes),
    and the listing is the one a single lane makes, in the same order."""
    import threading
    import time

    from app.retrievals.expected import list_expected

    orthanc, studies = loaded
    inner = DicomClient(settings, node(orthanc))
    lock = threading.Lock()
    state = {"now": 0, "peak": 0}

    class Spy:  # the real client, counting finds in flight (slowed a little so that overlaps are certain)
        def find(self, level, query=None, **kw):
            with lock:
                state["now"] += 1
                state["peak"] = max(state["peak"], state["now"])
            try:
                time.sleep(0.05)
                return inner.find(level, query, **kw)
            finally:
                with lock:
                    state["now"] -= 1

    query = {"StudyDate": "20110101-20161231"}
    one = list_expected(Spy(), query, lanes=1)
    assert state["peak"] == 1
    three = list_expected(Spy(), query, lanes=3)
    assert 2 <= state["peak"] <= 3
    every = {sop for st in studies for sops in st.series.values() for sop in sops}
    assert list(three.items) == list(one.items) and set(one.items) == every
    assert three.items == one.items
    assert three.finds == one.finds == 1 + 3 + 3 * 2  # studies, then each study's series, then each series
    assert three.report() == one.report()
