"""Storage SCP: raw atomic writes, real status codes, associations only from configured nodes.

`make_store_handler` is the C-STORE handler shared by our Storage SCP and by a C-GET requestor.
It answers Success (0x0000) only when the file is on disk AND the sink (the index) accepted it:

- 0xA700 out of resources: the file could not be written (OSError: disk full, read-only, ...)
- 0xA701 out of resources: the file is on disk but the sink failed (index/DB down); a resend
  is idempotent and completes the index row
- 0xA700 also when the store's filesystem has less than settings.scp_min_free_mb free (checked
  before writing, and at the start of a chunked receive) or a write fails with ENOSPC mid-stream
- 0xA900 data set does not match SOP class: native Pixel Data whose length is not what Rows x
  Columns x SamplesPerPixel x BitsAllocated x NumberOfFrames declares, or encapsulated Pixel Data
  without fragments (never stored, never indexed as an image)
- 0xB000 warning: a known SOP Instance UID with other content (or a new instance of a known study
  under another patient): the copy is kept aside under .conflicts/ and listed by /api/v1/conflicts,
  never filed under the index's instance or patient (see STATUS_CONFLICT)
- 0xC210 cannot understand: the dataset could not be parsed under the negotiated transfer syntax
  (implicit VR on an explicit-VR context, garbage after the dataset, truncation)
- 0xC212 cannot understand: a Study/Series/SOP Instance UID is not a valid UID (or is missing)
- 0xC213 cannot understand: the dataset's SOP Instance UID differs from the request's

Durability choice: Success means the file is fsynced in its final place AND its index row is
committed. Commits are grouped (IndexBatcher): concurrent stores share one transaction, a lone
sender commits per instance. A file without a row (index down) is completed by a resend or by
`radcohort reindex`; a row never points at a missing or partial file.

Neither `make_store_handler` nor `StorageSCP` knows the database: the SCP is handed its sink (the
index writer, app.index.sink.IndexSink), its node lookup (which configured PACS a peer is) and its
recorders (conflicts, refusals) when it is wired (app.wiring.storage_scp).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import selectors
import socket
import ssl
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer
from pydicom import uid as _uid

from app.dicom.netopts import low_latency
from app.store import (DicomStore, EarlyWriteback, PixelDataMismatch, StoredFile, dataset_sha256, file_meta_end,
                       parse_header, part10_sha256, validate_uid)
from app.errors import InvalidInput

log = logging.getLogger("radcohort.scp")

# Every syntax we accept as received: Orthanc fails a whole C-MOVE (0xC000) when the receiver
# offers only uncompressed syntaxes for an instance stored compressed.
TRANSFER_SYNTAXES: list[str] = [
    _uid.ExplicitVRLittleEndian,
    _uid.ImplicitVRLittleEndian,
    _uid.DeflatedExplicitVRLittleEndian,
    _uid.ExplicitVRBigEndian,
    _uid.JPEGBaseline8Bit,
    _uid.JPEGExtended12Bit,
    _uid.JPEGLossless,
    _uid.JPEGLosslessSV1,
    _uid.JPEGLSLossless,
    _uid.JPEGLSNearLossless,
    _uid.JPEG2000Lossless,
    _uid.JPEG2000,
    _uid.JPEG2000MCLossless,
    _uid.JPEG2000MC,
    _uid.RLELossless,
    _uid.HTJ2KLossless,
    _uid.HTJ2KLosslessRPCL,
    _uid.HTJ2K,
]

# The image storage SOP classes X-ray users meet (and the other common image classes).
STORAGE_SOP_CLASSES: list[str] = [
    "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography
    "1.2.840.10008.5.1.4.1.1.1.1",  # DX for Presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # DX for Processing
    "1.2.840.10008.5.1.4.1.1.1.2",  # Mammography for Presentation
    "1.2.840.10008.5.1.4.1.1.1.2.1",  # Mammography for Processing
    "1.2.840.10008.5.1.4.1.1.1.3",  # Intra-oral for Presentation
    "1.2.840.10008.5.1.4.1.1.1.3.1",  # Intra-oral for Processing
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
    "1.2.840.10008.5.1.4.1.1.7.1",  # Multi-frame Single Bit SC
    "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte SC
    "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word SC
    "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color SC
    "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound
    "1.2.840.10008.5.1.4.1.1.3.1",  # Ultrasound Multi-frame
    "1.2.840.10008.5.1.4.1.1.2",  # CT
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT
    "1.2.840.10008.5.1.4.1.1.4",  # MR
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR
    "1.2.840.10008.5.1.4.1.1.12.1",  # X-Ray Angiographic
    "1.2.840.10008.5.1.4.1.1.12.1.1",  # Enhanced XA
    "1.2.840.10008.5.1.4.1.1.12.2",  # X-Ray Radiofluoroscopic
    "1.2.840.10008.5.1.4.1.1.12.2.1",  # Enhanced XRF
    "1.2.840.10008.5.1.4.1.1.20",  # Nuclear Medicine
    "1.2.840.10008.5.1.4.1.1.128",  # PET
    "1.2.840.10008.5.1.4.1.1.481.1",  # RT Image
    "1.2.840.10008.5.1.4.1.1.77.1.4",  # VL Photographic
    "1.2.840.10008.5.1.4.1.1.13.1.3",  # Breast Tomosynthesis
    "1.2.840.10008.5.1.4.1.1.13.1.1",  # X-Ray 3D Angiographic
    "1.2.840.10008.5.1.4.1.1.13.1.2",  # X-Ray 3D Craniofacial
]

# (sop_class, transfer_syntaxes) pairs; build_context() turns them into presentation contexts.
STORAGE_CONTEXTS: list[tuple[str, list[str]]] = [(c, list(TRANSFER_SYNTAXES)) for c in STORAGE_SOP_CLASSES]

STATUS_SUCCESS = 0x0000
STATUS_WRITE_FAILED = 0xA700
STATUS_SINK_FAILED = 0xA701
STATUS_MALFORMED = 0xC210
STATUS_INVALID_UID = 0xC212
STATUS_UID_MISMATCH = 0xC213
STATUS_NOT_IMAGE = 0xA900  # Storage "Data Set does not match SOP Class": the pixels are not the declared image
# A conflicting copy (known SOP Instance UID, other content; or a known study under another patient) is
# kept aside, not stored as that instance. 0xB000 ("Coercion of Data Elements") is the Storage service's
# own warning: a warning, not a failure, because the data *was* kept (a failure would make the PACS resend
# a copy it cannot change, forever) and every sender (dcmtk, Orthanc, pynetdicom) reports a 0xBxxx warning
# to its user instead of counting the instance as cleanly stored. The conflicts table says what happened.
STATUS_CONFLICT = 0xB000

# what a refusal means, in the words a retrieval report shows its user
REFUSAL_MEANING = {
    STATUS_WRITE_FAILED: "out of resources: the store could not write it (disk space or I/O)",
    STATUS_SINK_FAILED: "stored but not indexed (database unavailable)",
    STATUS_NOT_IMAGE: "pixel data do not match the image the header declares",
    STATUS_MALFORMED: "the dataset cannot be parsed under the negotiated transfer syntax",
    STATUS_INVALID_UID: "an invalid Study, Series or SOP Instance UID",
    STATUS_UID_MISMATCH: "the dataset's SOP Instance UID differs from the request's",
}

Sink = Callable[[StoredFile, Dataset], None]
RefusalRecorder = Callable[[str, int, str], None]  # (sop instance uid, status, calling AE)
NodeFor = Callable[[str, str], "str | None"]
ConflictRecorder = Callable[[dict], None]


class StoreConflict(Exception):
    """Raised by a sink (the index) that refuses an instance because it contradicts what is indexed:
    `reason` is sop_study, sop_series, sop_patient, sop_content or study_patient. `recorder` (optional)
    records the conflict (the IndexBatcher's record_conflict)."""

    def __init__(self, reason: str, recorder: ConflictRecorder | None = None, existing: dict | None = None):
        super().__init__(reason)
        self.reason, self.recorder, self.existing = reason, recorder, existing or {}


def storage_presentation_contexts():
    """Presentation contexts for an AE (SCP) or a C-GET requestor (SCU + SCP role)."""
    return [build_context(c, ts) for c, ts in STORAGE_CONTEXTS]


def make_store_handler(store: DicomStore, sink: Sink, node_for: NodeFor | None = None, *,
                       conflicts: ConflictRecorder | None = None, min_free_bytes: int = 0,
                       refused: RefusalRecorder | None = None):
    """An EVT_C_STORE handler: header parse -> atomic raw write -> sink -> status.

    The sink gets the StoredFile and the header Dataset (no pixel data) with
    `file_meta` set and, when `node_for` names the peer, `header.source_node` (not a DICOM element:
    an attribute for the sink). The sink must raise to fail the store, or raise StoreConflict to
    have the copy kept aside. Nothing is hashed on the way to Success: only a conflict is.
    `conflicts` records a conflict (else the StoreConflict's recorder; else it is only logged).
    `refused` records a failure status we answered, so that a retrieval can tell its user that our
    own SCP refused an instance (the PACS only reports a failed sub-operation).
    """

    def handle_store(event) -> int:
        status = _handle_store(event)
        if refused is not None and status not in (STATUS_SUCCESS, STATUS_CONFLICT):
            assoc = event.assoc
            peer = assoc.acceptor if assoc.is_requestor else assoc.requestor
            try:
                refused(_safe(event.request.AffectedSOPInstanceUID), status, str(peer.ae_title).strip()[:16])
            except Exception as exc:  # noqa: BLE001 - the status stands whether or not it is on record
                log.error("C-STORE refusal not recorded: %s", type(exc).__name__)
        return status

    def _handle_store(event) -> int:
        req = event.request
        ts = str(event.context.transfer_syntax)
        chunked = getattr(req, "_dataset_path", None)
        incoming = getattr(req, "_dataset_file", None)
        if getattr(incoming, "failed", None):  # the chunked receive could not be written
            log.error("C-STORE %s: not stored, %s", _safe(req.AffectedSOPInstanceUID), incoming.failed)
            return STATUS_WRITE_FAILED
        try:
            if chunked is not None:
                src: object = Path(chunked if not isinstance(chunked, tuple) else chunked[0])
                with open(src, "rb") as f:
                    offset = file_meta_end(f)
            else:
                src, offset = req.DataSet, 0
            header = parse_header(src, ts, offset)  # type: ignore[arg-type]
        except PixelDataMismatch as exc:
            log.warning("C-STORE %s: refused, not the declared image (%s)", _safe(req.AffectedSOPInstanceUID), exc)
            return STATUS_NOT_IMAGE
        except Exception as exc:  # noqa: BLE001 - any parse failure means we cannot understand it
            log.warning("C-STORE %s: malformed dataset (%s)", _safe(req.AffectedSOPInstanceUID), type(exc).__name__)
            return STATUS_MALFORMED
        try:
            sop = validate_uid(str(req.AffectedSOPInstanceUID or ""))
            study = validate_uid(str(header.get("StudyInstanceUID", "") or ""))
            series = validate_uid(str(header.get("SeriesInstanceUID", "") or ""))
            ds_sop = str(header.get("SOPInstanceUID", "") or "").rstrip("\x00 ")
        except InvalidInput as exc:
            log.warning("C-STORE refused: %s", exc.message)
            return STATUS_INVALID_UID
        except Exception as exc:  # noqa: BLE001 - a UID element that will not decode (e.g. an unknown VR)
            log.warning("C-STORE %s: undecodable UID element (%s)", _safe(req.AffectedSOPInstanceUID),
                        type(exc).__name__)
            return STATUS_MALFORMED
        if ds_sop != sop:
            log.warning("C-STORE %s: dataset SOP Instance UID differs from the request", sop)
            return STATUS_UID_MISMATCH
        file_meta = event.file_meta
        same_fs = chunked is not None and _same_fs(src, store.root)  # type: ignore[arg-type]
        try:
            if min_free_bytes and not same_fs:  # a chunked receive is on this disk already (checked at its start)
                size = req.DataSet.getbuffer().nbytes if chunked is None else os.path.getsize(src)  # type: ignore
                if store.free_bytes() - size < min_free_bytes:
                    log.error("C-STORE %s: refused, less than %d MB free in the store", sop, min_free_bytes >> 20)
                    return STATUS_WRITE_FAILED
            if same_fs:
                stored = store.adopt(study, series, sop, src, ts)  # type: ignore[arg-type]
            else:
                stored = store.write_raw(study, series, sop, file_meta, src, offset)  # type: ignore[arg-type]
        except InvalidInput as exc:
            log.warning("C-STORE refused: %s", exc.message)
            return STATUS_INVALID_UID
        except OSError as exc:
            log.error("C-STORE %s: write failed: %s", sop, errno.errorcode.get(exc.errno or 0, type(exc).__name__))
            return STATUS_WRITE_FAILED
        header.file_meta = file_meta
        assoc = event.assoc
        peer = assoc.acceptor if assoc.is_requestor else assoc.requestor
        header.source_node = None
        if node_for is not None:
            try:
                header.source_node = node_for(peer.ae_title, peer.address)
            except Exception:  # noqa: BLE001 - the source name is informative only
                pass

        def aside(reason: str, recorder: ConflictRecorder | None, existing: dict, moved: bool,
                  sha: str | None = None) -> int:
            """Keep the received copy under .conflicts/ and record it: never dropped, never indexed."""
            try:
                if moved:  # the copy was stored under its UID path before the index refused it
                    sha = part10_sha256(store.path(stored.relpath))
                    rel, size = store.move_aside(stored.relpath, sop, sha)
                else:
                    sha = sha or dataset_sha256(src, offset)  # type: ignore[arg-type]
                    rel, size = store.keep_aside(sop, sha, file_meta, src, offset)  # type: ignore[arg-type]
            except OSError as exc:
                log.error("C-STORE %s: conflicting copy could not be kept: %s", sop, type(exc).__name__)
                return STATUS_WRITE_FAILED
            details = {"sop_instance_uid": sop, "study_instance_uid": study, "series_instance_uid": series,
                       "reason": reason, "received_sha256": sha, "file_path": rel, "file_size": size,
                       "source_node": header.source_node, "calling_ae": str(peer.ae_title).strip()[:16],
                       "patient_id": str(header.get("PatientID", "") or ""),
                       "issuer": str(header.get("IssuerOfPatientID", "") or ""), **existing}
            log.warning("C-STORE %s: conflicts with the index (%s): kept aside as %s", sop, reason, rel)
            rec = conflicts or recorder
            if rec is None:
                return STATUS_CONFLICT
            try:
                rec(details)
            except Exception as exc:  # noqa: BLE001 - kept but not recorded: the sender must know
                log.error("C-STORE %s: conflict not recorded: %s", sop, type(exc).__name__)
                return STATUS_SINK_FAILED
            return STATUS_CONFLICT

        if stored.existed:  # a file for this UID path is there: the same copy, or another one
            try:
                sha = dataset_sha256(src, offset)  # type: ignore[arg-type]
                existing_sha = part10_sha256(store.path(stored.relpath))
            except (OSError, ValueError) as exc:
                log.error("C-STORE %s: cannot compare with the stored copy: %s", sop, type(exc).__name__)
                return STATUS_WRITE_FAILED
            if sha != existing_sha:
                return aside("sop_content", None, {"existing_sha256": existing_sha}, moved=False, sha=sha)
        try:
            sink(stored, header)
        except StoreConflict as exc:
            return aside(exc.reason, exc.recorder, exc.existing, moved=not stored.existed)
        except Exception as exc:  # noqa: BLE001 - any sink failure means the data is not indexed
            log.error("C-STORE %s: stored but not indexed: %s", sop, type(exc).__name__)
            return STATUS_SINK_FAILED
        return STATUS_SUCCESS

    return handle_store


def _same_fs(a: Path, b: Path) -> bool:
    try:
        return os.stat(a).st_dev == os.stat(b).st_dev
    except OSError:
        return False


def _safe(uid) -> str:
    return str(uid or "")[:64]


class _IncomingFile:
    """pynetdicom's chunked-receive temp file (it calls NamedTemporaryFile) made safe for a full disk.

    Checks the free space when a dataset starts to arrive; a write that fails (ENOSPC) empties the
    file, marks it `failed` and swallows the rest of the dataset, so pynetdicom finishes the message
    and our handler answers 0xA700 instead of pynetdicom aborting the association (what a PACS
    reports as 0xC000). Unbuffered: what is written is on disk, no buffer can fail later at close."""

    min_free_bytes = 0
    store: DicomStore | None = None

    def __init__(self, *args, **kwargs):
        fd, name = tempfile.mkstemp(suffix=".dcm", dir=kwargs.get("dir"))
        self._fd: int | None = fd
        self.name = name
        store = _IncomingFile.store
        # the fdatasync before Success then waits for the last chunk, not the whole file
        self._writeback = EarlyWriteback(fd) if store is not None and store.fsync else None
        self.file = self  # pynetdicom flushes `.file`
        self.failed: str | None = None
        if store is not None and _IncomingFile.min_free_bytes:
            try:
                if store.free_bytes() < _IncomingFile.min_free_bytes:
                    self.failed = f"less than {_IncomingFile.min_free_bytes >> 20} MB free in the store"
            except OSError:
                pass

    def write(self, data) -> int:
        n = len(data)
        if self.failed or self._fd is None:
            return n
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view):]
            if self._writeback is not None:
                self._writeback.wrote(n)
        except OSError as exc:
            self.failed = f"write failed: {errno.errorcode.get(exc.errno or 0, type(exc).__name__)}"
            try:
                os.ftruncate(self._fd, 0)  # give the space back at once
            except OSError:
                pass
        return n

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def discard(self) -> None:
        """Close and remove (an aborted or stalled receive)."""
        self.close()
        try:
            os.unlink(self.name)
        except FileNotFoundError:
            pass


