"""The job runner: claims jobs of its queues, runs each in a thread through its kind's handler, renews the
leases of what it runs, and ends each job succeeded / failed / cancelled.

One runner per process (the API's when RADCOHORT_API_RUNS_JOBS, or `radcohort worker`'s). Each queue has a
number of slots (app.jobs.handlers.Handler.slots); the loop claims while a slot is free, then sleeps until
the poll interval passes or a local enqueue wakes it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from app.context import AppContext
from app.db.base import session_scope
from app.jobs import handlers, queue as q

log = logging.getLogger("radcohort.jobs")


class JobCancelled(Exception):
    """Raised at a checkpoint: the job was cancelled."""


class JobStopped(Exception):
    """Raised at a checkpoint: this runner no longer holds the job (lease lost) or is stopping."""


class JobFailed(Exception):
    """A handler's clean failure: the message is the job's error as it stands."""


@dataclass
class JobRun:
    """What a handler gets: the job's payload and the means to report progress and to stop when asked."""

    ctx: AppContext
    job_id: int
    kind: str
    payload: dict
    attempts: int
    runner_id: str
    actor: str | None
    cancel: threading.Event = field(default_factory=threading.Event)
    lost: threading.Event = field(default_factory=threading.Event)
    stopping: threading.Event = field(default_factory=threading.Event)
    _progress: dict = field(default_factory=dict)
    _written: float = 0.0

    @property
    def state(self) -> dict:
        """The progress as last reported (after a takeover: what the previous holder recorded)."""
        return dict(self._progress)

    def checkpoint(self) -> None:
        """Raise JobCancelled / JobStopped when the job must stop here (cheap: reads events only)."""
        if self.lost.is_set():
            raise JobStopped("the lease was lost to another runner")
        if self.cancel.is_set():
            raise JobCancelled("cancelled")
        if self.stopping.is_set():
            raise JobStopped("the runner is stopping")

    def poll_cancel(self) -> bool:
        """Read the cancel flag from the database now (between heartbeats), e.g. before a costly step."""
        from app.db.models import Job

        with self.ctx.sessions() as s:
            if s.scalar(select(Job.cancel_requested).where(Job.id == self.job_id)):
                self.cancel.set()
        return self.cancel.is_set()

    def progress(self, force: bool = False, **values) -> None:
        """Merge `values` into the job's progress (written at most twice a second)."""
        self._progress.update(values)
        now = time.monotonic()
        if not force and now - self._written < 0.5:
            return
        self._written = now
        try:
            with session_scope(self.ctx.sessions) as s:
                if not q.set_progress(s, self.job_id, self.runner_id, self.attempts, dict(self._progress)):
                    self.lost.set()
        except OperationalError as exc:
            log.warning("job %s: progress not recorded (%s)", self.job_id, type(exc).__name__)


DEFAULT_POLL_S = 1.0


