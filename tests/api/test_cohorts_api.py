"""/api/v1/cohorts: create (201) / preview (200), list, get, manifest CSV, validation errors."""

from __future__ import annotations

import csv
import io
import sys

from app.labels.service import make_labeler
from app.labels.testing import add_index_rows


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
    assert client.get("/api/v1/cohorts").json() == []
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
    assert [c["id"] for c in client.get("/api/v1/cohorts").json()] == [out["id"]]
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
    assert client.get("/api/v1/cohorts").json() == []
