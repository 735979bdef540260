"""One retrieval suite over independent Query/Retrieve servers (issue #11, items 7 and 8).

Every scenario runs through radcohort's real entry point (a node, a retrieval,
app.retrievals.runner.run_retrieval, our StorageSCP on settings.scp_port) against each peer of
tests/conformance/peers.py: Orthanc, dcmtk dcmqrscp (default, strict, compressed-capable) and
pynetdicom's qrscp. What a peer cannot do by design (documented in docs/pacs-conformance.md) is
asserted as that limitation and recorded as such in the matrix, never skipped.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import JPEG2000Lossless, generate_uid
from sqlalchemy import select

from app.db.models import Instance, PacsNode, Retrieval, RetrievalItem
from app.wiring import storage_scp
from app.policy.service import cancel
from app.retrievals.nodes import create_node
from app.retrievals.runner import run_retrieval
from app.retrievals.schemas import NodeIn
from app.retrievals.service import create_retrieval
from tests.conftest import testdata as sample_file
from tests.conformance.badpacs import BadPacs
from tests.conformance.peers import KINDS, Peer, PeerError, c_find, start_peer
from tests.dicom.helpers import make_cr, make_studies

# ------------------------------------------------------------------------------------ rig
@pytest.fixture
def rig(ctx):
    """Our Storage SCP on settings.scp_port, with short waits for stragglers."""
    ctx.settings.arrival_timeout = 3.0
    ctx.settings.dicom_retries = 1
    scp = storage_scp(ctx).start()
    yield ctx
    scp.stop()


@pytest.fixture(params=KINDS)
def peer(request, rig, tmp_path) -> Peer:
    """A real Q/R peer of each kind, knowing our AE as a move destination, registered as node 'pacs'."""
    ctx = rig
    factory = request.getfixturevalue("orthanc_factory") if request.param == "orthanc" else None
    try:
        p = start_peer(request.param, tmp_path / request.param, (ctx.settings.ae_title, ctx.settings.scp_port),
                       orthanc_factory=factory)
    except PeerError as exc:
        pytest.fail(f"peer {request.param} did not start (fixture, not product): {exc}")
    add_node(ctx, p)
    yield p
    p.stop()


def add_node(ctx, p, name: str = "pacs", **options) -> None:
    with ctx.sessions() as s:
        node = create_node(s, NodeIn(name=name, ae_title=p.ae_title, host=p.host, port=p.port,
                                     retrieve_method="move"), "test")
        if options:
            node.options = options
        s.commit()


def new_retrieval(ctx, query: dict, node: str = "pacs") -> int:
    with ctx.sessions() as s:
        rid = create_retrieval(s, node, query, "test").id
        s.commit()
    return rid


def retrieve(ctx, query: dict, node: str = "pacs", **kw) -> Retrieval:
    return run_retrieval(ctx, new_retrieval(ctx, query, node), **kw)


def indexed(ctx) -> dict[str, Instance]:
    with ctx.sessions() as s:
        rows = list(s.scalars(select(Instance)))
        for r in rows:
            s.expunge(r)
    return {r.sop_instance_uid: r for r in rows}


def item_states(ctx, rid: int) -> dict[str, str]:
    with ctx.sessions() as s:
        return dict(s.execute(select(RetrievalItem.sop_instance_uid, RetrievalItem.state)
                              .where(RetrievalItem.retrieval_id == rid)).all())


def files_of(studies) -> set[str]:
    return {u for st in studies for u in st.sop_uids}


def pixel_tail(path: Path) -> bytes:
    """The bytes from the encapsulated Pixel Data element (explicit VR LE, undefined length) to the
    end of the file: the whole compressed codestream, fragment by fragment."""
    raw = path.read_bytes()
    i = raw.find(b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff")
    assert i > 0, f"no encapsulated Pixel Data in {path}"
    return raw[i:]


def summary(r: Retrieval) -> str:
    return (f"status={r.status} expected={r.expected} received={r.received} skipped={r.skipped} "
            f"failed={r.failed} missing={len(r.missing or [])} error={r.error!r} "
            f"statuses={(r.report or {}).get('statuses')}")


def assert_names_pacs_status(r: Retrieval) -> None:
    """The retrieval's error names the failure status the PACS gave (not only a count or a timeout)."""
    bad = [s.upper() for s in (r.report or {}).get("statuses", []) if s.upper() not in ("0X0000", "0XFE00")]
    assert bad, f"no failure status from the PACS recorded: {summary(r)}"
    assert any(s in (r.error or "").upper() for s in bad), f"the PACS's status is not in the error: {summary(r)}"


