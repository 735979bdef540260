"""Keep a WADO-RS part exactly like the Storage SCP keeps a C-STORE: raw bytes, atomic, then index.

The same checks as `app.dicom.scp.make_store_handler`: the header must parse, the UIDs must be
UIDs, the dataset is written as received (file meta re-encoded, dataset bytes untouched) and the
sink (the index batcher) must accept the record, or the instance counts as failed.
"""

from __future__ import annotations

import io

from pydicom import dcmread

from app.store import DicomStore, StoredFile, file_meta_end, parse_header, validate_uid


class PartRefused(Exception):
    """This part cannot be kept (malformed, bad UID, I/O or index failure); message says why."""


def store_part10(store: DicomStore, raw: bytes, sink) -> StoredFile:
    """Write one Part 10 instance and index it through `sink(stored, header)`."""
    try:
        fp = io.BytesIO(raw)
        offset = file_meta_end(fp)
        # the file meta group alone (read_file_meta_info wants a path; this keeps to public API)
        file_meta = dcmread(io.BytesIO(raw[:offset])).file_meta
        ts = str(file_meta.TransferSyntaxUID)
        header = parse_header(raw, ts, offset)
    except Exception as exc:  # noqa: BLE001 - whatever it is, we cannot understand it
        raise PartRefused(f"malformed DICOM part ({type(exc).__name__})") from exc
    try:
        sop = validate_uid(str(header.get("SOPInstanceUID", "") or ""))
        study = validate_uid(str(header.get("StudyInstanceUID", "") or ""))
        series = validate_uid(str(header.get("SeriesInstanceUID", "") or ""))
    except Exception as exc:  # noqa: BLE001
        raise PartRefused(str(getattr(exc, "message", exc))) from exc
    if str(file_meta.get("MediaStorageSOPInstanceUID", sop)).rstrip("\x00 ") != sop:
        raise PartRefused(f"{sop}: file meta names another instance")
    try:
        stored = store.write_raw(study, series, sop, file_meta, memoryview(raw)[offset:])
    except OSError as exc:
        raise PartRefused(f"{sop}: write failed ({exc})") from exc
    header.file_meta = file_meta
    try:
        sink(stored, header)
    except Exception as exc:  # noqa: BLE001
        raise PartRefused(f"{sop}: stored but not indexed ({type(exc).__name__})") from exc
    return stored
