"""Predictions: the warm predictor's latency vs the old cold subprocess, and batch scoring's throughput vs
bare decode + forward, all in the same run on the same machine.

    .venv/bin/python bench/bench_predict.py                      # 1,000 x 2.6 MB CR, resnet18 at 256 px
    .venv/bin/python bench/bench_predict.py --n 100 --requests 20 --repeat 1

Setup: n CR radiographs of 1,275 x 1,020 x 16 bit (2.6 MB, explicit VR LE, bench_scp.make_instances),
indexed with labels into a fresh SQLite database; a resnet18 checkpoint at 256 px (10 classes, seeded
random weights: speed does not depend on what the weights learned) registered as a model whose classes
cover the images' body part.

1. Latency of `POST /api/v1/models/{id}/predict` to `radcohort serve --no-scp` over HTTP (upload,
   DICOM checks, domain check, audit row, the warm predictor process) vs
   - cold: the old path, `python -m models.predict_cli RUN_DIR FILE` (a new interpreter importing torch
     and loading the model for every request);
   - floor: decode + forward of the same file inside one process (`Classifier.predict_file`).
   Target: warm <= 200 ms per image on CPU.
2. Throughput of a scoring job run by the real worker code (`Worker.run(once=True)`, as `radcohort worker`
   does: claim, child process, keyset reads of the index, pooled decode, batched forward, bulk writes) vs
   bare decode + forward: the same files decoded by a pool of as many processes (all cores), then the same
   model on the same device in batches of the same size, no database, no job; once one phase after the
   other and once overlapped (batches classified as decoded images come back, as the job does). Each runs
   `--repeat` times, alternately with the job; each keeps its best, and the job is compared with the
   better bare way. The job's figure is end to end (claim to completed,
   the child's interpreter, torch import and model load included) and steady (its own images/s, from its
   first page to its last write). Target: >= 0.8x.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from models.cache import default_workers  # noqa: E402
from models.preprocess import preprocess_file  # noqa: E402


def _decode(path: str, size: int):
    return preprocess_file(path, size)[0]


def _decode_task(args):
    return _decode(*args)


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def setup(work: Path, n: int, image_size: int, arch: str):
    """Settings, context, store files indexed with labels, a registered model: (settings, ctx, model_id, files)."""
    import torch
    from bench_scp import make_instances

    from app.config import Settings
    from app.context import AppContext
    from app.db.base import session_scope
    from app.db.migrate import upgrade
    from app.db.models import Cohort, TrainedModel, TrainingJob
    from app.labels.service import load_labeler
    from app.index.ingest import index_directory
    from models.registry import build_model

    s = Settings(data_dir=work / "data", database_url=f"sqlite:///{work / 'rc.db'}", pseudonym_key="bench",
                 _env_file=None)
    upgrade(s.database_url)
    ctx = AppContext.build(s)
    src = s.store_dir / "bench"
    t0 = time.perf_counter()
    make_instances(src, n, studies=max(1, n // 4))
    res = index_directory(ctx, src, labeler=load_labeler(ctx.sessions, s.label_rules))
    print(f"setup: {n} files of {next(src.iterdir()).stat().st_size / 1e6:.1f} MB written and {res.inserted} indexed "
          f"in {time.perf_counter() - t0:.0f} s")
    torch.manual_seed(0)
    classes = [f"C{i}" for i in range(10)]
    net = build_model(arch, len(classes))
    with session_scope(ctx.sessions) as ss:
        cohort = Cohort(taxonomy_name="bench", taxonomy={"name": "bench", "classes": [
            {"name": c, "where": {"body_part": "CHEST"}} for c in classes]}, summary={})
        ss.add(cohort)
        ss.flush()
        job = TrainingJob(cohort_id=cohort.id, status="completed", params={}, metrics={})
        ss.add(job)
        ss.flush()
        rd = s.runs_dir / f"job-{job.id}"
        rd.mkdir(parents=True)
        torch.save({"model": net.state_dict(), "classes": classes, "arch": {"model": arch, "depth": None},
                    "image_size": image_size, "normalize": {"mean": 0.5, "std": 0.25}}, rd / "model.pt")
        m = TrainedModel(job_id=job.id, architecture=arch, classes=classes, path=f"runs/job-{job.id}/model.pt",
                         card={"cohort_id": cohort.id})
        ss.add(m)
        ss.flush()
        mid = m.id
    return s, ctx, mid, sorted(src.iterdir())


def bench_latency(s, ctx, mid: int, files: list[Path], requests: int, cold_runs: int) -> dict:
    import httpx

    from app.devtools.orthanc import free_port
    from models.predict import Classifier

    run_dir = s.runs_dir / "job-1"
    # cold: the old path, a new interpreter per request
    cold = []
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for f in files[:cold_runs]:
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "models.predict_cli", str(run_dir), str(f)], cwd=ROOT, env=env,
                           capture_output=True, text=True)
        cold.append(time.perf_counter() - t0)
        assert r.returncode == 0, r.stdout + r.stderr
    # floor: decode + forward in this process, timed alternately with the warm requests (same load)
    clf = Classifier(run_dir / "model.pt")
    clf.warm_up()
    # warm, through HTTP: `radcohort serve --no-scp` in its own process, as deployed
    port = free_port()
    env = {**os.environ, "RADCOHORT_DATABASE_URL": s.database_url, "RADCOHORT_DATA_DIR": str(s.data_dir),
           "RADCOHORT_PSEUDONYM_KEY": "bench", "RADCOHORT_LOG_LEVEL": "WARNING", "PYTHONPATH": str(ROOT)}
    log = (s.data_dir / "serve.log").open("wb")
    server = subprocess.Popen([sys.executable, "-c", "from app.cli import main; main()", "serve", "--no-scp",
                               "--port", str(port)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    url = f"{base}/api/v1/models/{mid}/predict"
    warm, floor, first = [], [], None
    try:
        with httpx.Client(timeout=600) as client:
            end = time.monotonic() + 120
            while True:
                try:
                    if client.get(f"{base}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > end or server.poll() is not None:
                    raise RuntimeError(f"the API did not start: {(s.data_dir / 'serve.log').read_text()[-2000:]}")
                time.sleep(0.2)
            for i in range(requests + 1):
                f = files[i % len(files)]
                data = f.read_bytes()
                t0 = time.perf_counter()
                r = client.post(url, files={"file": (f.name, data, "application/dicom")})
                dt = time.perf_counter() - t0
                assert r.status_code == 200 and r.json()["in_domain"] is True, r.text
                if first is None:
                    first = dt
                    continue
                warm.append(dt)
                t0 = time.perf_counter()
                clf.predict_file(f)
                floor.append(time.perf_counter() - t0)
    finally:
        server.terminate()
        server.wait(60)
        log.close()
    return {"cold": cold, "first": first, "warm": warm, "floor": floor}


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) a live process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def bare_throughput(pool, files: list[Path], clf, batch: int, overlapped: bool) -> tuple[float, float]:
    """(images/s, CPU s per image) of decoding every file with the pool and classifying them in batches: one
    phase after the other, or (overlapped) batches classified as the pool hands decoded images back."""
    import numpy as np

    tasks = [(str(f), clf.image_size) for f in files]
    chunk = max(1, min(16, len(files) // (pool._processes * 4)))
    workers = [p.pid for p in pool._pool]
    cpu0 = time.process_time() + sum(_proc_cpu(p) for p in workers)
    t0 = time.perf_counter()
    if overlapped:
        buf = []
        for img in pool.imap(_decode_task, tasks, chunksize=chunk):
            buf.append(img)
            if len(buf) == batch:
                clf.probabilities(np.stack(buf))
                buf = []
        if buf:
            clf.probabilities(np.stack(buf))
    else:
        stack = np.stack(pool.map(_decode_task, tasks, chunksize=chunk))
        for i in range(0, len(stack), batch):
            clf.probabilities(stack[i:i + batch])
    dt = time.perf_counter() - t0
    cpu = time.process_time() + sum(_proc_cpu(p) for p in workers) - cpu0
    return len(files) / dt, cpu / len(files)


def job_throughput(ctx, mid: int, batch: int) -> tuple[float, int, float, float]:
    """One scoring job through the worker: (seconds end to end, images, the job's own images/s, CPU s per image
    of the worker, its child and the child's decode processes)."""
    from app.db.base import session_scope
    from app.db.models import ScoringJob
    from app.training import scoring
    from app.training.worker import Worker

    with session_scope(ctx.sessions) as ss:
        jid = scoring.create_job(ss, ctx.settings, mid, "bench", batch_size=batch).id
    worker = Worker(ctx, say=lambda _t: None)  # the defaults of `radcohort worker` (a heartbeat a second)
    worker._caps = {"queues": ["training", "scoring"]}  # skip listing timm's registry: not what is measured
    worker._publish(force=True)
    cpu0 = time.process_time() + _children_cpu()
    t0 = time.perf_counter()
    outcome = worker.run_one()
    dt = time.perf_counter() - t0
    cpu = time.process_time() + _children_cpu() - cpu0
    with session_scope(ctx.sessions) as ss:
        job = ss.get(ScoringJob, jid)
        assert outcome is not None and outcome.status == "completed", (outcome, job.error)
        return dt, job.done, float(job.progress.get("images_per_second") or 0), cpu / max(job.done, 1)


def report_latency(lat: dict) -> None:
    cold, warm, floor = (statistics.median(lat[k]) for k in ("cold", "warm", "floor"))
    print("\n== per-image latency (2.6 MB CR, one request at a time)")
    print(f"cold subprocess per request (old): median {cold * 1000:7.0f} ms over {len(lat['cold'])}")
    print(f"first request (starts the predictor): {lat['first'] * 1000:7.0f} ms")
    print(f"warm POST /predict over HTTP:        median {warm * 1000:7.1f} ms, p95 "
          f"{percentile(lat['warm'], 95) * 1000:.1f} ms over {len(lat['warm'])}")
    print(f"floor (decode + forward in-process): median {floor * 1000:7.1f} ms")
    print(f"ratios: cold / warm = {cold / warm:.0f}x faster; warm / floor = {warm / floor:.2f} "
          f"(API, upload and process hop overhead); target warm <= 200 ms: "
          f"{'met' if warm <= 0.2 else 'NOT met'}")


def report_scoring(s, ctx, mid: int, files: list[Path], pool, device: str, batch: int, repeat: int) -> None:
    from models.predict import Classifier

    clf = Classifier(s.runs_dir / "job-1" / "model.pt", device)
    clf.warm_up()
    seq, ovl, job = [], [], []
    for r in range(repeat):
        seq.append(bare_throughput(pool, files, clf, batch, overlapped=False))
        ovl.append(bare_throughput(pool, files, clf, batch, overlapped=True))
        dt, n, steady, cpu = job_throughput(ctx, mid, batch)
        job.append((n / dt, steady, cpu))
        ratio = job[-1][0] / max(seq[-1][0], ovl[-1][0])
        print(f"  run {r + 1}: bare {seq[-1][0]:.1f} img/s one phase after the other ({seq[-1][1] * 1000:.0f} ms "
              f"CPU/img), {ovl[-1][0]:.1f} overlapped ({ovl[-1][1] * 1000:.0f}); job {job[-1][0]:.1f} img/s end to "
              f"end ({steady:.1f} steady, {cpu * 1000:.0f} ms CPU/img); this run {ratio:.2f}x")
    b1, b2 = max(x[0] for x in seq), max(x[0] for x in ovl)
    b = max(b1, b2)
    e2e, steady = max(j[0] for j in job), max(j[1] for j in job)
    bare_cpu, job_cpu = min(x[1] for x in seq + ovl), min(j[2] for j in job)
    print(f"\n== scoring throughput ({len(files)} images, best of {repeat})")
    print(f"bare decode + forward: {b1:.1f} img/s one phase after the other, {b2:.1f} img/s overlapped")
    print(f"scoring job end to end: {e2e:.1f} img/s = {e2e / b:.2f}x the better bare; steady: {steady:.1f} img/s "
          f"= {steady / b:.2f}x (target >= 0.8x: {'met' if e2e / b >= 0.8 else 'NOT met'} end to end)")
    print(f"CPU per image (steadier than wall time on a shared machine): bare {bare_cpu * 1000:.0f} ms, job "
          f"{job_cpu * 1000:.0f} ms (child start, torch import and model load included) = {bare_cpu / job_cpu:.2f}x "
          "the bare efficiency")



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="radiographs indexed and scored")
    ap.add_argument("--requests", type=int, default=30, help="warm predictions timed")
    ap.add_argument("--cold", type=int, default=3, help="cold subprocess predictions timed")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each throughput side (best kept)")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=None, help="default: 256 on CUDA, 32 on CPU (the job's default)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--part", choices=("all", "latency", "scoring"), default="all")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()

    # torch's OpenMP threads sleep rather than spin here too, as in the predictor and scoring processes (set
    # before torch is imported): the floor and the bare side get the same runtime as what they are compared with
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # the bare side's decode pool is forked before torch is imported, as the scoring child does
    workers = default_workers()
    pool = mp.get_context("fork").Pool(workers)
    import torch

    from models.predict import pick_device

    device = str(pick_device(args.device))
    batch = args.batch or (256 if device.startswith("cuda") else 32)
    (ROOT / ".bench").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="predict-", dir=ROOT / ".bench"))
    try:
        s, ctx, mid, files = setup(work, args.n, args.image_size, args.model)
        print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads, "
              f"device {device}; {args.model} at {args.image_size} px, batch {batch}, {workers} decode processes")

        if args.part != "scoring":
            load = os.getloadavg()[0]
            report_latency(bench_latency(s, ctx, mid, files, args.requests, args.cold))
            print(f"load average (1 min) {load:.1f} before, {os.getloadavg()[0]:.1f} after")
        if args.part != "latency":
            load = os.getloadavg()[0]
            report_scoring(s, ctx, mid, files, pool, device, batch, args.repeat)
            print(f"load average (1 min) {load:.1f} before, {os.getloadavg()[0]:.1f} after")
        ctx.close()
    finally:
        pool.terminate()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")


if __name__ == "__main__":
    main()
