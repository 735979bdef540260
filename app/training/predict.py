"""Predictions for the API without torch in the API process: a checked upload, then a warm predictor process
(one per model, kept loaded for RADCOHORT_PREDICT_IDLE_S; models.predict_cli --serve)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.config import Settings
from app.db.models import TrainedModel
from app.errors import InvalidInput, NotFound, RadcohortError, ServiceUnavailable
from models import predict_cli as proto  # the framing only (no torch)

log = logging.getLogger("radcohort.predict")

CHUNK = 1024 * 1024
PROJECT_ROOT = Path(__file__).resolve().parents[2]


class PayloadTooLarge(RadcohortError):
    status_code = 413


class UnsupportedUpload(RadcohortError):
    status_code = 415


class PredictionTimeout(RadcohortError):
    status_code = 504


class PredictionFailed(RadcohortError):
    status_code = 502


def max_upload_bytes(settings: Settings) -> int:
    return settings.predict_max_upload_mb * 1024 * 1024


def timeout_seconds(settings: Settings) -> float:
    return settings.predict_timeout_s


def get_model(session: Session, model_id: int) -> TrainedModel:
    model = session.get(TrainedModel, model_id)
    if model is None:
        raise NotFound(f"model {model_id} not found")
    return model


def list_models(session: Session, *, limit: int = 100, offset: int = 0) -> tuple[int, list[TrainedModel]]:
    """Newest first."""
    total = session.scalar(select(func.count()).select_from(TrainedModel)) or 0
    q = select(TrainedModel).order_by(TrainedModel.id.desc()).limit(limit).offset(offset)
    return total, list(session.scalars(q))


def delete_model(session: Session, settings, model_id: int) -> None:
    """Forget a model and remove its checkpoint; the job keeps its metrics, report and charts.

    Only its own scores and scoring jobs refer to a model, and they go with it (ON DELETE CASCADE): it can
    always go (no 409). A running scoring job loses its claim and stops."""
    model = get_model(session, model_id)
    path = (settings.data_dir / model.path).resolve()
    session.delete(model)
    session.flush()
    # only a file inside the data directory, whatever the row says
    if path.is_file() and settings.data_dir.resolve() in path.parents:
        path.unlink()


def model_view(model: TrainedModel) -> dict:
    return {"id": model.id, "job_id": model.job_id, "architecture": model.architecture,
            "classes": model.classes, "card": model.card, "created_at": model.created_at}


@contextmanager
def spooled_upload(src: BinaryIO, tmp_dir: Path, max_bytes: int) -> Iterator[Path]:
    """Copy an upload to a private temp file (size-capped, DICOM-checked); always removed afterwards."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="predict-", suffix=".dcm", dir=tmp_dir)
    path = Path(name)
    try:
        size = 0
        with os.fdopen(fd, "wb") as out:
            while chunk := src.read(CHUNK):
                size += len(chunk)
                if size > max_bytes:
                    raise PayloadTooLarge(f"upload larger than the limit of {max_bytes} bytes")
                out.write(chunk)
        check_dicom(path, size)
        yield path
    finally:
        path.unlink(missing_ok=True)


def check_dicom(path: Path, size: int) -> None:
    """A DICOM Part 10 file with pixel data, or a 4xx saying what is wrong."""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    if size == 0:
        raise UnsupportedUpload("empty upload: expected a DICOM file")
    with path.open("rb") as f:
        head = f.read(132)
    if len(head) < 132 or head[128:132] != b"DICM":
        raise UnsupportedUpload("not a DICOM Part 10 file (no 'DICM' marker after the 128-byte preamble)")
    try:
        ds = dcmread(path, stop_before_pixels=False, defer_size=1024)
    except (InvalidDicomError, ValueError, EOFError, OSError, KeyError, TypeError) as exc:
        raise InvalidInput(f"malformed DICOM file: {type(exc).__name__}") from None
    if "PixelData" not in ds:
        raise InvalidInput("DICOM file has no pixel data")


