"""The SCU: C-ECHO, C-FIND, C-MOVE, C-GET against a PACS node — and the ONE retry layer.

Every operation opens its own association, collects the whole answer (no generators leak out),
and maps what went wrong to `RetriableDicomError` (connection refused/reset, timeout, abort,
0xA7xx out of resources, transient rejection) or `PermanentDicomError` (rejected association,
0xA801 unknown move destination, bad identifier, 0xCxxx unable to process). Retriable errors are
retried with exponential backoff and jitter, `settings.dicom_retries` times.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from app.config import Settings
from app.dicom.netopts import low_latency
from app.dicom.queries import build_identifier, check_level, validate_query
from app.errors import DicomError, PermanentDicomError, RetriableDicomError
from app.retry import RetryPolicy

log = logging.getLogger("radcohort.scu")

T = TypeVar("T")

MODELS = {
    ("study", "find"): StudyRootQueryRetrieveInformationModelFind,
    ("patient", "find"): PatientRootQueryRetrieveInformationModelFind,
    ("study", "move"): StudyRootQueryRetrieveInformationModelMove,
    ("patient", "move"): PatientRootQueryRetrieveInformationModelMove,
    ("study", "get"): StudyRootQueryRetrieveInformationModelGet,
    ("patient", "get"): PatientRootQueryRetrieveInformationModelGet,
}
MAX_CONTEXTS = 128  # PS3.8: at most 128 presentation contexts per association

PENDING = (0xFF00, 0xFF01)
CANCEL = 0xFE00
MOVE_DESTINATION_UNKNOWN = 0xA801


@dataclass(frozen=True)
class Node:
    """Where a PACS listens."""

    ae_title: str
    host: str
    port: int
    name: str = ""
    find_limit: int | None = None  # a silent C-FIND result limit: an answer this long counts as capped
    tls: tuple[str | None, str | None, str | None] | None = None  # (ca, cert, key) PEM paths: speak TLS

    def tls_args(self) -> tuple[ssl.SSLContext, str] | None:
        """pynetdicom's tls_args for this node: verify it against `ca` (system CAs when None) and its
        host name, presenting `cert`/`key` when given."""
        if self.tls is None:
            return None
        ca, cert, key = self.tls
        try:
            ctx = ssl.create_default_context(cafile=ca)
            if cert:
                ctx.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise PermanentDicomError(f"TLS settings of {self}: cannot load the CA, certificate or key: {exc}") \
                from exc
        return ctx, self.host

    @classmethod
    def of(cls, obj: Any) -> "Node":
        """From a PacsNode row (or anything with ae_title/host/port and optional options)."""
        if isinstance(obj, Node):
            return obj
        options = getattr(obj, "options", None) or {}
        limit = options.get("find_limit") if isinstance(options, dict) else None
        tls = options.get("tls") if isinstance(options, dict) else None
        return cls(obj.ae_title, obj.host, int(obj.port), getattr(obj, "name", "") or "",
                   int(limit) if limit else None,
                   (tls.get("ca"), tls.get("cert"), tls.get("key")) if isinstance(tls, dict) else None)

    def __str__(self) -> str:
        return f"{self.name or self.ae_title} ({self.ae_title}@{self.host}:{self.port})"


@dataclass
class FindResult:
    results: list[Dataset]
    status: int
    capped: bool  # the PACS stopped matching early (result cap): the list is incomplete


@dataclass
class RetrieveResult:
    """Final status and sub-operation counts of a C-MOVE or C-GET."""

    method: str
    status: int = 0
    completed: int = 0
    failed: int = 0
    warning: int = 0
    remaining: int = 0
    failed_uids: list[str] = field(default_factory=list)
    comment: str = ""  # the final response's ErrorComment, if any

    @property
    def ok(self) -> bool:
        return self.status == 0 and self.failed == 0

    @property
    def failure(self) -> str:
        """Why sub-operations failed, in the PACS's words (its final status and comment)."""
        return status_text(self.status) + (f" ({self.comment})" if self.comment else "")


def status_text(code: int) -> str:
    names = {0x0000: "Success", 0xFE00: "Cancel (matching terminated)", 0xB000: "Warning (sub-operations failed)",
             0xA700: "Out of resources", 0xA701: "Out of resources (matches)",
             0xA702: "Out of resources (sub-operations)", 0xA801: "Move destination unknown",
             0xA900: "Identifier does not match SOP class", 0x0122: "SOP class not supported",
             0x0124: "Not authorized"}
    if code in names:
        return f"0x{code:04X} {names[code]}"
    if 0xC000 <= code <= 0xCFFF:
        return f"0x{code:04X} Unable to process"
    return f"0x{code:04X}"


