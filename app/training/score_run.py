"""A scoring job: every indexed radiograph through one model, results in bulk to `instance_scores`.

    python -m app.training.score_run RUN_DIR/spec.json      # the child; RADCOHORT_DATABASE_URL in its environment

`run_next(worker)` is the worker's side (claim, spec, child, heartbeat, cancel, finish), called by
app.training.worker when no training job is waiting. The child streams the index in keyset pages
(app.training.scoring.iter_pages), decodes them in a process pool (the next pages queued behind the
current one), classifies each batch as soon as its images are decoded, and writes the results with the
job's progress and cursor in one guarded transaction (app.training.scoring.write_batch) at most once a
second. Exit codes: 0 done, 3 cancelled, 5 the job is no longer ours, 1 failed (RUN_DIR/error.txt).

Importing this module imports no torch (the decode pool is forked before the child imports it).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
import traceback
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from models.cache import cache_root, default_workers, entry_path
from models.preprocess import PreprocessError, preprocess_file

EXIT_OK, EXIT_FAILED, EXIT_CANCELLED, EXIT_LOST = 0, 1, 3, 5
PREFETCH_PAGES = 2  # pages decoding while one is classified (memory: about 3 pages of images)
WRITE_EVERY_S = 1.0


# ---------------------------------------------------------------- the child
def _decode(task: tuple[str, int, str | None]) -> tuple[np.ndarray | None, str | None]:
    """Pool task: (path, image size, cache entry or None) -> (uint8 image, None) or (None, why not)."""
    path, size, cached = task
    try:
        if cached and os.path.exists(cached):
            with np.load(cached) as z:  # the training cache already holds this image at this size
                return z["img"], None
        return preprocess_file(path, size)[0], None
    except PreprocessError as exc:
        return None, str(exc)
    except Exception as exc:  # noqa: BLE001 - one bad file must not stop the job
        return None, f"{type(exc).__name__}: {exc}"


def _decode_chunk(tasks: list) -> list:
    return [_decode(t) for t in tasks]


class _Decoder:
    """The decode processes, fed a few images per task. A process that dies (a codec crashing on a hostile
    file) breaks the pool: a new pool takes the pages still to come, and the images the broken one held are
    decoded again one at a time in a one-process pool, where the file that kills it again can only be that
    one: it gets an error row instead of stopping the job."""

    CRASHED = "a decoder process died on this file (a codec crash); not scored"

    def __init__(self, workers: int, ctx) -> None:
        self.workers, self.ctx = workers, ctx
        self.pool = self._new(workers)
        self.solo: ProcessPoolExecutor | None = None
        self.crashes = 0

    def _new(self, n: int) -> ProcessPoolExecutor:
        pool = ProcessPoolExecutor(n, mp_context=self.ctx)
        pool.submit(int).result()  # start (fork) its processes now, not at the first page
        return pool

    def submit(self, tasks: list):
        """Start decoding; an iterator of (image, None) or (None, why not), in the order of `tasks`."""
        pool = self.pool
        chunk = max(1, min(8, len(tasks) // (self.workers * 4)))
        parts = [tasks[i:i + chunk] for i in range(0, len(tasks), chunk)]
        futures = [pool.submit(_decode_chunk, part) for part in parts]  # now: the pool works ahead
        return self._results(pool, parts, futures)

    def _results(self, pool, parts: list, futures: list):
        for part, fut in zip(parts, futures):
            try:
                yield from fut.result()
            except BrokenProcessPool:
                yield from (self._alone(pool, task) for task in part)

    def _alone(self, pool, task) -> tuple[np.ndarray | None, str | None]:
        if pool is self.pool:  # the first result to see it broken: a new pool for what comes next
            self.crashes += 1
            print(f"scoring: a decode process died ({self.crashes} so far); decoding its images again one by one",
                  file=sys.stderr, flush=True)
            pool.shutdown(wait=False, cancel_futures=True)
            self.pool = self._new(self.workers)
        if self.solo is None:
            self.solo = self._new(1)
        try:
            return self.solo.submit(_decode, task).result()
        except BrokenProcessPool:
            self.solo.shutdown(wait=False, cancel_futures=True)
            self.solo = None
            return None, self.CRASHED

    def shutdown(self) -> None:
        for pool in (self.pool, self.solo):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)


class _Writer:
    """Batches results into guarded writes (retried while the database is briefly away)."""

    def __init__(self, sessions, spec: dict, device: str, batch_size: int):
        self.sessions, self.spec = sessions, spec
        resume = spec.get("resume") or {}
        self.cursor = int(resume.get("cursor") or 0)
        self.done, self.failed = int(resume.get("done") or 0), int(resume.get("failed") or 0)
        self.out_of_domain = int(resume.get("out_of_domain") or 0)
        self.total = int(spec.get("total") or 0)
        self.pending: list[dict] = []
        self.pending_cursor = self.cursor
        self.started = time.monotonic()
        self.processed = 0  # by this attempt (for the rate)
        self.last_write = 0.0
        self.device, self.batch_size = device, batch_size

    def add(self, rows: list[dict], cursor: int) -> None:
        self.pending.extend(rows)
        self.pending_cursor = cursor

    def flush(self, force: bool = False) -> tuple[bool, bool]:
        """(still ours, cancel requested)."""
        if not force and time.monotonic() - self.last_write < WRITE_EVERY_S:
            return True, False
        from sqlalchemy.exc import OperationalError

        from app.db.base import session_scope
        from app.training.scoring import write_batch

        rows = self.pending
        n_failed = sum(1 for r in rows if r.get("error"))
        n_ood = sum(1 for r in rows if not r["in_domain"])
        processed = self.processed + len(rows)
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = processed / elapsed
        done = self.done + len(rows)
        progress = {"out_of_domain": self.out_of_domain + n_ood, "images_per_second": round(rate, 2),
                    "eta_seconds": round(max(self.total - done, 0) / rate, 1) if rate > 0 else None,
                    "device": self.device, "batch_size": self.batch_size}
        for wait in (0, 1, 2, 4, 8, 15, 30):
            time.sleep(wait)
            try:
                with session_scope(self.sessions) as s:
                    owned, cancel = write_batch(s, self.spec["job_id"], self.spec["worker_id"], self.spec["model_id"],
                                                rows, cursor=self.pending_cursor, done=done,
                                                failed=self.failed + n_failed, progress=progress)
                break
            except OperationalError as exc:
                print(f"scoring: database unavailable ({type(exc).__name__}); retrying", file=sys.stderr, flush=True)
        else:
            raise RuntimeError("the database stayed unavailable for a minute")
        if owned:
            self.done, self.failed, self.out_of_domain = done, self.failed + n_failed, self.out_of_domain + n_ood
            self.processed, self.cursor = processed, self.pending_cursor
            self.pending = []
        self.last_write = time.monotonic()
        return owned, cancel


def run(spec: dict, database_url: str) -> int:
    """Score the index as the spec says; the exit code of the child."""
    from app.training.scoring import iter_pages

    t0 = time.monotonic()
    size_workers = int(spec.get("workers") or default_workers())
    # fork before torch is imported (the children never touch it), as the training cache does
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    decoder = _Decoder(size_workers, ctx)
    try:
        from app.db.base import make_engine, make_sessionmaker
        from models.predict import Classifier, pick_device

        clf = Classifier(spec["model_path"], pick_device(spec.get("device") or "auto"))
        batch = int(spec.get("batch_size") or (256 if clf.cuda else 32))
        engine = make_engine(database_url)
        sessions = make_sessionmaker(engine)
        writer = _Writer(sessions, spec, str(clf.device), batch)
        print(f"scoring job {spec['job_id']}: model {spec['model_id']} loaded on {clf.device} in "
              f"{time.monotonic() - t0:.1f} s since start; batch {batch}, {size_workers} decode processes, "
              f"from instance id {writer.cursor}", file=sys.stderr, flush=True)
        store = Path(spec["store_dir"])
        root = cache_root(spec["cache_dir"], clf.image_size) if spec.get("cache_dir") else None
        xray = {m.upper() for m in spec.get("xray_modalities") or ("CR", "DX", "DR")}
        parts = set(spec.get("body_parts") or [])
        page_size = max(int(spec.get("page_size") or 512), batch)

        def submit(page):
            """Start decoding a page; its images come back in order, as they are ready."""
            tasks = [(str(store / fp), clf.image_size, str(entry_path(root, uid)) if root else None)
                     for _pk, uid, fp, _m, _b in page]
            return page, decoder.submit(tasks)

        def classify(page, decoded) -> int | None:
            for start in range(0, len(page), batch):
                items = page[start:start + batch]
                got = [next(decoded) for _ in items]  # the batch's images, while the pool decodes on
                ok = [i for i, (img, _e) in enumerate(got) if img is not None]
                probs = clf.probabilities(np.stack([got[i][0] for i in ok])) if ok else np.zeros((0, 0))
                by_item = dict(zip(ok, probs))
                rows = []
                for i, (_pk, uid, _fp, modality, body_part) in enumerate(items):
                    in_domain = (modality or "").upper() in xray and (not parts or body_part in parts)
                    if i in by_item:
                        p = by_item[i]
                        k = int(np.argmax(p))
                        rows.append({"sop_instance_uid": uid, "predicted_class": clf.classes[k],
                                     "confidence": float(p[k]), "in_domain": in_domain, "error": None})
                    else:
                        rows.append({"sop_instance_uid": uid, "predicted_class": None, "confidence": None,
                                     "in_domain": in_domain, "error": got[i][1] or "cannot decode"})
                writer.add(rows, items[-1][0])
                owned, cancel = writer.flush()
                if not owned:
                    return EXIT_LOST
                if cancel:
                    return EXIT_CANCELLED
            return None

        inflight: deque = deque()
        for page in iter_pages(sessions, spec["modalities"], after=writer.cursor, page=page_size):
            inflight.append(submit(page))
            if len(inflight) > PREFETCH_PAGES:
                rc = classify(*inflight.popleft())
                if rc is not None:
                    return rc
        while inflight:
            rc = classify(*inflight.popleft())
            if rc is not None:
                return rc
        owned, _cancel = writer.flush(force=True)
        engine.dispose()
        took = time.monotonic() - writer.started
        print(f"scoring job {spec['job_id']}: {writer.processed} images in {took:.1f} s "
              f"({writer.processed / max(took, 1e-6):.1f} img/s), {time.monotonic() - t0:.1f} s in all",
              file=sys.stderr, flush=True)
        return EXIT_OK if owned else EXIT_LOST  # all scored: a cancel that came too late changes nothing
    finally:
        decoder.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m app.training.score_run RUN_DIR/spec.json", file=sys.stderr)
        return EXIT_FAILED
    spec_path = Path(args[0])
    try:
        spec = json.loads(spec_path.read_text())
        url = os.environ.get("RADCOHORT_DATABASE_URL")
        if not url:
            raise RuntimeError("RADCOHORT_DATABASE_URL is not set")
        return run(spec, url)
    except Exception as exc:  # noqa: BLE001 - the reason goes to error.txt for the job's `error`
        traceback.print_exc()
        (spec_path.parent / "error.txt").write_text(f"scoring failed: {type(exc).__name__}: {exc}\n")
        return EXIT_FAILED


# ---------------------------------------------------------------- the worker's side
def _error_text(rd: Path, rc: int) -> str:
    err = rd / "error.txt"
    if err.exists() and err.read_text(errors="replace").strip():
        return err.read_text(errors="replace").strip()[-8000:]
    log = rd / "worker.log"
    tail = log.read_text(errors="replace")[-4000:].strip() if log.exists() else ""
    return f"scoring exited with status {rc}" + (f"; log tail:\n{tail}" if tail else "")


def run_next(worker):
    """Claim one scoring job and run it to its end (worker: app.training.worker.Worker); None when none is queued."""
    from sqlalchemy.exc import OperationalError

    from app.db.base import session_scope
    from app.db.models import ScoringJob
    from app.training import scoring
    from app.training.worker import Outcome

    with session_scope(worker.ctx.sessions) as s:
        job = scoring.claim_next(s, worker.worker_id, stale_after=worker.stale_after,
                                 max_attempts=worker.max_attempts)
    if job is None:
        return None
    worker.say(f"scoring job {job.id}: claimed (model {job.model_id}, attempt {job.attempts})")
    try:
        outcome = _run(worker, job)
    except OperationalError:
        raise  # the job turns stale and is reclaimed; it resumes after its last written batch
    except Exception as exc:  # noqa: BLE001 - a worker bug must fail the job, not hang it
        with session_scope(worker.ctx.sessions) as s:
            jobs_fail(s, job.id, worker.worker_id, f"worker error: {type(exc).__name__}: {exc}")
        outcome = Outcome(job.id, "failed", kind="scoring")
    text = f"scoring job {job.id}: {outcome.status}"
    with session_scope(worker.ctx.sessions) as s:
        row = s.get(ScoringJob, job.id)
        if row is not None:
            text += f": {row.done - row.failed}/{row.total} scored, {row.failed} undecodable"
            if outcome.status == "failed" and row.error:
                text += f": {row.error.strip().splitlines()[-1][:300]}"
    worker.say(text)
    return outcome


def jobs_fail(session, job_id: int, worker_id: str, error: str) -> bool:
    from app.db.models import ScoringJob
    from app.training import jobs

    return jobs.fail_job(session, job_id, worker_id, error, ScoringJob)


def _run(worker, job):
    from sqlalchemy.exc import OperationalError

    from app.db.base import session_scope
    from app.db.models import ScoringJob
    from app.training import jobs, scoring
    from app.training.artifacts import write_json_atomic
    from app.training.worker import MARK_ENV, PROJECT_ROOT, Outcome, _die_with_parent, kill_marked

    settings = worker.settings
    rd = scoring.run_dir(settings, job.id).resolve()
    rd.mkdir(parents=True, exist_ok=True)
    mark = str(rd)
    if kill_marked(mark):  # a previous worker of this job died and left its child behind
        time.sleep(0.5)
    with session_scope(worker.ctx.sessions) as s:
        spec = scoring.build_spec(s, settings, job, worker.worker_id)
    spec_path = rd / "spec.json"
    write_json_atomic(spec_path, spec)
    (rd / "error.txt").unlink(missing_ok=True)
    # OpenMP threads sleep rather than spin (as the API's predictors do): the decode processes share the cores
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, MARK_ENV: mark, "RADCOHORT_DATABASE_URL": settings.database_url,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "app.training.score_run", str(spec_path)]
    with (rd / "worker.log").open("ab") as logf:
        logf.write(f"--- attempt {job.attempts} by {worker.worker_id}\n".encode())
        logf.flush()
        proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=_die_with_parent(signal.SIGKILL))
    cancel_sent: float | None = None
    said_at, said_done = time.monotonic(), -1
    try:
        while True:
            rc = proc.poll()
            try:
                with session_scope(worker.ctx.sessions) as s:
                    owned, cancel = jobs.heartbeat(s, job.id, worker.worker_id, ScoringJob)
                    row = s.get(ScoringJob, job.id, populate_existing=True) if owned else None
                    done, total = (row.done, row.total) if row is not None else (0, 0)
            except OperationalError as exc:
                owned, cancel, done, total = True, False, said_done, 0
                print(f"scoring job {job.id}: heartbeat not recorded ({type(exc).__name__})", file=sys.stderr)
            worker._publish()
            if not owned:
                worker._stop_child(proc, 5)
                return Outcome(job.id, "lost", kind="scoring")
            if rc is not None:
                break
            if cancel and cancel_sent is None:
                cancel_sent = time.monotonic()  # the child stops at its next write
            if cancel_sent is not None and time.monotonic() - cancel_sent > worker.cancel_grace:
                worker._stop_child(proc, 5)
            if worker.stopping.is_set():
                worker._stop_child(proc, worker.stop_grace)
                with session_scope(worker.ctx.sessions) as s:
                    jobs.release_job(s, job.id, worker.worker_id, ScoringJob)
                return Outcome(job.id, "released", kind="scoring")
            if done != said_done and time.monotonic() - said_at > 10:
                worker.say(f"scoring job {job.id}: {done}/{total} images")
                said_at, said_done = time.monotonic(), done
            try:
                proc.wait(timeout=worker.tick)  # back at once when the child ends
            except subprocess.TimeoutExpired:
                pass
    finally:
        if proc.poll() is None:
            worker._stop_child(proc, 0)
        kill_marked(mark)
    with session_scope(worker.ctx.sessions) as s:
        if rc == EXIT_LOST:
            return Outcome(job.id, "lost", kind="scoring")
        if rc == EXIT_CANCELLED or (cancel_sent is not None and rc != EXIT_OK):
            ok = jobs.mark_cancelled(s, job.id, worker.worker_id, ScoringJob)
            return Outcome(job.id, "cancelled" if ok else "lost", kind="scoring")
        if rc == EXIT_OK:
            ok = scoring.complete_job(s, job.id, worker.worker_id)
            return Outcome(job.id, "completed" if ok else "lost", kind="scoring")
        ok = jobs.fail_job(s, job.id, worker.worker_id, _error_text(rd, rc), ScoringJob)
        return Outcome(job.id, "failed" if ok else "lost", kind="scoring")


if __name__ == "__main__":
    sys.exit(main())