class JobRunner:
    """Claim and run jobs of `queues` until stopped."""

    def __init__(self, ctx: AppContext, queues: list[str] | None = None, *, poll: float | None = None,
                 runner_id: str | None = None, say=None):
        known = handlers.queues()
        self.ctx = ctx
        self.queues = [x for x in (queues or known) if x in known]
        self.slots = {x: handlers.slots(x) for x in self.queues}
        self.poll = poll if poll is not None else min(DEFAULT_POLL_S, ctx.settings.worker_poll_seconds)
        self.runner_id = runner_id or q.new_runner_id()
        self.say = say or log.info
        self.running: dict[int, tuple[JobRun, str, threading.Thread]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._periodic_at = 0.0

    # ------------------------------------------------------------ settings
    def stale_after(self, queue: str) -> float:
        # a retrieval's job lease follows the retrieval settings (its own row's lease uses them too)
        s = self.ctx.settings
        return s.retrieval_stale_s if queue == "retrieval" else s.jobs_stale_s

    @property
    def heartbeat_s(self) -> float:
        s = self.ctx.settings
        return min(s.jobs_heartbeat_s, s.retrieval_heartbeat_s) if "retrieval" in self.queues else s.jobs_heartbeat_s

    # ------------------------------------------------------------ lifecycle
    def start(self) -> "JobRunner":
        if self._threads:
            return self
        for target, name in ((self._loop, "jobs-claim"), (self._beat_loop, "jobs-heartbeat")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        log.info("job runner %s serving %s", self.runner_id, ", ".join(self.queues) or "no queue")
        return self

    def wake(self) -> None:
        """Look for work now (a job was queued in this process)."""
        self._wake.set()

    def stop(self, grace: float = 0.0, release: bool = False) -> None:
        """Stop claiming; ask running jobs to stop at their next checkpoint and wait up to `grace` s.
        With `release` (the process is about to exit) jobs still running are given back to the queue."""
        self._stop.set()
        self._wake.set()
        with self._lock:
            runs = list(self.running.values())
        for run, _queue, _t in runs:
            run.stopping.set()
        deadline = time.monotonic() + grace
        for _run, _queue, t in runs:
            t.join(max(0.0, deadline - time.monotonic()))
        if release:
            with self._lock:
                left = list(self.running.values())
            for run, _queue, _t in left:
                try:
                    with session_scope(self.ctx.sessions) as s:
                        q.release(s, run.job_id, run.runner_id, run.attempts)
                    self.say(f"job {run.job_id} ({run.kind}): given back to the queue")
                except OperationalError:
                    pass  # its lease goes stale and another runner takes it over

    def shutdown(self, wait: bool = False) -> None:
        """The API's shutdown (app.api.main stops every shared object): stop claiming; jobs still running
        finish in their threads, or are taken over once this process is gone."""
        self.stop(grace=5.0 if wait else 0.0)

    def busy(self) -> bool:
        with self._lock:
            return bool(self.running)

    # ------------------------------------------------------------ claiming
    def _free(self, queue: str) -> int:
        with self._lock:
            return self.slots[queue] - sum(1 for _r, qq, _t in self.running.values() if qq == queue)

    def claim_once(self) -> int:
        """Claim what the free slots allow and start it; returns the number of jobs started."""
        started = 0
        for queue in self.queues:
            while self._free(queue) > 0 and not self._stop.is_set():
                with session_scope(self.ctx.sessions) as s:
                    job = q.claim_next(s, self.runner_id, queue, stale_after=self.stale_after(queue))
                    if job is None:
                        break
                    run = JobRun(self.ctx, job.id, job.kind, dict(job.payload or {}), job.attempts, self.runner_id,
                                 job.actor, _progress=dict(job.progress or {}))
                    cancel = bool(job.cancel_requested)
                if cancel:
                    run.cancel.set()
                self._start(run, queue)
                started += 1
        return started

    def _start(self, run: JobRun, queue: str) -> None:
        t = threading.Thread(target=self._execute, args=(run,), name=f"job-{run.job_id}", daemon=True)
        with self._lock:
            self.running[run.job_id] = (run, queue, t)
        self.say(f"job {run.job_id} ({run.kind}): claimed (attempt {run.attempts})")
        t.start()

    def _periodic(self) -> None:
        now = time.monotonic()
        if now - self._periodic_at < self.heartbeat_s:
            return
        self._periodic_at = now
        for queue in self.queues:
            fn = handlers.PERIODIC.get(queue)
            if fn is not None:
                try:
                    fn(self.ctx)
                except Exception as exc:  # noqa: BLE001 - the database may be down for a moment
                    log.warning("periodic task of queue %s failed: %s", queue, type(exc).__name__)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._periodic()
                self.claim_once()
            except OperationalError as exc:
                log.warning("job queue unavailable (%s); retrying", type(exc).__name__)
            except Exception:  # noqa: BLE001 - the claim loop must outlive any one failure
                log.exception("job runner: claim failed")
            self._wake.wait(self.poll)
            self._wake.clear()

    # ------------------------------------------------------------ leases
    def beat(self) -> None:
        """Renew every held lease once; flag jobs cancelled or lost meanwhile."""
        with self._lock:
            runs = {jid: r for jid, (r, _q, _t) in self.running.items()}
        if not runs:
            return
        with session_scope(self.ctx.sessions) as s:
            state = q.heartbeat(s, self.runner_id, {jid: r.attempts for jid, r in runs.items()})
        for jid, (ours, cancel) in state.items():
            if not ours and not runs[jid].lost.is_set():
                log.warning("job %s: lease lost to another runner", jid)
                runs[jid].lost.set()
            if cancel:
                runs[jid].cancel.set()

    def _beat_loop(self) -> None:
        while True:
            time.sleep(self.heartbeat_s)
            if self._stop.is_set() and not self.busy():
                return
            try:
                self.beat()
            except Exception as exc:  # noqa: BLE001 - a database blip must not kill the heartbeat
                log.warning("job heartbeat failed (%s); retrying", type(exc).__name__)

    # ------------------------------------------------------------ one job
    def _execute(self, run: JobRun) -> None:
        h = handlers.find_handler(run.kind)
        status, result, error = "succeeded", None, None
        try:
            if h is None:
                raise JobFailed(f"no handler for job kind {run.kind!r} in this process")
            run.checkpoint()
            result = h.run(run)
        except JobCancelled:
            status, error = "cancelled", "cancelled"
        except JobStopped as exc:
            status, error = "stopped", str(exc)
        except JobFailed as exc:
            status, error = "failed", str(exc)
        except Exception as exc:  # noqa: BLE001 - a handler's failure is the job's, never the runner's
            log.exception("job %s (%s) failed", run.job_id, run.kind)
            status, error = "failed", f"{type(exc).__name__}: {exc}"
        try:
            self._end(run, h, status, result, error)
        except Exception as exc:  # noqa: BLE001 - then the lease goes stale and the job is retried elsewhere
            log.warning("job %s: end not recorded (%s)", run.job_id, type(exc).__name__)
        finally:
            with self._lock:
                self.running.pop(run.job_id, None)
            self._wake.set()  # a slot is free

    def _end(self, run: JobRun, h, status: str, result, error: str | None) -> None:
        with session_scope(self.ctx.sessions) as s:
            if status == "stopped":
                if run.lost.is_set():
                    self.say(f"job {run.job_id} ({run.kind}): lost to another runner")
                elif q.release(s, run.job_id, run.runner_id, run.attempts):
                    self.say(f"job {run.job_id} ({run.kind}): given back to the queue")
                return
            ok = q.finish(s, run.job_id, run.runner_id, run.attempts, status,
                          result=result if isinstance(result, dict) else None, error=error)
            if not ok:
                self.say(f"job {run.job_id} ({run.kind}): {status}, but its lease was lost meanwhile")
                return
            if status != "succeeded" and h is not None and h.settle is not None:
                from app.db.models import Job

                h.settle(s, s.get(Job, run.job_id), status, error)
        self.say(f"job {run.job_id} ({run.kind}): {status}" + (f": {error}" if error and status == "failed" else ""))

    # ------------------------------------------------------------ foreground use
    def run_until_idle(self, timeout: float = 60.0) -> None:
        """Claim and run until no job of these queues is queued or running here (CLI --once, tests)."""
        deadline = time.monotonic() + timeout
        self._start_beat()
        while time.monotonic() < deadline:
            self._periodic()
            if not self.claim_once() and not self.busy():
                return
            time.sleep(0.05)
        raise TimeoutError("jobs still running")

    def _start_beat(self) -> None:
        if not any(t.name == "jobs-heartbeat" for t in self._threads):
            t = threading.Thread(target=self._beat_loop, name="jobs-heartbeat", daemon=True)
            t.start()
            self._threads.append(t)


def get_runner(ctx: AppContext) -> JobRunner:
    """This process's runner (serving every queue of the jobs table), created on first use, not started."""
    return ctx.shared(JobRunner, lambda: JobRunner(ctx, list(q.QUEUES)))


def start_in_api(ctx: AppContext) -> JobRunner | None:
    """The API's start-up: run jobs in this process when settings.api_runs_jobs (the embedded single-process
    default); otherwise leave them to `radcohort worker`."""
    if not ctx.settings.api_runs_jobs:
        log.info("this API runs no background jobs (RADCOHORT_API_RUNS_JOBS=false): workers run them")
        return None
    return get_runner(ctx).start()


def wake_local(ctx: AppContext) -> None:
    """Wake this process's runner if it has one (after a commit that queued a job)."""
    runner = ctx.existing(JobRunner)
    if runner is not None:
        runner.wake()


def wake_after_commit(ctx: AppContext, session) -> None:
    """Wake the local runner once `session` commits (the job row is then visible to its claim)."""
    from sqlalchemy import event

    event.listen(session, "after_commit", lambda _s: wake_local(ctx), once=True)