def _failure(op: str, node: Node, code: int, comment: str = "") -> DicomError:
    """The error for a failed final status (None for statuses that are not failures)."""
    msg = f"{op} on {node}: {status_text(code)}" + (f" ({comment})" if comment else "")
    if code == MOVE_DESTINATION_UNKNOWN:
        exc: DicomError = PermanentDicomError(msg + " — register our AE title as a destination on the PACS")
    elif 0xA700 <= code <= 0xA7FF:
        exc = RetriableDicomError(msg)
    else:
        exc = PermanentDicomError(msg)
    exc.status = code  # type: ignore[attr-defined]
    return exc


# Classes that get one presentation context per transfer syntax in a C-GET when the caller does
# not say which classes to expect (the X-ray classes this project is about).
CORE_GET_CLASSES = ("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1.1")


def _context(sop: str, syntaxes: list[str]) -> PresentationContext:
    cx = PresentationContext()
    cx.abstract_syntax = sop
    cx.transfer_syntax = list(syntaxes)
    return cx


# When the 128-context budget cannot give every expected class one context per syntax, these get
# their own contexts first: uncompressed, then what Orthanc cannot transcode (JPEG 2000, HTJ2K) and
# the common lossless/lossy JPEG family; the class's last context lists every other syntax.
_SOLO_FIRST = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.70",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.50",  # JPEG baseline
    "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "1.2.840.10008.1.2.5",  # RLE
    "1.2.840.10008.1.2.4.201",  # HTJ2K lossless
)


def _syntax_groups(syntaxes: list[str], k: int) -> list[list[str]]:
    """`syntaxes` in at most k contexts: one per syntax when k allows, else k-1 solo (by
    _SOLO_FIRST) and one context with the rest, so that every syntax stays on offer."""
    if k >= len(syntaxes):
        return [[ts] for ts in syntaxes]
    ranked = [ts for ts in _SOLO_FIRST if ts in syntaxes] + [ts for ts in syntaxes if ts not in _SOLO_FIRST]
    return [[ts] for ts in ranked[:k - 1]] + [ranked[k - 1:]]


def storage_contexts_for_get(limit: int, sop_classes: list[str] | None = None) -> list[PresentationContext]:
    """Storage contexts a C-GET requestor offers (at most `limit`).

    A PACS picks ONE accepted context per SOP class and transcodes to its syntax — Orthanc cannot
    transcode JPEG 2000 and fails the C-GET. So the classes we expect get one context per transfer
    syntax (the PACS can then send as stored) as far as the budget allows: with many classes each
    gets an equal share (see _syntax_groups), never none. The other classes of our Storage SCP get a
    single context listing every syntax with what is left.
    """
    from app.dicom.scp import STORAGE_CONTEXTS, TRANSFER_SYNTAXES  # what our Storage SCP accepts

    wanted = list(dict.fromkeys(sop_classes or CORE_GET_CLASSES))[:limit]
    share = limit // len(wanted) if wanted else 0
    out = [_context(sop, group) for sop in wanted for group in _syntax_groups(TRANSFER_SYNTAXES, share)]
    for sop, syntaxes in STORAGE_CONTEXTS:
        if len(out) >= limit:
            break
        if sop not in wanted:
            out.append(_context(sop, list(syntaxes)))
    return out


def _unreachable(exc: RetriableDicomError) -> RetriableDicomError:
    """Mark an error raised before any association existed: the PACS cannot be reached at all (as
    opposed to one that answered, then aborted or went silent in the middle of an operation)."""
    exc.unreachable = True  # type: ignore[attr-defined]
    return exc


