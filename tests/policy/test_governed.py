"""Retrievals under a node's policy, against a real Orthanc (and a fake PACS for 0xA700)."""

from __future__ import annotations

import time
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from pydicom import dcmread
from pynetdicom import AE
from sqlalchemy import select

from app.db.models import AuditEvent, Instance, PacsNode, Retrieval
from app.policy.clock import FakeClock
from app.retrievals.runner import RetrievalRunner, governor_gate
from app.retrievals.nodes import create_node
from app.retrievals.schemas import NodeIn
from app.retrievals.service import create_retrieval
from tests.dicom.helpers import make_cr, make_studies, upload_all
from tests.policy.fakepacs import FakePacs

TOKYO = ZoneInfo("Asia/Tokyo")


def add_node(ctx, port: int, *, ae="ORTHANC", method="get", name="pacs", **options) -> None:
    with ctx.sessions() as s:
        node = create_node(s, NodeIn(name=name, ae_title=ae, host="127.0.0.1", port=port,
                                     retrieve_method=method), "test")
        node.options = options
        s.commit()


def new_retrieval(ctx, query: dict, node="pacs", report: dict | None = None) -> int:
    with ctx.sessions() as s:
        r = create_retrieval(s, node, query, "test")
        if report:
            r.report = report
        s.commit()
        return r.id


def indexed(ctx) -> set[str]:
    with ctx.sessions() as s:
        return set(s.scalars(select(Instance.sop_instance_uid)))


@pytest.fixture
def quick(ctx):
    ctx.settings.arrival_timeout = 3.0
    ctx.settings.dicom_retries = 1
    return ctx


def test_window_closing_mid_retrieval_pauses_at_a_boundary_and_resumes(quick, orthanc, tmp_path):
    ctx = quick
    studies = make_studies(tmp_path / "gen", ["20120101", "20120102", "20120103"], instances_per_series=2)
    upload_all(orthanc, sorted((tmp_path / "gen").iterdir()))
    add_node(ctx, orthanc.dicom_port, policy={  # one lane: the boundaries are the test's subject
        "max_associations": 1, "timezone": "Asia/Tokyo", "windows": [{"days": ["mon", "tue", "wed", "thu", "fri"],
                                               "start": "19:00", "end": "07:00"}]})
    clock = FakeClock(datetime(2026, 11, 24, 6, 58, tzinfo=TOKYO))  # Tuesday, 2 minutes before it closes
    seen: list[tuple[datetime, int]] = []
    phases: list[str] = []

    def progress(p):
        if p.phase.startswith("fetched") and p.phase not in phases:  # one per boundary
            phases.append(p.phase)
            seen.append((clock.now(), len(indexed(ctx))))
            if len(seen) == 1:
                clock.advance(minutes=5)  # the first study took long: 07:03, the window is closed

    rid = new_retrieval(ctx, {"StudyDate": "20120101-20120103"})
    r = RetrievalRunner(ctx, rid, gate=governor_gate(ctx, clock=clock, poll_s=3600), on_progress=progress).run()
    assert (r.status, r.expected, r.received) == ("completed", 6, 6)
    assert indexed(ctx) == {u for st in studies for u in st.sop_uids}
    # one study before the window closed, the other two only once it reopened at 19:00
    assert [n for _, n in seen] == [2, 4, 6]
    assert seen[0][0] < datetime(2026, 11, 24, 7, 0, tzinfo=TOKYO)
    assert all(t >= datetime(2026, 11, 24, 19, 0, tzinfo=TOKYO) for t, _ in seen[1:])
    assert r.report["window_waits"] == 1
    assert r.report["window_wait_s"] == pytest.approx(11 * 3600 + 57 * 60, abs=60)
    assert r.report["waiting_for_window_until"] is None