def restamp(src: Path, dst: Path, *, study_uid: str, date: str, patient: str) -> str:
    """A copy of a real radiograph moved into our own study (same pixels, byte for byte)."""
    ds = dcmread(src)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyDate, ds.PatientID, ds.PatientName = date, patient, "Test^Patient"
    ds.save_as(dst, enforce_file_format=True)
    return str(ds.SOPInstanceUID)


# ------------------------------------------------------------------------------------ a
@pytest.mark.scenario("a-date-over-matching")
def test_date_and_modality_bring_exactly_the_matching_instances(peer, rig, tmp_path):
    """Studies on several dates, patients and two modalities: a StudyDate + Modality range, then
    one StudyDate, bring exactly the matching instances (the PACS may over-match: we filter)."""
    ctx = rig
    cr = make_studies(tmp_path / "cr", ["20120101", "20130505"], patient_prefix="C", modality="CR")
    dx = make_studies(tmp_path / "dx", ["20120101", "20120102", "20130506"], patient_prefix="D", modality="DX")
    peer.load(sorted((tmp_path / "cr").iterdir()) + sorted((tmp_path / "dx").iterdir()))
    assert len(peer.held()) == 10
    if peer.kind == "dcmqrscp":
        # the scenario is real here: the PACS itself answers every instance to a one-day query
        rows = c_find(peer, "IMAGE", {"StudyDate": "20120101", "StudyInstanceUID": "", "SeriesInstanceUID": "",
                                      "SOPInstanceUID": ""})
        assert len(rows) == 10, "dcmqrscp no longer over-matches: the scenario lost its point"

    r = retrieve(ctx, {"StudyDate": "20120101-20121231", "Modality": "DX"})
    want = files_of(dx[:2])
    assert set(indexed(ctx)) == want, f"index holds other than DX of 2012: {summary(r)}"
    assert (r.status, r.expected, r.received, r.skipped, r.failed) == ("completed", 4, 4, 0, 0), summary(r)

    r = retrieve(ctx, {"StudyDate": "20120101"})
    want = files_of([cr[0], dx[0]])
    assert set(indexed(ctx)) == files_of(dx[:2]) | want, f"index holds other than 20120101: {summary(r)}"
    # the DX study of that day came with the first retrieval: skipped, not asked again
    assert (r.status, r.expected, r.received, r.skipped, r.failed) == ("completed", 4, 2, 2, 0), summary(r)
    assert set(item_states(ctx, r.id)) == want


