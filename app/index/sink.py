"""The one "store -> extract -> index" sink, and what the receiving side needs of the database.

The Storage SCP, the C-GET handler and the WADO-RS path all keep an instance the same way: the file
is written by the store (app.store), then the sink handed to them turns its header into an
index record (app.index.extract) and waits for that record's commit (IndexBatcher: concurrent
stores share one transaction). The transport knows none of this: it is given, when it is wired
(app.wiring, the retrieval runner),

- `IndexSink`: the sink, plus `record_conflict` for a copy kept aside;
- `refusal_recorder`: where a refused C-STORE is recorded (the audit log);
- `NodeDirectory`: which configured PACS node a peer is (association check, record provenance).
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

from pydicom.dataset import Dataset
from sqlalchemy import select

from app import audit
from app.db.base import session_scope
from app.db.models import Instance, PacsNode, Patient, Series, Study
from app.db.models import StoreConflict as ConflictRow
from app.dicom.scp import REFUSAL_MEANING, RefusalRecorder, StoreConflict
from app.store import StoredFile
from app.index.extract import extract_record
from app.index.ingest import IngestCache, Labeler, ingest
from app.privacy import patient_key

log = logging.getLogger("radcohort.index")


class IndexSink:
    """Header of a stored file -> index record -> committed row, or an exception (the transport then
    answers a failure status, or keeps the copy aside on StoreConflict).

    `source_node`: the sender when the caller knows it (C-GET, WADO-RS: the node asked); otherwise
    the transport's `header.source_node` (the SCP's node lookup). Start it before the first call
    (the SCP starts and stops the sink it is given), stop it after the last.
    """

    def __init__(self, sessions, labeler: Labeler | None = None, *, pseudonym_key: bytes | None = None,
                 timeout: float = 60.0, source_node: str | None = None):
        self.batcher = IndexBatcher(sessions, labeler, pseudonym_key=pseudonym_key)
        self.timeout = timeout
        self.source_node = source_node

    @property
    def labeler(self) -> Labeler | None:
        return self.batcher.labeler

    def start(self) -> "IndexSink":
        self.batcher.start()
        return self

    def stop(self) -> None:
        self.batcher.stop()

    def __call__(self, stored: StoredFile, header: Dataset) -> None:
        src = self.source_node if self.source_node is not None else getattr(header, "source_node", None)
        rec = extract_record(header, file_path=stored.relpath, file_size=stored.size,
                             transfer_syntax_uid=stored.transfer_syntax_uid, source_node=src)
        self.batcher.submit(rec).result(timeout=self.timeout)

    def record_conflict(self, details: dict) -> None:
        self.batcher.record_conflict(details)


class IndexBatcher:
    """Group commit for the SCP: handler threads submit records and wait for their commit.

    One background thread takes whatever is queued (up to `max_batch`), ingests it in one
    transaction and commits, then wakes the waiting handlers. No linger: with one sender
    each store commits alone; with several associations, concurrent stores share commits.
    """

    def __init__(self, sessions, labeler=None, max_batch: int = 256, pseudonym_key: bytes | None = None):
        self.sessions = sessions
        self.labeler = labeler
        self.max_batch = max_batch
        self.pseudonym_key = pseudonym_key  # conflicts name patients by pseudonym only (None: not at all)
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
                res = self._commit([r for r, _ in batch], ingest)
                for rec, fut in batch:
                    self._settle(fut, rec, res)
            except Exception:  # noqa: BLE001 - retry one by one so one bad record fails alone
                for rec, fut in batch:
                    try:
                        self._settle(fut, rec, self._commit([rec], ingest))
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

    def _settle(self, fut: Future, rec: dict, res) -> None:
        reason = res.conflicts.get(rec["sop_instance_uid"])
        if reason is None:
            fut.set_result(True)
        else:  # the index refused it: the handler keeps the copy aside and records it here
            fut.set_exception(StoreConflict(reason, self.record_conflict))

    def record_conflict(self, details: dict) -> None:
        """Record a kept-aside copy (StoreConflict row + audit event), with what the index holds.

        `details` may carry patient_id/issuer: turned into a pseudonym here, never stored or logged."""
        d = dict(details)
        pid, issuer = d.pop("patient_id", None), d.pop("issuer", "")
        sop = d["sop_instance_uid"]
        with session_scope(self.sessions) as session:
            existing = session.execute(
                select(Study.study_instance_uid, Series.series_instance_uid, Patient.patient_id, Patient.issuer,
                       Instance.source_node)
                .select_from(Instance).join(Study, Instance.study_pk == Study.id)
                .join(Series, Instance.series_pk == Series.id).join(Patient, Instance.patient_pk == Patient.id)
                .where(Instance.sop_instance_uid == sop)).first()
            owner: Sequence[Any] | None = None  # (patient_id, issuer) of the instance's or the study's owner
            if existing is None:  # a new instance of a known study: the study's owner
                owner = session.execute(select(Patient.patient_id, Patient.issuer).join(
                    Study, Study.patient_pk == Patient.id).where(
                    Study.study_instance_uid == d["study_instance_uid"])).first()
            else:
                d.setdefault("existing_study_instance_uid", existing[0])
                d.setdefault("existing_series_instance_uid", existing[1])
                d.setdefault("existing_source_node", existing[4])
                owner = existing[2:4]
            if self.pseudonym_key is not None:
                if pid is not None:
                    d["patient_key"] = patient_key(self.pseudonym_key, pid, issuer)
                if owner is not None:
                    d["existing_patient_key"] = patient_key(self.pseudonym_key, owner[0], owner[1])
            cols = {c.name for c in ConflictRow.__table__.columns}
            known = session.scalar(select(ConflictRow.id).where(ConflictRow.sop_instance_uid == sop,
                                                                ConflictRow.received_sha256 == d["received_sha256"]))
            if known is None:  # the same copy sent again is one conflict
                row = ConflictRow(**{k: v for k, v in d.items() if k in cols})
                session.add(row)
                session.flush()
                audit.record(session, f"scp:{d.get('source_node') or d.get('calling_ae') or '?'}",
                             "dicom.conflict", sop, conflict_id=row.id, reason=d["reason"],
                             study_instance_uid=d["study_instance_uid"], file_path=d["file_path"])

    def _commit(self, records: list[dict], ingest):
        session = self.sessions()
        try:
            if session.get_bind().dialect.name == "sqlite":
                # take the write lock first: a read-then-write transaction that loses a race with
                # another SCP process gets SQLITE_BUSY at once instead of waiting its turn
                session.connection().exec_driver_sql("BEGIN IMMEDIATE")
            res = ingest(session, records, labeler=self.labeler, cache=self.cache)
            session.commit()
            self.cache.commit()
            return res
        except BaseException:
            session.rollback()
            self.cache.clear()  # a failure may come from a stale id: look everything up again
            raise
        finally:
            session.close()


def refusal_recorder(sessions) -> RefusalRecorder:
    """Refusals go to the audit log (`dicom.refused`, target the SOP Instance UID): rare, security
    relevant, and where a retrieval looks for them."""

    def record(sop: str, status: int, calling_ae: str) -> None:
        with sessions() as s:
            audit.record(s, "scp", "dicom.refused", sop, status=f"0x{status:04X}", calling_ae=calling_ae,
                         meaning=REFUSAL_MEANING.get(status, ""))
            s.commit()

    return record


class NodeDirectory:
    """`node_for(ae_title, host)`: the name of the configured PacsNode this peer is (None: unknown).

    One query reads every node, cached for 2 s: calling AE titles an attacker makes up neither
    query the database each nor grow a cache. Raises when the database cannot answer (the SCP then
    refuses the association: fail closed). With `check_host`, the peer's address must also be the
    node's host (or one of its addresses)."""

    def __init__(self, sessions, check_host: bool = False, ttl_s: float = 2.0):
        self.sessions, self.check_host, self.ttl_s = sessions, check_host, ttl_s
        self._snap: tuple[float, dict[str, list[tuple[str, str]]]] | None = None
        self._lock = threading.Lock()

    def __call__(self, ae_title: str, host: str) -> str | None:
        now = time.monotonic()
        with self._lock:
            snap = self._snap
        if snap is None or now - snap[0] >= self.ttl_s:
            with self.sessions() as s:
                rows = s.execute(select(PacsNode.ae_title, PacsNode.name, PacsNode.host)).all()
            nodes: dict[str, list[tuple[str, str]]] = {}
            for aet, name, h in rows:
                nodes.setdefault(aet.strip(), []).append((name, h))
            snap = (now, nodes)
            with self._lock:
                self._snap = snap
        for name, h in snap[1].get(ae_title.strip(), []):
            if not self.check_host or same_host(h, host):
                return name
        return None


def same_host(configured: str, peer: str) -> bool:
    """Is `peer` (an address) the configured host (a name or an address)?"""
    if configured == peer:
        return True
    try:
        return peer in {ai[4][0] for ai in socket.getaddrinfo(configured, None)}
    except OSError:
        return False
