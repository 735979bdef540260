"""Faults: the SCP process SIGKILLed mid-transfer, a full disk (tmpfs), the database cut (TCP proxy).

Each runs the real component: `radcohort scp` as a process, a real tmpfs, real PostgreSQL behind a
proxy this test cuts and restores.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pynetdicom import AE
from sqlalchemy import func, select

from app.db.models import Instance, Retrieval
from app.dicom.scp import STATUS_SINK_FAILED, STATUS_WRITE_FAILED
from app.wiring import storage_scp
from app.store import parse_header
from tests.conftest import make_settings, tmpfs_mounted
from tests.dicom.helpers import CR_STORAGE, make_cr, wait_retrieval
from tests.hardening.loadkit import dcmtk, sender_ctx

RADCOHORT = str(Path(sys.executable).with_name("radcohort"))
SENDER = "SENDER"


def _count(ctx) -> int:
    with ctx.sessions() as s:
        return s.scalar(select(func.count()).select_from(Instance))


def big_cr(mb: int, seed: int = 1):
    ds = make_cr(seed=seed)
    side = int((mb * 2**20 / 2) ** 0.5)
    ds.Rows = ds.Columns = side
    ds.PixelData = os.urandom(side * side * 2)
    return ds


def send(port: int, datasets, timeout: float = 30) -> list[int | None]:
    """C-STORE each dataset; None where no response came (association aborted or connection lost)."""
    ae = AE(SENDER)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(CR_STORAGE, datasets[0].file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="RADCOHORT")
    if not assoc.is_established:
        return [None] * len(datasets)
    out: list[int | None] = []
    try:
        for d in datasets:
            if not assoc.is_established:
                out.append(None)
                continue
            rsp = assoc.send_c_store(d)
            out.append(int(rsp.Status) if "Status" in rsp else None)
    finally:
        if assoc.is_established:
            assoc.release()
    return out


def _start_scp(settings, chunked: bool) -> subprocess.Popen:
    env = {**os.environ, "RADCOHORT_DATABASE_URL": settings.database_url,
           "RADCOHORT_DATA_DIR": str(settings.data_dir), "RADCOHORT_SCP_PORT": str(settings.scp_port),
           "RADCOHORT_PSEUDONYM_KEY": "k"}
    # one process: the SIGKILL must hit the process that receives (with several, it hits the dispatcher)
    proc = subprocess.Popen([RADCOHORT, "scp", "--processes", "1", "--chunked" if chunked else "--no-chunked"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            with socket.create_connection(("127.0.0.1", settings.scp_port), timeout=0.5):
                return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("the SCP never listened")


def _complete(path: Path) -> bool:
    """A Part 10 file whose dataset (incl. pixel data length) is whole."""
    from app.store import file_meta_end
    from pydicom import dcmread

    with open(path, "rb") as f:
        off = file_meta_end(f)
    ts = dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    try:
        parse_header(path, ts, off)
        return True
    except Exception:  # noqa: BLE001
        return False


def _finals(store: Path) -> list[Path]:
    """Files under their final names (study/series/sop.dcm), not the .incoming or temp files."""
    return [p for p in store.rglob("*.dcm") if not any(part.startswith(".") for part in p.relative_to(store).parts)]


@pytest.mark.parametrize("chunked", [False, True], ids=["memory", "chunked"])
def test_scp_sigkilled_mid_transfer_leaves_no_partial_file_and_reindexes_nothing_twice(tmp_path, chunked):
    s = make_settings(tmp_path)
    ctx = sender_ctx(s, "sender", SENDER)
    small = [make_cr(seed=i) for i in range(20)]
    big = big_cr(96)
    proc = _start_scp(s, chunked)
    try:
        assert send(s.scp_port, small) == [0] * 20
        interrupted = 0
        # kill at several points of the receive/write, until two kills hit a transfer in flight (on a
        # loaded machine some land before the data flows or after the response)
        for delay in (0.1, 0.3, 0.6, 1.0, 0.05, 0.2, 0.45, 0.8, 0.15, 0.35):
            if interrupted >= 2:
                break
            result: list = []
            had_it = any(p.stem == big.SOPInstanceUID for p in _finals(s.store_dir))
            t = threading.Thread(target=lambda: result.append(send(s.scp_port, [big], timeout=20)))
            t.start()
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            t.join(30)
            finals = _finals(s.store_dir)
            assert all(_complete(p) for p in finals), "a partial file is visible under its final name"
            if result and result[0] != [0]:
                # killed before Success: the instance is not there, or it was there before (a resend
                # killed in flight leaves the stored copy as it was), or the kill fell between its
                # commit (fsync + rename) and the response - then it is whole (checked above), and a
                # resend is a duplicate that completes its index row (checked at the end)
                has_it = any(p.stem == big.SOPInstanceUID for p in finals)
                if had_it or not has_it:
                    interrupted += 1
            else:  # it made it before the kill: whole and indexed
                assert _count(ctx) == 21
            proc = _start_scp(s, chunked)
        assert interrupted >= 2, "the kills never hit a transfer in flight"
        # the restart removed leftovers; resending everything stores the big one and duplicates nothing
        leftovers = [p for p in s.store_dir.rglob("*") if p.is_file() and p not in _finals(s.store_dir)]
        assert leftovers == []
        assert send(s.scp_port, small + [big], timeout=60) == [0] * 21
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert _count(ctx) == 21 and len(_finals(s.store_dir)) == 21
    stored_big = next(p for p in _finals(s.store_dir) if p.stem == big.SOPInstanceUID)
    assert _complete(stored_big) and stored_big.stat().st_size > 95 * 2**20
    env = {**os.environ, "RADCOHORT_DATABASE_URL": s.database_url, "RADCOHORT_DATA_DIR": str(s.data_dir),
           "RADCOHORT_PSEUDONYM_KEY": "k"}
    out = subprocess.run([RADCOHORT, "reindex"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "indexed 0," in out.stdout, out.stdout + out.stderr
    assert _count(ctx) == 21
    ctx.close()


# ----------------------------------------------------------------------------- disk full
@pytest.fixture
def tiny_tmpfs(tmp_path):
    with tmpfs_mounted(tmp_path / "data" / "store", "2m") as mnt:
        yield mnt


def test_disk_full_answers_out_of_resources_never_success_and_recovers(tmp_path, tiny_tmpfs):
    s = make_settings(tmp_path, scp_min_free_mb=0)  # no reserve: the writes themselves hit ENOSPC
    assert s.store_dir == tiny_tmpfs
    ctx = sender_ctx(s, "sender", SENDER)
    scp = storage_scp(ctx).start()
    try:
        batch = [big_cr(1, seed=i) for i in range(6)]  # ~1 MB each into 2 MB
        statuses = send(scp.port, batch)
        assert STATUS_WRITE_FAILED in statuses and 0 in statuses, [hex(x) for x in statuses]
        with ctx.sessions() as sess:
            indexed = set(sess.scalars(select(Instance.sop_instance_uid)))
        on_disk = {p.stem for p in tiny_tmpfs.rglob("*.dcm")}
        for ds, st in zip(batch, statuses):
            assert st in (0, STATUS_WRITE_FAILED)
            if st == 0:
                assert ds.SOPInstanceUID in indexed and ds.SOPInstanceUID in on_disk
            else:
                assert ds.SOPInstanceUID not in indexed and ds.SOPInstanceUID not in on_disk
        assert all(_complete(p) for p in tiny_tmpfs.rglob("*.dcm"))
        assert not [p for p in tiny_tmpfs.rglob("*") if p.is_file() and p.suffix != ".dcm"], "temp files left"
        # space returns: the same SCP (never restarted) takes the resend
        subprocess.run(["mount", "-o", "remount,size=16m", str(tiny_tmpfs)], check=True)
        assert send(scp.port, batch) == [0] * 6
        assert _count(ctx) == 6
    finally:
        scp.stop()
        ctx.close()


# ----------------------------------------------------------------------------- database outage
class CuttableProxy:
    """A TCP proxy to PostgreSQL that can drop every connection and refuse new ones, then restore."""

    def __init__(self, target=("127.0.0.1", 5432)):
        self.target = target
        self.port = _free_port()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None

    def start(self) -> "CuttableProxy":
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()
        return self

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                c, _ = listener.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(self.target)
            except OSError:
                c.close()
                continue
            with self._lock:
                self._conns += [c, u]
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for x in (a, b):
                try:
                    x.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        if self._listener:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close alone does not
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    def restore(self) -> None:
        self.start()


def _free_port() -> int:
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        return sk.getsockname()[1]


@pytest.mark.postgres
def test_database_cut_gives_503_then_works_and_loses_no_job(tmp_path, pg_database):
    from fastapi.testclient import TestClient

    from app.api import create_app
    from app.db.models import Cohort

    proxy = CuttableProxy().start()
    url = pg_database.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    assert url != pg_database
    s = make_settings(tmp_path, url, dicom_timeout=5.0)
    ctx = sender_ctx(s, "sender", SENDER)  # migrated through the proxy
    with ctx.sessions() as sess:
        c = Cohort(taxonomy_name="t", taxonomy={"name": "t", "classes": [{"name": "A"}, {"name": "B"}]},
                   summary={"classes": [{"name": "A", "train": 1, "test": 1}, {"name": "B", "train": 1, "test": 1}]})
        sess.add(c)
        sess.commit()
        cid = c.id
    job = {"cohort_id": cid, "model": "resnet10t", "epochs": 1, "image_size": 32}
    scp = storage_scp(ctx).start()
    try:
        with TestClient(create_app(s, ctx)) as client:
            r = client.post("/api/v1/training-jobs", json=job)
            assert r.status_code == 202, r.text
            first = r.json()["id"]
            assert client.get("/api/v1/instances").status_code == 200
            queued = make_cr(seed=5)
            assert send(scp.port, [queued]) == [0]

            proxy.cut()
            for method, path, body in (("GET", "/api/v1/instances", None), ("GET", "/api/v1/training-jobs", None),
                                       ("POST", "/api/v1/training-jobs", job), ("GET", "/api/v1/stats", None)):
                r = client.request(method, path, json=body)
                assert r.status_code == 503, (path, r.status_code, r.text)
                assert "database" in r.json()["detail"]
            h = client.get("/health")
            assert h.status_code == 200 and h.json()["database"] is False
            # a C-STORE while the DB is gone: out of resources (or, once the 2 s node cache expires, the
            # association is refused: the node lookup fails closed), never Success
            lost = make_cr(seed=6)
            assert send(scp.port, [lost]) in ([STATUS_SINK_FAILED], [None])

            proxy.restore()
            deadline = time.monotonic() + 10
            while client.get("/health").json()["database"] is not True and time.monotonic() < deadline:
                time.sleep(0.2)
            assert client.get("/api/v1/instances").status_code == 200
            r = client.post("/api/v1/training-jobs", json=job)
            assert r.status_code == 202, r.text
            jobs = {j["id"]: j["status"] for j in client.get("/api/v1/training-jobs").json()["items"]}
            # the job queued before the outage is still queued, the one refused with 503 was never half-made
            assert jobs == {first: "queued", r.json()["id"]: "queued"}
            assert send(scp.port, [lost]) == [0]
            uids = {i["sop_instance_uid"] for i in client.get("/api/v1/instances").json()["items"]}
            assert uids == {queued.SOPInstanceUID, lost.SOPInstanceUID}
    finally:
        scp.stop()
        ctx.close()
        proxy.cut()


# ----------------------------------------------------------------------------- PACS killed mid-retrieval
@pytest.mark.orthanc
def test_pacs_killed_mid_retrieval_reports_exact_missing_then_retry_completes(tmp_path, ctx, orthanc):
    import numpy as np
    from fastapi.testclient import TestClient

    from app.api import create_app

    ctx.settings.arrival_timeout = 3.0
    ctx.settings.dicom_timeout = 5.0
    ctx.settings.dicom_retries = 0
    gen = tmp_path / "gen"
    gen.mkdir()
    uids = set()
    for st in range(2):
        study = f"1.2.826.0.1.3680043.10.777.{st}"
        for k in range(60):
            ds = make_cr(patient_id=f"K{st}", study_uid=study, series_uid=f"{study}.{k % 2}", seed=k)
            ds.Rows = ds.Columns = 512  # 512 KB each: long enough to be killed in the middle
            ds.PixelData = np.random.default_rng(k).integers(0, 4096, (512, 512), dtype=np.uint16).tobytes()
            ds.save_as(gen / f"{st}-{k}.dcm", enforce_file_format=True)
            uids.add(ds.SOPInstanceUID)
    r = subprocess.run([dcmtk("storescu"), "-aec", orthanc.aet, "127.0.0.1", str(orthanc.dicom_port),
                        *map(str, sorted(gen.iterdir()))], capture_output=True, text=True)
    assert r.returncode == 0 and orthanc.instance_count() == 120, r.stderr[-1000:]
    with TestClient(create_app(ctx.settings, ctx)) as client, storage_scp(ctx):
        assert client.post("/api/v1/pacs-nodes", json={"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1",
                                                        "port": orthanc.dicom_port}).status_code == 201
        rid = client.post("/api/v1/retrievals", json={"node": "pacs", "query": {"StudyDate": "20120315"}}).json()["id"]
        deadline = time.monotonic() + 60
        while _count(ctx) < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
        orthanc.stop(kill=True)  # the PACS dies with the C-MOVE association open
        rep = wait_retrieval(client, rid, timeout=120)
        with ctx.sessions() as s:
            indexed = set(s.scalars(select(Instance.sop_instance_uid)))
        assert 10 <= len(indexed) < 120, len(indexed)
        assert rep["status"] == "partial" and rep["expected"] == 120 and rep["error"], rep
        assert set(rep["missing"]) == uids - indexed, (len(rep["missing"]), len(uids - indexed))
        orthanc.start()
        assert client.post(f"/api/v1/retrievals/{rid}/retry").status_code in (200, 202)
        rep = wait_retrieval(client, rid, timeout=120)
        assert rep["status"] == "completed" and rep["missing"] == [], rep
    with ctx.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == 120
        assert set(s.scalars(select(Instance.sop_instance_uid))) == uids
    assert len(_finals(ctx.settings.store_dir)) == 120




def test_api_killed_mid_retrieval_its_successor_takes_over_and_completes(tmp_path, ctx, orthanc):
    """`radcohort serve` SIGKILLed while a retrieval runs: the next start takes it over once its lease
    is stale, fetches only what is missing, and nothing is stored or indexed twice."""
    import httpx

    from app.db.models import AuditEvent
    from app.retrievals.nodes import create_node
    from app.retrievals.schemas import NodeIn
    from tests.hardening.loadkit import ServeProcess, scp_env

    gen = tmp_path / "gen"
    gen.mkdir()
    study = "1.2.826.0.1.3680043.10.778.1"
    uids = set()
    for k in range(80):
        ds = make_cr(patient_id="TK1", study_uid=study, series_uid=f"{study}.1", study_date="20130101", seed=k)
        ds.Rows = ds.Columns = 32
        ds.PixelData = ds.PixelData[: 32 * 32 * 2]
        ds.save_as(gen / f"{k:03d}.dcm", enforce_file_format=True)
        uids.add(ds.SOPInstanceUID)
    r = subprocess.run([dcmtk("storescu"), "-aec", orthanc.aet, "127.0.0.1", str(orthanc.dicom_port),
                        *map(str, sorted(gen.iterdir()))], capture_output=True, text=True)
    assert r.returncode == 0 and orthanc.instance_count() == 80, r.stderr[-1000:]
    with ctx.sessions() as s:  # 300 instances a minute: the retrieval runs for about 16 s
        node = create_node(s, NodeIn(name="pacs", ae_title=orthanc.aet, host="127.0.0.1",
                                     port=orthanc.dicom_port), "test")
        node.options = {"policy": {"instances_per_minute": 300}}
        s.commit()
    env = {**scp_env(ctx.settings), "RADCOHORT_RETRIEVAL_HEARTBEAT_S": "0.5", "RADCOHORT_RETRIEVAL_STALE_S": "3"}
    port = _free_port()

    first = ServeProcess(env, port).__enter__()
    try:
        rid = httpx.post(first.base + "/api/v1/retrievals",
                         json={"node": "pacs", "query": {"StudyDate": "20130101"}}).json()["id"]
        deadline = time.monotonic() + 60
        while _count(ctx) < 15:
            assert time.monotonic() < deadline, first.log_text()[-3000:]
            time.sleep(0.05)
    finally:
        first.proc.kill()
        first.proc.wait()
        first.log.close()
    at_kill = _count(ctx)
    assert at_kill < 80
    with ctx.sessions() as s:
        assert s.get(Retrieval, rid).status == "running"

    with ServeProcess(env, port) as second:
        deadline = time.monotonic() + 120
        while True:
            rep = httpx.get(f"{second.base}/api/v1/retrievals/{rid}").json()
            if rep["status"] not in ("queued", "running", "paused"):
                break
            assert time.monotonic() < deadline, (rep, second.log_text()[-3000:])
            time.sleep(0.2)
    assert rep["status"] == "completed" and rep["missing"] == [], rep
    # what the killed run brought before the kill is this job's work too: received, not skipped
    assert (rep["expected"], rep["skipped"], rep["received"]) == (80, 0, 80), rep
    with ctx.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == 80
        assert set(s.scalars(select(Instance.sop_instance_uid))) == uids
        assert s.get(Retrieval, rid).runner_id is None
        assert s.scalar(select(func.count()).select_from(AuditEvent)
                        .where(AuditEvent.action == "retrieval.takeover", AuditEvent.target == str(rid))) == 1
    assert len(_finals(ctx.settings.store_dir)) == 80
