"""The conformance matrix: every (peer, scenario) outcome, written as JSON when
RADCOHORT_CONFORMANCE_OUT names a file (rendered by bench/conformance_matrix.py)."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

import pytest

_RESULTS: dict[tuple[str, str], dict] = {}
_LIMITATIONS: dict[str, str] = {}  # test nodeid -> the documented limitation it observed


class Matrix:
    """Handed to a test: `limitation(reason)` records that the peer showed a documented
    limitation (asserted by the test) instead of the full behaviour."""

    def __init__(self, nodeid: str):
        self.nodeid = nodeid

    def limitation(self, reason: str) -> None:
        _LIMITATIONS[self.nodeid] = reason


@pytest.fixture
def matrix(request) -> Matrix:
    return Matrix(request.node.nodeid)


def _cell(item) -> tuple[str, str] | None:
    marker = item.get_closest_marker("scenario")
    if marker is None:
        return None
    params = getattr(getattr(item, "callspec", None), "params", {})
    return str(params.get("peer", marker.kwargs.get("peer", "?"))), str(marker.args[0])


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "scenario(name, peer=None): a cell of the PACS conformance matrix")


def pytest_collection_modifyitems(config, items) -> None:
    # the real peers need the Orthanc / dcmtk binaries: `-m orthanc` selects them with the rest
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if params.get("peer") and item.get_closest_marker("orthanc") is None:
            item.add_marker(pytest.mark.orthanc)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    cell = _cell(item)
    if cell is None or (rep.when != "call" and rep.passed):
        return
    if rep.passed:
        reason = _LIMITATIONS.get(item.nodeid)
        result = "expected-limitation" if reason else "pass"
    elif rep.skipped:
        result, reason = "skipped", str(rep.longrepr[-1]) if isinstance(rep.longrepr, tuple) else "skipped"
    else:
        crash = getattr(rep.longrepr, "reprcrash", None)
        msg = (crash.message if crash else str(rep.longrepr)).strip().splitlines()
        result = "fail" if rep.when == "call" else "error"
        reason = (msg[0] if msg else "")[:300]
    if cell in _RESULTS and _RESULTS[cell]["result"] in ("fail", "error"):
        return  # keep the first failure (a teardown error after a failed call adds nothing)
    _RESULTS[cell] = {"peer": cell[0], "scenario": cell[1], "result": result, "reason": reason or "",
                      "test": item.nodeid, "seconds": round(getattr(rep, "duration", 0.0), 1)}


def pytest_sessionfinish(session, exitstatus) -> None:
    out = os.environ.get("RADCOHORT_CONFORMANCE_OUT")
    if not out or not _RESULTS:
        return
    path = Path(out)
    old = json.loads(path.read_text()) if path.exists() else {}
    cells = {(c["peer"], c["scenario"]): c for c in old.get("cells", [])}
    cells.update(_RESULTS)  # a partial run (-k) updates its own cells only
    path.write_text(json.dumps({"generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                "cells": sorted(cells.values(), key=lambda c: (c["scenario"], c["peer"]))},
                               indent=1) + "\n")
