"""Real Query/Retrieve peers on free loopback ports, for the conformance suite.

Each peer knows our AE (title, host, port) as a move destination, is loaded with given DICOM
files, can say what it holds and how many C-MOVE requests it has received (from its own log), and
is torn down by SIGKILL of its process group (fast: nothing of its state is needed afterwards).

Kinds:
- ``orthanc``: the Debian Orthanc through app.devtools.orthanc (the tests' orthanc_factory);
- ``dcmqrscp``: dcmtk's archive with default options (ignores keys it does not index, sends
  uncompressed only);
- ``dcmqrscp-strict``: ``-XF -XM --require-find`` (hierarchical identifiers enforced, MOVE/GET
  contexts refused unless a FIND context is proposed with them);
- ``dcmqrscp-compressed``: an archive that stores each SOP class in one compressed syntax (CR/DX
  as JPEG 2000 lossless, SC/US as JPEG lossless; converted losslessly on load) and, through an
  association profile (``-xf``), proposes that syntax first when it sends (C-MOVE) and accepts only
  it on C-GET: what it holds is sent as stored;
- ``qrscp``: pynetdicom's bundled ``qrscp`` app (sends as stored; one C-FIND row per instance).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

from app.devtools.orthanc import free_port

KINDS = ("orthanc", "dcmqrscp", "dcmqrscp-strict", "dcmqrscp-compressed", "qrscp")
# Peers that send an instance in the transfer syntax it is stored in (no transcoding needed).
SENDS_COMPRESSED = frozenset({"orthanc", "dcmqrscp-compressed", "qrscp"})
DCMTK_HINT = "dcmtk is not installed: `apt-get install dcmtk` (needs dcmqrscp, dcmqridx)"


class PeerError(RuntimeError):
    """A peer could not be started or loaded (a broken fixture, never a product failure)."""


def dcmtk_binary(name: str) -> str:
    """A dcmtk binary from the system path: the venv has pynetdicom scripts of the same names."""
    for d in ("/usr/bin", "/usr/local/bin"):
        p = Path(d) / name
        if p.exists():
            return str(p)
    raise PeerError(DCMTK_HINT)


def wait_listening(port: int, proc: subprocess.Popen | None, log: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise PeerError(f"peer exited early (rc {proc.returncode}); log:\n{_tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise PeerError(f"peer did not listen on {port} within {timeout:g}s; log:\n{_tail(log)}")


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


def _kill_group(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # dcmqrscp forks a child per association: kill them all
    except ProcessLookupError:
        pass
    proc.wait(5)


def sop_uid_of(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)


def c_store(files: list[Path], ae_title: str, port: int, calling: str = "LOADER") -> None:
    """Send files to a peer over C-STORE, each in its own stored transfer syntax."""
    from pynetdicom import AE

    metas = [(p, dcmread(p, stop_before_pixels=True)) for p in files]
    ae = AE(ae_title=calling)
    ae.maximum_pdu_size = 0
    pairs = sorted({(str(m.file_meta.MediaStorageSOPClassUID), str(m.file_meta.TransferSyntaxUID)) for _, m in metas})
    if len(pairs) > 128:
        raise PeerError("too many (class, syntax) pairs for one association")
    for sop, ts in pairs:
        ae.add_requested_context(sop, [ts])
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    if not assoc.is_established:
        raise PeerError(f"C-STORE association to {ae_title}:{port} refused")
    try:
        for p, _ in metas:
            st = assoc.send_c_store(dcmread(p))
            if st.get("Status", 0xFFFF) != 0:
                raise PeerError(f"C-STORE of {p.name} to {ae_title}: status {st.get('Status')!r}")
    finally:
        assoc.release()


def c_find(peer, level: str, keys: dict[str, str], calling: str = "PROBE") -> list:
    """A raw C-FIND (pynetdicom, Study Root) straight to a peer: what the PACS itself answers,
    to show a quirk (e.g. over-matching) independently of radcohort's client."""
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

    ident = Dataset()
    ident.QueryRetrieveLevel = level
    for k, v in keys.items():
        setattr(ident, k, v)
    ae = AE(ae_title=calling)
    ae.add_requested_context(FIND)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    if not assoc.is_established:
        raise PeerError(f"C-FIND association to {peer.kind} refused")
    try:
        rows = [ds for st, ds in assoc.send_c_find(ident, FIND) if st and st.get("Status") in (0xFF00, 0xFF01)]
    finally:
        assoc.release()
    return rows


