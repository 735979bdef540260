"""Retrieval jobs against a real Orthanc into our real Storage SCP (C-MOVE) or over C-GET."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import func, select

from app.db.models import Instance, PacsNode, Retrieval, RetrievalItem
from app.wiring import storage_scp
from app.dicom.scu import DicomClient
from app.retrievals.runner import run_retrieval
from app.retrievals.schemas import NodeIn
from app.retrievals.nodes import create_node
from app.retrievals.service import create_retrieval
from tests.conftest import testdata as sample_file
from tests.dicom.helpers import make_studies, upload_all


@pytest.fixture
def rig(ctx, orthanc):
    """Our SCP (accepting the Orthanc node) + the Orthanc with a fast arrival timeout."""
    ctx.settings.arrival_timeout = 3.0
    ctx.settings.dicom_retries = 1
    scp = storage_scp(ctx)
    yield ctx, orthanc, scp
    scp.stop()


def add_node(ctx, orthanc, method: str = "move", name: str = "pacs") -> None:
    with ctx.sessions() as s:
        create_node(s, NodeIn(name=name, ae_title="ORTHANC", host="127.0.0.1", port=orthanc.dicom_port,
                              retrieve_method=method), "test")
        s.commit()


def retrieve(ctx, query: dict, node: str = "pacs", **kw) -> Retrieval:
    with ctx.sessions() as s:
        rid = create_retrieval(s, node, query, "test").id
        s.commit()
    return run_retrieval(ctx, rid, **kw)


def indexed(ctx) -> set[str]:
    with ctx.sessions() as s:
        return set(s.scalars(select(Instance.sop_instance_uid)))


def store_files(ctx) -> list[Path]:
    return sorted(p for p in ctx.settings.store_dir.rglob("*") if p.is_file())


def pixel_tail(path: Path) -> bytes:
    """The bytes from the encapsulated Pixel Data element (explicit VR LE) to the end of the file."""
    raw = path.read_bytes()
    i = raw.find(b"\xe0\x7f\x10\x00OB")
    assert i > 0
    return raw[i:]


@pytest.mark.parametrize("method", ["move", "get"])
def test_whole_studies_by_date_range_then_rerun_fetches_nothing(rig, tmp_path, method):
    ctx, orthanc, scp = rig
    studies = make_studies(tmp_path / "gen", ["20100505", "20120101", "20140303"], series_per_study=2,
                           instances_per_series=2)
    upload_all(orthanc, sorted((tmp_path / "gen").iterdir()))
    add_node(ctx, orthanc, method)
    if method == "move":
        scp.start()
    r = retrieve(ctx, {"StudyDate": "20110101-20161231"})
    want = set(studies[1].sop_uids) | set(studies[2].sop_uids)
    assert (r.status, r.expected, r.received, r.skipped, r.failed, r.missing) == ("completed", 8, 8, 0, 0, [])
    assert indexed(ctx) == want  # exactly the range: nothing of 2010
    assert len(store_files(ctx)) == 8
    assert r.report["suboperations"]["completed"] == 8
    with ctx.sessions() as s:
        states = dict(s.execute(select(RetrievalItem.sop_instance_uid, RetrievalItem.state)
                                .where(RetrievalItem.retrieval_id == r.id)).all())
    assert states == {u: "received" for u in want}

    again = retrieve(ctx, {"StudyDate": "20110101-20161231"})
    assert (again.status, again.expected, again.received, again.skipped) == ("completed", 8, 0, 8)
    assert again.report["suboperations"]["completed"] == 0  # nothing was asked of the PACS
    assert len(store_files(ctx)) == 8


@pytest.mark.parametrize("method", ["move", "get"])
def test_single_series(rig, tmp_path, method):
    ctx, orthanc, scp = rig
    (st,) = make_studies(tmp_path / "gen", ["20120101"], series_per_study=2, instances_per_series=3)
    upload_all(orthanc, sorted((tmp_path / "gen").iterdir()))
    add_node(ctx, orthanc, method)
    scp.start()
    series_uid, sops = next(iter(st.series.items()))
    r = retrieve(ctx, {"SeriesInstanceUID": series_uid})
    assert (r.status, r.expected, r.received) == ("completed", 3, 3)
    assert indexed(ctx) == set(sops)


@pytest.mark.parametrize("method", ["move", "get"])
def test_jpeg2000_arrives_bit_exact(rig, method):
    ctx, orthanc, scp = rig
    src = sample_file("RG1_J2KR.dcm")
    info = orthanc.upload(src)
    tags = orthanc.rest("GET", f"/instances/{info['ID']}/simplified-tags")
    add_node(ctx, orthanc, method)
    scp.start()
    r = retrieve(ctx, {"StudyInstanceUID": tags["StudyInstanceUID"]})
    assert (r.status, r.received) == ("completed", 1)
    (path,) = store_files(ctx)
    # Orthanc (DCMTK) may re-encode sequence lengths in the header when it sends; the JPEG 2000
    # codestream must arrive byte for byte (no transcode) and the dataset must read back equal
    assert pixel_tail(path) == pixel_tail(src)
    assert dcmread(path) == dcmread(src)
    with ctx.sessions() as s:
        assert s.scalar(select(Instance.transfer_syntax_uid)) == "1.2.840.10008.1.2.4.90"


def test_rerun_after_partial_index_fetches_only_what_is_missing(rig, tmp_path):
    ctx, orthanc, scp = rig
    (st,) = make_studies(tmp_path / "gen", ["20120101"], series_per_study=3, instances_per_series=2)
    upload_all(orthanc, sorted((tmp_path / "gen").iterdir()))
    add_node(ctx, orthanc)
    scp.start()
    first_series = next(iter(st.series))
    assert retrieve(ctx, {"SeriesInstanceUID": first_series}).received == 2
    r = retrieve(ctx, {"StudyInstanceUID": st.study_uid})
    assert (r.status, r.expected, r.skipped, r.received) == ("completed", 6, 2, 4)
    # only the two missing series were moved, not the whole study again
    assert r.report["suboperations"]["completed"] == 4
    assert indexed(ctx) == set(st.sop_uids)


def test_pacs_dies_mid_retrieval_then_rerun_completes(rig, tmp_path):
    ctx, orthanc, scp = rig
    studies = make_studies(tmp_path / "gen", [f"201201{d:02d}" for d in range(1, 7)], instances_per_series=4)
    upload_all(orthanc, sorted((tmp_path / "gen").iterdir()))
    add_node(ctx, orthanc)
    all_uids = {u for st in studies for u in st.sop_uids}

    # kill Orthanc (SIGKILL) from the arrival path, right after the 6th instance is indexed
    arrivals = []
    sink = scp._sink

    def killing_sink(stored, header):
        sink(stored, header)
        arrivals.append(stored.sop_instance_uid)
        if len(arrivals) == 6:
            orthanc.stop(kill=True)

    scp._sink = killing_sink
    scp.start()
    r = retrieve(ctx, {"StudyDate": "20120101-20120131"})
    got = indexed(ctx)
    assert r.status == "partial"
    assert r.expected == 24 and r.received == len(got) >= 6 and r.skipped == 0
    assert set(r.missing) == all_uids - got and len(r.missing) == 24 - len(got)
    assert "unreachable" in r.error
    with ctx.sessions() as s:
        missing_items = set(s.scalars(select(RetrievalItem.sop_instance_uid).where(
            RetrievalItem.retrieval_id == r.id, RetrievalItem.state == "missing")))
    assert missing_items == set(r.missing)

    orthanc.restart()
    again = retrieve(ctx, {"StudyDate": "20120101-20120131"})
    assert (again.status, again.expected, again.skipped, again.received) == ("completed", 24, len(got), 24 - len(got))
    assert again.missing == []
    files = store_files(ctx)
    assert len(files) == 24 and not [p for p in files if p.name.startswith(".tmp-")]
    with ctx.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == 24


def test_result_cap_is_split_until_everything_is_listed(orthanc_factory, ctx, tmp_path):
    ctx.settings.arrival_timeout = 3.0
    pacs = orthanc_factory(modalities={"rc": (ctx.settings.ae_title, "127.0.0.1", ctx.settings.scp_port)},
                           overrides={"LimitFindResults": 2, "LimitFindInstances": 3})
    # 5 dates, and two studies on one day (4 instances that day > the cap of 3)
    studies = make_studies(tmp_path / "gen", ["20110101", "20120101", "20130101", "20150101", "20150101"],
                           instances_per_series=2)
    upload_all(pacs, sorted((tmp_path / "gen").iterdir()))
    add_node(ctx, pacs)
    # the unsplit answer really is capped
    assert DicomClient(ctx.settings, PacsNode(ae_title="ORTHANC", host="127.0.0.1", port=pacs.dicom_port)).find(
        "IMAGE", {"StudyDate": "20110101-20161231"}).capped
    with storage_scp(ctx):
        r = retrieve(ctx, {"StudyDate": "20110101-20161231"})
    assert (r.status, r.expected, r.received) == ("completed", 10, 10)
    assert r.report["find_splits"] > 0 and r.report["listing_complete"]
    assert indexed(ctx) == {u for st in studies for u in st.sop_uids}


def test_unknown_destination_fails_without_hammering_the_pacs(rig, tmp_path):
    ctx, orthanc, scp = rig
    (st,) = make_studies(tmp_path / "gen", ["20120101"], series_per_study=8, instances_per_series=1)
    upload_all(orthanc, sorted((tmp_path / "gen").iterdir()))
    add_node(ctx, orthanc)
    calls = []

    class Elsewhere(DicomClient):
        def move(self, level, keys, **kw):
            calls.append(level)
            return super().move(level, keys, destination="NOWHERE", **kw)

    r = retrieve(ctx, {"StudyInstanceUID": st.study_uid}, client_factory=lambda n: Elsewhere(ctx.settings, n))
    assert (r.status, r.expected, r.received, r.failed) == ("failed", 8, 0, 8)
    assert sorted(r.missing) == sorted(st.sop_uids)
    assert "0xC000" in r.error or "0xA801" in r.error
    # the study, then its series until three in a row were refused (over the node's 2 lanes, one more
    # may be in flight then): it stops asking long before the 8 series
    assert len(calls) <= 1 + 3 + 1


def test_concurrent_retrievals(rig, tmp_path):
    ctx, orthanc, scp = rig
    studies = make_studies(tmp_path / "gen", ["20120101", "20130101"], series_per_study=2, instances_per_series=3)
    upload_all(orthanc, sorted((tmp_path / "gen").iterdir()))
    add_node(ctx, orthanc)
    scp.start()
    results = {}

    def run(st):
        results[st.study_uid] = retrieve(ctx, {"StudyInstanceUID": st.study_uid})

    threads = [threading.Thread(target=run, args=(st,)) for st in studies]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [results[st.study_uid].status for st in studies] == ["completed", "completed"]
    assert indexed(ctx) == {u for st in studies for u in st.sop_uids}


def test_series_and_image_level_queries_fetch_only_what_matches(rig, tmp_path):
    ctx, orthanc, scp = rig
    (cr,) = make_studies(tmp_path / "cr", ["20120101"], instances_per_series=3)
    # a DX series in the same study: a study-level move would bring it too
    (dx,) = make_studies(tmp_path / "dx", ["20120101"], instances_per_series=2, modality="DX")
    for p in sorted((tmp_path / "dx").iterdir()):
        ds = dcmread(p)
        ds.StudyInstanceUID = cr.study_uid
        ds.save_as(p)
    upload_all(orthanc, sorted((tmp_path / "cr").iterdir()) + sorted((tmp_path / "dx").iterdir()))
    add_node(ctx, orthanc)
    scp.start()
    r = retrieve(ctx, {"StudyInstanceUID": cr.study_uid, "Modality": "CR"})
    assert (r.status, r.expected, r.received) == ("completed", 3, 3)
    assert indexed(ctx) == set(cr.sop_uids)
    r = retrieve(ctx, {"StudyInstanceUID": cr.study_uid, "Modality": "DX", "InstanceNumber": "2"})
    assert (r.status, r.expected, r.received) == ("completed", 1, 1)
    assert indexed(ctx) == set(cr.sop_uids) | {dx.sop_uids[1]}


def test_silent_result_limit_from_node_options_is_detected(orthanc, settings, tmp_path):
    make_studies(tmp_path / "gen", ["20120101", "20120102", "20120103"], instances_per_series=1)
    upload_all(orthanc, sorted((tmp_path / "gen").iterdir()))
    silent = PacsNode(ae_title="ORTHANC", host="127.0.0.1", port=orthanc.dicom_port, options={"find_limit": 3})
    assert DicomClient(settings, silent).find("STUDY", {"StudyDate": "20120101-20120131"}).capped
    assert not DicomClient(settings, silent).find("STUDY", {"StudyDate": "20120101-20120102"}).capped


def test_retrieval_on_sqlite_and_postgresql(any_ctx, orthanc_factory, tmp_path):
    ctx = any_ctx
    ctx.settings.arrival_timeout = 3.0
    pacs = orthanc_factory(modalities={"rc": (ctx.settings.ae_title, "127.0.0.1", ctx.settings.scp_port)})
    (st,) = make_studies(tmp_path / "gen", ["20120101"], series_per_study=2, instances_per_series=2)
    upload_all(pacs, sorted((tmp_path / "gen").iterdir()))
    add_node(ctx, pacs)
    with storage_scp(ctx):
        r = retrieve(ctx, {"StudyDate": "20120101"})
        again = retrieve(ctx, {"StudyDate": "20120101"})
    assert (r.status, r.expected, r.received) == ("completed", 4, 4)
    assert (again.status, again.skipped, again.received) == ("completed", 4, 0)
    assert indexed(ctx) == set(st.sop_uids)


def test_get_of_a_study_with_many_sop_classes_brings_each_as_stored(rig, tmp_path):
    """Nine SOP classes in one study, all JPEG 2000: one context per syntax for each would need 162
    presentation contexts (PS3.8 allows 128), so each class gets a share that still holds JPEG 2000
    (Orthanc cannot transcode it); every instance arrives bit-exact."""
    import numpy as np

    from app.dicom.scp import STORAGE_SOP_CLASSES
    from app.synth.codecs import set_pixels
    from tests.dicom.helpers import make_cr

    ctx, orthanc, _scp = rig
    study = "1.2.826.0.1.3680043.10.779.1"
    gen = tmp_path / "gen"
    gen.mkdir()
    sources = {}
    for k, sop_class in enumerate(STORAGE_SOP_CLASSES[:9]):
        ds = make_cr(patient_id="MC1", study_uid=study, series_uid=f"{study}.{k}", seed=k)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
        set_pixels(ds, np.random.default_rng(k).integers(0, 4096, (64, 64), dtype=np.uint16), "j2k")
        path = gen / f"{k}.dcm"
        ds.save_as(path, enforce_file_format=True)
        sources[ds.SOPInstanceUID] = path
    upload_all(orthanc, sorted(gen.iterdir()))
    add_node(ctx, orthanc, "get")
    r = retrieve(ctx, {"StudyInstanceUID": study})
    assert (r.status, r.expected, r.received, r.missing) == ("completed", 9, 9, []), r.error
    # one C-GET, nothing refused or asked again (before, the class left without a context failed
    # the first C-GET with 0xC000 and the runner fell back to one retrieve per series)
    assert r.report["statuses"] == ["0x0000"] and r.report["suboperations"]["failed"] == 0, r.report
    with ctx.sessions() as s:
        rows = s.execute(select(Instance.sop_instance_uid, Instance.sop_class_uid, Instance.transfer_syntax_uid,
                                Instance.file_path)).all()
    assert {row[1] for row in rows} == set(STORAGE_SOP_CLASSES[:9])
    assert {row[2] for row in rows} == {"1.2.840.10008.1.2.4.90"}  # as stored: nothing transcoded
    for uid, _cls, _ts, rel in rows:
        assert pixel_tail(ctx.settings.store_dir / rel) == pixel_tail(sources[uid])