# ---------------------------------------------------------------- the warm predictors
class _Predictor:
    """One `python -m models.predict_cli --serve RUN_DIR` process: the model loaded once, one request at a time."""

    def __init__(self, model_id: int, run_dir: Path, key: tuple, log_path: Path, deadline: float,
                 threads: int | None = None):
        self.model_id, self.key, self.log_path = model_id, key, log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        # OpenMP threads that sleep rather than spin between torch's parallel regions: on a machine whose cores
        # are busy with other work (the SCP, the API, a worker) spinning threads made a 45 ms forward take
        # 200-350 ms (2 cores, load 4); an operator's own OMP_WAIT_POLICY wins
        env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "RADCOHORT_PREDICTOR_PARENT": str(os.getpid()),
               "RADCOHORT_PREDICT_THREADS": str(threads or ""),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}
        with log_path.open("wb") as logf:  # the child's stderr: warnings, tracebacks (read back on a crash)
            # a session of its own: a Ctrl-C meant for the API does not reach it; it exits when the API's
            # end of its stdin closes or the API process is gone (models.predict_cli.serve)
            cmd = [sys.executable, "-m", "models.predict_cli", "--serve", str(run_dir.resolve())]
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=logf, bufsize=0,
                                         cwd=PROJECT_ROOT, env=env, start_new_session=True)
        self.started = time.monotonic()
        self.last_used = self.started
        self.requests = 0
        try:
            ready = proto.read_frame(self.proc.stdout.fileno(), deadline)
        except proto.FrameTimeout:
            self.kill()
            raise PredictionTimeout(f"loading model {model_id} took longer than the prediction time limit; "
                                    "its predictor process was stopped") from None
        except proto.FrameError as exc:
            self.kill()
            raise PredictionFailed(f"the predictor process of model {model_id} is not speaking the protocol: "
                                   f"{exc}") from None
        if ready is None or ready.get("event") != "ready":
            self.kill()
            if ready is not None and ready.get("kind") == "no_torch":
                raise ServiceUnavailable(ready.get("error") or proto.NO_TORCH)
            detail = (ready or {}).get("error") or f"its process {self.exit_text()}"
            raise PredictionFailed(f"model {model_id} could not be loaded: {detail}")
        self.info = ready
        log.info("predictor for model %d ready in %.1f s (pid %s, %s threads)", model_id,
                 time.monotonic() - self.started, ready.get("pid"), ready.get("threads"))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def call(self, request: dict, deadline: float) -> dict | None:
        """The answer; None when the process died (before or while answering). FrameTimeout past the deadline."""
        try:
            proto.write_frame(self.proc.stdin.fileno(), request)
            answer = proto.read_frame(self.proc.stdout.fileno(), deadline)
        except (BrokenPipeError, ConnectionResetError, proto.FrameError):
            answer = None
        if answer is None:
            self.kill()
        self.last_used = time.monotonic()
        self.requests += 1
        return answer

    def close(self, grace: float = 2.0) -> None:
        """Ask it to exit; killed when it does not within `grace` seconds."""
        if self.alive():
            try:
                proto.write_frame(self.proc.stdin.fileno(), {"op": "exit"})
            except OSError:
                pass
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.kill()
        self._close_pipes()

    def kill(self) -> None:
        if self.alive():
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self._close_pipes()

    def _close_pipes(self) -> None:
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass

    def exit_text(self) -> str:
        """'exited with status 1: <last line of its stderr>' or 'was killed by SIGSEGV'."""
        rc = self.proc.poll()
        if rc is None:
            text = "is still running"
        elif rc < 0:
            try:
                text = f"was killed by {signal.Signals(-rc).name}"
            except ValueError:
                text = f"was killed by signal {-rc}"
        else:
            text = f"exited with status {rc}"
        try:
            lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            lines = []
        return text + (f": {lines[-1].strip()[:300]}" if lines else "")


