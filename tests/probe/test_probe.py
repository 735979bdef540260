"""The capability probe against real peers (Orthanc, dcmtk's dcmqrscp, pynetdicom's qrscp): result
caps, C-GET, storage syntaxes, move destination, matching keys honoured, duplicates, UID lists."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import func, select

from app.db.models import Instance
from app.dicom.scu import Node
from app.probe.probe import effective_find_cap, preferred_method, probe_node
from tests.conformance.peers import start_peer
from tests.dicom.helpers import make_studies, upload_all

J2K = "1.2.840.10008.1.2.4.90"
CR = "1.2.840.10008.5.1.4.1.1.1"


@pytest.fixture
def capped(orthanc_factory, settings, tmp_path):
    """An Orthanc that caps C-FIND at 3 results (4 at instance level), with 5 studies x 2 series x 3."""
    srv = orthanc_factory(modalities={"radcohort": (settings.ae_title, "127.0.0.1", settings.scp_port)},
                          overrides={"LimitFindResults": 3, "LimitFindInstances": 4})
    studies = make_studies(tmp_path / "gen", ["20110101", "20120101", "20130101", "20140101", "20150101"],
                           series_per_study=2, instances_per_series=3)
    upload_all(srv, sorted((tmp_path / "gen").iterdir()))
    return srv, studies


def test_probe_finds_the_caps_levels_get_and_syntaxes(capped, settings):
    srv, _ = capped
    caps = probe_node(settings, Node("ORTHANC", "127.0.0.1", srv.dicom_port, "pacs"))
    assert caps["echo"]["ok"]
    assert caps["find_cap"] == 3 and caps["instance_cap"] == 4
    assert {"study:STUDY", "study:SERIES", "study:IMAGE", "patient:PATIENT"} <= set(caps["levels"])
    assert caps["get"]["works"] and caps["get"]["sent_as"]["sop_class"] == CR
    assert J2K in caps["storage"][CR]  # Orthanc will send JPEG 2000 as stored
    # Orthanc honours every key radcohort plans with, answers once per study, takes UID lists in C-FIND
    assert caps["keys_not_honoured"] == {} and "keys_refused" not in caps
    assert caps["image_level_needs_series"] is False and caps["duplicate_answers"] is False
    assert caps["uid_lists"]["find"] is True and caps["uid_lists_refused"] is not True
    # Orthanc 1.10 answers 0xC000 to a C-MOVE that matches nothing, known destination or not
    assert caps["move"]["model_accepted"] and caps["move"]["destination_known"] is None
    assert "cannot be learnt" in caps["move"]["note"]
    assert caps["retrieve_ae_title"] == "ORTHANC" and not caps.get("called_ae_mismatch")
    assert caps["summary"] == ("echo ok, query ok (STUDY/SERIES/IMAGE), move not learnt, get ok, "
                               "result cap 3, instance cap 4")
    assert effective_find_cap({"capabilities": caps}) == 4
    assert effective_find_cap({"capabilities": caps, "policy": {"max_find_results": 2}}) == 2


def test_probe_stores_and_indexes_nothing(orthanc, ctx, settings, tmp_path):
    from app.wiring import storage_scp

    # Orthanc knows our AE as a move destination and our receiver is up: an old-style test move
    # would have stored and indexed a patient's image here
    make_studies(tmp_path / "gen", ["20120101", "20130101"], instances_per_series=2)
    upload_all(orthanc, sorted((tmp_path / "gen").iterdir()))
    with storage_scp(ctx):
        caps = probe_node(settings, Node("ORTHANC", "127.0.0.1", orthanc.dicom_port, "pacs"))
        time.sleep(0.5)  # anything in flight would have landed by now
    assert caps["echo"]["ok"] and caps["sampled"] and caps["get"]["works"]
    assert caps["move"]["receiver_listening"]
    assert [p for p in settings.store_dir.rglob("*") if p.is_file()] == []
    with ctx.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == 0
    assert orthanc.instance_count() == 4


@pytest.fixture
def peer_factory(settings, tmp_path):
    """Start a conformance peer (tests/conformance/peers.py) loaded with 3 studies x 2 series x 2."""
    started = []

    def make(kind: str, know_us: bool = True):
        our = (settings.ae_title, settings.scp_port) if know_us else ("SOMEONEELSE", 1)
        peer = start_peer(kind, tmp_path / f"{kind}-{len(started)}", our)
        started.append(peer)
        gen = tmp_path / f"gen-{len(started)}"
        make_studies(gen, ["20120101", "20130101", "20140101"], series_per_study=2, instances_per_series=2)
        peer.load(sorted(gen.iterdir()))
        return peer, Node(peer.ae_title, "127.0.0.1", peer.port, kind)

    yield make
    for p in started:
        p.stop()


def test_probe_learns_which_keys_dcmqrscp_ignores(peer_factory, settings):
    _, node = peer_factory("dcmqrscp")
    caps = probe_node(settings, node)
    # default dcmqrscp applies no key it does not index, nor study/patient keys at SERIES level
    assert caps["keys_not_honoured"] == {
        "STUDY": ["ModalitiesInStudy"],
        "SERIES": ["BodyPartExamined", "StudyDate", "PatientSex", "PatientBirthDate"]}
    assert "keys not honoured: STUDY ModalitiesInStudy, SERIES BodyPartExamined, SERIES StudyDate" in caps["summary"]
    assert caps["image_level_needs_series"] is False and caps["duplicate_answers"] is False
    # it looks for matches before it checks the destination: Success even to an unknown AE
    assert caps["move"]["destination_known"] is None and caps["move"]["control_status"].startswith("0x0000")
    assert caps["get"]["works"]


def test_strict_dcmqrscp_image_level_needs_the_series(peer_factory, settings):
    _, node = peer_factory("dcmqrscp-strict")
    caps = probe_node(settings, node)
    assert "study:IMAGE" in caps["levels"]  # not 'IMAGE level unsupported'
    assert caps["image_level_needs_series"] is True and caps["find"]["study"]["IMAGE"]["needs_series"]
    assert "IMAGE level needs SeriesInstanceUID" in caps["summary"]
    # keys above the query level are refused outright (0xA900), not ignored
    assert caps["keys_refused"] == {"SERIES": ["StudyDate", "PatientSex", "PatientBirthDate"]}
    assert caps["move"]["model_accepted"]  # the MOVE association proposes FIND too (--require-find)
    assert caps["sampled"] and caps["get"]["works"]


def test_qrscp_duplicates_lists_and_move_destination(peer_factory, settings):
    _, known = peer_factory("qrscp")
    caps = probe_node(settings, known)
    # one answer per instance at STUDY and SERIES level: counted once each
    assert caps["duplicate_answers"] is True
    assert caps["duplicates"]["study:STUDY"] == 9 and caps["find"]["study"]["STUDY"]["count"] == 3
    assert {"PatientSex", "PatientBirthDate", "ModalitiesInStudy"} <= set(caps["keys_not_honoured"]["STUDY"])
    assert "BodyPartExamined" in caps["keys_not_honoured"]["SERIES"]
    # it checks the destination first (a control to an unknown AE gets 0xA801): we are known
    assert caps["move"]["destination_known"] is True and caps["move"]["works"]
    assert caps["uid_lists"] == {"find": False, "move": False} and caps["uid_lists_refused"] is True
    assert "duplicate answers" in caps["summary"] and "UID lists refused (find/move)" in caps["summary"]

    _, unknown = peer_factory("qrscp", know_us=False)
    caps = probe_node(settings, unknown)
    assert caps["move"]["destination_known"] is False and caps["move"]["status"].startswith("0xA801")
    assert "not a known destination" in caps["summary"]
    method, why = preferred_method({"capabilities": caps}, "move")
    assert method == "get" and "C-MOVE" in why
    assert preferred_method({"capabilities": caps}, "get") == ("get", None)


def test_wrong_called_ae_title_is_named(orthanc_factory, settings, tmp_path):
    # a PACS that checks the called AE rejects the association, and the probe says which title
    strict = orthanc_factory(modalities={"radcohort": (settings.ae_title, "127.0.0.1", settings.scp_port)},
                             overrides={"DicomCheckCalledAet": True})
    caps = probe_node(settings, Node("WRONGAET", "127.0.0.1", strict.dicom_port, "pacs"))
    assert caps["echo"]["ok"] is False and "Called AE title not recognised" in caps["echo"]["error"]
    assert "called AE title 'WRONGAET' not recognised" in caps["summary"]
    # one that does not check answers anyway, but names itself in its answers (RetrieveAETitle)
    lax = orthanc_factory(modalities={"radcohort": (settings.ae_title, "127.0.0.1", settings.scp_port)})
    make_studies(tmp_path / "gen", ["20120101"], instances_per_series=1)
    upload_all(lax, sorted((tmp_path / "gen").iterdir()))
    caps = probe_node(settings, Node("WRONGAET", "127.0.0.1", lax.dicom_port, "pacs"))
    assert caps["echo"]["ok"] and caps["called_ae_mismatch"] is True
    assert "names itself 'ORTHANC'" in caps["summary"]


def test_capped_pacs_retrieval_still_gets_everything(capped, ctx, settings):
    from tests.dicom.test_retrieval import add_node, indexed, retrieve

    srv, studies = capped
    ctx.settings.arrival_timeout = 3.0
    add_node(ctx, srv, "get")
    r = retrieve(ctx, {"StudyDate": "20100101-20161231"})
    want = {u for st in studies for u in st.sop_uids}
    assert (r.status, r.expected, r.received, r.missing) == ("completed", 30, 30, [])
    assert indexed(ctx) == want
    assert r.report["find_splits"] > 0


def test_probe_of_a_dead_node_says_so(settings):
    from app.devtools.orthanc import free_port

    caps = probe_node(settings, Node("NOBODY", "127.0.0.1", free_port(), "dead"))
    assert caps["echo"]["ok"] is False and caps["echo"]["error"]


def test_an_instance_cap_does_not_bite_the_hierarchical_listing(orthanc_factory, ctx, settings, tmp_path):
    from app.retrievals.runner import RetrievalRunner
    from tests.policy.test_governed import add_node, new_retrieval

    # 6 studies of 3 instances on 6 days; the PACS caps instance-level answers at 5. The listing asks
    # IMAGE level per series (STUDY -> SERIES -> IMAGE), so no answer reaches the cap, probed or not
    # (it used to list instances by date range and had to bisect or size ranges to the cap).
    srv = orthanc_factory(modalities={"radcohort": (settings.ae_title, "127.0.0.1", settings.scp_port)},
                          overrides={"LimitFindInstances": 5})
    days = ["20120110", "20120220", "20120305", "20120415", "20120601", "20121130"]
    studies = make_studies(tmp_path / "gen", days, instances_per_series=3)
    upload_all(srv, sorted((tmp_path / "gen").iterdir()))
    ctx.settings.arrival_timeout = 3.0
    add_node(ctx, srv.dicom_port, name="blind")
    add_node(ctx, srv.dicom_port, name="probed", capabilities={"instance_cap": 5})
    blind = RetrievalRunner(ctx, new_retrieval(ctx, {"StudyDate": "20120101-20121231"}, node="blind")).run()
    assert (blind.status, blind.expected) == ("completed", 18)
    assert blind.report["capped_finds"] == 0 and blind.report["find_splits"] == 0
    sized = RetrievalRunner(ctx, new_retrieval(ctx, {"StudyDate": "20120101-20121231"}, node="probed")).run()
    # indexed from node "blind": for node "probed" another sender's copies, fetched again to be verified
    assert (sized.status, sized.expected, sized.received, sized.skipped) == ("completed", 18, 18, 0)
    assert sized.report["capped_finds"] == 0 and sized.report["find_splits"] == 0
    assert {u for st in studies for u in st.sop_uids} == {u for u in _indexed(ctx)}


def _indexed(ctx):
    from sqlalchemy import select

    from app.db.models import Instance

    with ctx.sessions() as s:
        return set(s.scalars(select(Instance.sop_instance_uid)))


def _wait_probe(client, name: str, timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while (body := client.get(f"/api/v1/pacs-nodes/{name}/probe").json())["probe"]["status"] == "running":
        assert time.monotonic() < deadline, body
        time.sleep(0.2)
    return body


def test_probe_over_http_is_a_background_job_with_a_summary(client, orthanc, tmp_path):
    from app.devtools.orthanc import free_port

    make_studies(tmp_path / "gen", ["20120101"], instances_per_series=1)
    upload_all(orthanc, sorted((tmp_path / "gen").iterdir()))
    node = {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}
    assert client.post("/api/v1/pacs-nodes", json=node).status_code == 201
    assert client.get("/api/v1/pacs-nodes/pacs/probe").json()["probe"]["status"] == "never"

    r = client.post("/api/v1/pacs-nodes/pacs/probe")
    assert r.status_code == 202, r.text
    assert r.json()["probe"]["status"] in ("running", "completed") and r.json()["probe"]["started_at"]
    body = _wait_probe(client, "pacs")
    assert body["probe"]["status"] == "completed" and body["probe"]["error"] is None
    assert body["summary"].startswith("echo ok, query ok (STUDY/SERIES/IMAGE)") and body["summary"] == \
        body["probe"]["summary"] == body["capabilities"]["summary"]
    assert body["capabilities"]["keys_not_honoured"] == {} and body["planner"]["method"] == "move"
    assert "PatientID" not in str(body) and "P0" not in str(body["capabilities"])  # no patient identifiers

    # the blocking form for scripts: 200 with the same shape
    r = client.post("/api/v1/pacs-nodes/pacs/probe?wait=true")
    assert r.status_code == 200 and r.json()["probe"]["status"] == "completed" and r.json()["summary"]

    # a node that does not answer: the job fails with the reason, earlier findings are kept
    dead = {**node, "name": "dead", "port": free_port()}
    assert client.post("/api/v1/pacs-nodes", json=dead).status_code == 201
    assert client.post("/api/v1/pacs-nodes/dead/probe").status_code == 202
    body = _wait_probe(client, "dead")
    assert body["probe"]["status"] == "failed" and "C-ECHO" in body["probe"]["error"]
    assert body["capabilities"] == {} and body["probe"]["summary"].startswith("echo failed")
    assert client.post("/api/v1/pacs-nodes/dead/probe?wait=true").status_code in (502, 504)
    assert client.get("/api/v1/pacs-nodes/nope/probe").status_code == 404
