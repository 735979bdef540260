"""Load, small: 16 concurrent senders (dcmtk + pynetdicom) into `radcohort scp`; a large instance with
bounded SCP memory; 4 retrievals and 2 cohort builds at once while the API serves reads (SQLite WAL).
bench/bench_load.py runs the same with the issue's sizes and prints the figures.
"""

from __future__ import annotations

import pytest
from pynetdicom import AE, _config

from app.db.migrate import upgrade
from app.devtools.orthanc import free_port
from app.store import file_meta_end
from tests.conftest import make_settings
from tests.hardening.loadkit import (ScpProcess, ServeProcess, api_under_jobs, check_store, scp_env,
                                     seed_orthanc, send_concurrently, sender_ctx, storescu, write_big,
                                     write_instances)


@pytest.fixture
def load_ctx(tmp_path):
    ctx = sender_ctx(make_settings(tmp_path))
    yield ctx
    ctx.close()


def test_16_concurrent_senders_store_and_index_everything_once(tmp_path, load_ctx):
    s = load_ctx.settings
    files = write_instances(tmp_path / "gen", 192)
    with ScpProcess(scp_env(s), s.scp_port) as scp:
        res = send_concurrently(s.scp_port, [p for p, _ in files], senders=16)
    assert res.ok == 192 and res.by_kind == {"storescu": 96, "pynetdicom": 96}, (res.by_kind, scp.output[-2000:])
    figures = check_store(load_ctx, {u for _, u in files})
    assert figures == {"files": 192, "distinct_files": 192, "rows": 192, "distinct_rows": 192, "missing": 0,
                       "stray_files": 0, "partial_files": 0}


def test_large_instance_is_received_with_bounded_memory(tmp_path, load_ctx):
    s = load_ctx.settings
    big = tmp_path / "big.dcm"
    uid = write_big(big, 160)
    with ScpProcess(scp_env(s), s.scp_port) as scp:
        ok, _ = storescu(s.scp_port, [big])
        # pynetdicom sends PDUs as large as the receiver allows: the default finite max PDU keeps them small
        _config.STORE_SEND_CHUNKED_DATASET = True
        try:
            ae = AE("LOADER")
            ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.1.2.1")
            assoc = ae.associate("127.0.0.1", s.scp_port, ae_title="RADCOHORT")
            status = assoc.send_c_store(big).Status
            assoc.release()
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = False
    assert ok == 1 and status == 0, scp.output[-2000:]
    growth = scp.peak_rss_mb - scp.baseline_rss_mb
    assert growth < 64, f"SCP memory grew {growth:.0f} MB for a 160 MB instance"
    stored = next(s.store_dir.rglob(f"{uid}.dcm"))
    with open(stored, "rb") as a, open(big, "rb") as b:  # the same dataset bytes (file meta may differ)
        assert stored.stat().st_size - file_meta_end(a) == big.stat().st_size - file_meta_end(b)


@pytest.mark.orthanc
def test_retrievals_and_cohort_builds_at_once_while_the_api_serves_reads(tmp_path, orthanc_factory):
    s = make_settings(tmp_path, dicom_timeout=10.0, arrival_timeout=5.0)
    orthanc = orthanc_factory(modalities={"radcohort": (s.ae_title, "127.0.0.1", s.scp_port)})
    dates = ["20110301", "20120301", "20130301", "20140301"]
    expected = seed_orthanc(orthanc, tmp_path / "pacs", dates, series=2, per_series=4)
    upgrade(s.database_url)
    env = scp_env(s)
    with ServeProcess(env, free_port()) as api:
        import httpx

        with httpx.Client(base_url=api.base) as c:
            for body in ({"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port},
                         {"name": "loader", "ae_title": "LOADER", "host": "127.0.0.1", "port": 104}):
                assert c.post("/api/v1/pacs-nodes", json=body).status_code == 201
        files = write_instances(tmp_path / "gen", 96)
        assert send_concurrently(s.scp_port, [p for p, _ in files], senders=8).ok == 96
        cohort = {"taxonomy": "xr10", "per_class": 8, "split": {"train": 0.75, "test": 0.25}}
        out = api_under_jobs(api.base, "pacs", dates, [{**cohort, "seed": 1}, {**cohort, "seed": 2}], readers=3)
        log = api.log_text()
    assert out["failures"] == [], out["failures"][:10]
    assert "locked" not in log.lower(), log[-3000:]
    for d, rep in zip(dates, out["retrievals"]):
        assert rep and rep["status"] == "completed" and rep["received"] == len(expected[d]), rep
    for status, body in out["cohorts"]:
        assert status == 201 and body["size"] == 32, body
    assert out["reads"] > 20
