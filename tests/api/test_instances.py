"""GET /api/v1/instances, /instances/{uid}, /stats over a real index (SQLite)."""

from __future__ import annotations

import pytest

from app.index.extract import extract_record
from app.index.ingest import ingest
from tests.dicom.helpers import make_cr

SECRET_NAMES = ["Secret^Alice", "Hidden^Bob", "山田^太郎"]
SECRET_IDS = ["PID-SECRET-1", "PID-SECRET-2", "PID-SECRET-3"]


def _labeler(rec: dict) -> dict:
    bp = rec["body_part_examined"]
    return {"label_body_part": bp, "label_sex": rec["patient_sex"], "label_age_years": 30.0 if bp == "CHEST" else 65.0,
            "label_age_band": "20s" if bp == "CHEST" else "60s", "label_laterality": rec["image_laterality"],
            "label_sources": {"body_part": "BodyPartExamined"},
            "label_conflicts": [{"label": "view", "values": ["PA", "AP"]}] if bp == "KNEE" else [],
            "has_conflict": bp == "KNEE", "ruleset_version": "test-1"}


@pytest.fixture
def indexed(ctx):
    """6 chest (2012), 3 knee R (2015), 1 elbow L (2016) over three patients."""
    recs = []
    plan = [("CHEST", None, "20120301")] * 6 + [("KNEE", "R", "20150610")] * 3 + [("ELBOW", "L", "20161231")]
    for i, (bp, lat, date) in enumerate(plan):
        ds = make_cr(patient_id=SECRET_IDS[i % 3], patient_name=SECRET_NAMES[i % 3], body_part=bp,
                     study_date=date, instance_number=i + 1)
        if lat:
            ds.ImageLaterality = lat
        ds.SpecificCharacterSet = "ISO_IR 192"
        recs.append(extract_record(ds, file_path=f"x/{i}.dcm", file_size=100 + i, transfer_syntax_uid="1.2.840.10008.1.2.1",
                                   source_node="pacs"))
    with ctx.sessions() as s:
        ingest(s, recs, labeler=_labeler)
        s.commit()
    return recs


def _no_identifiers(text: str) -> None:
    for secret in SECRET_NAMES + SECRET_IDS + ["Secret", "Hidden", "山田"]:
        assert secret not in text
    assert "patient_name" not in text and "patient_id" not in text


def test_list_filters_and_pagination(client, indexed):
    r = client.get("/api/v1/instances", params={"limit": 4})
    assert r.status_code == 200
    body = r.json()
    assert body["total"] == 10 and len(body["items"]) == 4
    page2 = client.get("/api/v1/instances", params={"limit": 4, "offset": 8}).json()
    assert [i["sop_instance_uid"] for i in page2["items"]] == [r["sop_instance_uid"] for r in indexed[8:]]
    item = body["items"][0]
    for key in ("sop_instance_uid", "study_instance_uid", "series_instance_uid", "modality", "body_part_examined",
                "view_position", "laterality", "patient_sex", "patient_age_years", "study_date",
                "transfer_syntax_uid", "labels"):
        assert key in item
    assert item["labels"]["body_part"] == "CHEST" and item["labels"]["sources"] == {"body_part": "BodyPartExamined"}
    assert item["patient_age_years"] == 32.0  # born 19800101, study 20120301

    def total(**params) -> int:
        res = client.get("/api/v1/instances", params=params)
        assert res.status_code == 200, res.text
        return res.json()["total"]

    assert total(body_part_examined="KNEE") == 3
    assert total(laterality="R") == 3 and total(laterality="L") == 1
    assert total(label_body_part="CHEST", label_age_band="20s") == 6
    assert total(study_date_from="20150101") == 4
    assert total(study_date="20120101-20151231") == 9
    assert total(study_date="20161231") == 1
    assert total(study_date="-20121231") == 6
    assert total(has_conflict=True) == 3
    assert total(age_min=60) == 4
    assert total(modality="CR", patient_sex="F") == 10
    assert total(modality="DX") == 0
    assert total(sop_instance_uid=indexed[3]["sop_instance_uid"]) == 1
    assert total(study_instance_uid=indexed[0]["study_instance_uid"]) == 1
    assert total(source_node="pacs") == 10


def test_never_exposes_patient_name_or_id(client, indexed):
    _no_identifiers(client.get("/api/v1/instances", params={"limit": 1000}).text)
    _no_identifiers(client.get(f"/api/v1/instances/{indexed[0]['sop_instance_uid']}").text)
    _no_identifiers(client.get("/api/v1/stats").text)


def test_get_one_and_404(client, indexed):
    r = client.get(f"/api/v1/instances/{indexed[7]['sop_instance_uid']}")
    assert r.status_code == 200
    assert r.json()["labels"]["conflicts"] == [{"label": "view", "values": ["PA", "AP"]}]
    assert client.get("/api/v1/instances/1.2.3.4").status_code == 404
    assert client.get("/api/v1/instances/1.2..3").status_code == 422


@pytest.mark.parametrize("params,field", [
    ({"limit": 0}, "limit"), ({"limit": 5000}, "limit"), ({"offset": -1}, "offset"),
    ({"study_date_from": "2012-01-01"}, "study_date_from"), ({"age_min": -3}, "age_min"),
    ({"sop_instance_uid": "1.2/../x"}, "sop_instance_uid"),
])
def test_bad_parameters_are_422_with_field(client, params, field):
    r = client.get("/api/v1/instances", params=params)
    assert r.status_code == 422
    assert any(field in d["loc"] for d in r.json()["detail"])


def test_bad_study_date_range_is_422(client):
    r = client.get("/api/v1/instances", params={"study_date": "2012-2013"})
    assert r.status_code == 422 and "study_date" in r.json()["detail"]


def test_stats(client, indexed):
    s = client.get("/api/v1/stats").json()
    assert (s["patients"], s["studies"], s["series"], s["instances"]) == (3, 10, 10, 10)
    assert s["labels"]["body_part"] == {"CHEST": 6, "KNEE": 3, "ELBOW": 1}
    assert s["labels"]["age_band"] == {"20s": 6, "60s": 4}
    assert s["labels"]["view"] == {"unlabeled": 10}
    assert s["with_conflicts"] == 3 and s["modalities"] == {"CR": 10}


def test_token_required_when_configured(tmp_path):
    from fastapi.testclient import TestClient

    from app.api import create_app
    from app.context import AppContext
    from app.db.migrate import upgrade
    from tests.conftest import make_settings

    s = make_settings(tmp_path, api_tokens="t0k")
    upgrade(s.database_url)
    c = AppContext.build(s)
    try:
        with TestClient(create_app(s, c)) as client:
            assert client.get("/api/v1/instances").status_code == 401
            assert client.get("/api/v1/stats", headers={"Authorization": "Bearer t0k"}).status_code == 200
    finally:
        c.close()


def test_unknown_query_parameter_is_422_listing_the_accepted_ones(client, indexed):
    """`?body_part=KNEE` used to return all 10 instances: a typo must not look like an empty filter."""
    r = client.get("/api/v1/instances", params={"body_part": "KNEE", "limit": 5})
    assert r.status_code == 422
    (err,) = r.json()["detail"]
    assert err["loc"] == ["query", "body_part"] and "label_body_part" in err["msg"]
    assert {"label_body_part", "modality", "limit", "offset"} <= set(err["ctx"]["accepted"])
    r = client.get("/api/v1/instances", params={"label_body_part": "KNEE"})
    assert r.status_code == 200 and 0 < r.json()["total"] < 10
