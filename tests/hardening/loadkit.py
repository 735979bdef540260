"""Load helpers shared by tests/hardening/test_load.py and bench/bench_load.py.

Senders are real: dcmtk `storescu` processes and pynetdicom associations in their own processes
(so the senders' GIL is not the bottleneck being measured). The SCP is `radcohort scp` as a process;
its memory is read from /proc (VmRSS sampled, VmHWM at the end) over its whole process tree.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.uid import generate_uid

CR = "1.2.840.10008.5.1.4.1.1.1"
ROOT = Path(__file__).resolve().parents[2]
RADCOHORT = str(Path(sys.executable).with_name("radcohort"))


def dcmtk(tool: str) -> str:
    """A dcmtk tool by absolute path: pynetdicom installs its own `storescu` into the venv."""
    for d in ("/usr/bin", "/usr/local/bin", "/bin"):
        if Path(d, tool).is_file():
            return str(Path(d, tool))
    return tool


def write_instances(outdir: Path, n: int, *, size: int = 64, prefix: str = "LD") -> list[tuple[Path, str]]:
    """n small CR chest PA files, one patient each, 20s and 60s, F and M (xr10's C20F..C60M)."""
    from tests.dicom.helpers import make_cr

    outdir.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        ds = make_cr(patient_id=f"{prefix}{i:06d}", patient_name=f"Load^{i}", study_date="20120315",
                     body_part="CHEST", study_description="CHEST PA", series_description="PA", seed=i % 50,
                     accession=f"{prefix}{i}")
        ds.PatientSex = "F" if i % 2 else "M"
        ds.PatientBirthDate = "19880101" if (i // 2) % 2 else "19480101"
        ds.ViewPosition = "PA"
        if size != 64:
            import numpy as np

            ds.Rows = ds.Columns = size
            ds.PixelData = np.random.default_rng(i).integers(0, 4096, (size, size), dtype=np.uint16).tobytes()
        p = outdir / f"{i:06d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        out.append((p, ds.SOPInstanceUID))
    return out


def _pynetdicom_sender(port: int, aet: str, paths: list[str], q) -> None:
    from pynetdicom import AE

    ae = AE(aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    ae.add_requested_context(CR, "1.2.840.10008.1.2.1")
    statuses: list[int | None] = []
    assoc = ae.associate("127.0.0.1", port, ae_title="RADCOHORT")
    if assoc.is_established:
        for p in paths:
            rsp = assoc.send_c_store(p)
            statuses.append(int(rsp.Status) if "Status" in rsp else None)
        assoc.release()
    q.put(("pynetdicom", statuses + [None] * (len(paths) - len(statuses))))


def _storescu_sender(port: int, aet: str, paths: list[str], q) -> None:
    # -v prints one "Received Store Response (Success)" per accepted instance
    r = subprocess.run([dcmtk("storescu"), "-v", "-aet", aet, "-aec", "RADCOHORT", "-to", "120", "-ta", "120",
                        "-td", "120", "127.0.0.1", str(port), *paths], capture_output=True, text=True)
    ok = (r.stdout + r.stderr).count("Received Store Response (Success)")
    q.put(("storescu", [0] * ok + [None] * (len(paths) - ok)))


@dataclass
class SendResult:
    seconds: float
    statuses: list[int | None] = field(default_factory=list)
    by_kind: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> int:
        return sum(1 for s in self.statuses if s == 0)


def send_concurrently(port: int, paths: list[Path], senders: int = 16, aet: str = "LOADER",
                      dcmtk_share: float = 0.5) -> SendResult:
    """Split paths over `senders` concurrent associations (dcmtk_share of them storescu)."""
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    shares = [[str(p) for p in paths[i::senders]] for i in range(senders)]
    n_dcmtk = round(senders * dcmtk_share)
    procs = [ctx.Process(target=_storescu_sender if i < n_dcmtk else _pynetdicom_sender,
                         args=(port, aet, share, q)) for i, share in enumerate(shares)]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    res = SendResult(0.0)
    for _ in procs:
        kind, st = q.get(timeout=900)
        res.statuses += st
        res.by_kind[kind] = res.by_kind.get(kind, 0) + sum(1 for s in st if s == 0)
    res.seconds = time.perf_counter() - t0
    for p in procs:
        p.join(30)
    return res


# ----------------------------------------------------------------------------- the SCP as a process
def tree_pids(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            kids = []
        todo += [int(k) for k in kids]
    return out


def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class ScpProcess:
    """`radcohort scp` with a sampler of its tree's RSS (sum over processes, MB)."""

    def __init__(self, env: dict, port: int, args: list[str] = ()):
        self.env, self.port, self.args = env, port, list(args)
        self.peak_rss_mb = 0.0
        self.baseline_rss_mb = 0.0
        self._stop = threading.Event()

    def rss_mb(self) -> float:
        return sum(_status_kb(p, "VmRSS") for p in tree_pids(self.proc.pid)) / 1024

    def hwm_mb(self) -> float:
        return sum(_status_kb(p, "VmHWM") for p in tree_pids(self.proc.pid)) / 1024

    def __enter__(self) -> "ScpProcess":
        self.proc = subprocess.Popen([RADCOHORT, "scp", *self.args], env=self.env, cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, self.proc.stdout.read()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the SCP never listened"
                time.sleep(0.2)
        time.sleep(0.5)
        self.baseline_rss_mb = self.rss_mb()
        threading.Thread(target=self._sample, daemon=True).start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_rss_mb = max(self.peak_rss_mb, self.rss_mb())
            time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.peak_rss_mb = max(self.peak_rss_mb, self.hwm_mb())
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.output = self.proc.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.output = self.proc.communicate()[0]


def sender_ctx(settings, name: str = "loader", ae_title: str = "LOADER"):
    """A migrated AppContext whose index knows one sending AE (the SCP accepts configured nodes only)."""
    from app.context import AppContext
    from app.db.base import session_scope
    from app.db.migrate import upgrade
    from app.db.models import PacsNode

    upgrade(settings.database_url)
    ctx = AppContext.build(settings)
    with session_scope(ctx.sessions) as s:
        s.add(PacsNode(name=name, ae_title=ae_title, host="127.0.0.1", port=104))
    return ctx


def scp_env(settings) -> dict:
    return {**os.environ, "RADCOHORT_DATABASE_URL": settings.database_url,
            "RADCOHORT_DATA_DIR": str(settings.data_dir), "RADCOHORT_SCP_PORT": str(settings.scp_port),
            "RADCOHORT_PSEUDONYM_KEY": "load-key", "RADCOHORT_LOG_LEVEL": "WARNING"}


def check_store(ctx, uids: set[str]) -> dict:
    """All of `uids` stored once and indexed once; no temp or partial files. Returns the figures."""
    from sqlalchemy import func, select

    from app.db.models import Instance
    from app.store import file_meta_end, parse_header

    store = ctx.settings.store_dir
    finals = [p for p in store.rglob("*.dcm") if not any(x.startswith(".") for x in p.relative_to(store).parts)]
    others = [p for p in store.rglob("*") if p.is_file() and p not in set(finals)]
    with ctx.sessions() as s:
        rows = s.scalar(select(func.count()).select_from(Instance))
        distinct = s.scalar(select(func.count(func.distinct(Instance.sop_instance_uid))))
        indexed = set(s.scalars(select(Instance.sop_instance_uid)))
    partial = 0
    for p in finals:
        with open(p, "rb") as f:
            off = file_meta_end(f)
        try:
            parse_header(p, "1.2.840.10008.1.2.1", off)
        except Exception:  # noqa: BLE001
            partial += 1
    return {"files": len(finals), "distinct_files": len({p.stem for p in finals}), "rows": rows,
            "distinct_rows": distinct, "missing": len(uids - indexed), "stray_files": len(others),
            "partial_files": partial}


def new_uid() -> str:
    return generate_uid()


# ----------------------------------------------------------------------------- API under concurrent jobs
class ServeProcess:
    """`radcohort serve` (API + SCP in one process) on settings' ports."""

    def __init__(self, env: dict, api_port: int):
        self.env, self.api_port = {**env, "RADCOHORT_API_PORT": str(api_port)}, api_port
        self.base = f"http://127.0.0.1:{api_port}"

    def __enter__(self) -> "ServeProcess":
        import httpx

        Path(self.env["RADCOHORT_DATA_DIR"]).mkdir(parents=True, exist_ok=True)
        self.log = open(Path(self.env["RADCOHORT_DATA_DIR"]) / "serve.log", "w")
        self.proc = subprocess.Popen([RADCOHORT, "serve"], env=self.env, cwd=ROOT, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, "radcohort serve exited"
            try:
                if httpx.get(self.base + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the API never answered"
            time.sleep(0.3)

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def log_text(self) -> str:
        return (Path(self.env["RADCOHORT_DATA_DIR"]) / "serve.log").read_text(errors="replace")


def seed_orthanc(orthanc, outdir: Path, dates: list[str], series: int, per_series: int) -> dict[str, set[str]]:
    """One study per date pushed to Orthanc by storescu; returns date -> SOP UIDs."""
    from tests.dicom.helpers import make_studies

    studies = make_studies(outdir, dates, series_per_study=series, instances_per_series=per_series,
                           patient_prefix="RT")
    files = sorted(str(p) for p in outdir.iterdir())
    r = subprocess.run([dcmtk("storescu"), "-aec", orthanc.aet, "127.0.0.1", str(orthanc.dicom_port), *files],
                       capture_output=True, text=True)
    assert r.returncode == 0 and orthanc.instance_count() == len(files), r.stderr[-2000:]
    return {st.study_date: set(st.sop_uids) for st in studies}


def api_under_jobs(base: str, node: str, dates: list[str], cohort_bodies: list[dict], readers: int = 4,
                   timeout: float = 600, min_seconds: float = 0.0) -> dict:
    """Start one retrieval per date and the cohort builds at once while `readers` threads read the API.

    Returns request counts, failures (any non-2xx or transport error), the retrievals' final
    reports, the cohorts' answers, and read latencies.
    """
    import httpx

    failures: list[str] = []
    latencies: list[float] = []
    lock = threading.Lock()
    done = threading.Event()
    counts = {"requests": 0}

    def call(client, method, path, **kw):
        t0 = time.perf_counter()
        try:
            r = client.request(method, path, **kw)
        except httpx.HTTPError as exc:
            with lock:
                counts["requests"] += 1
                failures.append(f"{method} {path}: {type(exc).__name__}")
            return None
        with lock:
            counts["requests"] += 1
            if method == "GET":
                latencies.append(time.perf_counter() - t0)
            if r.status_code >= 400:
                failures.append(f"{method} {path}: {r.status_code} {r.text[:200]}")
        return r

    def reader(k: int):
        paths = ["/api/v1/instances?limit=50&offset=%d", "/api/v1/stats", "/api/v1/retrievals", "/api/v1/cohorts",
                 "/api/v1/instances?label_body_part=CHEST&limit=20&offset=%d", "/api/v1/audit?limit=20"]
        with httpx.Client(base_url=base, timeout=120) as c:
            i = k
            while not done.is_set():
                p = paths[i % len(paths)]
                call(c, "GET", p % (i % 100) if "%d" in p else p)
                i += 1

    cohorts: list = [None] * len(cohort_bodies)

    def build(j: int):
        with httpx.Client(base_url=base, timeout=timeout) as c:
            r = call(c, "POST", "/api/v1/cohorts", json=cohort_bodies[j])
            cohorts[j] = (r.status_code, r.json()) if r is not None else None

    threads = [threading.Thread(target=reader, args=(k,), daemon=True) for k in range(readers)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    with httpx.Client(base_url=base, timeout=120) as c:
        ids = []
        builders = [threading.Thread(target=build, args=(j,)) for j in range(len(cohort_bodies))]
        for j, d in enumerate(dates):
            r = call(c, "POST", "/api/v1/retrievals", json={"node": node, "query": {"StudyDate": d}})
            ids.append(r.json()["id"] if r is not None and r.status_code == 202 else None)
            if j < len(builders):
                builders[j].start()
        for b in builders[len(dates):]:
            b.start()
        reports = {}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(reports) < len([i for i in ids if i]):
            for rid in ids:
                if rid and rid not in reports:
                    r = call(c, "GET", f"/api/v1/retrievals/{rid}")
                    if r is not None and r.status_code == 200 and r.json()["status"] not in ("queued", "running"):
                        reports[rid] = r.json()
            time.sleep(0.3)
        for b in builders:
            b.join(timeout)
        while time.perf_counter() - t0 < min_seconds:  # reads alone for a baseline
            time.sleep(0.1)
    seconds = time.perf_counter() - t0
    done.set()
    for t in threads:
        t.join(60)
    latencies.sort()
    def pct(q: float) -> float | None:
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000, 1) if latencies else None

    return {"seconds": round(seconds, 2), "requests": counts["requests"], "failures": failures,
            "retrievals": [reports.get(i) for i in ids], "cohorts": cohorts, "reads": len(latencies),
            "read_p50_ms": pct(0.5), "read_p95_ms": pct(0.95), "read_max_ms": pct(1.0)}


def write_big(path: Path, mb: int) -> str:
    """A CR of about `mb` MB written in chunks (the writer never holds the pixels); returns its SOP UID."""
    import struct

    from pydicom.filewriter import dcmwrite

    from tests.dicom.helpers import make_cr

    ds = make_cr(patient_id="BIG", seed=1)
    del ds.PixelData
    side = int((mb * 2**20 / 2) ** 0.5)
    ds.Rows = ds.Columns = side
    dcmwrite(path, ds, enforce_file_format=True)
    n = side * side * 2
    chunk = os.urandom(4 * 2**20)
    with open(path, "ab") as f:
        f.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, n))
        left = n
        while left:
            k = min(left, len(chunk))
            f.write(chunk[:k])
            left -= k
    return ds.SOPInstanceUID


def storescu(port: int, paths: list[Path], aet: str = "LOADER") -> tuple[int, float]:
    """Send files with dcmtk storescu (streams from disk); returns (successes, seconds)."""
    t0 = time.perf_counter()
    r = subprocess.run([dcmtk("storescu"), "-v", "-aet", aet, "-aec", "RADCOHORT", "-to", "300", "-ta", "300", "-td", "300",
                        "127.0.0.1", str(port), *map(str, paths)], capture_output=True, text=True)
    return (r.stdout + r.stderr).count("Received Store Response (Success)"), time.perf_counter() - t0
