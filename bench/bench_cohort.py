"""Benchmark: build an xr10 cohort over N index rows (inserted directly) on SQLite and PostgreSQL.

    .venv/bin/python bench/bench_cohort.py [--rows 1000000] [--backends sqlite,postgresql] [--relabel 100000]

Prints the query plan of the candidate query, the build timings (preview and saved snapshot: best and
worst of 3, and the phases of the best), and ratios against an in-run baseline (reading (id, patient_pk)
of every instances row once, best of 2, on the same backend). A saved snapshot's phases: query_s (the
selection), dedup_s, sample_s (quotas, split, file check), save_s = keys_s (the members' patient rows
and their HMAC pseudonyms) + members_s (the member INSERT ... SELECT) + the cohort row and audit event.
Target: <= 1 s per build at 1,000,000 rows on each backend, in every run (the worst of 3 is printed too).
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import create_engine, text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.cohorts.builder import explain  # noqa: E402
from app.cohorts.service import create_cohort  # noqa: E402
from app.cohorts.taxonomies import get_taxonomy  # noqa: E402
from app.config import Settings  # noqa: E402
from app.context import AppContext  # noqa: E402
from app.db.migrate import upgrade  # noqa: E402
from app.labels.engine import load_rules  # noqa: E402
from app.labels.service import relabel_all  # noqa: E402

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
BODY = [("CHEST", .40), ("KNEE", .08), ("ELBOW", .05), ("SINUS", .05), ("SKULL", .03), ("ABDOMEN", .10),
        ("LSPINE", .08), ("HAND", .07), ("FOOT", .07), ("PELVIS", .07)]
VIEWS = {"CHEST": [("PA", .7), ("AP", .15), ("LAT", .15)], "KNEE": [("AP", .5), ("LAT", .4), ("AXIAL", .1)],
         "ELBOW": [("AP", .5), ("LAT", .5)], "SINUS": [("WATERS", .5), ("PA", .5)],
         "SKULL": [("PA", .6), ("LAT", .4)]}
UNPAIRED = {"CHEST", "SINUS", "SKULL", "ABDOMEN", "LSPINE", "PELVIS"}
VIEW_TAG = {"WATERS": "PA"}  # Waters is recorded as PA in ViewPosition; the description says Waters


def pick(rng, items):
    x, acc = rng.random(), 0.0
    for v, w in items:
        acc += w
        if x < acc:
            return v
    return items[-1][0]


ROOT = "1.2.826.0.1.3680043.10.543"  # UIDs and store paths of real lengths (the snapshot copies both)


def generate(n_rows: int, version: str, seed: int = 1):
    """Rows for patients / studies / series / instances, ~4 instances per patient, labels filled in.
    UIDs are ~40 characters and file paths study/series/sop.dcm (~130), as the store writes them."""
    rng = random.Random(seed)
    rules = load_rules()
    patients, studies, series, instances = [], [], [], []
    iid = 0
    pk = 0
    while iid < n_rows:
        pk += 1
        sex = rng.choice("MF")
        age = rng.randint(1, 95)
        birth = f"{2015 - age:04d}0101"
        patients.append((pk, f"P{pk:08d}", "", f"NAME^{pk}", sex, birth))
        bp = pick(rng, BODY)
        side = rng.choice("LR")
        study_uid, series_uid = f"{ROOT}.1.{pk}.{20150601 + pk % 97}", f"{ROOT}.2.{pk}.{1 + pk % 13}"
        studies.append((pk, study_uid, pk, "20150601", f"{age:03d}Y"))
        series.append((pk, series_uid, pk, "CR", bp))
        for _ in range(min(rng.randint(1, 7), n_rows - iid)):
            iid += 1
            view = pick(rng, VIEWS.get(bp, [("AP", .5), ("LAT", .5)]))
            # mostly one side per patient; some bilateral exams
            lat = "NONE" if bp in UNPAIRED else (side if rng.random() < 0.9 else rng.choice(["L", "R", "UNKNOWN"]))
            conflict = rng.random() < 0.03
            photometric = "MONOCHROME1" if rng.random() < 0.5 else ("MONOCHROME2" if rng.random() < .98 else "RGB")
            sop_uid = f"{ROOT}.3.{iid}.{iid * 7919 % 100003}"
            instances.append((
                iid, sop_uid, pk, pk, pk, "CR", VIEW_TAG.get(view, view), lat if lat in "LR" else None,
                photometric, f"{study_uid}/{series_uid}/{sop_uid}.dcm", bp, view, lat, sex, float(age),
                rules.age_band(age),
                conflict, version,
            ))
    return patients, studies, series, instances


COLUMNS = {
    "patients": "id, patient_id, issuer, patient_name, patient_sex, patient_birth_date",
    "studies": "id, study_instance_uid, patient_pk, study_date, patient_age",
    "series": "id, series_instance_uid, study_pk, modality, body_part_examined",
    "instances": "id, sop_instance_uid, series_pk, study_pk, patient_pk, modality, view_position, image_laterality, "
                 "photometric_interpretation, file_path, label_body_part, label_view, label_laterality, label_sex, "
                 "label_age_years, label_age_band, has_conflict, ruleset_version, file_size, received_at",
}


def load(engine, data) -> float:
    """Bulk insert: executemany on SQLite, COPY on PostgreSQL; then ANALYZE (VACUUM for index-only scans)."""
    now = datetime.now(timezone.utc)
    tables = dict(zip(("patients", "studies", "series", "instances"), data))
    t0 = time.perf_counter()
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        is_pg = engine.dialect.name == "postgresql"
        for table, rows in tables.items():
            if table == "instances":
                rows = [r + (0, now) for r in rows]
            cols = COLUMNS[table]
            if is_pg:
                with cur.copy(f"COPY {table} ({cols}) FROM STDIN") as cp:
                    for r in rows:
                        cp.write_row(r)
            else:
                ph = ", ".join("?" * len(rows[0]))
                cur.executemany(f"INSERT INTO {table} ({cols}) VALUES ({ph})", rows)
        raw.commit()
        if is_pg:
            drv = raw.driver_connection
            drv.autocommit = True
            drv.execute("VACUUM ANALYZE")
            drv.autocommit = False
        else:
            cur.execute("ANALYZE")
            raw.commit()
    finally:
        raw.close()
    return time.perf_counter() - t0


def run_backend(name: str, url: str, n_rows: int, relabel: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench_cohort_"))  # data dir (pseudonym key only)
    settings = Settings(data_dir=tmp / "data", database_url=url, pseudonym_key="bench", _env_file=None)
    upgrade(url)
    ctx = AppContext.build(settings)
    data = generate(n_rows, load_rules().version)
    print(f"\n== {name}: {len(data[3]):,} instances, {len(data[0]):,} patients")
    print(f"load: {load(ctx.engine, data):.1f} s")
    del data
    with ctx.sessions() as s:
        classes = get_taxonomy(s, "xr10")["classes"]
        print("plan:")
        for line in explain(s, classes, vocabulary=load_rules().vocabulary):
            print("   ", line)
        base = None
        for _ in range(2):  # baseline: read (id, patient_pk) of every row once
            t0 = time.perf_counter()
            base_n = len(s.execute(text("SELECT id, patient_pk FROM instances")).all())
            dt = time.perf_counter() - t0
            base = dt if base is None else min(base, dt)
        params = {"taxonomy": "xr10", "per_class": 1500, "split": {"train": 0.8, "test": 0.2}, "seed": 0,
                  "check_files": False}
        for label, extra in (("preview", {"preview": True}), ("create", {})):
            runs = []
            for _ in range(3):
                t0 = time.perf_counter()
                out = create_cohort(s, {**params, **extra}, pseudonym_key=b"bench", store_dir=None, actor="bench")
                dt = time.perf_counter() - t0
                s.rollback()
                runs.append((dt, out))
            (best, out), worst = min(runs, key=lambda r: r[0]), max(r[0] for r in runs)
            print(f"{label:8s} best of 3: {best:.3f} s  ({best / base:.2f}x reading all {base_n:,} rows "
                  f"= {base:.3f} s), worst {worst:.3f} s ({worst / base:.2f}x)  size={out['size']}  "
                  f"target<=1s: {'OK' if worst <= 1 else 'best OK, worst MISSED' if best <= 1 else 'MISSED'}")
            print("   timings of the best:", {k: round(v, 3) for k, v in out["timings"].items()})
        print("excluded:", out["excluded"])
        print("classes:", {c["name"]: (c["available"], c["selected"]) for c in out["classes"]})
        if relabel:
            s.execute(text(f"UPDATE instances SET ruleset_version = 'old' WHERE id <= {relabel}"))
            t0 = time.perf_counter()
            stats = relabel_all(s)
            dt = time.perf_counter() - t0
            s.rollback()
            print(f"relabel_all: {stats['scanned']:,} rows in {dt:.1f} s ({stats['scanned'] / dt:,.0f} rows/s), "
                  f"{stats['changed']:,} changed")
    ctx.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--backends", default="sqlite,postgresql")
    ap.add_argument("--relabel", type=int, default=0, help="also time relabel_all over the index")
    a = ap.parse_args()
    for b in a.backends.split(","):
        if b == "sqlite":
            d = Path(tempfile.mkdtemp(prefix="bench_sqlite_"))
            try:
                run_backend("sqlite", f"sqlite:///{d / 'bench.db'}", a.rows, a.relabel)
            finally:
                shutil.rmtree(d, ignore_errors=True)
        else:
            db = "rc_bench_" + uuid.uuid4().hex[:8]
            admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
            with admin.connect() as c:
                c.execute(text(f'CREATE DATABASE "{db}"'))
            try:
                run_backend("postgresql", PG_ADMIN.rsplit("/", 1)[0] + "/" + db, a.rows, a.relabel)
            finally:
                with admin.connect() as c:
                    c.execute(text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
                admin.dispose()


if __name__ == "__main__":
    main()
