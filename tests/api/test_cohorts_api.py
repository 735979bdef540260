"""/api/v1/cohorts: create (201) / preview (200), list, get, manifest CSV, validation errors."""

from __future__ import annotations

import csv
import io
import sys

from app.labels.service import make_labeler
from tests.factories.index_rows import add_index_rows


def _index(ctx, n=10):
    recs = []
    for i in range(n):
        for pid, extra in ((f"L{i}", {"image_laterality": "L"}), (f"R{i}", {"image_laterality": "R"})):
            recs.append({"patient_id": pid, "patient_name": f"SECRET^{pid}", "patient_sex": "M",
                         "patient_age": "040Y", "body_part_examined": "KNEE", "view_position": "AP", **extra})
    with ctx.sessions() as s:
        rows = add_index_rows(s, recs, make_labeler(s))
        for r in rows:
            f = ctx.settings.store_dir / r.file_path
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(b"DICM")
        s.commit()


def test_preview_create_list_get_manifest(client, ctx):
    _index(ctx)
    body = {"taxonomy": "xr10", "per_class": 6, "split": {"train": 0.5, "test": 0.5}, "seed": 3}
    r = client.post("/api/v1/cohorts", json={**body, "preview": True})
    assert r.status_code == 200, r.text
    assert r.json()["id"] is None and r.json()["size"] == 12
    preview_version = r.json()["ruleset_version"]
    assert preview_version and preview_version.startswith("builtin-")
    assert client.get("/api/v1/cohorts").json() == {"total": 0, "items": []}
    r = client.post("/api/v1/cohorts", json=body)
    assert r.status_code == 201, r.text
    out = r.json()
    assert out["ruleset_version"] == preview_version  # the index was labelled with the rule set in force
    classes = {c["name"]: c for c in out["classes"]}
    assert classes["LtK"] == {"name": "LtK", "available": 10, "selected": 6, "incomplete_label": 0,
                              "train": 3, "val": 0, "test": 3}
    assert set(out["excluded"]) >= {"no_label", "conflicting_labels", "duplicate_patient", "patient_in_two_classes",
                                    "not_an_image", "unsupported_photometric", "file_missing"}
    got = client.get(f"/api/v1/cohorts/{out['id']}").json()
    assert got["taxonomy_definition"]["name"] == "xr10" and got["seed"] == 3 and got["params"]["per_class"] == 6
    assert [c["id"] for c in client.get("/api/v1/cohorts").json()["items"]] == [out["id"]]
    r = client.get(f"/api/v1/cohorts/{out['id']}/manifest")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert len(rows) == 12 and {x["class"] for x in rows} == {"LtK", "RtK"}
    assert "SECRET" not in r.text and ",L1," not in r.text
    assert all(len(x["patient_key"]) == 64 for x in rows)
    assert client.get("/api/v1/cohorts/999").status_code == 404
    assert client.get("/api/v1/cohorts/999/manifest").status_code == 404

    # the same manifest as Parquet, with the snapshot's identity in the file's metadata
    import pyarrow.parquet as pq

    r = client.get(f"/api/v1/cohorts/{out['id']}/manifest", params={"format": "parquet"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/vnd.apache.parquet"
    assert f'cohort-{out["id"]}.parquet' in r.headers["content-disposition"]
    table = pq.read_table(io.BytesIO(r.content))
    assert table.column_names == ["sop_instance_uid", "class", "split", "patient_key"]
    assert table.to_pylist() == rows
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    assert meta["radcohort.cohort_id"] == str(out["id"]) and meta["radcohort.taxonomy"] == "xr10"
    assert meta["radcohort.seed"] == "3" and meta["radcohort.ruleset_version"] == out["ruleset_version"]
    assert b"SECRET" not in r.content
    assert client.get("/api/v1/cohorts/999/manifest", params={"format": "parquet"}).status_code == 404
    r = client.get(f"/api/v1/cohorts/{out['id']}/manifest", params={"format": "xlsx"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "format"]


def test_parquet_without_pyarrow_is_a_clear_501(client, ctx, monkeypatch):
    _index(ctx)
    cid = client.post("/api/v1/cohorts", json={"taxonomy": "xr10", "seed": 1}).json()["id"]
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as on an install without the parquet extra
    r = client.get(f"/api/v1/cohorts/{cid}/manifest", params={"format": "parquet"})
    assert r.status_code == 501 and "radcohort[parquet]" in r.json()["detail"]
    assert client.get(f"/api/v1/cohorts/{cid}/manifest").status_code == 200  # CSV needs nothing more


def test_validation_errors(client, ctx):
    _index(ctx, 2)
    cases = [
        ({"taxonomy": "nope"}, ["body", "taxonomy"]),
        ({"taxonomy": "xr10", "split": {"train": 0.7, "test": 0.2}}, ["body", "split"]),
        ({"taxonomy": "xr10", "split": {"train": 0.8, "holdout": 0.2}}, ["body", "split"]),
        ({"taxonomy": "xr10", "per_class": 0}, ["body", "per_class"]),
        ({"taxonomy": "xr10", "split": {"train": 1.0}}, ["body", "split"]),  # no test set
        ({"taxonomy": "xr10", "split": {"train": 1.0, "test": 0.0}}, ["body", "split"]),
        ({"taxonomy": "xr10", "seed": -1}, ["body", "seed"]),
        ({"taxonomy": "xr10", "colour": "red"}, ["body", "colour"]),
        ({}, ["body", "taxonomy"]),
    ]
    for body, loc in cases:
        r = client.post("/api/v1/cohorts", json=body)
        assert r.status_code == 422, (body, r.text)
        assert r.json()["detail"][0]["loc"] == loc, (body, r.json())
    r = client.post("/api/v1/taxonomies", json={"name": "elbows", "classes": [{"name": "E",
                                                                               "where": {"body_part": "ELBOW"}}]})
    assert r.status_code == 201
    r = client.post("/api/v1/cohorts", json={"taxonomy": "elbows"})
    assert r.status_code == 422 and "nothing saved" in r.json()["detail"]
    assert client.get("/api/v1/cohorts").json() == {"total": 0, "items": []}


def test_warnings_for_unfilled_quotas_and_empty_classes(client, ctx):
    """1,500 asked with 10 per class available, and xr10's other classes empty: said, not silent."""
    _index(ctx)
    r = client.post("/api/v1/cohorts", json={"taxonomy": "xr10", "per_class": 1500, "seed": 0})
    assert r.status_code == 201, r.text
    warnings = r.json()["warnings"]
    assert any(w.startswith("no images for class(es) W, Ps, LtE, RtE, C20F") for w in warnings), warnings
    assert any("quota of 1500 per class not filled" in w and "LtK 10" in w and "RtK 10" in w for w in warnings)
    assert client.get(f"/api/v1/cohorts/{r.json()['id']}").json()["warnings"] == warnings  # kept with the snapshot
    r = client.post("/api/v1/cohorts", json={"taxonomy": "xr10", "per_class": 1, "preview": True})
    assert any("no test image for LtK, RtK" in w for w in r.json()["warnings"])  # 1 image: train only


def test_delete_cohort_and_taxonomy_unless_something_depends_on_them(client, ctx):
    from app.db.base import session_scope
    from app.db.models import CohortMember, TrainingJob

    _index(ctx)
    knee = {"name": "knee-lr", "classes": [{"name": "LtK", "where": {"body_part": "KNEE", "laterality": "L"}},
                                           {"name": "RtK", "where": {"body_part": "KNEE", "laterality": "R"}}]}
    assert client.post("/api/v1/taxonomies", json=knee).status_code == 201
    used = client.post("/api/v1/cohorts", json={"taxonomy": "knee-lr"}).json()["id"]
    trained = client.post("/api/v1/cohorts", json={"taxonomy": "xr10", "seed": 1}).json()["id"]
    with session_scope(ctx.sessions) as s:
        s.add(TrainingJob(cohort_id=trained, status="completed", params={}))
    # presets and taxonomies with cohorts stay
    r = client.delete("/api/v1/taxonomies/xr10")
    assert r.status_code == 409 and "preset" in r.json()["detail"]
    r = client.delete("/api/v1/taxonomies/knee-lr")
    assert r.status_code == 409 and f"cohort(s) {used}" in r.json()["detail"]
    r = client.delete(f"/api/v1/cohorts/{trained}")
    assert r.status_code == 409 and "training job(s) 1" in r.json()["detail"]
    # unused: gone, members with it
    assert client.delete(f"/api/v1/cohorts/{used}").status_code == 204
    assert client.get(f"/api/v1/cohorts/{used}").status_code == 404
    with session_scope(ctx.sessions) as s:
        assert s.query(CohortMember).filter_by(cohort_id=used).count() == 0
        assert s.query(CohortMember).filter_by(cohort_id=trained).count() > 0
    assert client.delete("/api/v1/taxonomies/knee-lr").status_code == 204
    assert client.get("/api/v1/taxonomies/knee-lr").status_code == 404
    assert client.delete("/api/v1/taxonomies/knee-lr").status_code == 404
    assert client.delete(f"/api/v1/cohorts/{used}").status_code == 404
    listing = client.get("/api/v1/cohorts", params={"limit": 1}).json()
    assert listing["total"] == 1 and [c["id"] for c in listing["items"]] == [trained]
    actions = [e["action"] for e in client.get("/api/v1/audit").json()["items"]]
    assert "cohort.delete" in actions and "taxonomy.delete" in actions


def test_every_list_endpoint_has_one_shape_with_paging(client, ctx):
    for path in ("/api/v1/cohorts", "/api/v1/taxonomies", "/api/v1/audit", "/api/v1/training-jobs",
                 "/api/v1/models", "/api/v1/retrievals", "/api/v1/instances", "/api/v1/architectures"):
        r = client.get(path, params={"limit": 1, "offset": 0})
        assert r.status_code == 200, (path, r.text)
        body = r.json()
        assert isinstance(body, dict) and isinstance(body["total"], int) and len(body["items"]) <= 1, path
    page = client.get("/api/v1/taxonomies", params={"limit": 1, "offset": 1}).json()
    assert page["total"] >= 2 and [t["name"] for t in page["items"]] == ["xr5"]