def discard_partial_receive(assoc) -> None:
    """Remove the chunked-receive files of an association that ended: the dataset it was receiving
    and complete ones queued for a handler that will never run. Files a handler is working on are
    not touched (pynetdicom removes those after the handler)."""
    dimse = getattr(assoc, "dimse", None)
    msg = getattr(dimse, "message", None)
    f = getattr(msg, "_data_set_file", None)
    if isinstance(f, _IncomingFile):
        f.discard()
    q = getattr(dimse, "msg_queue", None)
    if q is not None:
        for _cx, prim in list(q.queue):
            f = getattr(prim, "_dataset_file", None)
            if isinstance(f, _IncomingFile):
                f.discard()


def enable_chunked_receive(store: DicomStore, min_free_bytes: int = 0) -> None:
    """Stream received datasets to files in the store's .incoming dir instead of memory (huge
    instances), then move them into place. Process-wide: pynetdicom's flag, its temp file factory
    and tempfile's dir."""
    from pynetdicom import _config, dimse_messages

    store.incoming_dir.mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(store.incoming_dir)
    _IncomingFile.store, _IncomingFile.min_free_bytes = store, min_free_bytes
    dimse_messages.NamedTemporaryFile = _IncomingFile  # type: ignore[attr-defined]
    _config.STORE_RECV_CHUNKED_DATASET = True


