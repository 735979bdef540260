"""The UID-keyed DICOM store: `<root>/<study>/<series>/<sop>.dcm`, written as received, atomically.

Paths are built only from validated UIDs (digits and dots), so no crafted UID can leave the root.
Files are written to a temp file in the target directory, optionally fsynced, then `os.replace`d
into place: a reader (or the index) never sees a half-written file.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID

from app.errors import InvalidInput

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
PREAMBLE = b"\x00" * 128 + b"DICM"
PIXEL_DATA_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}


def validate_uid(uid: str) -> str:
    """Return `uid` (stripped of DICOM padding) if it is a DICOM UID, else raise InvalidInput.

    A UID is 1-64 characters of digits and dots with no empty component and no leading
    zero in a multi-digit component (PS3.5 9.1).
    """
    if not isinstance(uid, str):
        raise InvalidInput(f"UID must be a string, got {type(uid).__name__}")
    u = uid.rstrip("\x00 ")
    if not u or len(u) > 64 or not _UID_RE.match(u):
        raise InvalidInput(f"not a valid DICOM UID: {uid[:80]!r}")
    if any(len(c) > 1 and c[0] == "0" for c in u.split(".")):
        raise InvalidInput(f"not a valid DICOM UID (leading zero in a component): {uid[:80]!r}")
    return u


@dataclass(frozen=True)
class StoredFile:
    relpath: str
    size: int
    sop_instance_uid: str
    transfer_syntax_uid: str
    existed: bool


def encode_file_meta(file_meta: FileMetaDataset) -> bytes:
    """Preamble + 'DICM' + the encoded file meta group (group length recomputed)."""
    buf = io.BytesIO()
    buf.write(PREAMBLE)
    write_file_meta_info(buf, file_meta, enforce_standard=True)  # type: ignore[arg-type]
    return buf.getvalue()


def file_meta_end(fp: BinaryIO) -> int:
    """Offset of the dataset in a Part 10 file written with a meta group length (0002,0000)."""
    fp.seek(0)
    head = fp.read(144)
    if len(head) < 144 or head[128:132] != b"DICM" or head[132:136] != b"\x02\x00\x00\x00":
        raise ValueError("not a DICOM Part 10 file with a file meta group length")
    (group_len,) = struct.unpack("<I", head[140:144])
    return 144 + group_len


_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


def read_file_meta(fp: BinaryIO) -> tuple[dict[int, bytes], int]:
    """The file meta group of a Part 10 file as {tag: value bytes} and the dataset offset.

    A small explicit VR LE parser: much cheaper than a full dcmread of group 2.
    """
    end = file_meta_end(fp)
    fp.seek(144)
    raw = fp.read(end - 144)
    meta: dict[int, bytes] = {}
    i = 0
    while i + 8 <= len(raw):
        group, elem = struct.unpack_from("<HH", raw, i)
        vr = raw[i + 4:i + 6]
        if vr in _LONG_VRS:
            (length,) = struct.unpack_from("<I", raw, i + 8)
            i += 12
        else:
            (length,) = struct.unpack_from("<H", raw, i + 6)
            i += 8
        if i + length > len(raw):
            raise ValueError("truncated file meta")
        meta[(group << 16) | elem] = raw[i:i + length]
        i += length
    return meta, end


def read_part10_header(path: Path) -> Dataset:
    """Header (no pixel data) of a Part 10 file, with file_meta holding the transfer syntax and
    SOP class. Equivalent to dcmread(stop_before_pixels=True) for indexing, at a lower cost."""
    with open(path, "rb") as fp:
        meta, offset = read_file_meta(fp)
        ts = meta.get(0x00020010, b"").rstrip(b"\x00 ").decode("ascii")
        ds = parse_header(fp, ts, offset)
    fm = FileMetaDataset()
    fm.TransferSyntaxUID = ts
    sop_class = meta.get(0x00020002, b"").rstrip(b"\x00 ").decode("ascii")
    if sop_class:
        fm.MediaStorageSOPClassUID = sop_class
    ds.file_meta = fm
    return ds


def parse_header(data: bytes | BinaryIO | Path, transfer_syntax_uid: str, offset: int = 0) -> Dataset:
    """Decode the dataset header (everything before Pixel Data) of a raw dataset stream.

    Raises ValueError (or pydicom's errors) on malformed data; never reads pixel data.
    """
    ts = UID(transfer_syntax_uid)
    if not ts.is_transfer_syntax:
        raise ValueError(f"unknown transfer syntax {transfer_syntax_uid}")
    close = False
    if isinstance(data, (bytes, bytearray, memoryview)):
        fp: BinaryIO = io.BytesIO(data)
    elif isinstance(data, Path):
        fp = open(data, "rb")
        close = True
    else:
        fp = data
    try:
        fp.seek(offset)
        if ts.is_deflated:
            fp = io.BytesIO(zlib.decompress(fp.read(), -zlib.MAX_WBITS))
        ds = read_dataset(fp, ts.is_implicit_VR, ts.is_little_endian,
                          stop_when=lambda tag, vr, length: tag in PIXEL_DATA_TAGS)
        # pydicom reads a value that runs past the end of the data short, without complaint
        for raw in list(ds._dict.values()):
            length, value = getattr(raw, "length", None), getattr(raw, "value", None)
            if isinstance(value, bytes) and length not in (None, 0xFFFFFFFF) and len(value) != length:
                raise ValueError(f"element {raw.tag} is truncated")
        _check_pixel_data_complete(fp, ts.is_implicit_VR, ts.is_little_endian)
        # values are converted lazily: a junk value (IS "x1") must not refuse the instance,
        # the index extractor treats it as absent
        return ds
    finally:
        if close:
            fp.close()


def _check_pixel_data_complete(fp: BinaryIO, implicit: bool, little: bool) -> None:
    """Raise ValueError when the pixel data (where read_dataset stopped) runs past the end of the data.

    A sender that declares 8 KB of pixel data and sends 4 KB must not get Success for a half image.
    """
    start = fp.tell()
    head = fp.read(12)
    if not head:
        return  # no pixel data
    if len(head) < 8:
        raise ValueError("pixel data element header is truncated")
    e = "<" if little else ">"
    if implicit or head[4:6] in _LONG_VRS:
        length = struct.unpack(e + "I", head[4:8] if implicit else head[8:12])[0]
        hdr = 8 if implicit else 12
    else:
        length, hdr = struct.unpack(e + "H", head[6:8])[0], 8
    end = fp.seek(0, io.SEEK_END)
    if length == 0xFFFFFFFF:  # encapsulated: must end with the sequence delimiter (then optional padding)
        delim = struct.pack(e + "HHI", 0xFFFE, 0xE0DD, 0)
        fp.seek(max(start, end - 8))
        if fp.read(8) == delim:  # the common case: one small read (reindex reads many files)
            return
        fp.seek(max(start, end - 65536))
        tail = fp.read()
        i = tail.rfind(delim)
        if i < 0 or not (i + 8 == len(tail) or tail[i + 8:i + 12] == struct.pack(e + "HH", 0xFFFC, 0xFFFC)):
            raise ValueError("encapsulated pixel data is truncated (no sequence delimiter)")
    elif end - start - hdr < length:
        raise ValueError(f"pixel data is truncated ({end - start - hdr} of {length} bytes)")


class DicomStore:
    """Files under `root`, keyed by Study/Series/SOP Instance UID."""

    def __init__(self, root: Path, fsync: bool = True):
        self.root = Path(root).resolve()
        self.fsync = fsync  # fsync each file (and its directory) before reporting it stored

    def relpath(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        return "/".join((validate_uid(study_uid), validate_uid(series_uid), validate_uid(sop_uid) + ".dcm"))

    def path(self, relpath: str) -> Path:
        """Absolute path of a relpath; refuses anything that would resolve outside the root."""
        p = (self.root / relpath).resolve()
        if not p.is_relative_to(self.root) or p == self.root:
            raise InvalidInput(f"path escapes the store: {relpath[:120]!r}")
        return p

    def exists(self, study_uid: str, series_uid: str, sop_uid: str) -> bool:
        return self.path(self.relpath(study_uid, series_uid, sop_uid)).is_file()

    def write_raw(
        self,
        study_uid: str,
        series_uid: str,
        sop_uid: str,
        file_meta: FileMetaDataset,
        dataset: bytes | BinaryIO | Path,
        dataset_offset: int = 0,
    ) -> StoredFile:
        """Write preamble + file meta + the dataset bytes exactly as received.

        `dataset` is the encoded dataset (bytes, a binary stream, or a file whose dataset
        starts at `dataset_offset`). Idempotent: an existing file for the SOP is kept and
        returned with `existed=True`. Raises InvalidInput for bad UIDs, OSError for I/O.
        """
        rel = self.relpath(study_uid, series_uid, sop_uid)
        final = self.path(rel)
        ts = str(file_meta.get("TransferSyntaxUID", ""))
        if final.is_file():
            return StoredFile(rel, final.stat().st_size, validate_uid(sop_uid), ts, True)
        meta = encode_file_meta(file_meta)
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".part", dir=final.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(meta)
                if isinstance(dataset, (bytes, bytearray, memoryview)):
                    out.write(dataset)
                elif isinstance(dataset, Path):
                    with open(dataset, "rb") as src:
                        src.seek(dataset_offset)
                        shutil.copyfileobj(src, out, 1 << 20)
                elif isinstance(dataset, io.BytesIO):
                    out.write(dataset.getbuffer()[dataset_offset:])
                else:
                    dataset.seek(dataset_offset)
                    shutil.copyfileobj(dataset, out, 1 << 20)
                out.flush()
                if self.fsync:
                    os.fdatasync(out.fileno())
                size = out.tell()
            if final.exists():  # a concurrent writer won the race: keep its file
                os.unlink(tmp)
                return StoredFile(rel, final.stat().st_size, validate_uid(sop_uid), ts, True)
            os.replace(tmp, final)
            if self.fsync:
                _fsync_dir(final.parent)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        return StoredFile(rel, size, validate_uid(sop_uid), ts, False)

    def adopt(self, study_uid: str, series_uid: str, sop_uid: str, src: Path, transfer_syntax_uid: str) -> StoredFile:
        """Move a complete Part 10 file on the store's filesystem into place, without copying it
        (pynetdicom's chunked receive file). No-clobber: an existing SOP file is kept and `src`
        left alone. Raises OSError (EXDEV across filesystems)."""
        rel = self.relpath(study_uid, series_uid, sop_uid)
        final = self.path(rel)
        if final.is_file():
            return StoredFile(rel, final.stat().st_size, validate_uid(sop_uid), transfer_syntax_uid, True)
        final.parent.mkdir(parents=True, exist_ok=True)
        if self.fsync:
            fd = os.open(src, os.O_RDONLY)
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
        try:
            os.link(src, final)  # atomic and never overwrites
        except FileExistsError:
            return StoredFile(rel, final.stat().st_size, validate_uid(sop_uid), transfer_syntax_uid, True)
        os.unlink(src)
        if self.fsync:
            _fsync_dir(final.parent)
        return StoredFile(rel, final.stat().st_size, validate_uid(sop_uid), transfer_syntax_uid, False)

    @property
    def incoming_dir(self) -> Path:
        """Where chunked receives stream to (same filesystem, so files are moved, not copied)."""
        return self.root / ".incoming"

    def iter_files(self):
        """All stored files (skips temp files left by a crash)."""
        for p in self.root.rglob("*.dcm"):
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(self.root).parts):
                yield p

    def clean_temp(self) -> int:
        """Remove temp files a crashed writer left behind; returns how many."""
        n = 0
        for p in self.root.rglob(".tmp-*.part"):
            p.unlink(missing_ok=True)
            n += 1
        if self.incoming_dir.is_dir():
            for p in self.incoming_dir.iterdir():
                p.unlink(missing_ok=True)
                n += 1
        return n


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