class DicomClient:
    """Talks to one PACS node; every public call goes through the retry layer."""

    def __init__(self, settings: Settings, node: Any, *, retries: int | None = None, backoff: float = 0.5,
                 max_backoff: float = 10.0, sleep: Callable[[float], None] = time.sleep):
        self.settings = settings
        self.node = Node.of(node)
        self.retries = settings.dicom_retries if retries is None else retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._sleep = sleep

    # ------------------------------------------------------------------ retry layer
    def _retry(self, op: str, fn: Callable[[], T]) -> T:
        return RetryPolicy(self.retries, self.backoff, self.max_backoff, self._sleep).run(op, fn, log)

    @contextmanager
    def _association(self, contexts: list, *, handlers: list | None = None,
                     roles: list | None = None) -> Iterator[Any]:
        ae = AE(ae_title=self.settings.ae_title)
        t = self.settings.dicom_timeout
        ae.acse_timeout = t
        ae.dimse_timeout = t
        ae.network_timeout = t
        ae.connection_timeout = t
        ae.maximum_pdu_size = self.settings.max_pdu
        for cx in contexts:
            if isinstance(cx, PresentationContext):
                ae.add_requested_context(cx.abstract_syntax, cx.transfer_syntax)
            else:
                ae.add_requested_context(cx)
        n = self.node
        tls_args = n.tls_args()
        try:
            assoc = ae.associate(n.host, n.port, ae_title=n.ae_title, max_pdu=self.settings.max_pdu,
                                 ext_neg=roles or None, evt_handlers=handlers or None, tls_args=tls_args)
        except OSError as exc:  # e.g. name resolution
            raise _unreachable(RetriableDicomError(f"cannot reach {n}: {exc}")) from exc
        if not assoc.is_established:
            if assoc.is_rejected:
                rsp = assoc.acceptor.primitive
                why = f"{getattr(rsp, 'result_str', '')}, {getattr(rsp, 'source_str', '')}, " \
                      f"{getattr(rsp, 'reason_str', '')}".strip(", ")
                if getattr(rsp, "result", 1) == 0x02:
                    raise RetriableDicomError(f"association rejected (transient) by {n}: {why}")
                raise PermanentDicomError(f"association rejected by {n}: {why} — check the PACS's AE title and "
                                          f"that our AE '{self.settings.ae_title}' is registered there")
            raise _unreachable(RetriableDicomError(f"cannot reach {n}: connection refused, timed out or aborted"))
        low_latency(assoc)
        try:
            yield assoc
        finally:
            if assoc.is_established:
                assoc.release()

    def _lost(self, op: str) -> RetriableDicomError:
        # a PACS that does not let our AE query (Orthanc) aborts the association at once; in the
        # middle of a retrieve an abort means something else
        hint = (f" — is our AE '{self.settings.ae_title}' allowed to query/retrieve on the PACS?"
                if op in ("C-FIND", "C-ECHO") else "")
        return RetriableDicomError(f"{op} on {self.node}: no response (timeout, or the association was "
                                   f"aborted){hint}")

    # ------------------------------------------------------------------ C-ECHO
    def echo(self) -> float:
        """C-ECHO; returns the round trip in milliseconds."""

        def once() -> float:
            t0 = time.perf_counter()
            with self._association([Verification]) as assoc:
                st = assoc.send_c_echo()
                if "Status" not in st:
                    raise self._lost("C-ECHO")
                if st.Status != 0:
                    raise _failure("C-ECHO", self.node, st.Status)
            return (time.perf_counter() - t0) * 1000.0

        return self._retry("C-ECHO", once)

    # ------------------------------------------------------------------ C-FIND
    def find(self, level: str, query: Mapping[str, object] | None = None, *, root: str = "study",
             return_keys: tuple[str, ...] | list[str] | None = None) -> FindResult:
        """C-FIND at `level`; the whole answer as a list. `capped` when the PACS cut it short."""
        identifier = build_identifier(level, query, root, return_keys)
        model = MODELS[(check_level(level, root)[1], "find")]

        def once() -> FindResult:
            results: list[Dataset] = []
            with self._association([model]) as assoc:
                final = None
                comment = ""
                try:
                    responses = assoc.send_c_find(identifier, model)
                    for status, ident in responses:
                        if "Status" not in status:
                            raise self._lost("C-FIND")
                        if status.Status in PENDING:
                            if ident is not None:
                                results.append(ident)
                            continue
                        final = status.Status
                        comment = str(status.get("ErrorComment", ""))
                except ValueError as exc:  # no accepted presentation context
                    raise PermanentDicomError(f"C-FIND on {self.node}: {exc}") from exc
            if final is None:
                raise self._lost("C-FIND")
            if final not in (0x0000, CANCEL):
                raise _failure("C-FIND", self.node, final, comment)
            limit = self.node.find_limit
            return FindResult(results, final, capped=final == CANCEL or bool(limit and len(results) >= limit))

        return self._retry("C-FIND", once)

    # ------------------------------------------------------------------ C-MOVE / C-GET
    def _retrieve_identifier(self, level: str, keys: Mapping[str, str], root: str) -> Dataset:
        lvl, _ = check_level(level, root)
        validate_query(keys)
        return build_identifier(lvl, keys, root, return_keys=())

    def _run_retrieve(self, op: str, responses, on_pending) -> RetrieveResult:
        res = RetrieveResult(method=op)
        final = None
        comment = ""
        for status, ident in responses:
            if "Status" not in status:
                err = self._lost(op)
                err.result = res  # type: ignore[attr-defined]
                raise err
            res.completed = int(status.get("NumberOfCompletedSuboperations", res.completed) or 0)
            res.failed = int(status.get("NumberOfFailedSuboperations", res.failed) or 0)
            res.warning = int(status.get("NumberOfWarningSuboperations", res.warning) or 0)
            res.remaining = int(status.get("NumberOfRemainingSuboperations", 0) or 0)
            if status.Status in PENDING:
                if on_pending:
                    on_pending(res)
                continue
            final = status.Status
            comment = str(status.get("ErrorComment", ""))
            if ident is not None and "FailedSOPInstanceUIDList" in ident:
                v = ident.FailedSOPInstanceUIDList
                res.failed_uids = [str(u) for u in ([v] if isinstance(v, str) else list(v)) if u]
        if final is None:
            raise self._lost(op)
        res.status = final
        res.comment = comment
        if final not in (0x0000, CANCEL) and not (0xB000 <= final <= 0xBFFF):
            if res.failed_uids or res.completed or res.warning:
                # the PACS ran the retrieve and failed some sub-operations (e.g. 0xA702 with a Failed
                # SOP Instance UID List: an instance it cannot send to us): a per-instance outcome
                # for the caller to record, not a refusal of the whole retrieve (a bare failure with
                # only a failed count is a refusal: some PACS count every pending one as failed)
                return res
            err = _failure(op, self.node, final, comment)
            err.result = res  # type: ignore[attr-defined]
            raise err
        return res

    def move(self, level: str, keys: Mapping[str, str], *, destination: str | None = None,
             root: str = "study", on_pending: Callable[[RetrieveResult], None] | None = None) -> RetrieveResult:
        """C-MOVE the instances named by `keys` (unique keys) to `destination` (default: our AE)."""
        identifier = self._retrieve_identifier(level, keys, root)
        r = check_level(level, root)[1]
        model = MODELS[(r, "move")]
        dest = destination or self.settings.ae_title

        def once() -> RetrieveResult:
            # the FIND model too: a strict PACS (dcmqrscp --require-find) gives a MOVE association
            # without one no usable context
            with self._association([model, MODELS[(r, "find")]]) as assoc:
                try:
                    return self._run_retrieve("C-MOVE", assoc.send_c_move(identifier, dest, model), on_pending)
                except ValueError as exc:
                    raise PermanentDicomError(f"C-MOVE on {self.node}: {exc}") from exc

        return self._retry("C-MOVE", once)

    def get(self, level: str, keys: Mapping[str, str], store_handler: Callable, *, root: str = "study",
            sop_classes: list[str] | None = None,
            on_pending: Callable[[RetrieveResult], None] | None = None) -> RetrieveResult:
        """C-GET the instances named by `keys`; each arrives through `store_handler` (an EVT_C_STORE
        handler, e.g. app.dicom.scp.make_store_handler) on this association. `sop_classes`: the
        classes expected (from the C-FIND), offered in every transfer syntax."""
        identifier = self._retrieve_identifier(level, keys, root)
        r = check_level(level, root)[1]
        model = MODELS[(r, "get")]
        storage = storage_contexts_for_get(MAX_CONTEXTS - 2, sop_classes)
        roles = [build_role(sop, scp_role=True) for sop in dict.fromkeys(cx.abstract_syntax for cx in storage)]

        def once() -> RetrieveResult:
            with self._association([model, MODELS[(r, "find")], *storage],
                                   handlers=[(evt.EVT_C_STORE, store_handler)],
                                   roles=roles) as assoc:
                try:
                    return self._run_retrieve("C-GET", assoc.send_c_get(identifier, model), on_pending)
                except ValueError as exc:
                    raise PermanentDicomError(f"C-GET on {self.node}: {exc}") from exc

        return self._retry("C-GET", once)