# ----------------------------------------------------------------------------- the SCP
class StorageSCP:
    """Our Storage SCP (plus C-ECHO) on settings.scp_host/scp_port as settings.ae_title.

    Associations are accepted only from peers `node_for(calling AE title, address)` names (the
    configured PacsNode rows, looked up at association time; a lookup that raises refuses).
    Success is answered once the file is on disk (fsynced) AND the sink returned (the index row
    is committed).
    """

    def __init__(self, settings, sink: Sink, node_for: NodeFor, *, conflicts: ConflictRecorder | None = None,
                 refused: RefusalRecorder | None = None, port: int | None = None, fsync: bool = True,
                 chunked: bool = False):
        self.settings = settings
        self._port = self.settings.scp_port if port is None else port
        self.store = DicomStore(self.settings.store_dir, fsync=fsync)
        self.chunked = chunked
        # the components this SCP is handed (app.wiring.storage_scp builds them over the index)
        self.sink = sink  # started and stopped with the SCP when it has start()/stop()
        self._sink = sink  # what the C-STORE handler calls (a test may wrap it before start)
        self.node_for = node_for
        self.conflicts = conflicts
        self.refused = refused
        self._server = None
        s = self.settings
        self.admission = Admission(s.scp_max_associations, s.scp_max_pending, s.scp_max_pending_per_peer)
        self._sweeper: threading.Thread | None = None
        self._stopping = threading.Event()

    @property
    def port(self) -> int:
        if self._server is not None:
            return int(self._server.server_address[1])
        return self._port

    def _node_allowed(self, calling: str, host: str) -> bool:
        return self.node_for(calling, host) is not None

    def _on_requested(self, event) -> None:
        assoc = event.assoc
        calling = assoc.requestor.primitive.calling_ae_title
        host = assoc.requestor.address
        try:
            allowed = self.node_for(calling, host) is not None
        except Exception as exc:  # noqa: BLE001 - fail closed when the DB cannot answer
            log.error("association from %r refused: node lookup failed (%s)", calling, type(exc).__name__)
            allowed = False
        if not allowed:
            log.warning("association from %r at %s rejected: not a configured PACS node", calling, host)
            # rejected-permanent, service-user, calling AE title not recognised
            assoc.acse.send_reject(0x01, 0x01, 0x03)
            assoc.kill()  # as pynetdicom's own negotiation does: lets the DUL send the A-ASSOCIATE-RJ
            return
        if not self.admission.accept(assoc):
            log.warning("association from %r at %s rejected: %d associations already", calling, host,
                        self.settings.scp_max_associations)
            # rejected-transient, service-provider (presentation), local limit exceeded: retry later
            assoc.acse.send_reject(0x02, 0x03, 0x02)
            assoc.kill()
            return
        # a registered peer: from now on the ordinary DICOM timeouts apply, not the handshake deadline
        assoc.acse_timeout = self.settings.dicom_timeout
        try:
            assoc.dul.socket.socket.settimeout(assoc.ae.network_timeout)
        except (AttributeError, OSError):
            pass
        _prefer_requestor_syntaxes(assoc)

    # --- lifecycle ------------------------------------------------------------
    def make_ae(self) -> AE:
        ae = AE(ae_title=self.settings.ae_title)
        ae.maximum_pdu_size = self.settings.max_pdu
        # until the AE check passes a connection has scp_handshake_timeout to send its A-ASSOCIATE-RQ
        # (_on_requested then gives it dicom_timeout)
        ae.acse_timeout = self.settings.scp_handshake_timeout
        ae.dimse_timeout = self.settings.dicom_timeout
        ae.network_timeout = max(60.0, self.settings.dicom_timeout)
        # pynetdicom counts every connection's thread, before its AE title is known: 32 silent sockets
        # locked registered senders out. Admission enforces our limits (registered associations,
        # pending connections per peer); pynetdicom's count is only a far backstop.
        ae.maximum_associations = 16 * (self.settings.scp_max_associations + self.settings.scp_max_pending)
        for ctx in storage_presentation_contexts():
            ae.add_supported_context(ctx.abstract_syntax, ctx.transfer_syntax)
        ae.add_supported_context(Verification)
        return ae

    def tls_context(self) -> ssl.SSLContext | None:
        """The server-side TLS context from settings.scp_tls_* (None: plain DICOM).

        Not given to pynetdicom as its `ssl_context`: pynetdicom handshakes in the accept thread,
        where one silent peer would stall every other connection; `_TimedServer` handshakes in
        the association's own thread, under the network timeout.
        """
        s = self.settings
        if s.scp_tls_cert is None or s.scp_tls_key is None:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(s.scp_tls_cert, s.scp_tls_key)
            if s.scp_tls_ca is not None:
                ctx.load_verify_locations(cafile=s.scp_tls_ca)
                ctx.verify_mode = ssl.CERT_REQUIRED
        except (OSError, ssl.SSLError) as exc:
            raise InvalidInput(f"Storage SCP TLS: cannot load the certificate, key or CA "
                               f"(RADCOHORT_SCP_TLS_CERT/_KEY/_CA): {exc}") from exc
        ctx.sslsocket_class = _PduGuardSSLSocket  # the PDU guard reads the decrypted stream
        return ctx

    def _on_conn_open(self, event) -> None:
        self.admission.opened(event.assoc)
        low_latency(event.assoc)  # our C-STORE responses must not wait for the sender's delayed ACK

    def _on_conn_close(self, event) -> None:
        self.admission.closed(event.assoc)
        discard_partial_receive(event.assoc)

    def _handlers(self):
        return [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
            (evt.EVT_ABORTED, lambda event: discard_partial_receive(event.assoc)),
            (evt.EVT_C_STORE, make_store_handler(self.store, self._sink, self.node_for, conflicts=self.conflicts,
                                                 min_free_bytes=self.settings.scp_min_free_mb * 2**20,
                                                 refused=self.refused)),
            (evt.EVT_C_ECHO, lambda event: 0x0000),
        ]

    def sweep(self) -> int:
        """Remove partial receive files older than settings.scp_partial_max_age_s (also while running)."""
        n = self.store.sweep_partials(self.settings.scp_partial_max_age_s)
        if n:
            log.warning("removed %d stale partial file(s) from the store", n)
        return n

    def _sweep_loop(self) -> None:
        interval = min(60.0, max(1.0, self.settings.scp_partial_max_age_s / 4))
        while not self._stopping.wait(interval):
            try:
                self.sweep()
            except OSError as exc:
                log.error("partial-file sweep failed: %s", type(exc).__name__)

    def start(self, channel: socket.socket | None = None,
              on_channel_closed: Callable[[], None] | None = None) -> "StorageSCP":
        """Start serving in background threads (returns at once).

        With `channel` (the child end from ConnectionDispatcher), serve the connections a
        dispatcher process accepted and handed over, instead of listening ourselves.
        """
        tls = self.tls_context()  # first: a bad certificate or key fails start-up, not the first peer
        self.store.root.mkdir(parents=True, exist_ok=True)
        if channel is None:  # a dispatched child shares the store with its siblings: the parent cleans
            self.store.clean_temp()
        if self.chunked:
            enable_chunked_receive(self.store, self.settings.scp_min_free_mb * 2**20)
        start_sink = getattr(self.sink, "start", None)
        if start_sink is not None:
            start_sink()
        self._stopping.clear()
        self._sweeper = threading.Thread(target=self._sweep_loop, name="scp-sweep", daemon=True)
        self._sweeper.start()
        ae = self.make_ae()
        address = (self.settings.scp_host, self._port)
        if channel is None:
            self._server = ae.make_server(address, evt_handlers=self._handlers(), server_class=_TimedServer)
            self._server.tls_context = tls
            self._server.admission = self.admission
            self._server.node_check = self._node_allowed
            ae._servers.append(self._server)  # as start_server does: shutdown() removes it
            threading.Thread(target=self._server.serve_forever, name="scp-accept", daemon=True).start()
        else:
            self._server = ae.make_server(("127.0.0.1", 0), evt_handlers=self._handlers(),
                                          server_class=_HandoffServer)
            self._server.server_address = address
            self._server.tls_context = tls
            self._server.admission = self.admission
            self._server.node_check = self._node_allowed
            threading.Thread(target=_serve_handoffs, args=(self._server, channel, on_channel_closed),
                             name="scp-handoff", daemon=True).start()
        log.info("Storage SCP %s listening on %s:%d%s", self.settings.ae_title, self.settings.scp_host, self.port,
                 " (TLS)" if tls else "")
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        stop_sink = getattr(self.sink, "stop", None)
        if stop_sink is not None:
            stop_sink()

    def __enter__(self) -> "StorageSCP":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _prefer_requestor_syntaxes(assoc) -> None:
    """Accept, per presentation context, the first transfer syntax the *sender* proposes among ours.

    pynetdicom picks by the acceptor's order (Explicit VR LE first), so a PACS offering [JPEG 2000,
    Explicit LE, Implicit LE] would decompress for us: compressed instances must stay as received.
    Reorders this association's copy of our contexts by the order of the sender's proposals."""
    proposed: dict[str, list[str]] = {}
    for cx in assoc.requestor.primitive.presentation_context_definition_list or []:
        order = proposed.setdefault(str(cx.abstract_syntax), [])
        order.extend(str(t) for t in cx.transfer_syntax if str(t) not in order)
    contexts = assoc.acceptor.supported_contexts
    for cx in contexts:
        theirs = proposed.get(str(cx.abstract_syntax))
        if theirs:
            ours = [str(t) for t in cx.transfer_syntax]
            rank = {t: i for i, t in enumerate(theirs)}
            cx.transfer_syntax = sorted(ours, key=lambda t: rank.get(t, len(rank)))  # stable: ours after theirs


