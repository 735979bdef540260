"""A PACS that ignores matching keys cannot make radcohort move anything outside the query.

The fake PACS here matches on UIDs only (as dcmqrscp does for keys it does not index): every answer
is checked on our side, what does not match is discarded before anything moves, and the report
names the keys the PACS did not honour. Also: a cancel during a retry wait ends the job at once,
and the node's backoff decays with time.
"""

from __future__ import annotations

import threading
import time

from pydicom.uid import generate_uid
from sqlalchemy import select, update

from app.db.models import Instance, Retrieval
from app.policy.backoff import AdaptiveBackoff, BackoffConfig
from app.retrievals.runner import RetrievalRunner, governor_gate
from tests.dicom.helpers import make_cr
from tests.policy.fakepacs import FakePacs
from tests.policy.test_governed import add_node, new_retrieval


def _studies(dates_modalities: list[tuple[str, str]], per_study: int = 2) -> list:
    out = []
    for i, (date, modality) in enumerate(dates_modalities):
        study, series = generate_uid(), generate_uid()
        out += [make_cr(study_uid=study, series_uid=series, study_date=date, modality=modality,
                        patient_id=f"V{i}", seed=i * 10 + k) for k in range(per_study)]
    return out


def _indexed(ctx) -> set[str]:
    with ctx.sessions() as s:
        return set(s.scalars(select(Instance.sop_instance_uid)))


def test_keys_the_pacs_ignores_are_filtered_on_our_side_before_anything_moves(ctx):
    ctx.settings.arrival_timeout = 3.0
    data = _studies([("20120101", "CR"), ("20130505", "CR"), ("20120101", "MR"), ("20150101", "DX")])
    fake = FakePacs(data).start()  # answers every level with everything under the UIDs it is given
    try:
        add_node(ctx, fake.port, ae="FAKEPACS", name="lax")
        r = RetrievalRunner(ctx, new_retrieval(ctx, {"StudyDate": "20120101", "Modality": "CR"}, node="lax")).run()
    finally:
        fake.stop()
    want = {d.SOPInstanceUID for d in data[:2]}
    assert (r.status, r.expected, r.received, r.skipped) == ("completed", 2, 2, 0)
    assert _indexed(ctx) == want  # nothing of the other dates or modalities entered the store or index
    assert fake.gets == 1
    rep = r.report
    # two studies of other dates dropped at study level, the MR series of the matching date at series level
    assert rep["discarded"] == {"studies": 2, "series": 1, "instances": 0}
    assert rep["keys_not_honoured"] == ["Modality", "StudyDate"] and rep["keys_not_returned"] == []


def test_answers_that_cannot_be_verified_are_not_moved_and_the_job_says_why(ctx):
    ctx.settings.arrival_timeout = 3.0
    data = _studies([("20120101", "CR"), ("20130505", "CR")])
    for ds in data:
        del ds.BodyPartExamined  # the PACS cannot say which body part: nothing may be moved on a guess
    fake = FakePacs(data).start()
    try:
        add_node(ctx, fake.port, ae="FAKEPACS", name="mute")
        r = RetrievalRunner(ctx, new_retrieval(ctx, {"StudyDate": "20120101-20131231", "BodyPartExamined": "CHEST"},
                                              node="mute")).run()
    finally:
        fake.stop()
    assert (r.status, r.expected, r.received) == ("failed", 0, 0)
    assert fake.gets == 0 and _indexed(ctx) == set()
    assert r.report["keys_not_returned"] == ["BodyPartExamined"] and r.report["discarded"]["series"] == 2
    assert "BodyPartExamined" in r.error and "not retrieved" in r.error


def test_modalities_in_study_is_settled_by_the_series_when_the_pacs_does_not_return_it(ctx):
    ctx.settings.arrival_timeout = 3.0
    data = _studies([("20120101", "CR"), ("20120101", "MR")])  # the fake has no ModalitiesInStudy to return
    fake = FakePacs(data).start()
    try:
        add_node(ctx, fake.port, ae="FAKEPACS", name="lax")
        r = RetrievalRunner(ctx, new_retrieval(ctx, {"StudyDate": "20120101", "ModalitiesInStudy": "CR\\DX"},
                                              node="lax")).run()
    finally:
        fake.stop()
    assert (r.status, r.received) == ("completed", 2)
    assert _indexed(ctx) == {d.SOPInstanceUID for d in data[:2]}
    assert r.report["discarded"]["studies"] == 1 and r.report["keys_not_honoured"] == ["ModalitiesInStudy"]


