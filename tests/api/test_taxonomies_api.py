"""/api/v1/taxonomies: presets, user taxonomies, 409 on duplicates, 422 with field-level detail."""

from __future__ import annotations


def test_presets_listed_in_the_post_shape(client):
    r = client.get("/api/v1/taxonomies")
    assert r.status_code == 200
    assert r.json()["total"] == len(r.json()["items"]) >= 2
    by_name = {t["name"]: t for t in r.json()["items"]}
    assert [c["name"] for c in by_name["xr10"]["classes"]] == ["W", "Ps", "LtE", "RtE", "LtK", "RtK", "C20F",
                                                              "C20M", "C60F", "C60M"]
    assert [c["name"] for c in by_name["xr5"]["classes"]] == ["W", "H", "K", "E", "C"]
    assert by_name["xr10"]["classes"][6]["where"]["age_years"] == {"min": 20, "max": 29}
    one = client.get("/api/v1/taxonomies/xr5").json()
    # a preset can be posted back under another name as is
    r = client.post("/api/v1/taxonomies", json={"name": "xr5-copy", "classes": one["classes"]})
    assert r.status_code == 201, r.text
    assert client.get("/api/v1/taxonomies/nope").status_code == 404


def test_create_user_taxonomy_and_duplicates(client):
    body = {"name": "knee-lr", "classes": [{"name": "LtK", "where": {"body_part": "KNEE", "laterality": "L"}},
                                           {"name": "RtK", "where": {"body_part": "KNEE", "laterality": "R"}}]}
    r = client.post("/api/v1/taxonomies", json=body)
    assert r.status_code == 201, r.text
    assert r.json()["builtin"] is False and r.json()["classes"] == body["classes"]
    assert client.get("/api/v1/taxonomies/knee-lr").json()["classes"] == body["classes"]
    assert "knee-lr" in [t["name"] for t in client.get("/api/v1/taxonomies").json()["items"]]
    assert client.post("/api/v1/taxonomies", json=body).status_code == 409
    assert client.post("/api/v1/taxonomies", json={**body, "name": "xr10"}).status_code == 409
    audit = client.get("/api/v1/audit").json()
    assert any(e.get("action") == "taxonomy.create" for e in audit["items"])


def test_validation_detail_names_the_field(client):
    r = client.post("/api/v1/taxonomies", json={"name": "bad", "classes": [
        {"name": "A", "where": {"body_part": "KNE"}},
        {"name": "B", "where": {"colour": "red", "age_years": {"min": 30, "max": 20}}},
        {"name": "A", "where": {"sex": ["F", "Q"], "age_band": "20-30", "view": 3}},
        {"name": "D", "where": {}}]})
    assert r.status_code == 422
    locs = {tuple(e["loc"]): e["msg"] for e in r.json()["detail"]}
    assert "KNE" in locs[("body", "classes", 0, "where", "body_part")]
    assert "unknown label 'colour'" in locs[("body", "classes", 1, "where", "colour")]
    assert "greater than max" in locs[("body", "classes", 1, "where", "age_years")]
    assert "duplicate class name" in locs[("body", "classes", 2, "name")]
    assert "'Q'" in locs[("body", "classes", 2, "where", "sex")]
    assert "20-29" in locs[("body", "classes", 2, "where", "age_band")]
    assert ("body", "classes", 2, "where", "view") in locs
    assert ("body", "classes", 3, "where") in locs
    assert client.get("/api/v1/taxonomies/bad").status_code == 404  # nothing stored
    r = client.post("/api/v1/taxonomies", json={"name": "no classes", "classes": []})
    assert r.status_code == 422
    r = client.post("/api/v1/taxonomies", json={"name": "x/y", "classes": [{"name": "A", "where": {"sex": "F"}}]})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "name"]