@dataclass
class Peer:
    """A running Query/Retrieve peer."""

    kind: str
    ae_title: str
    port: int
    workdir: Path
    host: str = "127.0.0.1"
    log_path: Path | None = None
    proc: subprocess.Popen | None = None
    loaded: dict[str, Path] = field(default_factory=dict)  # SOP Instance UID -> source file

    @property
    def sends_compressed(self) -> bool:
        return self.kind in SENDS_COMPRESSED

    def load(self, files) -> None:
        raise NotImplementedError

    def held(self) -> set[str]:
        """SOP Instance UIDs the peer holds (read from its own store, not from C-FIND)."""
        raise NotImplementedError

    def move_requests(self) -> int:
        """C-MOVE requests the peer has received so far (counted in its log)."""
        raise NotImplementedError

    def log_text(self) -> str:
        return _tail(self.log_path, 10**7) if self.log_path else ""

    def stop(self) -> None:
        _kill_group(self.proc)


# ------------------------------------------------------------------------------------ Orthanc
class OrthancPeer(Peer):
    def __init__(self, server, workdir: Path):
        super().__init__("orthanc", server.aet, server.dicom_port, workdir,
                         log_path=server.workdir / "orthanc.log")
        self.server = server
        # Orthanc logs each C-MOVE request only at verbose level: switch it on at run time
        server.rest("PUT", "/tools/log-level", b"verbose")

    def load(self, files) -> None:
        for p in files:
            self.server.upload(Path(p))
            self.loaded[sop_uid_of(Path(p))] = Path(p)

    def held(self) -> set[str]:
        rows = self.server.rest("GET", "/instances?expand")
        return {r["MainDicomTags"]["SOPInstanceUID"] for r in rows}  # type: ignore[union-attr]

    def move_requests(self) -> int:
        return len(re.findall(r"Move-SCU request received", self.log_text()))

    def stop(self) -> None:
        self.server.stop(kill=True)


# ------------------------------------------------------------------------------------ dcmqrscp
# dcmqrscp (3.6.7) sends every instance of a SOP class in the FIRST accepted presentation context of
# that class, whatever the instance's own syntax, and it can transcode only among the uncompressed
# syntaxes (plus JPEG/RLE encoding): it cannot pick per instance. So the compressed-capable archive
# is configured like a PACS that archives compressed: per class, the archive syntax is proposed
# first (uncompressed after it), and what is loaded is stored in that syntax (see load()).
ARCHIVE_SYNTAX = {
    "1.2.840.10008.5.1.4.1.1.1": "1.2.840.10008.1.2.4.90",  # CR -> JPEG 2000 lossless
    "1.2.840.10008.5.1.4.1.1.1.1": "1.2.840.10008.1.2.4.90",  # DX for presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1": "1.2.840.10008.1.2.4.90",  # DX for processing
    "1.2.840.10008.5.1.4.1.1.7": "1.2.840.10008.1.2.4.70",  # Secondary Capture -> JPEG lossless SV1
    "1.2.840.10008.5.1.4.1.1.6.1": "1.2.840.10008.1.2.4.70",  # US
}
_UNCOMPRESSED = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")


