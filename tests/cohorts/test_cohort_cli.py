"""`radcohort labels relabel` and `radcohort cohort create|manifest|plan-pull` against a small index."""

from __future__ import annotations

import csv
import io
import json

from typer.testing import CliRunner

from app.cli import cli
from cohort_index import build_index


def test_cli_cohort_flow(ctx, monkeypatch, tmp_path):
    with ctx.sessions() as s:
        build_index(s, ctx.settings.store_dir)
    env = {"RADCOHORT_DATABASE_URL": ctx.settings.database_url, "RADCOHORT_DATA_DIR": str(ctx.settings.data_dir),
           "RADCOHORT_PSEUDONYM_KEY": "cli-key"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    run = CliRunner().invoke
    r = run(cli, ["labels", "relabel"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.strip().splitlines()[-1])["changed"] == 0  # labelled at insert already
    r = run(cli, ["cohort", "create", "--per-class", "5", "--seed", "4", "--preview"])
    assert r.exit_code == 0, r.output
    table = r.output.splitlines()  # the class counts, as its help says, not the JSON
    assert table[0].startswith("preview (nothing saved): taxonomy xr10, 20 images")
    assert table[1].split() == ["class", "available", "selected", "train", "val", "test"]
    assert any(line.split()[0] == "LtK" and line.split()[2] == "5" for line in table[2:]), r.output
    r = run(cli, ["cohort", "create", "--per-class", "5", "--seed", "4", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output[r.output.index("{"):])
    assert out["size"] == 20  # LtK, RtK, C20F, C60M x 5
    manifest = tmp_path / "m.csv"
    r = run(cli, ["cohort", "manifest", str(out["id"]), "--out", str(manifest)])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(io.StringIO(manifest.read_text())))
    assert len(rows) == 20 and "LK1" not in manifest.read_text()
    r = run(cli, ["cohort", "manifest", "999"])
    assert r.exit_code == 2 and "not found" in r.output
    pq_file = tmp_path / "m.parquet"
    r = run(cli, ["cohort", "manifest", str(out["id"]), "--format", "parquet", "--out", str(pq_file)])
    assert r.exit_code == 0, r.output
    import pyarrow.parquet as pq

    assert pq.read_table(pq_file).to_pylist() == rows
    assert run(cli, ["cohort", "manifest", str(out["id"]), "--format", "parquet"]).exit_code == 2  # binary: --out
    r = run(cli, ["cohort", "create", "--train", "0.5", "--test", "0.2"])
    assert r.exit_code == 2 and "split: Value error, split fractions must sum to 1" in r.output
    assert "pydantic" not in r.output and "http" not in r.output
    r = run(cli, ["cohort", "plan-pull", "--taxonomy", "xr5", "--study-dates", "20150101-20151231"])
    assert r.exit_code == 0
    first = json.loads(r.output.splitlines()[0])
    assert first["class"] == "W" and first["query"]["StudyDate"] == "20150101-20151231"
