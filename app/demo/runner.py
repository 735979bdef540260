"""Set up the demo world, run the REST flow, print the results, and stop every process started.

Layout under the demo dir (default ./.demo, ignored by git); everything expensive is kept and reused:
  synth-<key>/      the synthetic PACS content (`radcohort synth`), generated once per parameter set
  orthanc-<key>/    Orthanc's storage and log, seeded once (`radcohort seed`)
  radcohort-<key>/  RADCOHORT_DATA_DIR (store, cache, runs) and the SQLite database
  logs/             one log per process and step
  summary.json      the last run's results
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from app.demo.flow import FlowOptions, FlowResult, run_flow
from app.demo.processes import DemoError, Managed, run_step
from app.demo.report import summary
from app.devtools.orthanc import OrthancServer, free_port


@dataclass
class DemoOptions:
    demo_dir: Path = Path(".demo")
    per_class: int = 60                 # synthetic patients per class
    header_error_rate: float = 0.05     # wrong/missing header labels in the synthetic PACS
    synth_size: str = "small"           # `radcohort synth --size`: small = 1/8 of the detector (CPU-friendly)
    synth_args: list[str] = field(default_factory=list)  # extra `radcohort synth` options
    seed: int = 0
    epochs: int | None = None           # None: chosen for the device (CPU small, CUDA the study's)
    image_size: int | None = None
    model: str | None = None
    batch_size: int | None = None
    lr: float | None = None
    experiments: list[str] | None = None
    device: str = "auto"
    retrieve_method: str = "move"
    keep_running: bool = False
    fresh: bool = False                 # forget radcohort's DB/store (the PACS content is kept)
    retrieval_timeout: float = 600.0
    training_timeout: float = 1800.0
    say: Callable[[str], None] = print


@dataclass
class DemoResult:
    flow: FlowResult
    report_path: Path | None
    summary_path: Path
    timings: dict[str, float]


def cuda_available() -> bool:
    """Whether the worker will find a GPU (asked in a child so the demo process stays torch-free)."""
    import subprocess

    try:
        out = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                             capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.stdout.strip() == "True"


def training_params(opts: DemoOptions, cuda: bool) -> dict:
    """The job body: small and fast on a 2-core CPU, the study's settings on a GPU."""
    if cuda:
        base = {"model": "resnet18", "epochs": 30, "image_size": 256, "experiments": ["rotate90", "scale10"]}
    else:
        # ~360 training images and a 2-3 minute budget: a higher learning rate, and no rotation. The
        # study's +-10/20/30 degree rotations (tens of thousands of images, 30 GPU epochs) leave this
        # small model underfit here (confidences ~0.6, one-way L/R confusions); shift/scale/intensity
        # jitter stay. rotate90 and scale10 are left to the GPU settings.
        base = {"model": "resnet10t", "epochs": 40, "image_size": 96, "batch_size": 16, "lr": 0.003,
                "augment": {"rotation": []}, "experiments": []}
    for key in ("model", "epochs", "image_size", "batch_size", "lr", "experiments"):
        value = getattr(opts, key)
        if value is not None:
            base[key] = value
    if opts.device != "auto":
        base["device"] = opts.device
    return base


def radcohort_argv(*args: str) -> list[str]:
    """`radcohort ...` from this interpreter's environment."""
    script = Path(sys.executable).with_name("radcohort")
    if script.exists():
        return [str(script), *args]
    found = shutil.which("radcohort")
    if found:
        return [found, *args]
    return [sys.executable, "-c", "import sys; from app.cli import main; sys.argv[0] = 'radcohort'; main()", *args]


