"""The client a retrieval talks to the PACS through: DIMSE (C-FIND, C-MOVE, C-GET), DICOMweb (QIDO,
WADO-RS) or both, every find holding one of the node's association slots from the gate.

`make_client` picks by the method the runner settled on (the node's protocol and its probe, or the
caller's override); the runner then retrieves with `move`/`get` (DIMSE) or `iter_unit` (WADO-RS).
"""

from __future__ import annotations

from collections.abc import Callable

from app.dicom.scu import DicomClient, FindResult
from app.probe.probe import find_caps_by_level


class GovernedClient:
    """A DIMSE or DICOMweb client whose finds hold an association slot and honour a known cap.

    A PACS that truncates at its cap and still says Success is caught by the known cap (policy, or
    the probe): an answer of that size counts as capped, so the hierarchical listing
    (app.retrievals.expected) splits the study level by date and reports a capped series.
    """

    def __init__(self, inner, gate, caps: dict[str, int | None]):
        self.inner, self.gate = inner, gate
        self.caps = caps
        self.capped_answers = 0

    def find(self, level, query=None, **kw) -> FindResult:
        with self.gate.association():
            res = self.inner.find(level, dict(query or {}), **kw)
        cap = self.caps.get("IMAGE" if str(level).upper() == "IMAGE" else "OTHER")
        if cap and not res.capped and len(res.results) >= cap:
            res.capped = True
        self.capped_answers += bool(res.capped)
        return res


class Both:
    """protocol 'both': C-FIND for the listing, WADO-RS for the instances."""

    def __init__(self, dimse: GovernedClient, dw):
        self.dimse, self.dw = dimse, dw

    def find(self, level, query=None, **kw):
        return self.dimse.find(level, query, **kw)


def make_client(settings, node, method: str, gate, dimse: Callable[[object], object] | None = None):
    """(the client the runner lists and retrieves through, the GovernedClient that counts capped finds).

    `dimse(node)`: a DIMSE client factory (a test's fake PACS); default DicomClient, whose retry
    sleeps go through the gate."""
    opts = node.options or {}
    caps = find_caps_by_level(opts)

    def dimse_client():
        if dimse is not None:
            return dimse(node)
        return DicomClient(settings, node, sleep=gate.retry_sleep)

    if method == "dicomweb":
        from app.dicomweb.client import DicomwebNode

        inner = DicomwebNode(opts["dicomweb_url"], name=node.name, timeout=settings.dicom_timeout,
                             retries=settings.dicom_retries, sleep=gate.retry_sleep)
        if opts.get("protocol") == "both":  # listing over C-FIND, retrieval over WADO-RS
            finds = GovernedClient(dimse_client(), gate, caps)
            return Both(finds, inner), finds
        # Orthanc's QIDO truncates at its limit silently, offset or not: only a known cap
        # (policy, or the probe of the same server over DIMSE) reveals it
        finds = GovernedClient(inner, gate, caps)
        return finds, finds
    finds = GovernedClient(dimse_client(), gate, caps)
    return finds, finds
