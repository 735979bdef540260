"""A small pynetdicom PACS for what Orthanc cannot be made to do: answer 0xA700 on demand."""

from __future__ import annotations

import threading

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pynetdicom import AE, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelGet

from app.dicom.scp import storage_presentation_contexts
from app.devtools.orthanc import free_port
from tests.dicom.helpers import find_answer

OUT_OF_RESOURCES = 0xA700


class FakePacs:
    """Serves `datasets` over C-FIND (any level, matching on UIDs) and C-GET; the first
    `refuse_gets` C-GET requests are answered 0xA700 (out of resources) with nothing sent."""

    def __init__(self, datasets: list[Dataset], refuse_gets: int = 0, ae_title: str = "FAKEPACS",
                 refuse_levels: frozenset[str] = frozenset(), get_delay: float = 0.0, uid_lists: bool = False):
        self.datasets = datasets
        # False (the default: what the tests were written against): a UID list is matched as one literal
        # value, so it matches nothing; True: list-of-UID matching (PS3.4 C.2.2.2.2)
        self.uid_lists = uid_lists
        self.refuse_gets = refuse_gets
        self.refuse_levels = refuse_levels  # answered 0xC000 (unable to process): a permanent refusal
        self.get_delay = get_delay
        self.levels: list[str] = []
        self.active = 0
        self.max_active = 0
        self.ae_title = ae_title
        self.port = free_port()
        self.gets = 0
        self.refused = 0
        self._lock = threading.Lock()
        self._server = None

    def _match(self, ident: Dataset) -> list[Dataset]:
        out = []
        for ds in self.datasets:
            ok = True
            for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
                value = ident.get(key, "") or ""
                want = [str(v) for v in value] if isinstance(value, (list, MultiValue)) else \
                    ([str(value)] if value else [])
                if len(want) > 1 and not self.uid_lists:
                    want = ["\\".join(want)]
                if want and str(ds.get(key)) not in want:
                    ok = False
            if ok:
                out.append(ds)
        return out

    def _find(self, event):
        ident = event.identifier
        ident.QueryRetrieveLevel  # noqa: B018 - a find without a level fails here, as at a real SCP
        seen = set()
        for ds in self._match(ident):
            rsp = find_answer(ds, ident)
            k = tuple(rsp.get(key) for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))
            if k in seen:
                continue
            seen.add(k)
            yield 0xFF00, rsp

    def _get(self, event):
        level = str(event.identifier.QueryRetrieveLevel)
        with self._lock:
            self.levels.append(level)
        if level in self.refuse_levels:
            yield 1
            yield 0xC000, None
            return
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            yield from self._serve(event)
        finally:
            with self._lock:
                self.active -= 1

    def _serve(self, event):
        import time

        if self.get_delay:
            time.sleep(self.get_delay)
        with self._lock:
            self.gets += 1
            refuse = self.refused < self.refuse_gets
            if refuse:
                self.refused += 1
        if refuse:
            yield 1  # with 0 sub-operations pynetdicom would answer Success straight away
            yield OUT_OF_RESOURCES, None
            return
        matches = self._match(event.identifier)
        yield len(matches)
        for ds in matches:
            yield 0xFF00, ds

    def start(self) -> "FakePacs":
        ae = AE(ae_title=self.ae_title)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
        for cx in storage_presentation_contexts():
            ae.add_supported_context(cx.abstract_syntax, cx.transfer_syntax, scu_role=True, scp_role=True)
        self._server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_C_FIND, self._find), (evt.EVT_C_GET, self._get)])
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