# ------------------------------------------------------------------------------------ b
@pytest.mark.scenario("b-failing-instance")
def test_a_failing_instance_does_not_stop_the_job(peer, rig, tmp_path, matrix):
    """A study holding a JPEG 2000 radiograph and one holding an instance our SCP refuses (pixel
    data shorter than the image), among good studies: the good ones all arrive, the refused one is
    reported failed with the PACS's status, the job goes on and ends partial."""
    ctx = rig
    studies = make_studies(tmp_path / "gen", ["20150101", "20150102", "20150103"], instances_per_series=2)
    j2k = restamp(sample_file("RG3_J2KR.dcm"), tmp_path / "j2k.dcm", study_uid=studies[0].study_uid,
                  date="20150101", patient="P0")
    bad = make_cr(patient_id="P1", study_uid=studies[1].study_uid, study_date="20150102", accession="A1")
    if peer.kind == "dcmqrscp-compressed":  # it archives CR as JPEG 2000: the defect must survive that
        bad.compress(JPEG2000Lossless, generate_instance_uid=False)
        bad.NumberOfFrames = 2  # one fragment for two frames: our SCP answers 0xA900
    else:
        bad.PixelData = bad.PixelData[:1000]  # the image says 64x64x16 bit: our SCP answers 0xA900
    bad.save_as(tmp_path / "bad.dcm", enforce_file_format=True)
    peer.load(sorted((tmp_path / "gen").iterdir()) + [tmp_path / "j2k.dcm", tmp_path / "bad.dcm"])

    r = retrieve(ctx, {"StudyDate": "20150101-20150131"})
    got = set(indexed(ctx))
    assert files_of(studies) <= got, f"good instances missing: {summary(r)}"
    assert "unreachable" not in (r.error or ""), summary(r)
    assert r.status == "partial" and r.expected == 8, summary(r)
    assert bad.SOPInstanceUID in (r.failed_uids or []), f"refused instance not reported failed: {summary(r)}"
    assert item_states(ctx, r.id)[str(bad.SOPInstanceUID)] == "failed"
    # the PACS only says a sub-operation failed: the report says it was our own SCP, and why
    assert "refused by our own Storage SCP, not the PACS (0xA900" in (r.error or ""), summary(r)
    assert_names_pacs_status(r)
    if peer.sends_compressed:
        assert j2k in got, f"JPEG 2000 instance did not arrive from {peer.kind}: {summary(r)}"
        assert (r.received, r.failed) == (7, 1), summary(r)
    else:
        # dcmqrscp sends uncompressed only and refuses a JPEG 2000 context on C-GET too (verified by
        # hand): no other way exists, it must be reported failed with the PACS's 0xA702
        assert j2k in (r.failed_uids or []) and "0XA702" in (r.error or "").upper(), \
            f"JPEG 2000 failure not reported with the PACS's 0xA702: {summary(r)}"
        assert (r.received, r.failed) == (6, 2), summary(r)
        matrix.limitation(f"{peer.kind} cannot send JPEG 2000 (0xA702, C-GET refuses the context): "
                          f"reported failed, the rest arrived")


# ------------------------------------------------------------------------------------ c
@pytest.mark.scenario("c-multi-study-batch")
def test_multi_study_batch_brings_everything(peer, rig, tmp_path):
    """Four studies in one date range (radcohort batches study UIDs into one retrieve; a PACS
    that refuses UID lists must still give everything)."""
    ctx = rig
    studies = make_studies(tmp_path / "gen", ["20160101", "20160102", "20160103", "20160104"],
                           instances_per_series=2)
    peer.load(sorted((tmp_path / "gen").iterdir()))
    r = retrieve(ctx, {"StudyDate": "20160101-20160131"})
    assert set(indexed(ctx)) == files_of(studies), summary(r)
    assert (r.status, r.expected, r.received, r.failed) == ("completed", 8, 8, 0), summary(r)
    if peer.kind == "qrscp":  # the scenario met the quirk: a UID list is refused, then one study each
        assert peer.move_requests() >= 2


@pytest.mark.scenario("c-listing-uid-list-finds")
def test_a_listing_asks_for_several_studies_instances_at_once_where_the_pacs_answers(peer, rig, tmp_path, matrix):
    """A node probed to answer IMAGE level with the study key alone is listed with one find over a
    list of study UIDs; a peer that refuses or ignores such a list is asked per study, the listing is
    the same, and the node remembers it (its next listing asks per study at once)."""
    from app.probe.service import probe_and_store
    from app.retrievals.nodes import get_node

    ctx = rig
    studies = make_studies(tmp_path / "gen", ["20170101", "20170102", "20170103", "20170104"],
                           series_per_study=2, instances_per_series=2)
    peer.load(sorted((tmp_path / "gen").iterdir()))
    with ctx.sessions() as s:
        caps = probe_and_store(s, ctx.settings, get_node(s, "pacs"), "test")["capabilities"]
        s.commit()
    r = retrieve(ctx, {"StudyDate": "20170101-20170131"})
    assert set(indexed(ctx)) == files_of(studies), summary(r)
    assert (r.status, r.expected, r.received) == ("completed", 16, 16), summary(r)
    with ctx.sessions() as s:
        learnt = get_node(s, "pacs").options.get("capabilities", {})
    if caps.get("image_level_needs_series") is not False:
        # dcmqrscp -XF: the hierarchy is enforced, IMAGE level needs the series: walked per series
        assert r.report["finds"] == 1 + 4 + 8, summary(r)
        matrix.limitation(f"{peer.kind} needs the series key at IMAGE level: one find per series")
    elif learnt.get("find_uid_lists_unanswered"):
        assert peer.kind == "qrscp", learnt  # pynetdicom's qrscp refuses a UID list in a C-FIND
        assert r.report["finds"] == 1 + 4, summary(r)  # the refused find is not an answer
        matrix.limitation(f"{peer.kind} refuses UID lists in C-FIND: one IMAGE-level find per study")
    else:
        assert r.report["finds"] == 1 + 1, summary(r)


