"""Storage SCP: raw atomic writes, real status codes, associations only from configured nodes.

`make_store_handler` is the C-STORE handler shared by our Storage SCP and by a C-GET requestor.
It answers Success (0x0000) only when the file is on disk AND the sink (the index) accepted it:

- 0xA700 out of resources: the file could not be written (OSError: disk full, read-only, ...)
- 0xA701 out of resources: the file is on disk but the sink failed (index/DB down); a resend
  is idempotent and completes the index row
- 0xC210 cannot understand: the dataset could not be parsed
- 0xC212 cannot understand: a Study/Series/SOP Instance UID is not a valid UID (or is missing)
- 0xC213 cannot understand: the dataset's SOP Instance UID differs from the request's

Durability choice: Success means the file is fsynced in its final place AND its index row is
committed. Commits are grouped (IndexBatcher): concurrent stores share one transaction, a lone
sender commits per instance. A file without a row (index down) is completed by a resend or by
`radcohort reindex`; a row never points at a missing or partial file.

`make_store_handler` and the store know nothing of the DB; `StorageSCP` is the composition point
that wires the PacsNode lookup and the index (imported lazily) around them.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer
from pydicom import uid as _uid

from app.dicom.store import DicomStore, StoredFile, file_meta_end, parse_header, validate_uid
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

Sink = Callable[[StoredFile, Dataset], None]
NodeFor = Callable[[str, str], "str | None"]


def storage_presentation_contexts():
    """Presentation contexts for an AE (SCP) or a C-GET requestor (SCU + SCP role)."""
    return [build_context(c, ts) for c, ts in STORAGE_CONTEXTS]


def make_store_handler(store: DicomStore, sink: Sink, node_for: NodeFor | None = None):
    """An EVT_C_STORE handler: header parse -> atomic raw write -> sink -> status.

    The sink gets the StoredFile and the header Dataset (no pixel data) with
    `file_meta` set and, when `node_for` names the peer, `header.source_node`
    (not a DICOM element: an attribute for the sink). The sink must raise to fail the store.
    """

    def handle_store(event) -> int:
        req = event.request
        ts = str(event.context.transfer_syntax)
        chunked = getattr(req, "_dataset_path", None)
        try:
            if chunked is not None:
                src: object = Path(chunked if not isinstance(chunked, tuple) else chunked[0])
                with open(src, "rb") as f:
                    offset = file_meta_end(f)
            else:
                src, offset = req.DataSet, 0
            header = parse_header(src, ts, offset)  # type: ignore[arg-type]
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
        try:
            if chunked is not None and _same_fs(src, store.root):  # type: ignore[arg-type]
                stored = store.adopt(study, series, sop, src, ts)  # type: ignore[arg-type]
            else:
                stored = store.write_raw(study, series, sop, file_meta, src, offset)  # type: ignore[arg-type]
        except InvalidInput as exc:
            log.warning("C-STORE refused: %s", exc.message)
            return STATUS_INVALID_UID
        except OSError as exc:
            log.error("C-STORE %s: write failed: %s", sop, exc)
            return STATUS_WRITE_FAILED
        header.file_meta = file_meta
        if node_for is not None:
            assoc = event.assoc
            peer = assoc.acceptor if assoc.is_requestor else assoc.requestor
            try:
                header.source_node = node_for(peer.ae_title, peer.address)
            except Exception:  # noqa: BLE001 - the source name is informative only
                header.source_node = None
        try:
            sink(stored, header)
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


# ----------------------------------------------------------------------------- index batcher
class IndexBatcher:
    """Group commit for the SCP: handler threads submit records and wait for their commit.

    One background thread takes whatever is queued (up to `max_batch`), ingests it in one
    transaction and commits, then wakes the waiting handlers. No linger: with one sender
    each store commits alone; with several associations, concurrent stores share commits.
    """

    def __init__(self, sessions, labeler=None, max_batch: int = 256):
        self.sessions = sessions
        self.labeler = labeler
        self.max_batch = max_batch
        from app.index.ingest import IngestCache

        self.cache = IngestCache()
        self._q: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> "IndexBatcher":
        self._thread = threading.Thread(target=self._run, name="index-batcher", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._q.put(None)
        if self._thread:
            self._thread.join(10)

    def submit(self, record: dict) -> Future:
        fut: Future = Future()
        if self._stop.is_set():
            fut.set_exception(RuntimeError("index batcher stopped"))
        else:
            self._q.put((record, fut))
        return fut

    def _run(self) -> None:
        from app.index.ingest import ingest

        while True:
            item = self._q.get()
            if item is None:
                break
            batch = [item]
            while len(batch) < self.max_batch:
                try:
                    nxt = self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._stop.set()
                    break
                batch.append(nxt)
            try:
                self._commit([r for r, _ in batch], ingest)
                for _, fut in batch:
                    fut.set_result(True)
            except Exception:  # noqa: BLE001 - retry one by one so one bad record fails alone
                for rec, fut in batch:
                    try:
                        self._commit([rec], ingest)
                        fut.set_result(True)
                    except Exception as exc:  # noqa: BLE001
                        fut.set_exception(exc)
            if self._stop.is_set() and self._q.empty():
                break
        # fail whatever is still queued rather than leave handlers waiting
        while True:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[1].set_exception(RuntimeError("index batcher stopped"))

    def _commit(self, records: list[dict], ingest) -> None:
        session = self.sessions()
        try:
            if session.get_bind().dialect.name == "sqlite":
                # take the write lock first: a read-then-write transaction that loses a race with
                # another SCP process gets SQLITE_BUSY at once instead of waiting its turn
                session.connection().exec_driver_sql("BEGIN IMMEDIATE")
            ingest(session, records, labeler=self.labeler, cache=self.cache)
            session.commit()
            self.cache.commit()
        except BaseException:
            session.rollback()
            self.cache.clear()  # a failure may come from a stale id: look everything up again
            raise
        finally:
            session.close()


def enable_chunked_receive(store: DicomStore) -> None:
    """Stream received datasets to files in the store's .incoming dir instead of memory (huge
    instances), then move them into place. Process-wide: pynetdicom's flag and tempfile's dir."""
    import tempfile

    from pynetdicom import _config

    store.incoming_dir.mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(store.incoming_dir)
    _config.STORE_RECV_CHUNKED_DATASET = True


def load_labeler(sessions, rules_file=None):
    """The labels stage's labeler when it is installed (None otherwise: labels can be recomputed)."""
    try:
        from app.labels.service import make_labeler  # type: ignore[import-not-found]
    except ImportError:
        return None
    last: Exception | None = None
    for _ in range(3):  # several SCP processes may register the same rule set at once
        session = sessions()
        try:
            labeler = make_labeler(session, rules_file)
            session.commit()
            return labeler
        except Exception as exc:  # noqa: BLE001 - index without labels rather than refuse data
            session.rollback()
            last = exc
            time.sleep(0.2)
        finally:
            session.close()
    log.warning("labeler unavailable, indexing without labels: %s", last)
    return None


