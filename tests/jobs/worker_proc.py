"""A job-runner process for the tests: `python -m tests.jobs.worker_proc DATABASE_URL DATA_DIR QUEUES`.

The same JobRunner `radcohort worker` runs, with the test kinds registered and short leases (heartbeat
0.2 s, stale after 1.5 s). SIGTERM stops it and gives its running jobs back."""

from __future__ import annotations

import signal
import sys
import threading

from app.config import Settings
from app.context import AppContext
from app.jobs.runner import JobRunner
from tests.jobs.kinds import register_all


def main() -> None:
    url, data_dir, queues = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
    register_all()
    settings = Settings(_env_file=None, database_url=url, data_dir=data_dir, pseudonym_key="k",
                        jobs_heartbeat_s=0.2, jobs_stale_s=1.5)
    ctx = AppContext.build(settings)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    runner = JobRunner(ctx, queues, poll=0.1, say=lambda text: print(text, flush=True)).start()
    print(f"runner {runner.runner_id} ready", flush=True)
    stop.wait()
    runner.stop(grace=5, release=True)
    ctx.close()


if __name__ == "__main__":
    main()
