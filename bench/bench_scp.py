"""Storage SCP throughput: C-MOVE from a test Orthanc into our SCP vs the textbook pynetdicom SCP
(decode event.dataset + save_as) and dcmtk storescp, same run, same Orthanc, same instances.

    .venv/bin/python bench/bench_scp.py --n 400          # issue 2's benchmark (1275x1020 16-bit CR)
    .venv/bin/python bench/bench_scp.py --n 60 --moves 2 --processes 2
    .venv/bin/python bench/bench_scp.py --n 400 --studies 20 --retrieval-only   # issue 16's target

`--retrieval-only`: one radcohort retrieval (hierarchical verified listing, then the study units over
`--moves` concurrent C-MOVEs into `radcohort scp --processes N`) against the textbook SCP receiving the
same instances over one C-MOVE, and a discard-only receiver fed by the same number of concurrent moves.

Prints instances/s, MB/s and ratios. Our SCP runs as `radcohort scp` (fsync per file, index row
committed before Success; variants without fsync / without chunked receive); the baselines
neither fsync nor index. The discard-only receiver shows what Orthanc can send on this machine.
Between receivers the previous one's files are removed and written back (`os.sync`), so that no
receiver's fsyncs wait behind the dirty pages another one left.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.devtools.orthanc import OrthancServer, free_port  # noqa: E402

CR = "1.2.840.10008.5.1.4.1.1.1"
PY = sys.executable
RADCOHORT = str(Path(PY).with_name("radcohort"))

TEXTBOOK = textwrap.dedent("""
    import sys
    from pynetdicom import AE, evt, AllStoragePresentationContexts
    from pynetdicom.sop_class import Verification
    out = sys.argv[2]
    def handle(event):
        ds = event.dataset
        ds.file_meta = event.file_meta
        ds.save_as(f"{out}/{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        return 0
    ae = AE("TEXTBOOK")
    ae.supported_contexts = AllStoragePresentationContexts
    ae.add_supported_context(Verification)
    ae.start_server(("127.0.0.1", int(sys.argv[1])), evt_handlers=[(evt.EVT_C_STORE, handle)])
""")


NULL = textwrap.dedent("""
    import sys
    from pynetdicom import AE, evt, AllStoragePresentationContexts
    ae = AE("NULLSCP")
    ae.maximum_pdu_size = 0
    ae.supported_contexts = AllStoragePresentationContexts
    ae.start_server(("127.0.0.1", int(sys.argv[1])), evt_handlers=[(evt.EVT_C_STORE, lambda e: 0)])
""")


def make_instances(outdir: Path, n: int, studies: int, rows: int = 1275, cols: int = 1020) -> list[str]:
    """n CR instances (16-bit, explicit VR LE) in `studies` studies; returns the study UIDs."""
    outdir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = (np.add.outer(np.arange(rows), np.arange(cols)) * 3 % 4096).astype(np.uint16)
    study_uids = [generate_uid() for _ in range(studies)]
    series_uids = [generate_uid() for _ in range(studies)]
    for i in range(n):
        k = i % studies
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CR
        ds.SOPClassUID = CR
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientID, ds.PatientName, ds.PatientSex = f"BENCH{k}", f"Bench^{k}", "F"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uids[k], series_uids[k]
        ds.StudyDate, ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "20120101", "CR", "CHEST", "PA"
        ds.SeriesNumber, ds.InstanceNumber = 1, i + 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = rows, cols
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        noise = rng.integers(0, 64, (rows, cols), dtype=np.uint16)
        ds.PixelData = (base + noise).tobytes()
        ds.save_as(outdir / f"{i:05d}.dcm", enforce_file_format=True)
    return study_uids


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"port {port} did not open")


def seed(orthanc: OrthancServer, files: list[Path], parallel: int = 2) -> float:
    t = time.perf_counter()
    chunks = [files[i::parallel] for i in range(parallel)]
    procs = [subprocess.Popen(["storescu", "-aet", "BENCHSCU", "-aec", orthanc.aet, "127.0.0.1",
                               str(orthanc.dicom_port), *map(str, c)]) for c in chunks if c]
    for p in procs:
        if p.wait() != 0:
            raise RuntimeError("seeding Orthanc failed")
    return time.perf_counter() - t


def move_all(orthanc: OrthancServer, dest_aet: str, study_uids: list[str], concurrent: int) -> tuple[float, int]:
    """C-MOVE every study to dest_aet over `concurrent` parallel associations; (seconds, completed)."""
    completed = [0]
    lock = threading.Lock()
    errors: list[str] = []

    def worker(uids: list[str]) -> None:
        ae = AE("BENCHSCU")
        ae.dimse_timeout = ae.acse_timeout = ae.network_timeout = 600
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = ae.associate("127.0.0.1", orthanc.dicom_port, ae_title=orthanc.aet)
        if not assoc.is_established:
            errors.append("association to Orthanc failed")
            return
        for uid in uids:
            q = Dataset()
            q.QueryRetrieveLevel, q.StudyInstanceUID = "STUDY", uid
            last = None
            for status, _ in assoc.send_c_move(q, dest_aet, StudyRootQueryRetrieveInformationModelMove):
                if status:
                    last = status
            if last is None or last.Status not in (0x0000,):
                errors.append(f"move {uid}: status {getattr(last, 'Status', None)!r}")
            else:
                with lock:
                    completed[0] += int(last.get("NumberOfCompletedSuboperations", 0) or 0)
        assoc.release()

    parts = [study_uids[i::concurrent] for i in range(concurrent)]
    threads = [threading.Thread(target=worker, args=(p,)) for p in parts if p]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    dt = time.perf_counter() - t
    if errors:
        raise RuntimeError("; ".join(errors[:3]))
    return dt, completed[0]


def disk_write_rate(workdir: Path, size: int, n: int) -> float:
    """MB/s of writing n files of `size` bytes with fsync each (the ceiling for durable receiving)."""
    d = workdir / "disk-probe"
    d.mkdir()
    buf = os.urandom(size)
    t = time.perf_counter()
    for i in range(n):
        with open(d / f"{i}.bin", "wb") as f:
            f.write(buf)
            f.flush()
            os.fsync(f.fileno())
    dt = time.perf_counter() - t
    shutil.rmtree(d)
    return size * n / dt / 1e6


def count_files(d: Path) -> int:
    return sum(1 for p in d.rglob("*") if p.is_file() and not p.name.startswith(".") and p.suffix != ".db"
               and "-wal" not in p.name and "-shm" not in p.name)


def run_ours(work: Path, orthanc: OrthancServer, port: int, processes: int, db_url: str | None,
             study_uids: list[str], moves: int, fsync: bool = True, chunked: bool = False) -> tuple[float, int, int]:
    from sqlalchemy import create_engine, func, select, text

    from app.db.migrate import upgrade
    from app.db.models import Instance

    data = work / f"ours-{processes}-{int(fsync)}-{int(chunked)}"
    url = db_url or f"sqlite:///{data}/radcohort.db"
    upgrade(url)
    eng = create_engine(url)
    with eng.begin() as c:
        c.execute(text("INSERT INTO pacs_nodes (name, ae_title, host, port, retrieve_method, options, created_at) "
                       "VALUES ('orthanc', :aet, '127.0.0.1', :p, 'move', '{}', CURRENT_TIMESTAMP)"),
                  {"aet": orthanc.aet, "p": orthanc.dicom_port})
    env = dict(os.environ, RADCOHORT_DATABASE_URL=url, RADCOHORT_DATA_DIR=str(data), RADCOHORT_SCP_PORT=str(port),
               RADCOHORT_PSEUDONYM_KEY="bench", RADCOHORT_LOG_LEVEL="WARNING")
    proc = subprocess.Popen([RADCOHORT, "scp", "--processes", str(processes), "--fsync" if fsync else "--no-fsync",
                             "--chunked" if chunked else "--no-chunked"], env=env, cwd=work)
    try:
        wait_port(port)
        time.sleep(0.5)
        dt, done = move_all(orthanc, "RADCOHORT", study_uids, moves)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    with eng.connect() as c:
        rows = c.scalar(select(func.count()).select_from(Instance.__table__))
    eng.dispose()
    n = count_files(data / "store")
    settle(data)
    return dt, n, rows


def run_retrieval(work: Path, orthanc: OrthancServer, port: int, processes: int, moves: int) -> tuple[float, int, str]:
    """One radcohort retrieval of everything CR on the Orthanc, end to end (listing included), with the
    node's policy allowing `moves` associations; our SCP in its own processes. (seconds, received, status)"""
    from app.config import Settings
    from app.context import AppContext
    from app.db.migrate import upgrade
    from app.probe.service import probe_and_store
    from app.retrievals.nodes import create_node
    from app.retrievals.runner import run_retrieval
    from app.retrievals.schemas import NodeIn
    from app.retrievals.service import create_retrieval

    data = work / f"retrieval-{processes}-{moves}"
    settings = Settings(data_dir=data, database_url=f"sqlite:///{data}/radcohort.db", scp_port=port,
                        pseudonym_key="bench", arrival_timeout=30.0, _env_file=None)
    settings.ensure_dirs()
    upgrade(settings.database_url)
    ctx = AppContext.build(settings)
    with ctx.sessions() as s:
        node = create_node(s, NodeIn(name="orthanc", ae_title=orthanc.aet, host="127.0.0.1",
                                     port=orthanc.dicom_port, retrieve_method="move"), "bench")
        node.options = {"policy": {"max_associations": moves}}
        s.commit()
        # as a user would: the node probed once (what it honours, whether IMAGE level needs the series)
        probe_and_store(s, settings, node, "bench")
        node.options = {**(node.options or {}), "policy": {"max_associations": moves}}
        rid = create_retrieval(s, "orthanc", {"ModalitiesInStudy": "CR"}, "bench").id
        s.commit()
    env = dict(os.environ, RADCOHORT_DATABASE_URL=settings.database_url, RADCOHORT_DATA_DIR=str(data),
               RADCOHORT_SCP_PORT=str(port), RADCOHORT_PSEUDONYM_KEY="bench", RADCOHORT_LOG_LEVEL="WARNING")
    proc = subprocess.Popen([RADCOHORT, "scp", "--processes", str(processes)], env=env, cwd=work)
    try:
        wait_port(port)
        settle()
        time.sleep(0.5)
        t0 = time.perf_counter()
        r = run_retrieval(ctx, rid)
        dt = time.perf_counter() - t0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        ctx.close()
    rep = r.report or {}
    print(f"  retrieval report: {rep.get('finds')} C-FINDs in {rep.get('listing_s')} s, fetch {rep.get('fetch_s')} s "
          f"of {rep.get('elapsed_s')} s")
    return dt, r.received, r.status


def run_baseline(kind: str, work: Path, orthanc: OrthancServer, port: int, aet: str,
                 study_uids: list[str], moves: int) -> tuple[float, int]:
    out = work / kind
    out.mkdir()
    if kind == "textbook":
        cmd = [PY, "-c", TEXTBOOK, str(port), str(out)]
    elif kind == "null":
        cmd = [PY, "-c", NULL, str(port)]
    elif kind == "storescp":
        cmd = ["storescp", "-aet", aet, "+xa", "-od", str(out), "-uf", str(port)]
    else:  # storescp --fork: one process per association
        cmd = ["storescp", "--fork", "-aet", aet, "+xa", "-od", str(out), "-uf", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_port(port)
        dt, _ = move_all(orthanc, aet, study_uids, moves)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    n = count_files(out)
    settle(out)
    return dt, n


def settle(out: Path | None = None) -> None:
    """Remove a receiver's output and write back what it left dirty: a receiver that does not
    fsync leaves up to a gigabyte for the kernel to write in the next ~30 s, which would otherwise
    slow down the fsyncs of whichever receiver runs next."""
    if out is not None:
        shutil.rmtree(out, ignore_errors=True)
    os.sync()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=400, help="instances (default 400, ~2.5 MB each)")
    ap.add_argument("--studies", type=int, default=8, help="studies the instances are spread over")
    ap.add_argument("--moves", type=int, default=2, help="concurrent C-MOVE associations for every receiver")
    ap.add_argument("--processes", type=int, default=2, help="our SCP processes (also run with 1)")
    ap.add_argument("--db", default=None, help="our index DB URL (default: SQLite in the work dir)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--fork", action="store_true", help="also run storescp --fork")
    ap.add_argument("--retrieval-only", action="store_true",
                    help="only the one-retrieval comparison (textbook over 1 move, discard over --moves)")
    args = ap.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-scp-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        study_uids = make_instances(work / "src", args.n, min(args.studies, args.n))
        files = sorted((work / "src").glob("*.dcm"))
        mb = sum(f.stat().st_size for f in files) / 1e6
        print(f"generated {args.n} instances, {mb:.0f} MB ({mb / args.n:.2f} MB each) in {time.perf_counter() - t:.1f} s")
        ports = {k: free_port() for k in ("ours", "textbook", "storescp", "fork", "null")}
        mods = {"radcohort": ("RADCOHORT", "127.0.0.1", ports["ours"]),
                "textbook": ("TEXTBOOK", "127.0.0.1", ports["textbook"]),
                "storescp": ("STORESCP", "127.0.0.1", ports["storescp"]),
                "fork": ("STORESCPF", "127.0.0.1", ports["fork"]),
                "null": ("NULLSCP", "127.0.0.1", ports["null"]),
                "bench": ("BENCHSCU", "127.0.0.1", 1)}
        with OrthancServer(work / "orthanc", modalities=mods) as orthanc:
            print(f"seeded Orthanc in {seed(orthanc, files):.1f} s; it holds {orthanc.instance_count()} instances")
            settle()
            if args.retrieval_only:
                return _retrieval_comparison(args, work, orthanc, ports, study_uids, mb)
            results: list[tuple[str, float, int]] = []
            dt, n = run_baseline("textbook", work, orthanc, ports["textbook"], "TEXTBOOK", study_uids, args.moves)
            results.append(("textbook pynetdicom SCP (decode + save_as)", dt, n))
            dt, n = run_baseline("storescp", work, orthanc, ports["storescp"], "STORESCP", study_uids, args.moves)
            results.append(("dcmtk storescp", dt, n))
            if args.fork:
                dt, n = run_baseline("fork", work, orthanc, ports["fork"], "STORESCPF", study_uids, args.moves)
                results.append(("dcmtk storescp --fork", dt, n))
            # (processes, fsync, chunked); the CLI default is fsync + chunked
            variants = [(1, True, True), (args.processes, True, True), (args.processes, True, False),
                        (args.processes, False, True)]
            for procs, fsync, chunked in variants:
                url = _fresh_db(args.db)
                try:
                    dt, n, rows = run_ours(work, orthanc, ports["ours"], procs, url, study_uids, args.moves, fsync,
                                           chunked)
                finally:
                    _drop_db(url)
                results.append((f"radcohort scp -p {procs} ({'fsync' if fsync else 'no fsync'}"
                                f"{', chunked' if chunked else ''}, {rows} rows indexed)", dt, n))
            dt, _ = run_baseline("null", work, orthanc, ports["null"], "NULLSCP", study_uids, args.moves)
            results.append(("ceiling: pynetdicom SCP that discards (Orthanc+network)", dt, args.n))
        disk = disk_write_rate(work, int(mb * 1e6 / args.n), min(args.n, 100))
        base = {name: dt for name, dt, _ in results}
        tb, sc = base["textbook pynetdicom SCP (decode + save_as)"], base["dcmtk storescp"]
        print(f"\n{args.n} instances, {mb:.0f} MB, {args.moves} concurrent C-MOVE(s), {os.cpu_count()} CPUs")
        print(f"{'receiver':62s} {'s':>7s} {'inst/s':>8s} {'MB/s':>7s} {'x textbook':>10s} {'x storescp':>10s} ok")
        for name, dt, n in results:
            print(f"{name:62s} {dt:7.2f} {args.n / dt:8.1f} {mb / dt:7.1f} {tb / dt:10.2f} {sc / dt:10.2f} "
                  f"{'yes' if n == args.n else f'NO ({n})'}")
        print(f"disk write rate (one writer, fsync per file): {disk:.0f} MB/s")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def _retrieval_comparison(args, work: Path, orthanc: OrthancServer, ports: dict, study_uids: list[str],
                          mb: float) -> None:
    tb, n_tb = run_baseline("textbook", work, orthanc, ports["textbook"], "TEXTBOOK", study_uids, 1)
    null, _ = run_baseline("null", work, orthanc, ports["null"], "NULLSCP", study_uids, args.moves)
    ours, got, status = run_retrieval(work, orthanc, ports["ours"], args.processes, args.moves)
    print(f"\n{args.n} instances in {len(study_uids)} studies, {mb:.0f} MB, {os.cpu_count()} CPUs")
    for name, dt, n in (("textbook pynetdicom SCP, one C-MOVE", tb, n_tb),
                        (f"discard-only receiver, {args.moves} concurrent C-MOVEs", null, args.n),
                        (f"radcohort retrieval ({args.moves} lanes, scp -p {args.processes}, listing included, "
                         f"{status})", ours, got)):
        print(f"{name:72s} {dt:7.2f} s {args.n / dt:7.1f} inst/s {'ok' if n == args.n else f'NO ({n})'}")
    print(f"retrieval vs textbook: {tb / ours:.2f}x (target >= 3x); vs discard-only: {null / ours:.2f}x "
          f"(target >= 0.8x)")


def _fresh_db(url: str | None) -> str | None:
    """A PostgreSQL URL gets a fresh database per run (dropped after it)."""
    if not url or not url.startswith("postgresql"):
        return url
    from sqlalchemy import create_engine, text

    name = "bench_" + generate_uid().replace(".", "")[-12:]
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return url.rsplit("/", 1)[0] + "/" + name


def _drop_db(url: str | None) -> None:
    if not url or not url.startswith("postgresql"):
        return
    from sqlalchemy import create_engine, text

    base, name = url.rsplit("/", 1)
    admin = create_engine(base + "/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


if __name__ == "__main__":
    main()