def test_cancel_during_a_retry_wait_ends_the_job_and_sends_nothing_more(ctx):
    ctx.settings.dicom_retries = 5
    data = _studies([("20120101", "CR")])
    fake = FakePacs(data, refuse_gets=100).start()  # 0xA700 out of resources, every time
    try:
        add_node(ctx, fake.port, ae="FAKEPACS", name="busy",
                 policy={"backoff": {"initial_s": 60.0, "factor": 2.0, "max_s": 600.0}})
        rid = new_retrieval(ctx, {"StudyDate": "20120101"}, node="busy")

        def cancel_soon():
            while fake.gets == 0:
                time.sleep(0.05)
            time.sleep(0.5)  # inside the first retry wait (60 s)
            with ctx.sessions() as s:
                s.execute(update(Retrieval).where(Retrieval.id == rid).values(status="cancelled"))
                s.commit()

        t = threading.Thread(target=cancel_soon)
        t.start()
        t0 = time.monotonic()
        r = RetrievalRunner(ctx, rid, gate=governor_gate(ctx, poll_s=0.2)).run()
        elapsed = time.monotonic() - t0
        t.join()
        time.sleep(1.0)
        gets_after = fake.gets
    finally:
        fake.stop()
    assert r.status == "cancelled", (r.status, r.error)
    assert elapsed < 10, elapsed  # not the 60 s wait
    assert gets_after == 1  # no retrieve after the cancel


def test_backoff_level_decays_with_time_and_is_per_node_state():
    now = [1000.0]
    b = AdaptiveBackoff(BackoffConfig(initial_s=1.0, factor=2.0, max_s=300.0, recover_after=3, decay_s=60.0),
                        monotonic=lambda: now[0])
    for _ in range(5):
        b.pressure()
    assert b.level == 5 and b.delay() == 16.0
    now[0] += 59
    assert b.level == 5
    now[0] += 2 * 60 + 1  # three decay periods since the last pushback
    assert b.level == 2 and b.delay() == 2.0
    now[0] += 3600
    assert b.level == 0 and b.delay() == 0.0
    b.pressure()  # a new pushback starts from the decayed level
    assert b.level == 1


# ---- what is already indexed: from this node, from another sender, from a run before a takeover ----

def _orthanc_rig(ctx, orthanc, tmp_path):
    from app.wiring import storage_scp
    from app.retrievals.nodes import create_node
    from app.retrievals.schemas import NodeIn
    from tests.dicom.helpers import make_studies, upload_all

    ctx.settings.arrival_timeout = 3.0
    studies = make_studies(tmp_path / "gen", ["20120101", "20120102"], instances_per_series=2)
    upload_all(orthanc, sorted((tmp_path / "gen").iterdir()))
    with ctx.sessions() as s:
        create_node(s, NodeIn(name="pacs", ae_title="ORTHANC", host="127.0.0.1", port=orthanc.dicom_port,
                              retrieve_method="move"), "test")
        create_node(s, NodeIn(name="modality", ae_title="MODALITY", host="127.0.0.1", port=1,
                              retrieve_method="move"), "test")
        s.commit()
    return studies, storage_scp(ctx)


def _send_as_modality(port: int, ds) -> int:
    from pynetdicom import AE

    ae = AE("MODALITY")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="RADCOHORT")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def _run(ctx, query: dict):
    from app.retrievals.runner import run_retrieval
    from app.retrievals.service import create_retrieval

    with ctx.sessions() as s:
        rid = create_retrieval(s, "pacs", query, "test").id
        s.commit()
    return run_retrieval(ctx, rid)


def test_a_forged_copy_from_another_sender_is_not_counted_present_and_is_reported(ctx, orthanc, tmp_path):
    from pydicom import dcmread

    studies, scp = _orthanc_rig(ctx, orthanc, tmp_path)
    with scp:
        files = sorted((tmp_path / "gen").iterdir())
        forged = dcmread(files[0])
        forged.PixelData = bytes(len(forged.PixelData))  # same UIDs, other pixels
        same = dcmread(files[1])  # an identical copy from another sender
        assert _send_as_modality(scp.port, forged) == 0 and _send_as_modality(scp.port, same) == 0
        r = _run(ctx, {"StudyDate": "20120101"})
    forged_uid, same_uid = str(forged.SOPInstanceUID), str(same.SOPInstanceUID)
    # nothing counted as already present on another sender's word: both fetched from the PACS
    assert (r.expected, r.skipped) == (2, 0), (r.status, r.error)
    assert r.status == "partial" and r.received == 1 and r.failed_uids == [forged_uid], (r.status, r.error)
    assert "conflict" in (r.error or "") or "conflict" in str(r.report.get("failure_reasons")), r.report
    from app.db.models import StoreConflict

    with ctx.sessions() as s:
        kept = list(s.scalars(select(StoreConflict.sop_instance_uid).where(StoreConflict.source_node == "pacs")))
    assert kept == [forged_uid] and same_uid not in (r.missing or [])