def synth_code_fingerprint() -> str:
    """Hash of the generator's source (app/synth/*.py): the pixels and headers it writes depend on it."""
    import app.synth

    h = hashlib.sha256()
    for path in sorted(Path(app.synth.__file__).parent.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def _key(opts: DemoOptions, synth_code: str | None = None) -> str:
    # The generator's code is part of the key: reusing content written by an older generator (weaker
    # L/R cues, markers elsewhere) silently trained the demo on stale phantoms.
    synth_code = synth_code_fingerprint() if synth_code is None else synth_code
    raw = json.dumps([opts.per_class, opts.header_error_rate, opts.seed, opts.synth_size, opts.synth_args, synth_code])
    return f"n{opts.per_class}-" + hashlib.sha256(raw.encode()).hexdigest()[:8]


def _count_dicom(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*.dcm"))


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def child_env(base: dict[str, str], data_dir: Path, db_url: str, api_port: int, scp_port: int) -> dict[str, str]:
    """The demo's radcohort processes: embedded defaults (SQLite, local files) under the demo dir."""
    env = {k: v for k, v in base.items() if not k.startswith("RADCOHORT_")
           or k in ("RADCOHORT_API_TOKENS", "RADCOHORT_AE_TITLE", "RADCOHORT_LOG_LEVEL", "RADCOHORT_PSEUDONYM_KEY")}
    env.update(RADCOHORT_DATA_DIR=str(data_dir), RADCOHORT_DATABASE_URL=db_url,
               RADCOHORT_API_HOST="127.0.0.1", RADCOHORT_API_PORT=str(api_port),
               RADCOHORT_SCP_HOST="127.0.0.1", RADCOHORT_SCP_PORT=str(scp_port), PYTHONUNBUFFERED="1")
    return env


def run_demo(opts: DemoOptions, after: Callable[[httpx.Client, FlowResult], None] | None = None) -> DemoResult:
    """The whole demo. `after(client, result)` runs while the services are still up (used by the e2e test)."""
    say = opts.say
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    t_start = time.monotonic()
    timings: dict[str, float] = {}
    demo = opts.demo_dir.resolve()
    logs = demo / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    key = _key(opts)
    # radcohort's own state is keyed too: a different synthetic PACS must not mix into the old index
    synth_dir, orthanc_dir, rc_dir = demo / f"synth-{key}", demo / f"orthanc-{key}", demo / f"radcohort-{key}"
    if opts.fresh and rc_dir.exists():
        shutil.rmtree(rc_dir)
    data_dir = rc_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    db_url = f"sqlite:///{rc_dir / 'radcohort.db'}"
    api_port, scp_port = free_port(), free_port()
    while scp_port == api_port:
        scp_port = free_port()
    env = child_env(dict(os.environ), data_dir, db_url, api_port, scp_port)
    ae_title = env.get("RADCOHORT_AE_TITLE") or "RADCOHORT"

    started: list[Managed] = []
    orthanc = OrthancServer(orthanc_dir, modalities={"radcohort": (ae_title, "127.0.0.1", scp_port)})
    in_main = threading.current_thread() is threading.main_thread()
    previous_term = signal.getsignal(signal.SIGTERM) if in_main else None

    def _on_term(signum, frame):  # a `kill` of the demo still stops what it started
        raise KeyboardInterrupt

    if previous_term is not None:
        signal.signal(signal.SIGTERM, _on_term)
    try:
        # 1. the synthetic PACS content, generated once
        t = time.monotonic()
        done = synth_dir / ".complete"
        if done.exists():
            say(f"synthetic PACS content: reusing {synth_dir} ({_count_dicom(synth_dir)} instances)")
        else:
            if synth_dir.exists():
                shutil.rmtree(synth_dir)  # an interrupted earlier run: start that step over
            say(f"generating the synthetic 10-class PACS: {opts.per_class} images per class -> {synth_dir}")
            run_step("radcohort synth", radcohort_argv(
                "synth", "--per-class", str(opts.per_class), "--out", str(synth_dir), "--seed", str(opts.seed),
                "--taxonomy", "xr10", "--header-error-rate", str(opts.header_error_rate), "--size", opts.synth_size,
                *opts.synth_args),
                env, demo, logs / "synth.log", timeout=1800)
            done.write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
            say(f"  {_count_dicom(synth_dir)} instances in {time.monotonic() - t:.0f} s")
        timings["synth"] = time.monotonic() - t
        n_files = _count_dicom(synth_dir)

        # 2. Orthanc on free loopback ports (config from orthanc/), seeded once
        t = time.monotonic()
        orthanc.start(timeout=60)
        say(f"Orthanc {orthanc.aet} on DICOM port {orthanc.dicom_port}, HTTP {orthanc.url}")
        have = orthanc.instance_count()
        if have >= n_files:
            say(f"Orthanc already holds {have} instances: not seeding again")
        else:
            say(f"seeding Orthanc with {n_files} instances (C-STORE)")
            run_step("radcohort seed", radcohort_argv(
                "seed", "--host", "127.0.0.1", "--port", str(orthanc.dicom_port), "--aet", orthanc.aet,
                str(synth_dir)), env, demo, logs / "seed.log", timeout=1800)
            have = orthanc.instance_count()
            if have < n_files:
                raise DemoError(f"seeding left Orthanc with {have} of {n_files} instances; see {logs / 'seed.log'}")
        timings["pacs"] = time.monotonic() - t

        # 3. radcohort: schema, API + SCP, worker
        t = time.monotonic()
        run_step("radcohort db upgrade", radcohort_argv("db", "upgrade"), env, demo, logs / "db.log", timeout=300)
        serve = Managed("radcohort serve", radcohort_argv("serve"), env, demo, logs / "serve.log").start()
        started.append(serve)
        base_url = f"http://127.0.0.1:{api_port}"
        serve.wait_until(lambda: httpx.get(base_url + "/health", timeout=2).status_code == 200, 120, "API")
        serve.wait_until(lambda: _port_open(scp_port), 60, "Storage SCP")
        worker = Managed("radcohort worker", radcohort_argv("worker"), env, demo, logs / "worker.log").start()
        started.append(worker)
        say(f"radcohort API {base_url} (docs {base_url}/docs), SCP {ae_title}@127.0.0.1:{scp_port}, worker started")
        timings["start"] = time.monotonic() - t

        # 4. the flow, REST only
        cuda = opts.device.startswith("cuda") or (opts.device == "auto" and cuda_available())
        params = training_params(opts, cuda)
        say(f"training on {'CUDA' if cuda else 'CPU'}: {params}")
        headers = {}
        tokens = [x.strip() for x in (env.get("RADCOHORT_API_TOKENS") or "").split(",") if x.strip()]
        if tokens:
            headers["Authorization"] = f"Bearer {tokens[0]}"
        flow_opts = FlowOptions(pacs_aet=orthanc.aet, pacs_host="127.0.0.1", pacs_port=orthanc.dicom_port,
                                retrieve_method=opts.retrieve_method, training=params, seed=opts.seed,
                                retrieval_timeout=opts.retrieval_timeout, training_timeout=opts.training_timeout,
                                cancel_leftover_jobs=True)
        with httpx.Client(base_url=base_url, headers=headers, timeout=120) as client:
            def say_checked(msg: str) -> None:
                say(msg)
                worker.check_alive()
                serve.check_alive()

            result = run_flow(client, flow_opts, say=say_checked)
            timings.update({f"flow_{k}": v for k, v in result.timings.items()})

            # 5. results
            say("")
            say(summary(result.metrics))
            report_path = _find_report(data_dir, result.job.get("id"))
            say("")
            say(f"report: {report_path}" if report_path else "report: (none written by the training run)")
            say(f"        also GET {base_url}/api/v1/training-jobs/{result.job.get('id')}/report")
            timings["total"] = time.monotonic() - t_start
            summary_path = demo / "summary.json"
            summary_path.write_text(json.dumps({
                "timings_s": {k: round(v, 1) for k, v in timings.items()}, "training": params,
                "retrieval": result.retrieval, "cohort": result.cohort, "job": result.job,
                "metrics": result.metrics, "report_path": str(report_path) if report_path else None,
            }, indent=1, default=str))
            say(f"summary: {summary_path}; total {timings['total']:.0f} s "
                f"({', '.join(f'{k} {v:.0f} s' for k, v in timings.items() if k != 'total')})")
            if after is not None:
                after(client, result)
            if opts.keep_running:
                say(f"\nservices keep running: API {base_url}/docs, Orthanc {orthanc.url}; Ctrl-C stops them")
                try:
                    while True:
                        for p in started:
                            p.check_alive()
                        time.sleep(1)
                except KeyboardInterrupt:
                    say("stopping")
        return DemoResult(flow=result, report_path=report_path, summary_path=summary_path, timings=timings)
    except KeyboardInterrupt:
        say("interrupted: stopping what the demo started")
        raise
    finally:
        for p in reversed(started):
            p.stop()
        orthanc.stop()
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)


def _find_report(data_dir: Path, job_id) -> Path | None:
    """The training run's report (runs/job-<id>/report.md|html), if it wrote one."""
    runs = data_dir / "runs"
    for name in ("report.md", "report.html"):
        direct = runs / f"job-{job_id}" / name
        if direct.exists():
            return direct
    found = sorted(runs.glob(f"*{job_id}*/report.*")) if runs.exists() else []
    return found[0] if found else None
