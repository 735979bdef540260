"""PACS misbehaviour Orthanc cannot show: Success with sub-operations that never reach us, and a
standard 0xA801 unknown destination. The PACS here is a small real pynetdicom Q/R SCP."""

from __future__ import annotations

import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

from app.devtools.orthanc import free_port
from app.dicom.scp import storage_presentation_contexts
from app.retrievals.nodes import create_node
from app.retrievals.runner import run_retrieval
from app.retrievals.schemas import NodeIn
from app.retrievals.service import create_retrieval
from tests.dicom.helpers import find_answer, make_cr


@pytest.fixture
def fake_pacs():
    """Yields (port, datasets, moves, mode): `mode["move"]` is 'blackhole' or 'unknown'."""
    from pydicom.uid import generate_uid

    study = generate_uid()
    series = generate_uid()
    datasets = [make_cr(study_uid=study, series_uid=series, seed=i) for i in range(2)]
    other = generate_uid()  # a second study, for the 'first_only' mode
    datasets.append(make_cr(study_uid=other, series_uid=generate_uid(), seed=9))
    moves: list[str] = []
    mode = {"move": "blackhole"}

    sink = AE("BLACKHOLE")  # a destination that says Success and keeps nothing
    for cx in storage_presentation_contexts():
        sink.add_supported_context(cx.abstract_syntax, cx.transfer_syntax)
    sink_port = free_port()
    sink_server = sink.start_server(("127.0.0.1", sink_port), block=False,
                                    evt_handlers=[(evt.EVT_C_STORE, lambda e: 0x0000)])

    def on_find(event):  # matches on nothing: every instance, whatever the level (radcohort checks)
        for ds in datasets:
            yield 0xFF00, find_answer(ds, event.identifier)

    def on_move(event):
        moves.append(event.identifier.QueryRetrieveLevel)
        if mode["move"] == "unknown":
            yield None, None
            return
        if mode["move"] == "first_only":  # honours only the first UID of a list, says Success
            uids = event.identifier.StudyInstanceUID
            first = uids if isinstance(uids, str) else uids[0]
            chosen = [ds for ds in datasets if ds.StudyInstanceUID == first]
            yield "127.0.0.1", mode["port"]
        else:
            chosen = datasets
            yield "127.0.0.1", sink_port
        yield len(chosen)
        for ds in chosen:
            yield 0xFF00, ds

    pacs = AE("LIAR")
    pacs.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    pacs.add_supported_context(StudyRootQueryRetrieveInformationModelMove)
    for cx in storage_presentation_contexts():
        pacs.add_requested_context(cx.abstract_syntax, cx.transfer_syntax[:1])
    port = free_port()
    server = pacs.start_server(("127.0.0.1", port), block=False,
                               evt_handlers=[(evt.EVT_C_FIND, on_find), (evt.EVT_C_MOVE, on_move)])
    yield port, datasets, moves, mode
    server.shutdown()
    sink_server.shutdown()


def _run(ctx, port, query=None, lanes: int | None = None):
    with ctx.sessions() as s:
        node = create_node(s, NodeIn(name="liar", ae_title="LIAR", host="127.0.0.1", port=port), "test")
        if lanes:  # one association at a time: both studies go in one batched (UID list) retrieve
            node.options = {**(node.options or {}), "policy": {"max_associations": lanes}}
        rid = create_retrieval(s, "liar", query or {"StudyDate": "20120101-20121231"}, "test").id
        s.commit()
    return run_retrieval(ctx, rid)


def test_success_status_without_arrivals_is_not_completed(ctx, fake_pacs):
    port, datasets, moves, _ = fake_pacs
    ctx.settings.arrival_timeout = 1.0
    r = _run(ctx, port)
    # the PACS claims success every time (one study per lane: two studies, two lanes)...
    assert moves == ["STUDY"] * 2
    assert r.report["suboperations"]["completed"] == 6 and r.report["suboperations"]["failed"] == 0
    assert (r.status, r.expected, r.received) == ("failed", 3, 0)  # ...but nothing is in our index
    assert sorted(r.missing) == sorted(d.SOPInstanceUID for d in datasets)
    assert "did not arrive" in r.error


def test_unknown_destination_a801_stops_at_once(ctx, fake_pacs):
    port, datasets, moves, mode = fake_pacs
    mode["move"] = "unknown"
    r = _run(ctx, port)
    # one study per lane (two studies, two lanes), both asked at once; 0xA801 for a single study is an
    # unknown destination: no retry, no series
    assert moves == ["STUDY", "STUDY"]
    assert (r.status, r.failed, len(r.missing)) == ("failed", 3, 3)
    assert "0xA801" in r.error and "destination" in r.error


def test_pacs_ignoring_uid_lists_gets_asked_again_one_by_one(ctx, fake_pacs):
    from app.wiring import storage_scp

    port, datasets, moves, mode = fake_pacs
    mode.update(move="first_only", port=ctx.settings.scp_port)
    ctx.settings.arrival_timeout = 1.0
    with storage_scp(ctx):
        r = _run(ctx, port, lanes=1)
    assert moves == ["STUDY", "STUDY"]  # one batched move of both studies, then the one that did not come
    assert (r.status, r.expected, r.received, r.missing) == ("completed", 3, 3, [])
