"""`radcohort worker`: one process serving job queues (app.jobs) and, with "training", the training and
scoring queue (app.training.worker). SIGTERM / Ctrl-C: stop claiming, give running jobs back to the queue."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading

from sqlalchemy.exc import OperationalError

from app.context import AppContext
from app.db.base import session_scope
from app.jobs import queue as q
from app.jobs.runner import JobRunner

log = logging.getLogger("radcohort.worker")
STOP_GRACE_S = 30.0  # a running job has this long to reach a checkpoint before it is given back


def run_worker(ctx: AppContext, queues: list[str], *, once: bool = False, poll: float | None = None,
               stale_after: float = 60.0, nproc: int | None = None, say=None) -> None:
    say = say or log.info
    job_queues = [x for x in queues if x in q.QUEUES]
    runner = JobRunner(ctx, job_queues, say=say) if job_queues else None
    if "training" in queues:
        from app.training.worker import Worker

        worker = Worker(ctx, poll=poll, stale_after=stale_after, nproc=nproc, say=say, queues=queues)
        worker.install_signal_handlers()
        try:
            if runner is not None:
                if once:
                    runner.run_until_idle(timeout=24 * 3600)
                else:
                    runner.start()
            worker.run(once=once)
        finally:
            if runner is not None:
                runner.stop(grace=STOP_GRACE_S, release=True)
        return
    _serve_jobs_only(ctx, runner, queues, once=once, say=say)


def _serve_jobs_only(ctx: AppContext, runner: JobRunner | None, queues: list[str], *, once: bool, say) -> None:
    """Job queues only: no torch imported; the process's row in `workers` names its queues."""
    from app import __version__
    from app.training import workers

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    worker_id = runner.runner_id if runner is not None else q.new_runner_id()
    caps = {"queues": queues, "version": __version__, "models": []}

    def publish() -> None:
        try:
            with session_scope(ctx.sessions) as s:
                if not workers.heartbeat(s, worker_id):
                    workers.register(s, worker_id, socket.gethostname(), os.getpid(), caps)
        except OperationalError as exc:
            log.warning("worker heartbeat not recorded (%s)", type(exc).__name__)

    publish()
    try:
        if runner is None:
            return
        if once:
            runner.run_until_idle(timeout=24 * 3600)
            return
        runner.start()
        while not stop.wait(5.0):
            publish()
    finally:
        if runner is not None:
            runner.stop(grace=STOP_GRACE_S, release=True)
        try:
            with session_scope(ctx.sessions) as s:
                workers.unregister(s, worker_id)
        except OperationalError:
            pass  # the row goes stale by itself