# ----------------------------------------------------------------------------- the SCP
class StorageSCP:
    """Our Storage SCP (plus C-ECHO) on settings.scp_host/scp_port as settings.ae_title.

    Associations are accepted only from the calling AE titles of PacsNode rows (and, with
    settings.scp_check_host, only from their host), looked up at association time.
    Success is answered once the file is on disk (fsynced) AND its index row is committed.
    """

    def __init__(self, ctx, *, port: int | None = None, fsync: bool = True, labeler=None,
                 load_labels: bool = True, chunked: bool = False):
        self.ctx = ctx
        self.settings = ctx.settings
        self._port = self.settings.scp_port if port is None else port
        self.store = DicomStore(self.settings.store_dir, fsync=fsync)
        self.chunked = chunked
        if labeler is None and load_labels:
            labeler = load_labeler(ctx.sessions, self.settings.label_rules)
        self._labeler = labeler
        self.batcher = IndexBatcher(ctx.sessions, self._labeler)
        self._server = None
        self._node_cache: dict[tuple[str, str], tuple[float, str | None]] = {}
        self._cache_lock = threading.Lock()

    @property
    def port(self) -> int:
        if self._server is not None:
            return int(self._server.server_address[1])
        return self._port

    # --- node lookup ----------------------------------------------------------
    def node_for(self, ae_title: str, host: str) -> str | None:
        """Name of the PacsNode this peer is (None if unknown). Cached for 2 s."""
        key = (ae_title.strip(), host)
        now = time.monotonic()
        with self._cache_lock:
            hit = self._node_cache.get(key)
            if hit and now - hit[0] < 2.0:
                return hit[1]
        from sqlalchemy import select

        from app.db.models import PacsNode

        with self.ctx.sessions() as s:
            rows = s.execute(select(PacsNode.name, PacsNode.host).where(PacsNode.ae_title == key[0])).all()
        name = None
        for n, h in rows:
            if not self.settings.scp_check_host or _same_host(h, host):
                name = n
                break
        with self._cache_lock:
            self._node_cache[key] = (now, name)
        return name

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

    def _sink(self, stored: StoredFile, header: Dataset) -> None:
        from app.index.extract import extract_record

        rec = extract_record(header, file_path=stored.relpath, file_size=stored.size,
                             transfer_syntax_uid=stored.transfer_syntax_uid,
                             source_node=getattr(header, "source_node", None))
        self.batcher.submit(rec).result(timeout=max(60.0, self.settings.dicom_timeout))

    # --- lifecycle ------------------------------------------------------------
    def make_ae(self) -> AE:
        ae = AE(ae_title=self.settings.ae_title)
        ae.maximum_pdu_size = self.settings.max_pdu
        ae.acse_timeout = self.settings.dicom_timeout
        ae.dimse_timeout = self.settings.dicom_timeout
        ae.network_timeout = max(60.0, self.settings.dicom_timeout)
        ae.maximum_associations = 32
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

    def _handlers(self):
        return [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_STORE, make_store_handler(self.store, self._sink, self.node_for)),
            (evt.EVT_C_ECHO, lambda event: 0x0000),
        ]

    def start(self, channel: socket.socket | None = None) -> "StorageSCP":
        """Start serving in background threads (returns at once).

        With `channel` (the child end from ConnectionDispatcher), serve the connections a
        dispatcher process accepted and handed over, instead of listening ourselves.
        """
        tls = self.tls_context()  # first: a bad certificate or key fails start-up, not the first peer
        self.store.root.mkdir(parents=True, exist_ok=True)
        if channel is None:  # a dispatched child shares the store with its siblings: the parent cleans
            self.store.clean_temp()
        if self.chunked:
            enable_chunked_receive(self.store)
        self.batcher.start()
        ae = self.make_ae()
        address = (self.settings.scp_host, self._port)
        if channel is None:
            self._server = ae.make_server(address, evt_handlers=self._handlers(), server_class=_TimedServer)
            self._server.tls_context = tls
            ae._servers.append(self._server)  # as start_server does: shutdown() removes it
            threading.Thread(target=self._server.serve_forever, name="scp-accept", daemon=True).start()
        else:
            self._server = ae.make_server(("127.0.0.1", 0), evt_handlers=self._handlers(),
                                          server_class=_HandoffServer)
            self._server.server_address = address
            self._server.tls_context = tls
            threading.Thread(target=_serve_handoffs, args=(self._server, channel), name="scp-handoff",
                             daemon=True).start()
        log.info("Storage SCP %s listening on %s:%d%s", self.settings.ae_title, self.settings.scp_host, self.port,
                 " (TLS)" if tls else "")
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self.batcher.stop()

    def __enter__(self) -> "StorageSCP":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _same_host(configured: str, peer: str) -> bool:
    if configured == peer:
        return True
    try:
        return peer in {ai[4][0] for ai in socket.getaddrinfo(configured, None)}
    except OSError:
        return False


class _TimedServer(ThreadedAssociationServer):
    """Accepted sockets time out after the network timeout: pynetdicom leaves them blocking, so a peer
    that stops in the middle of a PDU would hold its association thread (and a slot) forever."""

    tls_context: ssl.SSLContext | None = None

    def process_request(self, request, client_address):
        limit = self.ae.maximum_pdu_size
        tls = self.tls_context
        if limit and tls is None:  # we advertise a maximum PDU: refuse a peer that sends far more in one PDU
            request = _PduGuardSocket(request.family, request.type, request.proto, fileno=request.detach())
            request.pdu_limit = 2 * max(limit, 65536)
        request.settimeout(self.ae.network_timeout)
        if tls is not None:  # the handshake itself runs in the association's thread
            request = tls.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
            request.pdu_limit = 2 * max(limit, 65536) if limit else 0
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


def _serve_handoffs(server: ThreadedAssociationServer, channel: socket.socket) -> None:
    channel.send(b"ready")
    while True:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(channel, 1024, 1)
        except OSError:
            break
        if not msg and not fds:  # the dispatcher closed the channel
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
