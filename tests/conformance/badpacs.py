"""A misbehaving Query/Retrieve peer (pynetdicom) for faults that real servers will not produce.

It holds real datasets and answers C-FIND (any level, matching UIDs, StudyDate and Modality) and
C-MOVE (sub-operations to a known destination), and can be told to misbehave:
- ``garbage_rows``: extra C-FIND rows whose identifiers are garbage (not UIDs, too long);
- ``rows_without_uids``: extra C-FIND rows that lack SOP/Series Instance UIDs;
- ``no_counts``: pending C-MOVE responses carry no sub-operation counts;
- ``abort_study``: a C-MOVE that includes this study sends its first instance, then the peer
  aborts the association (every time);
- ``stop_at``: SOP Instance UIDs that cannot be sent: a C-MOVE that includes one tries it first and
  ends there with 0xC000 (as Orthanc does when one sub-operation fails), nothing sent.
It counts the C-MOVE requests it receives (``moves``), so a test can say "nothing more was asked".
"""

from __future__ import annotations

import copy
import threading
import warnings
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from app.devtools.orthanc import free_port

PENDING = 0xFF00


def _values(value) -> list[str]:
    """A matching value as a list: a UID list arrives as a MultiValue (or a backslash string)."""
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple, MultiValue)):
        return [str(v) for v in value if str(v)]
    return [v for v in str(value).split("\\") if v]


def _date_match(want: str, have: str) -> bool:
    if not want:
        return True
    if "-" not in want:
        return have == want
    lo, hi = want.split("-", 1)
    return (not lo or have >= lo) and (not hi or have <= hi)


@dataclass
class BadPacs:
    datasets: list[Dataset]
    destinations: dict[str, tuple[str, int]]  # move destination AE title -> (host, port)
    ae_title: str = "BADPACS"
    garbage_rows: int = 0
    rows_without_uids: int = 0
    no_counts: bool = False
    abort_study: str | None = None
    stop_at: frozenset = frozenset()
    host: str = "127.0.0.1"
    kind: str = "badpacs"
    port: int = field(default_factory=free_port)
    moves: int = 0
    move_identifiers: list = field(default_factory=list)  # what each C-MOVE asked for (a test's evidence)
    aborted: int = 0
    _server: object = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def held(self) -> set[str]:
        return {str(ds.SOPInstanceUID) for ds in self.datasets}

    def move_requests(self) -> int:
        with self._lock:
            return self.moves

    # ------------------------------------------------------------------ matching
    def _match(self, ident: Dataset) -> list[Dataset]:
        out = []
        for ds in self.datasets:
            ok = True
            for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
                want = _values(ident.get(key, ""))
                if want and str(ds.get(key)) not in want:
                    ok = False
            if not _date_match(str(ident.get("StudyDate", "") or ""), str(ds.get("StudyDate", ""))):
                ok = False
            modality = str(ident.get("Modality", "") or "")
            if modality and str(ds.get("Modality", "")) != modality:
                ok = False
            if ok:
                out.append(ds)
        return out

    @staticmethod
    def _answer(ident: Dataset, ds: Dataset) -> Dataset:
        """The C-FIND answer for `ds`: every key the identifier names that `ds` has."""
        rsp = Dataset()
        rsp.QueryRetrieveLevel = ident.QueryRetrieveLevel
        for elem in ident:
            if elem.keyword in ds and elem.keyword != "QueryRetrieveLevel":
                rsp.add_new(elem.tag, ds[elem.tag].VR, copy.deepcopy(ds[elem.tag].value))  # never share
        return rsp

    def _find(self, event):
        ident = event.identifier
        level = str(ident.QueryRetrieveLevel)
        keys = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")[: {"STUDY": 1, "SERIES": 2}.get(level, 3)]
        seen = set()
        for ds in self._match(ident):
            rsp = self._answer(ident, ds)
            k = tuple(str(ds.get(key)) for key in keys)
            if k in seen:
                continue
            seen.add(k)
            yield PENDING, rsp
        if not self._match(ident):
            return
        first = self._match(ident)[0]
        # the faulty rows carry the same matching keys as a good one (they match the query): only
        # their identifiers are wrong
        for i in range(self.garbage_rows):
            rsp = self._answer(ident, first)
            with warnings.catch_warnings():  # invalid on purpose: pydicom's warnings are noise here
                warnings.simplefilter("ignore")
                rsp.StudyInstanceUID = "not a uid!" if i % 2 == 0 else "1." + "9" * 80
                rsp.SeriesInstanceUID = "garbage-series"
                rsp.SOPInstanceUID = f"1.2.abc.{i}"
            rsp.SOPClassUID = first.SOPClassUID
            yield PENDING, rsp
        for i in range(self.rows_without_uids):
            rsp = self._answer(ident, first)
            for key in ("SeriesInstanceUID",) if i % 2 else ("SOPInstanceUID",):
                if key in rsp:
                    del rsp[key]
            if i % 2 and level == "IMAGE":
                rsp.SOPInstanceUID = f"2.25.{1000 + i}"  # an instance without its series
            yield PENDING, rsp

    # ------------------------------------------------------------------ C-MOVE
    def _move(self, event):
        with self._lock:
            self.moves += 1
            self.move_identifiers.append(event.identifier)
        name = event.move_destination
        dest = self.destinations.get((name.decode("ascii") if isinstance(name, bytes) else str(name)).strip())
        if dest is None:
            yield None, None
            return
        matches = self._match(event.identifier)
        yield dest[0], dest[1]
        yield len(matches)
        failing = [ds for ds in matches if str(ds.SOPInstanceUID) in self.stop_at]
        if failing:
            yield 0xC000, None  # "unable to process": the whole move, at its first sub-operation
            return
        aborting = bool(self.abort_study) and any(str(ds.StudyInstanceUID) == self.abort_study for ds in matches)
        if aborting:  # the aborting study's instances first, so one of them arrives before the abort
            matches.sort(key=lambda ds: str(ds.StudyInstanceUID) != self.abort_study)
        for i, ds in enumerate(matches):
            if aborting and i == 1:
                with self._lock:
                    self.aborted += 1
                event.assoc.abort()
                return
            yield PENDING, ds

    def _strip_counts(self, event) -> None:
        """Per association: pending C-MOVE responses leave without NumberOf*Suboperations."""
        dimse = event.assoc.dimse
        send = dimse.send_msg

        def send_msg(primitive, context_id):
            if type(primitive).__name__ == "C_MOVE" and primitive.Status in (0xFF00, 0xFF01):
                for name in ("NumberOfRemainingSuboperations", "NumberOfCompletedSuboperations",
                             "NumberOfFailedSuboperations", "NumberOfWarningSuboperations"):
                    setattr(primitive, name, None)
            return send(primitive, context_id)

        dimse.send_msg = send_msg

    # ------------------------------------------------------------------ life cycle
    def start(self) -> "BadPacs":
        ae = AE(ae_title=self.ae_title)
        ae.add_supported_context(Verification)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelMove)
        # the contexts it proposes on the move's sub-association (to our Storage SCP)
        for cls in sorted({str(ds.SOPClassUID) for ds in self.datasets}):
            ae.add_requested_context(cls, [str(ds.file_meta.TransferSyntaxUID) for ds in self.datasets
                                           if str(ds.SOPClassUID) == cls][:1])
        handlers = [(evt.EVT_C_FIND, self._find), (evt.EVT_C_MOVE, self._move)]
        if self.no_counts:
            handlers.append((evt.EVT_ESTABLISHED, self._strip_counts))
        self._server = ae.start_server((self.host, self.port), block=False, evt_handlers=handlers)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