def _assoc_profile() -> str:
    """The -xf association profile of dcmqrscp-compressed: In = Q/R (incoming), Out = storage."""
    lines = ["[[TransferSyntaxes]]", "[Uncompressed]"]
    lines += [f"TransferSyntax{i} = {uid}" for i, uid in enumerate(_UNCOMPRESSED, 1)]
    archive = sorted(set(ARCHIVE_SYNTAX.values()))
    for i, uid in enumerate(archive):
        lines += [f"[Archive{i}]", f"TransferSyntax1 = {uid}"]
    lines += ["", "[[PresentationContexts]]", "[StorageOut]"]
    n = 0
    for cls, uid in ARCHIVE_SYNTAX.items():
        for ts_name in (f"Archive{archive.index(uid)}", "Uncompressed"):
            n += 1
            lines.append(f"PresentationContext{n} = {cls}\\{ts_name}")
    lines += ["[QRIn]"]
    qr = ["VerificationSOPClass", "FINDStudyRootQueryRetrieveInformationModel",
          "MOVEStudyRootQueryRetrieveInformationModel", "GETStudyRootQueryRetrieveInformationModel",
          "FINDPatientRootQueryRetrieveInformationModel", "MOVEPatientRootQueryRetrieveInformationModel",
          "GETPatientRootQueryRetrieveInformationModel"]
    for i, cls in enumerate(qr, 1):
        lines.append(f"PresentationContext{i} = {cls}\\Uncompressed")
    # C-GET sends on the incoming association: accept each storage class in its archive syntax only
    # (an acceptor lists a class once), with the SCP role our C-GET proposes
    for i, (cls, uid) in enumerate(ARCHIVE_SYNTAX.items(), len(qr) + 1):
        lines.append(f"PresentationContext{i} = {cls}\\Archive{archive.index(uid)}")
    lines += ["", "[[SCPSCURoleSelection]]", "[GetRoles]"]
    lines += [f"Role{i} = {cls}\\BOTH" for i, cls in enumerate(ARCHIVE_SYNTAX, 1)]
    lines += ["", "[[Profiles]]", "[In]", "PresentationContexts = QRIn", "SCPSCURoleSelection = GetRoles",
              "[Out]", "PresentationContexts = StorageOut", ""]
    return "\n".join(lines)


def to_archive_syntax(src: Path, dst: Path) -> None:
    """Write `src` to `dst` in its class's archive syntax (lossless; as is when already there)."""
    ds = dcmread(src)
    want = ARCHIVE_SYNTAX.get(str(ds.SOPClassUID))
    if want is None:
        raise PeerError(f"dcmqrscp-compressed has no archive syntax for SOP class {ds.SOPClassUID}")
    if str(ds.file_meta.TransferSyntaxUID) == want:
        shutil.copyfile(src, dst)
        return
    if str(ds.file_meta.TransferSyntaxUID) not in _UNCOMPRESSED:
        raise PeerError(f"{src.name}: cannot re-encode {ds.file_meta.TransferSyntaxUID} as {want}")
    ds.compress(want, generate_instance_uid=False)  # lossless, through pylibjpeg-openjpeg
    ds.save_as(dst, enforce_file_format=True)


class DcmqrscpPeer(Peer):
    OPTIONS = {
        "dcmqrscp": [],
        "dcmqrscp-strict": ["-XF", "-XM", "--require-find"],
        "dcmqrscp-compressed": [],  # + the -xf profile (start())
    }

    def __init__(self, kind: str, workdir: Path, our_ae: tuple[str, int], ae_title: str = "DCMQRSCP"):
        super().__init__(kind, ae_title, free_port(), workdir, log_path=workdir / "dcmqrscp.log")
        self.our_ae = our_ae
        self.storage = workdir / "storage"

    def config(self) -> str:
        our_title, our_port = self.our_ae
        return (f"NetworkTCPPort = {self.port}\nMaxPDUSize = 131072\nMaxAssociations = 16\n\n"
                f"HostTable BEGIN\nradcohort = ({our_title}, 127.0.0.1, {our_port})\n"
                f"loader = (LOADER, 127.0.0.1, 104)\n"
                f"HostTable END\n\nVendorTable BEGIN\nVendorTable END\n\n"
                f"AETable BEGIN\n{self.ae_title} {self.storage} RW (200, 1024mb) ANY\nAETable END\n")

    def start(self) -> "DcmqrscpPeer":
        return _on_free_port(self, self._start)

    def _start(self) -> "DcmqrscpPeer":
        self.storage.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "dcmqrscp.cfg"
        cfg.write_text(self.config())
        args = [dcmtk_binary("dcmqrscp"), "-c", str(cfg), "-dhl", "-v", *self.OPTIONS[self.kind]]
        if self.kind == "dcmqrscp-compressed":
            prof = self.workdir / "assoc.cfg"
            prof.write_text(_assoc_profile())
            args += ["-xf", str(prof), "In", "Out"]
        args.append(str(self.port))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, cwd=self.workdir)
        wait_listening(self.port, self.proc, self.log_path)
        return self

    def load(self, files) -> None:
        """Copy into the storage area (dcmqrscp-compressed: in the class's archive syntax) and index
        with dcmqridx (which, unlike a C-STORE to dcmqrscp, takes compressed instances)."""
        dst = []
        for p in files:
            p = Path(p)
            uid = sop_uid_of(p)
            target = self.storage / f"{uid}.dcm"
            if self.kind == "dcmqrscp-compressed":
                to_archive_syntax(p, target)
            else:
                shutil.copyfile(p, target)
            dst.append(str(target))
            self.loaded[uid] = p
        if dst:
            r = subprocess.run([dcmtk_binary("dcmqridx"), str(self.storage), *dst], capture_output=True, text=True)
            if r.returncode != 0:
                raise PeerError(f"dcmqridx failed: {r.stderr[-2000:]}")

    def held(self) -> set[str]:
        return {sop_uid_of(p) for p in self.storage.glob("*.dcm")}

    def move_requests(self) -> int:
        return len(re.findall(r"Received Move (?:Request|SCP)", self.log_text()))