class Admission:
    """Who holds a slot: connections before the AE check ("pending") and accepted associations.

    Only associations of registered peers count against `max_associations`. A pending connection has
    the handshake timeout to send its A-ASSOCIATE-RQ; a new connection over `max_pending_per_peer`
    from one address, or over `max_pending` in all, closes the oldest pending one instead of being
    refused, so silent sockets can never keep a registered sender out (it sends its request at once).
    """

    # a real sender sends its A-ASSOCIATE-RQ right after connecting: only a connection that has been
    # silent this long is closed for a newer one from its address (a burst of 32 senders from one
    # host all got through; without it 13 of them were closed before their request arrived)
    grace = 1.0

    def __init__(self, max_associations: int, max_pending: int, max_pending_per_peer: int):
        self.max_associations, self.max_pending, self.max_per_peer = max_associations, max_pending, max_pending_per_peer
        self._lock = threading.Lock()
        self._pending: OrderedDict = OrderedDict()  # socket -> [address, Association | None, accepted at]
        self._accepted: set = set()
        self.evicted = 0

    def admit(self, sock, address: str) -> None:
        """A new connection: closes the oldest waiting ones over the limits (per address: only those
        silent for `grace`; over `max_pending` in all: the oldest, whatever its age)."""
        victims = []
        now = time.monotonic()
        with self._lock:
            for k in [k for k in self._pending if k.fileno() == -1]:
                del self._pending[k]
            same = [k for k, v in self._pending.items() if v[0] == address]
            while len(same) >= self.max_per_peer and now - self._pending[same[0]][2] >= self.grace:
                victims.append((same[0], self._pending.pop(same.pop(0))))
            while len(self._pending) >= self.max_pending:
                victims.append(self._pending.popitem(last=False))
            self._pending[sock] = [address, None, now]
            self.evicted += len(victims)
        for k, (addr, assoc, _t) in victims:
            log.warning("connection from %s closed: too many connections before the AE check", addr)
            _drop(k, assoc)

    def forget(self, sock) -> None:
        """The gate closed or handed over a waiting connection."""
        with self._lock:
            self._pending.pop(sock, None)

    def opened(self, assoc) -> None:
        with self._lock:
            entry = self._pending.get(_assoc_socket(assoc))
            if entry is not None:
                entry[1] = assoc

    def accept(self, assoc) -> bool:
        """The peer passed the AE check: take an association slot (False: all taken)."""
        with self._lock:
            self._pending.pop(_assoc_socket(assoc), None)
            self._accepted = {a for a in self._accepted if a.is_alive()}
            if len(self._accepted) >= self.max_associations:
                return False
            self._accepted.add(assoc)
            return True

    def closed(self, assoc) -> None:
        """The connection closed: a pending one frees its place and its thread at once."""
        with self._lock:
            entry = self._pending.pop(_assoc_socket(assoc), None)
            self._accepted.discard(assoc)
        if entry is not None and not assoc.is_established:
            assoc.dul.to_user_queue.put(None)  # the reactor's wait for an A-ASSOCIATE-RQ ends now

    def counts(self) -> dict:
        with self._lock:
            return {"pending": sum(1 for k in self._pending if k.fileno() != -1),
                    "associations": sum(1 for a in self._accepted if a.is_alive()), "evicted": self.evicted}