def test_instances_brought_before_a_takeover_are_received_not_skipped(ctx, orthanc, tmp_path):
    from app.retrievals.service import create_retrieval
    from app.retrievals.runner import run_retrieval

    studies, scp = _orthanc_rig(ctx, orthanc, tmp_path)
    with scp:
        first = _run(ctx, {"StudyDate": "20120101"})  # an earlier job: its instances are skipped later
        assert (first.status, first.received) == ("completed", 2)
        with ctx.sessions() as s:
            rid = create_retrieval(s, "pacs", {"StudyDate": "20120101-20120102"}, "test").id
            s.commit()
        # "a run before the kill" brought study 2 (same node, after this retrieval was created)
        from app.dicom.scu import DicomClient
        from app.db.models import PacsNode

        with ctx.sessions() as s:
            node = s.scalar(select(PacsNode).where(PacsNode.name == "pacs"))
            s.expunge(node)
        DicomClient(ctx.settings, node).move("STUDY", {"StudyInstanceUID": studies[1].study_uid})
        deadline = time.monotonic() + 10
        while len(_indexed(ctx)) < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        r = run_retrieval(ctx, rid)
    assert (r.status, r.expected, r.skipped, r.received) == ("completed", 4, 2, 2), (r.status, r.error)


def test_a_forged_copy_is_reported_as_a_conflict_over_c_get_too(ctx, orthanc, tmp_path):
    from pydicom import dcmread

    from app.db.models import PacsNode, StoreConflict

    studies, scp = _orthanc_rig(ctx, orthanc, tmp_path)
    with ctx.sessions() as s:
        s.scalar(select(PacsNode).where(PacsNode.name == "pacs")).retrieve_method = "get"
        s.commit()
    with scp:
        forged = dcmread(sorted((tmp_path / "gen").iterdir())[0])
        forged.PixelData = bytes(len(forged.PixelData))
        assert _send_as_modality(scp.port, forged) == 0
        r = _run(ctx, {"StudyDate": "20120101"})
    assert (r.status, r.received, r.failed_uids) == ("partial", 1, [str(forged.SOPInstanceUID)]), r.error
    with ctx.sessions() as s:
        rows = s.execute(select(StoreConflict.sop_instance_uid, StoreConflict.source_node,
                                StoreConflict.reason)).all()
    assert rows == [(str(forged.SOPInstanceUID), "pacs", "sop_content")]


def _studies_of_two_series(prefix: str) -> list:
    """Three studies on one date, each of two single-instance series."""
    data = []
    for i in range(3):
        study = generate_uid()
        data += [make_cr(study_uid=study, series_uid=generate_uid(), study_date="20120101", patient_id=f"{prefix}{i}",
                         seed=i * 10 + k) for k in range(2)]
    return data


def test_a_pacs_probed_to_answer_image_level_per_study_is_listed_with_fewer_queries(ctx):
    ctx.settings.arrival_timeout = 3.0
    data = _studies_of_two_series("Q")
    fake = FakePacs(data, uid_lists=True).start()
    try:
        add_node(ctx, fake.port, ae="FAKEPACS", name="walked")
        add_node(ctx, fake.port, ae="FAKEPACS", name="flat", capabilities={"image_level_needs_series": False})
        walked = RetrievalRunner(ctx, new_retrieval(ctx, {"StudyDate": "20120101"}, node="walked")).run()
        with ctx.sessions() as s:  # the same instances again, through the other node
            s.execute(Instance.__table__.delete())
            s.commit()
        flat = RetrievalRunner(ctx, new_retrieval(ctx, {"StudyDate": "20120101"}, node="flat")).run()
    finally:
        fake.stop()
    assert (walked.status, walked.received, flat.status, flat.received) == ("completed", 6, "completed", 6)
    # walked: studies, each study's series, each series' instances; flat: studies, then every study's
    # instances with one find over the list of their UIDs
    assert walked.report["finds"] == 1 + 3 + 6 and flat.report["finds"] == 1 + 1
    assert _indexed(ctx) == {d.SOPInstanceUID for d in data}


def test_a_pacs_that_leaves_uid_list_finds_unanswered_is_asked_per_study_and_it_is_remembered(ctx):
    """A PACS that matches a list of study UIDs as one literal value answers nothing: each study is
    asked again on its own (nothing is missed), and the node's next listing asks per study at once."""
    from app.db.models import PacsNode

    ctx.settings.arrival_timeout = 3.0
    data = _studies_of_two_series("L")
    fake = FakePacs(data, uid_lists=False).start()
    try:
        add_node(ctx, fake.port, ae="FAKEPACS", name="literal", capabilities={"image_level_needs_series": False})
        first = RetrievalRunner(ctx, new_retrieval(ctx, {"StudyDate": "20120101"}, node="literal")).run()
        with ctx.sessions() as s:
            caps = s.scalar(select(PacsNode.options).where(PacsNode.name == "literal"))["capabilities"]
            s.execute(Instance.__table__.delete())
            s.commit()
        second = RetrievalRunner(ctx, new_retrieval(ctx, {"StudyDate": "20120101"}, node="literal")).run()
    finally:
        fake.stop()
    assert (first.status, first.received, second.status, second.received) == ("completed", 6, "completed", 6)
    assert first.report["finds"] == 1 + 1 + 3 and caps.get("find_uid_lists_unanswered") is True
    assert second.report["finds"] == 1 + 3
    assert _indexed(ctx) == {d.SOPInstanceUID for d in data}
