"""The capability probe against a real Orthanc: result caps, C-GET, storage syntaxes, move destination."""

from __future__ import annotations

import pytest

from app.dicom.scu import Node
from app.probe.probe import effective_find_cap, preferred_method, probe_node
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
    assert caps["move"]["model_accepted"] and caps["move"]["destination_known"]
    assert effective_find_cap({"capabilities": caps}) == 4
    assert effective_find_cap({"capabilities": caps, "policy": {"max_find_results": 2}}) == 2


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


def test_unknown_move_destination_makes_the_planner_use_get(orthanc_factory, ctx, settings, tmp_path):
    from app.dicom.scp import StorageSCP

    # our AE is not among the PACS's modalities: queries and C-GET allowed, C-MOVE has nowhere to go
    srv = orthanc_factory(overrides={"DicomAlwaysAllowFind": True, "DicomAlwaysAllowGet": True,
                                     "DicomAlwaysAllowMove": True})
    make_studies(tmp_path / "gen", ["20120101"], instances_per_series=1)
    upload_all(srv, sorted((tmp_path / "gen").iterdir()))
    with StorageSCP(ctx):  # our receiver is up, so a failed test move means the PACS cannot move to us
        caps = probe_node(settings, Node("ORTHANC", "127.0.0.1", srv.dicom_port, "pacs"))
    assert caps["find_cap"] is None
    assert caps["move"]["receiver_listening"] and not caps["move"]["works"], caps["move"]
    assert caps["get"]["works"]
    method, why = preferred_method({"capabilities": caps}, "move")
    assert method == "get" and "C-MOVE" in why
    assert preferred_method({"capabilities": caps}, "get") == ("get", None)


def test_probe_of_a_dead_node_says_so(settings):
    from app.devtools.orthanc import free_port

    caps = probe_node(settings, Node("NOBODY", "127.0.0.1", free_port(), "dead"))
    assert caps["echo"]["ok"] is False and caps["echo"]["error"]


def test_known_cap_sizes_the_date_split_instead_of_bisecting(orthanc_factory, ctx, settings, tmp_path):
    from app.policy.runner import GovernedRunner
    from tests.policy.test_governed import add_node, new_retrieval

    # 6 studies of 3 instances on 6 days; the PACS caps instance-level answers at 5
    srv = orthanc_factory(modalities={"radcohort": (settings.ae_title, "127.0.0.1", settings.scp_port)},
                          overrides={"LimitFindInstances": 5})
    days = ["20120110", "20120220", "20120305", "20120415", "20120601", "20121130"]
    studies = make_studies(tmp_path / "gen", days, instances_per_series=3)
    upload_all(srv, sorted((tmp_path / "gen").iterdir()))
    ctx.settings.arrival_timeout = 3.0
    add_node(ctx, srv.dicom_port, name="blind")  # cap unknown: bisects on 0xFE00
    add_node(ctx, srv.dicom_port, name="probed", capabilities={"instance_cap": 5})
    blind = GovernedRunner(ctx, new_retrieval(ctx, {"StudyDate": "20120101-20121231"}, node="blind")).run()
    assert (blind.status, blind.expected) == ("completed", 18)
    assert blind.report["capped_finds"] >= 3 and blind.report["find_splits"] >= 3
    sized = GovernedRunner(ctx, new_retrieval(ctx, {"StudyDate": "20120101-20121231"}, node="probed")).run()
    assert (sized.status, sized.expected, sized.skipped) == ("completed", 18, 18)
    # ranges of at most 4 instances (80 % of 5): one study each, and no query came back capped
    assert sized.report["capped_finds"] == 0 and sized.report["find_splits"] == 0
    assert sized.report["cap_sized_ranges"] == 6
    assert {u for st in studies for u in st.sop_uids} == {u for u in _indexed(ctx)}


def _indexed(ctx):
    from sqlalchemy import select

    from app.db.models import Instance

    with ctx.sessions() as s:
        return set(s.scalars(select(Instance.sop_instance_uid)))
