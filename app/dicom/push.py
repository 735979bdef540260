"""C-STORE sender: push DICOM files to a PACS over several associations in parallel.

Files are sent as they are (pynetdicom streams the file's bytes; nothing is decoded), so every
transfer syntax the files carry is offered as its own presentation context. The report counts
exactly what the PACS confirmed: a file is `stored` only on a Success or Warning status; a
refused context, a failure status, an abort or a timeout is a failure with its reason.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, build_context

log = logging.getLogger(__name__)

MAX_CONTEXTS = 128
WARNING_STATUSES = {0x0001, 0xB000, 0xB006, 0xB007}


@dataclass
class PushResult:
    total: int = 0
    stored: int = 0
    warnings: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # not DICOM files: (path, reason)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed and self.stored == self.total

    def summary(self) -> str:
        return (f"{self.stored}/{self.total} stored ({self.warnings} with warnings), {len(self.failed)} failed, "
                f"{len(self.skipped)} skipped (not DICOM) in {self.seconds:.1f} s")


@dataclass(frozen=True)
class _Item:
    path: str
    sop_class: str
    syntax: str


def scan(paths: Iterable[str | Path]) -> tuple[list[_Item], list[tuple[str, str]]]:
    """Read only the file meta of each file: (DICOM items, skipped non-DICOM files with reasons)."""
    items, skipped = [], []
    for p in paths:
        try:
            meta = read_file_meta_info(p)
            items.append(_Item(str(p), str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
        except Exception as exc:  # noqa: BLE001  any unreadable file is reported, never dropped
            skipped.append((str(p), f"not a DICOM file: {exc.__class__.__name__}"))
    return items, skipped


def dicom_files(root: str | Path) -> list[Path]:
    """Every file under `root` except the synth sidecar and temp files, sorted."""
    root = Path(root)
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() not in (".csv", ".tmp", ".json",
                                                                                          ".md", ".png"))


def push(paths: Iterable[str | Path], host: str, port: int, called_aet: str, calling_aet: str = "RADCOHORT",
         associations: int = 4, timeout: float = 30.0,
         progress: Callable[[int, int], None] | None = None) -> PushResult:
    """C-STORE every file to host:port over up to `associations` parallel associations."""
    t0 = time.perf_counter()
    items, skipped = scan(paths)
    result = PushResult(total=len(items), skipped=skipped)
    if not items:
        result.seconds = time.perf_counter() - t0
        return result
    pairs = sorted({(i.sop_class, i.syntax) for i in items})
    if len(pairs) > MAX_CONTEXTS:
        raise ValueError(f"{len(pairs)} SOP class/transfer syntax pairs exceed {MAX_CONTEXTS} presentation contexts")
    contexts = [build_context(sop, [ts]) for sop, ts in pairs]

    work: queue.Queue[_Item] = queue.Queue()
    for it in items:
        work.put(it)
    lock = threading.Lock()
    done = 0
    assoc_errors: list[str] = []

    def record(item: _Item | None, status: str | None, warn: bool = False) -> None:
        nonlocal done
        with lock:
            if status is None:
                result.stored += 1
                result.warnings += int(warn)
            else:
                result.failed.append((item.path, status))  # type: ignore[union-attr]
            done += 1
            if progress:
                progress(done, len(items))

    def connect():
        ae = AE(ae_title=calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
        ae.requested_contexts = contexts
        assoc = ae.associate(host, port, ae_title=called_aet)
        if not assoc.is_established:
            why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "could not connect"
            raise ConnectionError(f"association to {called_aet}@{host}:{port} {why}")
        return assoc

    def worker() -> None:
        assoc = None
        failures_in_row = 0
        msg_id = 0
        try:
            while True:
                try:
                    item = work.get_nowait()
                except queue.Empty:
                    return
                if assoc is None or not assoc.is_established:
                    try:
                        assoc = connect()
                        failures_in_row = 0
                    except ConnectionError as exc:
                        work.put(item)  # another worker (or the final sweep) accounts for it
                        with lock:
                            assoc_errors.append(str(exc))
                        return
                accepted = {(c.abstract_syntax, c.transfer_syntax[0]) for c in assoc.accepted_contexts}
                if (item.sop_class, item.syntax) not in accepted:
                    record(item, f"PACS accepted no presentation context for {item.sop_class} in {item.syntax}")
                    continue
                msg_id = msg_id % 65535 + 1
                try:
                    status = assoc.send_c_store(item.path, msg_id=msg_id)
                except Exception as exc:  # noqa: BLE001  a broken file or connection fails this file only
                    record(item, f"send failed: {exc.__class__.__name__}: {exc}")
                    assoc.abort()
                    assoc = None
                    continue
                code = getattr(status, "Status", None)
                if code is None:
                    record(item, "no C-STORE response (association aborted or timed out)")
                    assoc.abort()
                    assoc = None
                    failures_in_row += 1
                    if failures_in_row >= 3:
                        with lock:
                            assoc_errors.append("three transfers in a row got no response")
                        return
                elif code == 0x0000:
                    record(item, None)
                elif code in WARNING_STATUSES:
                    record(item, None, warn=True)
                else:
                    record(item, f"C-STORE status 0x{code:04X}")
        finally:
            if assoc is not None and assoc.is_established:
                assoc.release()

    threads = [threading.Thread(target=worker, name=f"push-{k}", daemon=True)
               for k in range(max(1, min(associations, len(items))))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # whatever no worker could send (every association failed) is a failure, with the reason
    reason = assoc_errors[-1] if assoc_errors else "not sent"
    while True:
        try:
            record(work.get_nowait(), reason)
        except queue.Empty:
            break
    result.seconds = time.perf_counter() - t0
    if result.failed:
        log.warning("C-STORE to %s@%s:%s: %s", called_aet, host, port, result.summary())
    return result