def test_queued_outside_the_window_waits_unless_urgent(quick, orthanc, tmp_path):
    ctx = quick
    make_studies(tmp_path / "gen", ["20120101"], instances_per_series=2)
    upload_all(orthanc, sorted((tmp_path / "gen").iterdir()))
    add_node(ctx, orthanc.dicom_port, policy={"timezone": "Asia/Tokyo",
                                              "windows": [{"days": ["sat", "sun"], "start": "00:00", "end": "24:00"}]})
    monday_noon = datetime(2026, 11, 23, 12, 0, tzinfo=TOKYO)
    urgent = new_retrieval(ctx, {"StudyDate": "20120101"}, report={"urgent": True})
    clock = FakeClock(monday_noon)
    r = RetrievalRunner(ctx, urgent, gate=governor_gate(ctx, clock=clock, poll_s=3600)).run()
    assert r.status == "completed" and r.report["window_overrides"] >= 1 and r.report["window_wait_s"] == 0
    with ctx.sessions() as s:
        assert s.scalar(select(AuditEvent.action).where(AuditEvent.action == "retrieval.window_override"))

    normal = new_retrieval(ctx, {"StudyDate": "20120101"})
    clock = FakeClock(monday_noon)
    r = RetrievalRunner(ctx, normal, gate=governor_gate(ctx, clock=clock, poll_s=3600)).run()
    assert r.status == "completed" and r.skipped == 2
    assert clock.now() >= datetime(2026, 11, 28, 0, 0, tzinfo=TOKYO)  # it waited for Saturday
    assert r.report["window_wait_s"] == pytest.approx((4 * 24 + 12) * 3600, abs=60)


def _store_all(port: int, paths) -> None:
    ae = AE(ae_title="SEEDER")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="ORTHANC")
    assert assoc.is_established
    try:
        for p in paths:
            assert assoc.send_c_store(dcmread(p)).Status == 0
    finally:
        assoc.release()


def test_rate_limit_holds_within_ten_percent(quick, orthanc, tmp_path):
    ctx = quick
    out = tmp_path / "gen"
    out.mkdir()
    n = 0
    for st in range(2):  # 2 studies x 100 tiny 32x32 instances
        study, series = f"1.2.826.0.1.3680043.8.498.{st + 1}", f"1.2.826.0.1.3680043.8.498.{st + 1}.1"
        for k in range(100):
            ds = make_cr(study_uid=study, series_uid=series, study_date="20120101", instance_number=k + 1, seed=n)
            ds.Rows = ds.Columns = 32
            ds.PixelData = ds.PixelData[: 32 * 32 * 2]
            ds.save_as(out / f"{n:04d}.dcm", enforce_file_format=True)
            n += 1
    _store_all(orthanc.dicom_port, sorted(out.iterdir()))
    per_min = 480.0  # well below what C-GET into our store does on a loaded 2-core machine (~900/min)
    add_node(ctx, orthanc.dicom_port, policy={"instances_per_minute": per_min})
    rid = new_retrieval(ctx, {"StudyDate": "20120101"})
    t0 = time.monotonic()
    r = RetrievalRunner(ctx, rid).run()
    wall = time.monotonic() - t0
    assert (r.status, r.received) == ("completed", 200)
    rate = r.received / r.report["fetch_s"] * 60
    assert per_min * 0.9 <= rate <= per_min * 1.1, (rate, r.report)
    assert r.report["rate_wait_s"] > 5 and wall >= 200 / (per_min / 60) * 0.9


def test_out_of_resources_slows_the_job_down_and_it_recovers(quick):
    ctx = quick
    ctx.settings.dicom_retries = 4
    datasets = []
    for st in range(3):
        study = f"1.2.826.0.1.3680043.8.498.7{st}"
        for k in range(2):
            ds = make_cr(study_uid=study, series_uid=study + ".1", study_date="20120101", seed=st * 2 + k)
            datasets.append(ds)
    # one lane, so that the waits add up as the test counts them
    policy = {"max_associations": 1, "backoff": {"initial_s": 0.4, "factor": 2.0, "max_s": 5.0, "recover_after": 1}}

    def run(refuse: int, name: str) -> tuple[Retrieval, float, FakePacs]:
        fake = FakePacs(datasets, refuse_gets=refuse).start()
        try:
            add_node(ctx, fake.port, ae="FAKEPACS", name=name, policy=policy)
            rid = new_retrieval(ctx, {"StudyDate": "20120101"}, node=name)
            t0 = time.monotonic()
            r = RetrievalRunner(ctx, rid).run()
            return r, time.monotonic() - t0, fake
        finally:
            fake.stop()

    pushed, slow, fake = run(3, "busy")
    assert (pushed.status, pushed.received) == ("completed", 6)
    assert fake.refused == 3 and pushed.report["backoffs"] == 3
    # the three retries waited at least 0.4 + 0.8 + 1.6 s, and the next units still waited
    # (level 3 -> 2 -> 1 after each success: 0.8 s, then 0.4 s) before it recovered fully
    assert pushed.report["backoff_wait_s"] >= 0.4 + 0.8 + 1.6 + 0.8 + 0.4 - 0.01
    assert pushed.report["backoff_level"] == 0
    # a clean run of the same job (its instances are in store now: clear them)
    with ctx.sessions() as s:
        s.query(Instance).delete()
        s.commit()
    clean, fast, _ = run(0, "idle")
    assert (clean.status, clean.received, clean.report["backoffs"]) == ("completed", 6, 0)
    assert slow - fast >= 4.0, (slow, fast)