def _assoc_socket(assoc):
    try:
        return assoc.dul.socket.socket
    except AttributeError:
        return None


def _drop(sock, assoc) -> None:
    """Close a pending connection from another thread (its association thread ends at once)."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the base call: leaves an SSL object alone
    except OSError:
        pass
    if assoc is not None and not assoc.is_established:
        assoc.dul.to_user_queue.put(None)


_RJ_CALLING_AE = bytes([0x03, 0, 0, 0, 0, 4, 0, 0x01, 0x01, 0x03])  # A-ASSOCIATE-RJ: permanent, calling AE unknown
_MAX_RQ = 65536  # an A-ASSOCIATE-RQ with 128 presentation contexts is about 10 KB


class _Gate:
    """One thread holds every new plain-TCP connection until its A-ASSOCIATE-RQ is complete.

    pynetdicom gives each connection an association thread and a DUL thread that polls its socket
    from the first byte: 256 silent sockets kept a few hundred threads busy and slowed the accept
    loop until connects from registered senders queued in the kernel. Here a waiting connection
    costs a socket: the request is *peeked* (MSG_PEEK, left in the kernel buffer for pynetdicom
    to read), the calling AE title checked (unknown: A-ASSOCIATE-RJ without any thread), and only
    then is the connection handed to pynetdicom. Deadline: the handshake timeout.
    """

    def __init__(self, server: "_TimedServer", timeout: float):
        self.server, self.timeout = server, timeout
        self.sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ)
        self._lock = threading.Lock()
        self._new: list = []
        self._held: dict = {}  # socket -> (address tuple, deadline)
        self._later: dict = {}  # socket -> when to look again (partial request: no busy loop)
        self._closing: dict = {}  # rejected socket -> when to close it if the peer has not
        self._rejects: dict = {}  # socket of an unknown calling AE -> when to send its A-ASSOCIATE-RJ
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="scp-gate", daemon=True)
        self._thread.start()

    def add(self, sock, address) -> None:
        with self._lock:
            self._new.append((sock, address))
        self._wake_w.send(b"x")

    def held(self) -> int:
        return len(self._held)

    def close(self) -> None:
        self._stop = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        self._thread.join(5)

    def _send_reject(self, sock) -> None:
        try:
            # read the request first: closing with unread data would send a reset, not our answer
            socket.socket.recv(sock, _MAX_RQ + 6, socket.MSG_DONTWAIT)
            socket.socket.sendall(sock, _RJ_CALLING_AE)
            self.sel.register(sock, selectors.EVENT_READ)
        except (OSError, ValueError):
            sock.close()
            return
        # as the DICOM state machine does (Sta13): let the requestor close first, briefly
        self._closing[sock] = time.monotonic() + 2.0

    def _close_rejected(self, sock) -> None:
        self._closing.pop(sock, None)
        try:
            self.sel.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()

    def _forget(self, sock, close: bool = True) -> None:
        self._held.pop(sock, None)
        self._later.pop(sock, None)
        try:
            self.sel.unregister(sock)
        except (KeyError, ValueError):
            pass
        if self.server.admission is not None:
            self.server.admission.forget(sock)
        if close:
            try:
                sock.close()
            except OSError:
                pass

    def _run(self) -> None:
        while not self._stop:
            now = time.monotonic()
            with self._lock:
                new, self._new = self._new, []
            for sock, address in new:
                try:
                    self.sel.register(sock, selectors.EVENT_READ)
                    self._held[sock] = (address, now + self.timeout)
                except (ValueError, OSError):  # closed (evicted) before we saw it
                    self._forget(sock)
            for sock, when in list(self._later.items()):
                if when <= now:
                    del self._later[sock]
                    try:
                        self.sel.register(sock, selectors.EVENT_READ)
                    except (ValueError, OSError):
                        self._forget(sock)
            wait = min([d for _, d in self._held.values()] + list(self._later.values()) + list(self._closing.values())
                       + list(self._rejects.values()) + [now + 0.5]) - now
            for key, _ in self.sel.select(max(0.0, wait)):
                if key.fileobj is self._wake_r:
                    try:
                        self._wake_r.recv(4096)
                    except OSError:
                        pass
                    continue
                self._look(key.fileobj)
            now = time.monotonic()
            for sock, (address, deadline) in list(self._held.items()):
                if deadline <= now:
                    log.warning("connection from %s closed: no A-ASSOCIATE-RQ within %.0f s", address[0], self.timeout)
                    self._forget(sock)
            for sock, due in list(self._rejects.items()):
                if due <= now:
                    del self._rejects[sock]
                    self._send_reject(sock)
            for sock, deadline in list(self._closing.items()):
                if deadline <= now:
                    self._close_rejected(sock)
        for sock in list(self._held):
            self._forget(sock)
        for sock in list(self._closing):
            self._close_rejected(sock)
        for sock in list(self._rejects):
            sock.close()
        self.sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def _look(self, sock) -> None:
        if sock in self._closing:  # rejected: wait for the peer's close (or the timer)
            try:
                if socket.socket.recv(sock, 4096, socket.MSG_DONTWAIT):
                    return
            except BlockingIOError:
                return
            except OSError:
                pass
            self._close_rejected(sock)
            return
        address = self._held.get(sock, (("?", 0), 0))[0]
        try:
            head = socket.socket.recv(sock, _MAX_RQ + 6, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            self._forget(sock)
            return
        if not head:  # closed by the peer (or evicted): its place is free at once
            self._forget(sock)
            return
        if head[0] != 0x01 or (len(head) >= 6 and int.from_bytes(head[2:6], "big") > _MAX_RQ):
            log.warning("connection from %s closed: not an A-ASSOCIATE-RQ", address[0])
            self._forget(sock)
            return
        if len(head) < 6 or len(head) < 6 + int.from_bytes(head[2:6], "big") or len(head) < 42:
            self.sel.unregister(sock)  # partial: look again shortly instead of spinning on it
            self._later[sock] = time.monotonic() + 0.05
            return
        self._forget(sock, close=False)
        calling = head[26:42].decode("ascii", "replace").strip(" \x00")
        check = self.server.node_check
        try:
            allowed = check is None or check(calling, str(address[0]))
        except Exception as exc:  # noqa: BLE001 - fail closed when the DB cannot answer
            log.error("association from %r refused: node lookup failed (%s)", calling, type(exc).__name__)
            allowed = False
        if not allowed:
            log.warning("association from %r at %s rejected: not a configured PACS node", calling, address[0])
            # answered 50 ms later: a pynetdicom requestor that gets the rejection within microseconds
            # of its request can take the closed connection for a failed connect (and abort)
            self._rejects[sock] = time.monotonic() + 0.05
            return
        try:
            ThreadedAssociationServer.process_request(self.server, sock, address)
        except Exception as exc:  # noqa: BLE001 - e.g. no thread can be started: drop this one
            log.error("connection from %s dropped: %s", address[0], type(exc).__name__)
            sock.close()


class _TimedServer(ThreadedAssociationServer):
    """Accepted sockets time out after the network timeout: pynetdicom leaves them blocking, so a peer
    that stops in the middle of a PDU would hold its association thread (and a slot) forever.

    Plain TCP connections first wait in the _Gate (no thread) until their A-ASSOCIATE-RQ is in;
    TLS connections go to their thread at once (the handshake runs there, under the handshake timeout)."""

    tls_context: ssl.SSLContext | None = None
    admission: Admission | None = None
    node_check: Callable[[str, str], bool] | None = None
    _gate: _Gate | None = None
    request_queue_size = 128  # socketserver's listen backlog is 5: a burst of connects waited for SYN retries

    def server_close(self) -> None:
        if self._gate is not None:
            self._gate.close()
        super().server_close()

    def process_request(self, request, client_address):
        limit = self.ae.maximum_pdu_size
        tls = self.tls_context
        if limit and tls is None:  # we advertise a maximum PDU: refuse a peer that sends far more in one PDU
            request = _PduGuardSocket(request.family, request.type, request.proto, fileno=request.detach())
            request.pdu_limit = 2 * max(limit, 65536)
        # until the AE check: the handshake deadline (also bounds a peer that stops mid-PDU or mid-TLS)
        request.settimeout(self.ae.acse_timeout)
        if tls is not None:  # the handshake itself runs in the association's thread
            request = tls.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
            request.pdu_limit = 2 * max(limit, 65536) if limit else 0
        if self.admission is not None:
            self.admission.admit(request, str(client_address[0]))
        if tls is None:
            if self._gate is None:
                self._gate = _Gate(self, self.ae.acse_timeout or 5.0)
            self._gate.add(request, client_address)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        if isinstance(request, ssl.SSLSocket):
            try:
                request.do_handshake()
            except (OSError, ValueError) as exc:  # plain DICOM, no/untrusted client certificate, timeout
                log.warning("TLS handshake with %s failed: connection closed (%s)", client_address[0],
                            type(exc).__name__ if not isinstance(exc, ssl.SSLError) else exc.reason)
                self.shutdown_request(request)
                return
        super().process_request_thread(request, client_address)


class _PduGuard:
    """Mixin for a socket that follows the PDU framing of what it receives and fails the read of a PDU header
    declaring more than `pdu_limit` bytes: pynetdicom holds a whole PDU in memory (about 4x at
    peak), so one 4 GB PDU from a peer that ignores our maximum would exhaust it. The OSError
    makes pynetdicom close the connection."""

    pdu_limit = 0
    _left = 0
    _head = b""

    def recv(self, bufsize, flags=0):
        data = super().recv(bufsize, flags)
        i = 0
        while i < len(data):
            if self._left:
                k = min(self._left, len(data) - i)
                self._left -= k
                i += k
                continue
            need = 6 - len(self._head)
            self._head += data[i:i + need]
            i += need
            if len(self._head) == 6:
                length = int.from_bytes(self._head[2:6], "big")
                self._head = b""
                if length > self.pdu_limit:
                    log.warning("PDU of %d bytes from %s over the limit of %d: connection closed",
                                length, _peer(self), self.pdu_limit)
                    raise ConnectionAbortedError("PDU over the limit")
                self._left = length
        return data


class _PduGuardSocket(_PduGuard, socket.socket):
    """The PDU guard on a plain TCP socket."""


class _PduGuardSSLSocket(_PduGuard, ssl.SSLSocket):
    """The PDU guard on a TLS socket (the SSLContext's sslsocket_class): it sees decrypted bytes.
    `pdu_limit` 0 (unlimited max_pdu) disables it."""

    def recv(self, bufsize=1024, flags=0):
        if not self.pdu_limit:
            return ssl.SSLSocket.recv(self, bufsize, flags)
        return super().recv(bufsize, flags)


def _peer(sock: socket.socket) -> str:
    try:
        return str(sock.getpeername()[0])
    except OSError:
        return "?"


class _HandoffServer(_TimedServer):
    """An association server that never listens: connections arrive through a dispatcher."""

    def server_activate(self) -> None:
        pass

    def shutdown(self) -> None:  # serve_forever never ran: BaseServer.shutdown would wait forever
        for assoc in self.active_associations:
            assoc.abort()
        self.server_close()


def _serve_handoffs(server: ThreadedAssociationServer, channel: socket.socket,
                    on_closed: Callable[[], None] | None = None) -> None:
    channel.send(b"ready")
    while True:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(channel, 1024, 1)
        except OSError:
            break
        if not msg and not fds:  # the dispatcher closed the channel
            if on_closed is not None:
                on_closed()
            break
        for fd in fds:
            conn = socket.socket(fileno=fd)
            try:
                peer = tuple(json.loads(msg))
            except ValueError:
                peer = ("0.0.0.0", 0)
            server.process_request(conn, peer)


class ConnectionDispatcher:
    """Accepts on the SCP port and hands each connection to the next of N SCP processes.

    Associations are threads sharing one GIL, so one process does not scale with concurrent
    senders; round-robin over processes does, deterministically (SO_REUSEPORT hashing would
    often put two concurrent associations on the same process).
    """

    def __init__(self, host: str, port: int, n: int):
        # bind now (a busy port fails here), listen only once every process is ready
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, port))
        self.pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(n)]
        self._thread: threading.Thread | None = None
        self._closed = False

    def child_channels(self) -> list[socket.socket]:
        return [b for _, b in self.pairs]

    def start(self, ready_timeout: float = 60.0) -> "ConnectionDispatcher":
        """Wait for every process to say ready, then start accepting."""
        for a, b in self.pairs:
            b.close()  # the children hold their own copies now
            a.settimeout(ready_timeout)
            if a.recv(16) != b"ready":
                raise RuntimeError("a Storage SCP process did not start")
            a.settimeout(None)
        self.listener.listen(128)
        self._thread = threading.Thread(target=self._run, name="scp-dispatch", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        live = [a for a, _ in self.pairs]
        i = 0
        while not self._closed and live:
            try:
                conn, addr = self.listener.accept()
            except OSError:
                break
            with conn:
                while live:
                    ch = live[i % len(live)]
                    i += 1
                    try:
                        socket.send_fds(ch, [json.dumps(list(addr[:2])).encode()], [conn.fileno()])
                        break
                    except OSError:  # that process is gone: drop it, try the next
                        live.remove(ch)
                        log.error("a Storage SCP process is gone; %d left", len(live))

    def close(self) -> None:
        self._closed = True
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        self.listener.close()
        for a, _ in self.pairs:
            a.close()
