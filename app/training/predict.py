"""Predictions for the API without torch in the API process: a checked upload, then a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.config import Settings
from app.db.models import TrainedModel
from app.errors import InvalidInput, NotFound, RadcohortError, ServiceUnavailable

DEFAULT_TIMEOUT_S = 300.0
CHUNK = 1024 * 1024
# exit codes of models.predict_cli
EXIT_BAD_INPUT, EXIT_NO_TORCH = 2, 4
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

    Nothing in the database refers to a model, so it can always go (no 409)."""
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


def run_prediction(run_dir: Path, dicom_path: Path, timeout: float = DEFAULT_TIMEOUT_S) -> dict:
    """`python -m models.predict_cli RUN_DIR FILE` -> {"class", "confidence", "probabilities"}."""
    if not (run_dir / "model.pt").is_file():
        raise NotFound("the model's artifacts are missing from the data directory")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT),
                                                                      os.environ.get("PYTHONPATH")]))}
    try:
        # absolute paths: the child works in the project root, a relative DATA_DIR (./data) is not there
        proc = subprocess.run([sys.executable, "-m", "models.predict_cli", str(Path(run_dir).resolve()),
                               str(Path(dicom_path).resolve())],
                              capture_output=True, text=True, timeout=timeout, env=env, cwd=PROJECT_ROOT)
    except subprocess.TimeoutExpired:
        raise PredictionTimeout(f"prediction took longer than {timeout:.0f} s") from None
    answer = _last_json(proc.stdout)
    if proc.returncode == 0 and answer and "class" in answer:
        return {"class": answer["class"], "confidence": answer.get("confidence"),
                "probabilities": answer.get("probabilities", {})}
    detail = (answer or {}).get("error") or "prediction failed"
    if proc.returncode == EXIT_BAD_INPUT:
        raise InvalidInput(detail)
    if proc.returncode == EXIT_NO_TORCH:
        raise ServiceUnavailable(detail)
    raise PredictionFailed(f"{detail} (exit status {proc.returncode})")


def _last_json(stdout: str) -> dict | None:
    for line in reversed(stdout.strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


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