def _three_studies(prefix: str) -> list:
    out = []
    for st in range(3):
        study = f"1.2.826.0.1.3680043.8.498.{prefix}{st}"
        for se in range(2):
            out.append(make_cr(study_uid=study, series_uid=f"{study}.{se + 1}", study_date="20120101",
                               seed=st * 2 + se))
    return out


def test_study_level_refusal_is_remembered_and_later_jobs_ask_per_series(quick):
    ctx = quick
    fake = FakePacs(_three_studies("8"), refuse_levels=frozenset({"STUDY"})).start()
    try:
        add_node(ctx, fake.port, ae="FAKEPACS", name="strict")
        r = RetrievalRunner(ctx, new_retrieval(ctx, {"StudyDate": "20120101"}, node="strict")).run()
        assert (r.status, r.received) == ("completed", 6)
        assert "STUDY" in fake.levels and fake.levels.count("SERIES") >= 6
        with ctx.sessions() as s:
            caps = s.scalar(select(PacsNode.options).where(PacsNode.name == "strict"))["capabilities"]
            assert caps["study_retrieve_refused"] is True
            s.query(Instance).delete()
            s.commit()
        fake.levels.clear()
        r = RetrievalRunner(ctx, new_retrieval(ctx, {"StudyDate": "20120101"}, node="strict")).run()
        assert (r.status, r.received) == ("completed", 6)
        assert "STUDY" not in fake.levels  # asked per series from the start
    finally:
        fake.stop()


def test_max_associations_holds_across_concurrent_retrievals(quick):
    import threading

    ctx = quick
    fake = FakePacs(_three_studies("9"), get_delay=0.3).start()
    try:
        add_node(ctx, fake.port, ae="FAKEPACS", name="one", policy={"max_associations": 1})
        ids = [new_retrieval(ctx, {"StudyInstanceUID": f"1.2.826.0.1.3680043.8.498.9{k}"}, node="one")
               for k in range(3)]
        results = {}
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, RetrievalRunner(ctx, i).run()))
                   for i in ids]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert [results[i].status for i in ids] == ["completed"] * 3
        assert fake.max_active == 1 and fake.gets >= 3
    finally:
        fake.stop()


def test_megabytes_per_second_paces_between_pieces(quick):
    ctx = quick
    fake = FakePacs(_three_studies("6")).start()  # 3 studies x 2 instances of ~8.5 kB
    try:
        add_node(ctx, fake.port, ae="FAKEPACS", name="thin",
                 policy={"max_associations": 1, "mb_per_second": 0.01})  # 10 kB/s, one lane
        t0 = time.monotonic()
        r = RetrievalRunner(ctx, new_retrieval(ctx, {"StudyDate": "20120101"}, node="thin")).run()
        wall = time.monotonic() - t0
        assert (r.status, r.received) == ("completed", 6)
        with ctx.sessions() as s:
            sizes = list(s.scalars(select(Instance.file_size)))
        per_study = sum(sizes) / 3
        # a piece starts only when what arrived before it fits the rate: the third study cannot
        # start before 2 studies' bytes / 10 kB/s, less the bucket's one-second burst (10 kB) that
        # may have filled between the node's limiter being built and the first fetch
        assert r.report["fetch_s"] >= (2 * per_study - 10_000) / 10_000 * 0.95, (r.report, per_study)
        assert r.report["rate_wait_s"] > 1 and wall >= r.report["fetch_s"]
    finally:
        fake.stop()