class _Slot:
    """A model's place in the pool: its lock serialises requests (and the start of its process)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.predictor: _Predictor | None = None
        self.closed = False  # taken out of the pool (model deleted, shutdown): a waiting request takes a new one


class PredictorPool:
    """Warm predictor processes owned by the API process, one per model, started on first use.

    A process stays loaded for `idle_s` after its last request (0: closed after every request), at most
    `max_models` are kept (the least recently used idle one is closed first). A process that died while
    idle is replaced before the request; one that dies while answering is restarted and asked once more
    (a second death is a 502); one that does not answer in time is killed (504) and replaced by the next
    request. The API's shutdown closes them all (`shutdown`, through AppContext.close_shared)."""

    def __init__(self, idle_s: float, max_models: int, log_dir: Path, threads: int | None = None):
        self.idle_s, self.max_models, self.log_dir = float(idle_s), int(max_models), Path(log_dir)
        self.threads = threads
        self._slots: dict[int, _Slot] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> PredictorPool:
        return cls(settings.predict_idle_s, settings.predict_max_models, settings.data_dir / "predictors",
                   settings.predict_threads)

    def _slot(self, model_id: int) -> _Slot:
        with self._lock:
            if self._stop.is_set():
                raise ServiceUnavailable("the API is shutting down")
            if self._reaper is None and self.idle_s > 0:
                self._reaper = threading.Thread(target=self._reap, name="predictor-reaper", daemon=True)
                self._reaper.start()
            return self._slots.setdefault(model_id, _Slot())

    def predict(self, model_id: int, run_dir: Path, dicom_path: Path, timeout: float) -> dict:
        """{"class", "confidence", "probabilities"} from the model's warm process (started when needed)."""
        deadline = time.monotonic() + timeout
        model_path = Path(run_dir) / "model.pt"
        try:
            stat = model_path.stat()
        except OSError:
            raise NotFound("the model's artifacts are missing from the data directory") from None
        key = (str(model_path.resolve()), stat.st_mtime_ns, stat.st_size)
        while True:
            slot = self._slot(model_id)
            if not slot.lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise PredictionTimeout(f"model {model_id}'s predictor was busy with earlier requests for "
                                        f"{timeout:g} s (the prediction time limit)")
            if not slot.closed:
                break
            slot.lock.release()
        try:
            answer = None
            for attempt in (1, 2):
                p = slot.predictor
                if p is None or p.key != key or not p.alive():
                    if p is not None:
                        p.close(grace=1.0)  # a replaced model file, or a process that died while idle
                    slot.predictor = None
                    slot.predictor = p = _Predictor(model_id, Path(run_dir), key,
                                                    self.log_dir / f"model-{model_id}.log", deadline, self.threads)
                    self._trim(keep=model_id)
                try:
                    answer = p.call({"op": "predict", "path": str(Path(dicom_path).resolve())}, deadline)
                except proto.FrameTimeout:
                    p.kill()
                    slot.predictor = None
                    raise PredictionTimeout(f"prediction took longer than {timeout:g} s; model {model_id}'s predictor "
                                            "process was stopped (the next request starts a new one)") from None
                if answer is not None:
                    break
                died = p.exit_text()
                slot.predictor = None
                log.warning("predictor for model %d %s (attempt %d)", model_id, died, attempt)
                if attempt == 2 or time.monotonic() >= deadline:
                    raise PredictionFailed(f"model {model_id}'s predictor process {died}, twice on this image; "
                                           "a new one starts with the next request")
            if self.idle_s <= 0 and slot.predictor is not None:
                slot.predictor.close()
                slot.predictor = None
        finally:
            slot.lock.release()
        if answer.get("ok"):
            return {"class": answer["class"], "confidence": answer.get("confidence"),
                    "probabilities": answer.get("probabilities", {})}
        detail = answer.get("error") or "prediction failed"
        if answer.get("kind") == "bad_input":
            raise InvalidInput(detail)
        raise PredictionFailed(detail)

    def _trim(self, keep: int) -> None:
        """Close the least recently used idle processes beyond max_models."""
        with self._lock:
            loaded = [(p.last_used, mid, s) for mid, s in self._slots.items()
                      if mid != keep and (p := s.predictor) is not None]
        loaded.sort(key=lambda t: t[0])
        excess = len(loaded) + 1 - self.max_models
        for _, mid, s in loaded:
            if excess <= 0:
                break
            if s.lock.acquire(blocking=False):  # a busy one is left alone (the reaper comes back)
                try:
                    if s.predictor is not None:
                        log.info("predictor for model %d closed (more than %d models loaded)", mid, self.max_models)
                        s.predictor.close()
                        s.predictor = None
                        excess -= 1
                finally:
                    s.lock.release()

    def _reap(self) -> None:
        every = min(max(self.idle_s / 4, 0.2), 10.0)
        while not self._stop.wait(every):
            now = time.monotonic()
            with self._lock:
                slots = list(self._slots.items())
            for mid, s in slots:
                p = s.predictor
                if p is None or now - p.last_used < self.idle_s:
                    continue
                if s.lock.acquire(blocking=False):
                    try:
                        p = s.predictor
                        if p is not None and time.monotonic() - p.last_used >= self.idle_s:
                            log.info("predictor for model %d closed after %.0f s idle", mid, self.idle_s)
                            p.close()
                            s.predictor = None
                    finally:
                        s.lock.release()

    def discard(self, model_id: int) -> None:
        """Close a model's process (the model was deleted); waits for a request in progress."""
        with self._lock:
            slot = self._slots.pop(model_id, None)
        if slot is not None:
            with slot.lock:
                slot.closed = True
                if slot.predictor is not None:
                    slot.predictor.close()
                    slot.predictor = None

    def status(self) -> list[dict]:
        """The loaded processes: model id, pid, requests served, seconds since the last one."""
        now = time.monotonic()
        with self._lock:
            items = [(mid, s.predictor) for mid, s in self._slots.items() if s.predictor is not None]
        return [{"model_id": mid, "pid": p.proc.pid, "requests": p.requests, "alive": p.alive(),
                 "idle_seconds": round(now - p.last_used, 1)} for mid, p in items]

    def shutdown(self, wait: bool = False) -> None:  # noqa: ARG002 - the signature AppContext.close_shared calls
        self._stop.set()
        with self._lock:
            slots = list(self._slots.values())
            self._slots.clear()
        for s in slots:
            s.closed = True
            p = s.predictor
            if p is not None:
                p.close(grace=1.0)
                s.predictor = None