# ------------------------------------------------------------------------------------ d
@pytest.mark.slow
@pytest.mark.scenario("d-cancel-during-wait")
def test_cancel_during_a_wait_ends_cancelled_and_sends_no_more_moves(peer, rig, tmp_path):
    """A byte-rate limit makes the job wait after the first study; the user cancels during that
    wait: the job ends `cancelled` promptly and the PACS gets no further C-MOVE."""
    ctx = rig
    make_studies(tmp_path / "gen", ["20170101", "20170102", "20170103"], instances_per_series=2)
    peer.load(sorted((tmp_path / "gen").iterdir()))
    # ~17 KB per study at 1 KB/s: about 17 s of waiting before the second study
    with ctx.sessions() as s:
        node = s.scalar(select(PacsNode).where(PacsNode.name == "pacs"))
        node.options = {**(node.options or {}), "policy": {"mb_per_second": 0.001}}
        s.commit()
    rid = new_retrieval(ctx, {"StudyDate": "20170101-20170131"})
    first_done = threading.Event()

    def progress(p) -> None:
        if p.phase.startswith("fetched"):
            first_done.set()

    result: dict = {}
    job = threading.Thread(target=lambda: result.update(r=run_retrieval(ctx, rid, on_progress=progress)))
    job.start()
    assert first_done.wait(30), "the first study was never fetched"
    time.sleep(1.0)  # now inside the rate wait
    moves_at_cancel = peer.move_requests()
    t0 = time.monotonic()
    with ctx.sessions() as s:
        cancel(s, s.get(Retrieval, rid), "test")
        s.commit()
    job.join(30)
    took = time.monotonic() - t0
    assert not job.is_alive(), "the job did not end after cancel"
    r = result["r"]
    assert r.status == "cancelled", summary(r)
    assert peer.move_requests() == moves_at_cancel, (
        f"{peer.move_requests() - moves_at_cancel} C-MOVE sent after the cancel: {summary(r)}")
    assert took < 8.0, f"the cancel took {took:.1f}s to stop a wait of ~17 s"
    assert 0 < r.received < 6, summary(r)