# ------------------------------------------------------------------------------------ qrscp
class QrscpPeer(Peer):
    def __init__(self, workdir: Path, our_ae: tuple[str, int], ae_title: str = "QRSCP"):
        super().__init__("qrscp", ae_title, free_port(), workdir, log_path=workdir / "qrscp.log")
        self.our_ae = our_ae
        self.db = workdir / "instances.sqlite"

    def start(self) -> "QrscpPeer":
        return _on_free_port(self, self._start)

    def _start(self) -> "QrscpPeer":
        our_title, our_port = self.our_ae
        ini = self.workdir / "qrscp.ini"
        self.workdir.mkdir(parents=True, exist_ok=True)
        # absolute paths: qrscp joins relative ones to its own package directory
        ini.write_text(
            "[DEFAULT]\n"
            f"    ae_title: {self.ae_title}\n    port: {self.port}\n    max_pdu: 0\n"
            "    acse_timeout: 30\n    dimse_timeout: 30\n    network_timeout: 30\n    bind_address: 127.0.0.1\n"
            f"    instance_location: {self.workdir / 'instances'}\n    database_location: {self.db}\n"
            # identifiers may carry patient keys: keep them out of the peer's log
            "    log_identifier: False\n\n"
            f"[{our_title}]\n    address: 127.0.0.1\n    port: {our_port}\n")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "pynetdicom", "qrscp", "-c", str(ini), "-ll", "info"],
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, cwd=self.workdir)
        wait_listening(self.port, self.proc, self.log_path, timeout=30)
        return self

    def load(self, files) -> None:
        files = [Path(p) for p in files]
        c_store(files, self.ae_title, self.port)
        for p in files:
            self.loaded[sop_uid_of(p)] = p

    def held(self) -> set[str]:
        with sqlite3.connect(self.db) as conn:
            return {r[0] for r in conn.execute("SELECT sop_instance_uid FROM instance")}

    def move_requests(self) -> int:
        return len(re.findall(r"Received C-MOVE request", self.log_text()))


def _on_free_port(peer: Peer, start):
    """Start; when another process took the picked port between the pick and the peer's bind (an
    outgoing connection's ephemeral port, say), pick another and start again (3 tries)."""
    for attempt in range(3):
        try:
            return start()
        except PeerError as exc:
            if "Address already in use" not in str(exc) or attempt == 2:
                raise
            peer.port = free_port()
    raise AssertionError("unreachable")


def start_peer(kind: str, workdir: Path, our_ae: tuple[str, int], orthanc_factory=None) -> Peer:
    """Start a peer of `kind` that knows our AE (title, port) on 127.0.0.1 as a move destination."""
    workdir.mkdir(parents=True, exist_ok=True)
    if kind == "orthanc":
        if orthanc_factory is None:
            raise PeerError("an orthanc peer needs the orthanc_factory fixture")
        title, port = our_ae
        return OrthancPeer(orthanc_factory(modalities={"radcohort": (title, "127.0.0.1", port)}), workdir)
    if kind.startswith("dcmqrscp"):
        return DcmqrscpPeer(kind, workdir, our_ae).start()
    if kind == "qrscp":
        return QrscpPeer(workdir, our_ae).start()
    raise ValueError(f"unknown peer kind {kind!r}")
