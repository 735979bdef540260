"""Job kinds for the tests (queue "selftest"), registered in the test process and in the worker processes
tests/jobs/worker_proc.py starts. Each records what it did in the audit log, with the runner that did it."""

from __future__ import annotations

import time

from app import audit
from app.db.base import session_scope
from app.jobs.handlers import Handler, register
from app.jobs.runner import JobRun

QUEUE = "selftest"


def _record(run: JobRun) -> dict:
    with session_scope(run.ctx.sessions) as s:
        audit.record(s, "test", "test.ran", f"job:{run.job_id}", runner=run.runner_id)
    return {"ran": True}


def _steps(run: JobRun) -> dict:
    """payload {steps, delay}: one audited step at a time, resumed after a takeover from the progress."""
    start = int(run.state.get("step", 0))
    for i in range(start, int(run.payload["steps"])):
        run.checkpoint()
        time.sleep(float(run.payload.get("delay", 0.1)))
        with session_scope(run.ctx.sessions) as s:
            audit.record(s, "test", "test.step", f"job:{run.job_id}", step=i, runner=run.runner_id)
        run.progress(force=True, step=i + 1)
    return {"steps": int(run.payload["steps"]), "resumed_from": start}


def _fail(run: JobRun) -> dict:
    raise ValueError(f"the handler could not go on ({run.payload.get('why', 'no reason')})")


def register_all() -> None:
    register(Handler("test.record", QUEUE, _record, slots=4))
    register(Handler("test.steps", QUEUE, _steps, slots=4))
    register(Handler("test.fail", QUEUE, _fail, slots=4))
