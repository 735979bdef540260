"""Training-ready exports (issue #17 item 4): PNG (8/16-bit) / NumPy class folders per split and WebDataset
shards, made with the worker's preprocessing, with manifest and dataset card; progress; CLI to a folder."""

from __future__ import annotations

import csv
import io
import json
import tarfile
import zipfile

import numpy as np
import pydicom
from PIL import Image
from typer.testing import CliRunner

from models.preprocess import preprocess_dataset
from tests.exports.conftest import H, wait_export


def _run(client, cid, **body):
    r = client.post(f"/api/v1/cohorts/{cid}/exports", headers=H["exporter"], json=body)
    assert r.status_code == 202, r.text
    assert r.json()["status"] in ("queued", "running", "done") and r.json()["progress"]["total"] >= 0
    done = wait_export(client, r.json()["id"], H["exporter"])
    assert done["status"] == "done", done
    assert done["progress"]["done"] == done["progress"]["total"] > 0
    return done, client.get(f"/api/v1/exports/{done['id']}/download", headers=H["exporter"])


def test_png_class_folders_match_the_worker_preprocessing(export_env):
    client, ctx, cid, identifiers, originals = export_env
    done, dl = _run(client, cid, format="png", image_size=48)
    z = zipfile.ZipFile(io.BytesIO(dl.content))
    manifest = list(csv.DictReader(io.StringIO(z.read("manifest.csv").decode())))
    pngs = [n for n in z.namelist() if n.endswith(".png")]
    assert len(pngs) == len(manifest) == done["exported"]
    for row in manifest:
        assert row["file"] == f"{row['split']}/{row['class']}/{row['sop_instance_uid']}.png"
        assert row["file"] in pngs and len(row["patient_key"]) == 64
    # the first image is byte for byte what the worker computes from the source file
    from app.exports.deid import Deidentifier

    uid_map = Deidentifier(ctx.settings.get_pseudonym_key())._uids
    src = {uid_map._new_ui(u): p for u, p in originals.items()}
    checked = 0
    for row in manifest[:3]:
        img = np.asarray(Image.open(io.BytesIO(z.read(row["file"]))))
        want, _ = preprocess_dataset(pydicom.dcmread(src[row["sop_instance_uid"]]), 48)
        assert img.dtype == np.uint8 and img.shape == (48, 48) and np.array_equal(img, want)
        checked += 1
    assert checked == 3
    card = json.loads(z.read("dataset_card.json"))
    counts = {}
    for row in manifest:
        counts.setdefault(row["split"], {}).setdefault(row["class"], 0)
        counts[row["split"]][row["class"]] += 1
    assert card["counts"] == counts and card["total"] == len(manifest)
    assert card["labels"]["ruleset_version"] and card["seed"] == 1
    assert card["preprocessing"]["image_size"] == 48 and card["preprocessing"]["bit_depth"] == 8
    assert card["deidentification"]["profile"].startswith("DICOM PS3.15 Annex E")
    assert "excluded_at_build" in card["cohort"] and "excluded_at_export" in card
    assert "| split |" in z.read("README.md").decode()
    text = "".join(z.read(n).decode("latin-1") for n in z.namelist())
    for s in (s for s in identifiers if len(s) >= 4):
        assert s not in text


def test_png16_and_npy(export_env):
    client, _ctx, cid, _ids, _orig = export_env
    _done, dl = _run(client, cid, format="png", image_size=32, bit_depth=16, archive="tar")
    assert dl.headers["content-type"] == "application/x-tar"
    t = tarfile.open(fileobj=io.BytesIO(dl.content))
    png = next(m for m in t.getmembers() if m.name.endswith(".png"))
    img = np.asarray(Image.open(t.extractfile(png)))
    assert img.shape == (32, 32) and img.dtype == np.uint16
    assert int(img.max()) > 255  # real 16-bit range, not 8-bit values widened
    _done, dl = _run(client, cid, format="npy", image_size=32)
    z = zipfile.ZipFile(io.BytesIO(dl.content))
    arr = np.load(io.BytesIO(z.read(next(n for n in z.namelist() if n.endswith(".npy")))))
    assert arr.shape == (32, 32) and arr.dtype == np.uint8
    r = client.post(f"/api/v1/cohorts/{cid}/exports", headers=H["exporter"],
                    json={"format": "npy", "bit_depth": 16})
    assert r.status_code == 422 and "bit_depth" in r.text