# ------------------------------------------------------------------------------------ e
@pytest.mark.scenario("e-compressed-bit-exact")
def test_compressed_instances_arrive_bit_exact(peer, rig, matrix):
    """A JPEG 2000 radiograph and a JPEG lossless image arrive in their own transfer syntax with
    the pixel data byte for byte as loaded into the PACS."""
    ctx = rig
    sources = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
               for p in (sample_file("RG3_J2KR.dcm"), sample_file("JPEG-LL.dcm"))}
    peer.load(list(sources.values()))
    r = retrieve(ctx, {"StudyDate": "20040826"})  # the day of both (two studies, two patients)
    got = indexed(ctx)
    if not peer.sends_compressed:
        # by design (see peers.py and docs): nothing compressed leaves a default dcmqrscp
        assert set(got) == set(), summary(r)
        assert set(r.failed_uids or []) == set(sources), summary(r)
        assert "0XA702" in (r.error or "").upper(), f"failure not reported with the PACS's 0xA702: {summary(r)}"
        assert "unreachable" not in (r.error or ""), summary(r)
        matrix.limitation(f"{peer.kind} sends uncompressed only: compressed instances fail with 0xA702, "
                          f"reported failed")
        return
    assert set(got) == set(sources), summary(r)
    assert (r.status, r.received) == ("completed", 2), summary(r)
    for sop, src in sources.items():
        path = ctx.settings.store_dir / got[sop].file_path
        want_ts = str(dcmread(src, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        assert got[sop].transfer_syntax_uid == want_ts, f"{src.name} transcoded by {peer.kind}"
        assert dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == want_ts
        assert pixel_tail(path) == pixel_tail(src), f"{src.name}: pixel data differs from what the PACS holds"


# ------------------------------------------------------------------------------------ f
@pytest.mark.scenario("f-rerun-skips")
def test_rerun_skips_everything_and_asks_nothing(peer, rig, tmp_path):
    """A second run of the same query: skipped == expected, received == 0, no C-MOVE sent."""
    ctx = rig
    studies = make_studies(tmp_path / "gen", ["20180101", "20180102", "20180103"], instances_per_series=2)
    peer.load(sorted((tmp_path / "gen").iterdir()))
    first = retrieve(ctx, {"StudyDate": "20180101-20180131"})
    assert (first.status, first.received) == ("completed", 6), summary(first)
    moves = peer.move_requests()
    assert moves >= 1
    again = retrieve(ctx, {"StudyDate": "20180101-20180131"})
    assert (again.status, again.expected, again.skipped, again.received) == ("completed", 6, 6, 0), summary(again)
    assert peer.move_requests() == moves, "the rerun sent a C-MOVE"
    assert set(indexed(ctx)) == files_of(studies)


# ------------------------------------------------------------------------------------ h
@pytest.mark.scenario("h-cget-multi-study")
def test_cget_over_several_studies_brings_everything(peer, rig, tmp_path):
    """The same multi-study retrieval over C-GET (the node's method): everything arrives on the
    C-GET association, nothing is left to the Storage SCP."""
    ctx = rig
    studies = make_studies(tmp_path / "gen", ["20200101", "20200102", "20200103"], instances_per_series=2)
    peer.load(sorted((tmp_path / "gen").iterdir()))
    with ctx.sessions() as s:
        s.scalar(select(PacsNode).where(PacsNode.name == "pacs")).retrieve_method = "get"
        s.commit()
    moves = peer.move_requests()
    r = retrieve(ctx, {"StudyDate": "20200101-20200131"})
    assert set(indexed(ctx)) == files_of(studies), summary(r)
    assert (r.status, r.expected, r.received, r.failed) == ("completed", 6, 6, 0), summary(r)
    assert peer.move_requests() == moves, "C-MOVE used although the node retrieves by C-GET"


# ------------------------------------------------------------------------------------ g
@pytest.fixture
def badpacs(rig, tmp_path):
    """badpacs(studies_dates, **faults) -> (BadPacs registered as node 'pacs', generated studies)."""
    started: list[BadPacs] = []

    def make(dates: list[str], instances_per_series: int = 2, extra: list | None = None, **faults):
        studies = make_studies(tmp_path / "gen", dates, instances_per_series=instances_per_series)
        datasets = list(extra or []) + [dcmread(p) for p in sorted((tmp_path / "gen").iterdir())]
        bp = BadPacs(datasets, {rig.settings.ae_title: ("127.0.0.1", rig.settings.scp_port)}, **faults).start()
        started.append(bp)
        add_node(rig, bp)
        return bp, studies

    yield make
    for bp in started:
        bp.stop()


@pytest.mark.scenario("g-garbage-identifiers", peer="badpacs")
def test_garbage_identifiers_in_find_answers(rig, badpacs):
    """C-FIND rows whose UIDs are garbage: a clear error naming them; the good rows are fetched."""
    ctx = rig
    bp, studies = badpacs(["20190101", "20190102"], garbage_rows=2)
    r = retrieve(ctx, {"StudyDate": "20190101-20190131"})
    assert set(indexed(ctx)) == files_of(studies), summary(r)
    assert r.received == 4 and r.status != "failed", summary(r)
    assert "internal error" not in (r.error or "") and "fetch failed" not in (r.error or ""), summary(r)
    assert "UID" in (r.error or "").upper(), f"no clear error about the garbage identifiers: {summary(r)}"


@pytest.mark.scenario("g-missing-uids", peer="badpacs")
def test_find_answers_without_uids(rig, badpacs):
    """C-FIND rows lacking SOP/Series Instance UIDs: the listing cannot be complete, so the job is
    partial with an error saying so; everything nameable arrives."""
    ctx = rig
    bp, studies = badpacs(["20190201", "20190202"], rows_without_uids=2)
    r = retrieve(ctx, {"StudyDate": "20190201-20190228"})
    assert set(indexed(ctx)) == files_of(studies), summary(r)
    assert r.received == 4, summary(r)
    assert r.status == "partial", f"rows without UIDs dropped silently: {summary(r)}"
    assert "UID" in (r.error or "").upper(), f"no clear error about rows without UIDs: {summary(r)}"


@pytest.mark.scenario("g-pending-without-counts", peer="badpacs")
def test_pending_move_responses_without_counts(rig, badpacs):
    """Pending C-MOVE responses without sub-operation counts: arrivals decide, all is complete."""
    ctx = rig
    bp, studies = badpacs(["20190301", "20190302"], no_counts=True)
    r = retrieve(ctx, {"StudyDate": "20190301-20190331"})
    assert set(indexed(ctx)) == files_of(studies), summary(r)
    assert (r.status, r.expected, r.received, r.failed) == ("completed", 4, 4, 0), summary(r)


@pytest.mark.scenario("g-abort-mid-move", peer="badpacs")
def test_pacs_closing_the_association_mid_move(rig, badpacs):
    """A PACS that aborts every move of one study after its first instance: that unit gets a clear
    error naming it, what arrived is kept and counted, the other study is fetched."""
    ctx = rig
    bp, studies = badpacs(["20190401", "20190402"], instances_per_series=3)
    bp.abort_study = studies[0].study_uid
    r = retrieve(ctx, {"StudyDate": "20190401-20190430"})
    got = set(indexed(ctx))
    assert bp.aborted >= 1
    assert set(studies[1].sop_uids) <= got, f"the other study was not fetched: {summary(r)}"
    assert got & set(studies[0].sop_uids), "the instance sent before the abort was lost"
    assert r.received == len(got) and set(r.missing or []) == files_of(studies) - got, summary(r)
    assert r.status == "partial", summary(r)
    unit_ids = {studies[0].study_uid, *studies[0].series}
    assert any(u in (r.error or "") for u in unit_ids), f"the error does not name the aborted unit: {summary(r)}"


@pytest.mark.scenario("g-stop-at-first-failure", peer="badpacs")
def test_a_pacs_that_stops_a_move_at_its_first_failure(rig, badpacs):
    """Orthanc's way, made deterministic: one instance that cannot be sent (its own series in the
    first study) ends every C-MOVE that includes it with 0xC000 before anything is sent. The other
    series and studies must still arrive; only that instance fails, with the PACS's status."""
    ctx = rig
    first_study = generate_uid()
    bad = make_cr(patient_id="P0", study_uid=first_study, study_date="20190501", accession="A0")
    bp, studies = badpacs(["20190502", "20190503"], extra=[bad], stop_at=frozenset({str(bad.SOPInstanceUID)}))
    good_first = make_cr(patient_id="P0", study_uid=first_study, study_date="20190501", accession="A0", seed=99)
    bp.datasets.insert(1, good_first)  # the first study: the unsendable series, then a good one
    r = retrieve(ctx, {"StudyDate": "20190501-20190531"})
    got = set(indexed(ctx))
    want = files_of(studies) | {str(good_first.SOPInstanceUID)}
    assert want <= got, f"{len(want - got)} sendable instance(s) not fetched: {summary(r)}"
    assert r.status == "partial" and r.failed_uids == [str(bad.SOPInstanceUID)], summary(r)
    assert "0XC000" in (r.error or "").upper(), f"the PACS's status is not in the error: {summary(r)}"
