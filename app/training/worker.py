"""The worker loop: claim a job -> write spec.json -> run `models.run` in a child -> report -> repeat.

The training itself runs in a child process (or under torchrun for several GPUs), so a crash or an
out-of-memory kill there never takes the worker down, and the worker never holds CUDA state. The child
dies with the worker (PR_SET_PDEATHSIG, plus a sweep for leftovers of a killed worker); a job whose
worker vanished is reclaimed after its heartbeat goes stale and resumes from the run's checkpoint.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.exc import OperationalError

from app.context import AppContext
from app.db.base import session_scope
from app.training import jobs, workers
from app.training.artifacts import (ProgressTail, code_version, error_text, read_json, run_finished,
                                    write_json_atomic)

log = logging.getLogger("radcohort.worker")

PROJECT_ROOT = Path(__file__).resolve().parents[2]
EXIT_CANCELLED = 3
PR_SET_PDEATHSIG = 1
MARK_ENV = "RADCOHORT_RUN_MARK"  # set on the child; inherited by torchrun's ranks, found again in /proc


def detect_nproc(settings) -> int:
    """Processes per job: settings.worker_gpus, else every visible GPU (torch imported only for this)."""
    if settings.worker_gpus:
        return max(1, int(settings.worker_gpus))
    try:
        import torch
    except ImportError:
        return 1
    return max(1, torch.cuda.device_count())


def launch_command(spec_path: Path, nproc: int, module: str = "models.run") -> list[str]:
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                "-m", module, str(spec_path)]
    return [sys.executable, "-m", module, str(spec_path)]


def _die_with_parent(sig: int):
    parent = os.getpid()

    def preexec() -> None:
        # the child gets `sig` when the worker dies, even by SIGKILL (Linux; no-op elsewhere)
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
        except OSError:
            return
        if os.getppid() != parent:  # the worker died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)
    return preexec


def kill_marked(mark: str) -> int:
    """SIGKILL processes on this host that carry our run mark (orphans of a killed worker). Returns count."""
    needle = f"{MARK_ENV}={mark}".encode() + b"\0"
    killed = 0
    for entry in Path("/proc").glob("[0-9]*"):
        pid = int(entry.name)
        if pid == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes()
        except OSError:
            continue  # gone, or not ours to read
        if needle in env:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except OSError:
                pass
    return killed


def capabilities(queues: list[str] | None = None) -> dict:
    """What this worker offers, published in the workers table (the API validates requests against it):
    the queues it serves (training and scoring, plus the job queues of app.jobs it runs alongside)."""
    from app import __version__

    caps: dict = {"queues": list(dict.fromkeys([*(queues or ()), *workers.QUEUES])), "version": __version__}
    try:
        import timm

        from models.registry import DEPTH_PRESETS, _register

        _register()
        caps["models"] = sorted(set(timm.list_models()) | set(DEPTH_PRESETS.values()))
        caps["depth_presets"] = {str(k): v for k, v in DEPTH_PRESETS.items()}
        import torch

        caps["device"] = f"cuda x{torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
    except ImportError as exc:  # the [worker] extra is missing: alive, but it cannot train
        caps["models"] = []
        caps["error"] = f"{exc}: pip install -e '.[worker]'"
    return caps


def epoch_text(job_id: int, ev: dict) -> str:
    """One console line per epoch event."""
    parts = [f"training job {job_id}: epoch {ev.get('epoch')}/{ev.get('epochs')}"]
    if ev.get("loss") is not None:
        parts.append(f"loss {float(ev['loss']):.4f}")
    for key, label in (("train_accuracy", "train acc"), ("val_accuracy", "val acc")):
        if ev.get(key) is not None:
            parts.append(f"{label} {float(ev[key]):.1f}%")
    if ev.get("images_per_second"):
        parts.append(f"{float(ev['images_per_second']):.0f} img/s")
    return "  ".join(parts)


@dataclass
class Outcome:
    job_id: int
    status: str  # completed | failed | cancelled | released | lost
    kind: str = "training"  # or "scoring" (app.training.score_run)


class Worker:
    """One worker process's loop over the shared queue."""

    def __init__(self, ctx: AppContext, *, poll: float | None = None, stale_after: float = 60.0,
                 max_attempts: int = jobs.DEFAULT_MAX_ATTEMPTS, nproc: int | None = None,
                 module: str = "models.run", tick: float = 1.0, cancel_grace: float = 60.0,
                 stop_grace: float = 30.0, worker_id: str | None = None, say=None,
                 queues: list[str] | None = None):
        self.ctx = ctx
        self.say = say or log.info  # the console: claims, epochs, ends and failures
        self.settings = ctx.settings
        self.poll = poll if poll is not None else self.settings.worker_poll_seconds
        self.stale_after = stale_after
        self.max_attempts = max_attempts
        self._nproc = nproc
        self.module = module
        self.tick = tick
        self.cancel_grace = cancel_grace
        self.stop_grace = stop_grace
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.stopping = threading.Event()
        self.queues = queues  # published with the capabilities (app.jobs queues run by this process too)
        self._caps: dict | None = None
        self._said: set[int] = set()
        self._beat_at = 0.0

    # ------------------------------------------------------------ loop
    def stop(self, *_args) -> None:
        """Ask the loop to stop: a running child is stopped and its job goes back to the queue."""
        self.stopping.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def run(self, once: bool = False) -> list[Outcome]:
        """Claim and run jobs until stopped (or, with once, until the queue is empty)."""
        outcomes: list[Outcome] = []
        self._caps = capabilities(self.queues)
        self._publish(force=True)
        log.info("worker %s polling every %.1f s", self.worker_id, self.poll)
        try:
            while not self.stopping.is_set():
                try:
                    self._publish()
                    outcome = self.run_one()
                except OperationalError as exc:
                    log.warning("database unavailable (%s); retrying", type(exc).__name__)
                    outcome = None
                if outcome is not None:
                    outcomes.append(outcome)
                    continue
                if once:
                    break
                self.stopping.wait(self.poll)
        finally:
            try:
                with session_scope(self.ctx.sessions) as s:
                    workers.unregister(s, self.worker_id)
            except OperationalError:
                pass  # the row goes stale by itself
        return outcomes

    def _publish(self, force: bool = False, every: float = 5.0) -> None:
        """Heartbeat this worker's row (at most every `every` s); re-register when the row is gone."""
        now = time.monotonic()
        if not force and now - self._beat_at < every:
            return
        self._beat_at = now
        try:
            with session_scope(self.ctx.sessions) as s:
                if force or not workers.heartbeat(s, self.worker_id):
                    workers.register(s, self.worker_id, socket.gethostname(), os.getpid(),
                                     self._caps if self._caps is not None else capabilities(self.queues))
        except OperationalError as exc:
            log.warning("worker heartbeat not recorded (%s)", type(exc).__name__)

    def run_one(self) -> Outcome | None:
        """Claim one job and run it to its end (training first, then scoring); None when nothing was claimable."""
        with session_scope(self.ctx.sessions) as s:
            job = jobs.claim_next(s, self.worker_id, stale_after=self.stale_after,
                                  max_attempts=self.max_attempts)
        if job is None:
            from app.training.score_run import run_next  # the second job kind, on the same claim/lease functions

            return run_next(self)
        self.say(f"training job {job.id}: claimed (attempt {job.attempts}, {self._describe(job)})")
        try:
            outcome = self._run_job(job)
            self._say_end(outcome)
            return outcome
        except OperationalError:
            # the DB went away: leave the job as it is; it turns stale and is reclaimed (and a finished
            # run is then reported from its files, not rerun)
            raise
        except Exception as exc:  # noqa: BLE001 - a worker bug must fail the job, not hang it
            log.exception("training job %d failed in the worker", job.id)
            with session_scope(self.ctx.sessions) as s:
                jobs.fail_job(s, job.id, self.worker_id, f"worker error: {type(exc).__name__}: {exc}")
            self.say(f"training job {job.id}: failed: worker error: {type(exc).__name__}: {exc}")
            return Outcome(job.id, "failed")

    @staticmethod
    def _describe(job) -> str:
        p = job.params or {}
        return ", ".join(f"{k} {p[k]}" for k in ("model", "depth", "epochs", "image_size", "batch_size")
                         if p.get(k) is not None)

    def _say_end(self, outcome: Outcome) -> None:
        text = f"training job {outcome.job_id}: {outcome.status}"
        if outcome.status in ("failed", "completed"):
            with session_scope(self.ctx.sessions) as s:
                job = jobs.get_job(s, outcome.job_id)
                if outcome.status == "failed" and job.error:
                    text += f": {job.error.strip().splitlines()[-1][:500]}"
                    if job.run_dir:
                        text += f" (log: {job.run_dir}/worker.log)"
                elif outcome.status == "completed" and job.metrics:
                    text += f": overall accuracy {float(job.metrics.get('overall_accuracy') or 0):.1f}%"
        self.say(text)

    # ------------------------------------------------------------ one job
    def _run_job(self, job) -> Outcome:
        # absolute: the run's child works in the project root, not where a relative DATA_DIR (./data) points
        rd = jobs.run_dir(self.settings, job.id).resolve()
        rd.mkdir(parents=True, exist_ok=True)
        mark = str(rd.resolve())
        if kill_marked(mark):  # a previous worker of this job died and left its ranks behind
            log.warning("job %d: killed leftover processes of an earlier attempt", job.id)
            time.sleep(0.5)
        with session_scope(self.ctx.sessions) as s:
            spec, missing = jobs.build_spec(s, self.settings, job, code_version())
        if missing:
            with session_scope(self.ctx.sessions) as s:
                jobs.record_progress(s, job, self.worker_id, missing)
        spec_path = rd / "spec.json"
        write_json_atomic(spec_path, spec)
        with session_scope(self.ctx.sessions) as s:
            jobs.set_run_dir(s, job.id, self.worker_id, str(rd))

        if run_finished(rd):  # the last attempt finished training but died before reporting it
            log.info("job %d: run already finished, reporting it", job.id)
            self._drain(job, ProgressTail(rd / "progress.jsonl"))
            return self._finish(job, rd, spec, 0, cancelled=False)

        for stale in ("CANCEL", "error.txt"):
            (rd / stale).unlink(missing_ok=True)
        nproc = self._nproc or detect_nproc(self.settings)
        cmd = launch_command(spec_path, nproc, self.module)
        env = {**os.environ, MARK_ENV: mark, "RADCOHORT_WORKER_PID": str(os.getpid()),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}
        # torchrun must get SIGTERM (it then stops its ranks); a plain run can be killed outright
        deathsig = signal.SIGTERM if nproc > 1 else signal.SIGKILL
        with (rd / "worker.log").open("ab") as logf:
            logf.write(f"--- attempt {job.attempts} by {self.worker_id}: {' '.join(cmd)}\n".encode())
            logf.flush()
            proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    preexec_fn=_die_with_parent(deathsig))
        try:
            return self._monitor(job, rd, spec, proc, mark)
        finally:
            if proc.poll() is None:
                self._stop_child(proc, 0)
            kill_marked(mark)

    def _monitor(self, job, rd: Path, spec: dict, proc: subprocess.Popen, mark: str) -> Outcome:
        tail = ProgressTail(rd / "progress.jsonl")
        cancel_sent: float | None = None
        while True:
            rc = proc.poll()
            owned, cancel = self._report(job, tail.read())
            if not owned:
                log.warning("job %d was reclaimed by another worker; stopping our run", job.id)
                self._stop_child(proc, 5)
                return Outcome(job.id, "lost")
            if rc is not None:
                break
            if cancel and cancel_sent is None:
                log.info("job %d: cancel requested", job.id)
                (rd / "CANCEL").write_text("cancel requested through the API\n")
                cancel_sent = time.monotonic()
            if cancel_sent is not None and time.monotonic() - cancel_sent > self.cancel_grace:
                self._stop_child(proc, 5)
            if self.stopping.is_set():
                log.info("job %d: worker stopping; run stopped, job back in the queue", job.id)
                self._stop_child(proc, self.stop_grace)
                self._drain(job, tail)
                with session_scope(self.ctx.sessions) as s:
                    jobs.release_job(s, job.id, self.worker_id)
                return Outcome(job.id, "released")
            time.sleep(self.tick)
        self._drain(job, tail)
        return self._finish(job, rd, spec, rc, cancelled=cancel_sent is not None)

    def _report(self, job, events: list[dict]) -> tuple[bool, bool]:
        for ev in events:
            if ev.get("event") == "epoch":
                self.say(epoch_text(job.id, ev))
            elif ev.get("event") == "preprocess" and ev.get("done") == ev.get("total") and job.id not in self._said:
                self._said.add(job.id)  # the cache reports "all done" twice when everything was cached
                self.say(f"training job {job.id}: preprocessed {ev.get('total')} images")
        self._publish()
        try:
            with session_scope(self.ctx.sessions) as s:
                return jobs.record_progress(s, job, self.worker_id, events)
        except OperationalError as exc:
            # the run goes on; if the DB stays away long enough the job turns stale and is reclaimed
            log.warning("job %d: progress not recorded (%s)", job.id, type(exc).__name__)
            return True, False

    def _drain(self, job, tail: ProgressTail) -> None:
        events = tail.read()
        if events:
            self._report(job, events)

    def _finish(self, job, rd: Path, spec: dict, rc: int, *, cancelled: bool) -> Outcome:
        with session_scope(self.ctx.sessions) as s:
            if rc == EXIT_CANCELLED or (cancelled and rc != 0):
                ok = jobs.mark_cancelled(s, job.id, self.worker_id)
                return Outcome(job.id, "cancelled" if ok else "lost")
            if rc == 0:
                metrics = read_json(rd / "metrics.json")
                if metrics is not None and (rd / "model.pt").is_file():
                    card = read_json(rd / "model_card.json") or {}
                    params = job.params or {}
                    arch = card.get("architecture") or card.get("model") or params.get("model", "?")
                    model = jobs.complete_job(
                        s, job.id, self.worker_id, metrics=metrics, card=card, architecture=str(arch)[:64],
                        classes=spec["classes"], model_path=str((rd / "model.pt").relative_to(self.settings.data_dir.resolve())))
                    return Outcome(job.id, "completed" if model is not None else "lost")
                error = "training exited 0 without metrics.json and model.pt"
            else:
                error = error_text(rd, rc)
            ok = jobs.fail_job(s, job.id, self.worker_id, error)
            return Outcome(job.id, "failed" if ok else "lost")

    @staticmethod
    def _stop_child(proc: subprocess.Popen, grace: float) -> None:
        """SIGTERM the child's process group, SIGKILL it after `grace` seconds."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue


def main(ctx: AppContext, *, once: bool = False, poll: float | None = None, stale_after: float = 60.0,
         nproc: int | None = None, say=None) -> list[Outcome]:
    """Entry for `radcohort worker`: handles SIGTERM/SIGINT by giving the running job back."""
    worker = Worker(ctx, poll=poll, stale_after=stale_after, nproc=nproc, say=say)
    worker.install_signal_handlers()
    return worker.run(once=once)