def test_webdataset_shards(export_env):
    client, _ctx, cid, _ids, _orig = export_env
    done, dl = _run(client, cid, format="webdataset", image_size=32)
    outer = tarfile.open(fileobj=io.BytesIO(dl.content))
    shards = [m for m in outer.getmembers() if m.name.startswith("shards/")]
    assert shards and all(m.name.endswith(".tar") for m in shards)
    samples = {}
    for m in shards:
        inner = tarfile.open(fileobj=outer.extractfile(m))
        for s in inner.getmembers():
            stem, ext = s.name.split(".", 1)
            samples.setdefault(stem, {})[ext] = inner.extractfile(s).read()
    assert len(samples) == done["exported"]
    for parts in samples.values():
        assert set(parts) == {"png", "cls", "json"}
        meta = json.loads(parts["json"])
        assert int(parts["cls"]) == meta["class_index"] and meta["split"] in ("train", "test")


def test_cli_export_to_a_folder(export_env, tmp_path, monkeypatch):
    client, ctx, cid, _ids, _orig = export_env
    from app.cli import cli

    for k, v in {"RADCOHORT_DATABASE_URL": ctx.settings.database_url, "RADCOHORT_DATA_DIR": str(ctx.settings.data_dir),
                 "RADCOHORT_PSEUDONYM_KEY": "test-pseudonym-key"}.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "shared-dataset"
    res = CliRunner().invoke(cli, ["export", "create", str(cid), "--format", "png", "--image-size", "32",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "manifest.csv").exists() and (out / "dataset_card.json").exists()
    assert list(out.glob("*/*/*.png"))
    res = CliRunner().invoke(cli, ["export", "create", str(cid), "--format", "gif"])
    assert res.exit_code == 2 and "format" in res.output
    res = CliRunner().invoke(cli, ["export", "list"])
    assert res.exit_code == 0 and "png" in res.output
    # an archive made by the API, then removed from the server by the operator
    done, dl = _run(client, cid, format="npy", image_size=16)
    archive = ctx.settings.data_dir / "exports" / str(done["id"])
    assert archive.is_dir()
    res = CliRunner().invoke(cli, ["export", "delete", str(done["id"])])
    assert res.exit_code == 0, res.output
    assert not archive.exists()
    assert client.get(f"/api/v1/exports/{done['id']}/download", headers=H["exporter"]).status_code == 409


def test_an_export_whose_process_died_reads_failed(export_env):
    import socket

    from app.db.models import Export

    client, ctx, cid, _ids, _orig = export_env
    with ctx.sessions() as s:
        e = Export(cohort_id=cid, format="png", params={"format": "png"}, status="running", done=3, total=10,
                   report={"runner": f"{socket.gethostname()}:999999999"}, actor="token:exporter")
        s.add(e)
        s.commit()
        eid = e.id
    body = client.get(f"/api/v1/exports/{eid}", headers=H["exporter"]).json()
    assert body["status"] == "failed" and "interrupted" in body["error"]


def test_delete_removes_the_archive_keeps_the_row_and_is_audited(export_env):
    from app.db.models import AuditEvent

    client, ctx, cid, _ids, _orig = export_env
    done, dl = _run(client, cid, format="png", image_size=32)
    assert dl.status_code == 200
    eid = done["id"]
    folder = ctx.settings.data_dir / "exports" / str(eid)
    assert any(folder.rglob("*"))
    assert client.delete(f"/api/v1/exports/{eid}", headers=H["reader"]).status_code == 403  # no export scope
    assert any(folder.rglob("*"))
    assert client.delete(f"/api/v1/exports/{eid}", headers=H["exporter"]).status_code == 204
    assert not folder.exists()
    assert client.get(f"/api/v1/exports/{eid}", headers=H["exporter"]).json()["status"] == "deleted"
    r = client.get(f"/api/v1/exports/{eid}/download", headers=H["exporter"])
    assert r.status_code == 409 and "deleted" in r.json()["detail"]
    assert client.delete("/api/v1/exports/99999", headers=H["exporter"]).status_code == 404
    # the list by cohort
    mine = client.get(f"/api/v1/exports?cohort_id={cid}", headers=H["exporter"]).json()
    assert eid in [e["id"] for e in mine["items"]] and all(e["cohort_id"] == cid for e in mine["items"])
    assert client.get(f"/api/v1/exports?cohort_id={cid + 1000}", headers=H["exporter"]).json()["total"] == 0
    assert client.get("/api/v1/exports?cohort_id=0", headers=H["exporter"]).status_code == 422
    with ctx.sessions() as s:
        assert s.query(AuditEvent).filter_by(action="export.delete", target=f"export:{eid}").count() == 1