def pool(ctx) -> PredictorPool:
    """The API process's one pool (made on first use, closed with the app)."""
    return ctx.shared(PredictorPool, lambda: PredictorPool.from_settings(ctx.settings))


# what the models here are trained on: projection radiographs
XRAY_MODALITIES = ("CR", "DX", "DR")


def model_body_parts(session: Session, model: TrainedModel) -> set[str]:
    """Body parts the model's classes are defined on (from the frozen taxonomy of its cohort); empty when
    its classes do not constrain the body part."""
    from app.db.models import Cohort

    cohort = session.get(Cohort, (model.card or {}).get("cohort_id") or -1)
    classes = ((cohort.taxonomy if cohort is not None else None) or {}).get("classes") or []
    parts: set[str] = set()
    for c in classes:
        where = c.get("where") if isinstance(c, dict) else None
        value = (where or {}).get("body_part")
        if value is None:
            return set()  # a class that takes any body part: nothing to check
        parts.update([value] if isinstance(value, str) else value)
    return parts


def domain_check(session: Session, model: TrainedModel, dicom_path: Path, rules) -> dict:
    """{"in_domain", "warning", "domain": {"modality", "body_part"}} for an uploaded image, from its header
    and the label rules: a CT slice or an ankle is classified anyway, but flagged."""
    import pydicom

    from app.index.extract import extract_record
    from app.labels.engine import compute_labels

    try:
        ds = pydicom.dcmread(dicom_path, stop_before_pixels=True, force=True)
        rec = extract_record(ds)
    except Exception:  # noqa: BLE001 - an unreadable header is the prediction's to refuse, with its detail
        return {"in_domain": None, "warning": "the header could not be read: domain not checked", "domain": {}}
    modality = (rec.get("modality") or "").upper() or None
    body_part = compute_labels(rec, rules).body_part
    problems = []
    if modality not in XRAY_MODALITIES:
        problems.append(f"modality {modality or 'missing'} is not a radiograph ({', '.join(XRAY_MODALITIES)})")
    parts = model_body_parts(session, model)
    if parts and body_part not in parts:
        problems.append(f"body part {body_part or 'unknown'} is not one the model has a class for "
                        f"({', '.join(sorted(parts))})")
    warning = None
    if problems:
        warning = "outside the model's domain: " + "; ".join(problems) + ". The class below is a guess."
    return {"in_domain": not problems, "warning": warning, "domain": {"modality": modality, "body_part": body_part}}
