"""Exports of a frozen cohort: de-identified DICOM, or an image dataset (PNG/NumPy class folders per
split, or WebDataset shards), each with its manifest and a dataset card, packed as zip or tar.

An export is a row (`exports`) and a durable background job (kind "export", app.jobs: run by the API's
job runner or `radcohort worker`, taken over when its runner stops); the CLI runs the same `run_export`
in the foreground. Nothing here imports torch: the
image path uses models.preprocess (numpy/pydicom/Pillow), the worker's own preprocessing.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import socket
import tarfile
import time
import zipfile
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pydicom
from sqlalchemy.orm import Session

from app import audit
from app.cohorts.service import training_items
from app.db.base import session_scope
from app.db.models import Cohort, Export
from app.errors import Conflict, InvalidInput, NotFound

log = logging.getLogger("radcohort.exports")

FORMATS = ("dicom-deid", "dicom", "png", "npy", "webdataset")
IDENTIFIED_FORMATS = frozenset({"dicom"})  # the original files: needs the export-identified scope
IMAGE_FORMATS = frozenset({"png", "npy", "webdataset"})
SHARD_SIZE = 1000
MANIFEST_COLUMNS = ("file", "sop_instance_uid", "class", "split", "patient_key")


def validate_params(params: dict[str, Any]) -> dict[str, Any]:
    """Normalised export parameters; InvalidInput names the bad field."""
    fmt = params.get("format")
    if fmt not in FORMATS:
        raise InvalidInput(f"format: one of {', '.join(FORMATS)}")
    out = {"format": fmt,
           "burned_in": params.get("burned_in") or "exclude",
           "archive": params.get("archive") or ("tar" if fmt == "webdataset" else "zip")}
    if out["burned_in"] not in ("exclude", "flag"):
        raise InvalidInput("burned_in: 'exclude' or 'flag'")
    if out["archive"] not in ("zip", "tar"):
        raise InvalidInput("archive: 'zip' or 'tar'")
    if fmt in IMAGE_FORMATS:
        size = params.get("image_size", 224)
        if not isinstance(size, int) or isinstance(size, bool) or not 16 <= size <= 4096:
            raise InvalidInput("image_size: an integer from 16 to 4096")
        bits = params.get("bit_depth", 8)
        if bits not in (8, 16):
            raise InvalidInput("bit_depth: 8 or 16")
        if bits == 16 and fmt != "png":
            raise InvalidInput("bit_depth: 16 is for format png (npy and webdataset hold the worker's 8-bit images)")
        out.update(image_size=size, bit_depth=bits)
    return out


def missing_scope(fmt: str, scopes) -> str | None:
    """The scope a caller lacks for output of format `fmt` (None: allowed). `scopes` None = the CLI."""
    if scopes is None:
        return None
    if "export" not in scopes:
        return "export"
    if fmt in IDENTIFIED_FORMATS and "export-identified" not in scopes:
        return "export-identified"
    return None


def create_export(session: Session, cohort_id: int, params: dict[str, Any], *, actor: str) -> Export:
    """Validate and add the queued export row (audited: who, which cohort, which format and profile).
    The caller has checked the scopes (missing_scope)."""
    p = validate_params(params)
    if session.get(Cohort, cohort_id) is None:
        raise NotFound(f"cohort {cohort_id} not found")
    exp = Export(cohort_id=cohort_id, format=p["format"], params=p, status="queued", done=0, total=0,
                 report={"runner": _runner()}, actor=actor)
    session.add(exp)
    session.flush()
    audit.record(session, actor, "export.create", target=f"export:{exp.id}", cohort=cohort_id, format=p["format"],
                 profile="identified" if p["format"] in IDENTIFIED_FORMATS else "deidentified", options=p)
    session.flush()
    return exp


def view(exp: Export) -> dict:
    rep = exp.report or {}
    return {"id": exp.id, "cohort_id": exp.cohort_id, "format": exp.format, "params": exp.params,
            "status": exp.status, "progress": {"done": exp.done, "total": exp.total},
            "exported": rep.get("exported", 0), "excluded": rep.get("excluded", {}),
            "flagged": rep.get("flagged", {}), "error": exp.error,
            "download": f"/api/v1/exports/{exp.id}/download" if exp.status == "done" else None,
            "created_at": exp.created_at, "finished_at": exp.finished_at}


def list_exports(session: Session, limit: int, offset: int, *, identified: bool,
                 cohort_id: int | None = None) -> tuple[int, list[dict]]:
    """(total, newest first page), of one cohort if given; without `identified`, exports of identified
    output are left out."""
    from sqlalchemy import func, select

    q = select(Export)
    if cohort_id is not None:
        q = q.where(Export.cohort_id == cohort_id)
    if not identified:
        q = q.where(Export.format.not_in(sorted(IDENTIFIED_FORMATS)))
    total = session.scalar(select(func.count()).select_from(q.subquery())) or 0
    rows = session.scalars(q.order_by(Export.id.desc()).limit(limit).offset(offset))
    return total, [view(e) for e in rows]


def queue_export(session: Session, export_id: int, actor: str | None) -> int:
    """Queue the export's durable job in the caller's transaction; returns the job id."""
    from app.jobs.queue import enqueue

    return enqueue(session, "export", {"export_id": export_id}, target=f"export:{export_id}", actor=actor).id


def _has_live_job(session: Session, export_id: int) -> bool:
    from sqlalchemy import select

    from app.db.models import Job

    return session.scalar(select(Job.id).where(Job.target == f"export:{export_id}",
                                               Job.status.in_(("queued", "running"))).limit(1)) is not None


def settle_export(session: Session, export_id: int, status: str, error: str | None) -> None:
    """Its job ended without run_export recording the end (cancelled while queued, runners lost): say so."""
    exp = session.get(Export, export_id)
    if exp is None or exp.status not in ("queued", "running"):
        return
    exp.status = "cancelled" if status == "cancelled" else "failed"
    exp.error = (error or status)[:500]
    exp.finished_at = datetime.now(timezone.utc)
    session.flush()


def get_export(session: Session, export_id: int) -> Export:
    """The export; one left unfinished with no job to finish it and no live process running it (a CLI run
    that was killed) is marked failed."""
    exp = session.get(Export, export_id)
    if exp is None:
        raise NotFound(f"export {export_id} not found")
    if exp.status in ("queued", "running") and not _alive((exp.report or {}).get("runner")) \
            and not _has_live_job(session, export_id):
        exp.status, exp.error = "failed", "interrupted: the process running it stopped; start a new export"
        exp.finished_at = datetime.now(timezone.utc)
        session.flush()
    return exp


def _runner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive(runner: str | None) -> bool:
    """Whether the process `host:pid` still runs (always assumed for another host: we cannot tell)."""
    if not runner or ":" not in runner:
        return True
    host, _, pid = runner.rpartition(":")
    if host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return True


def archive_for_download(session: Session, data_dir: Path, exp: Export, *, actor: str) -> tuple[Path, str]:
    """(archive path, media type) of a finished export; the download is audited."""
    export_id = exp.id
    if exp.status != "done" or not exp.archive_path:
        raise Conflict(f"export {export_id} is {exp.status}; download it when its status is done")
    path = data_dir / exp.archive_path
    if not path.exists():
        raise NotFound(f"export {export_id}'s archive is gone from the server; start a new export")
    audit.record(session, actor, "export.download", target=f"export:{exp.id}", cohort=exp.cohort_id,
                 format=exp.format)
    session.flush()
    return path, "application/zip" if path.suffix == ".zip" else "application/x-tar"


def delete_archive(session: Session, data_dir: Path, export_id: int, actor: str) -> None:
    """Remove a finished export's files from the server (the row and its audit trail stay)."""
    exp = get_export(session, export_id)
    if exp.status in ("queued", "running"):
        raise Conflict(f"export {export_id} is {exp.status}")
    shutil.rmtree(data_dir / "exports" / str(export_id), ignore_errors=True)
    exp.status, exp.archive_path = "deleted", None
    audit.record(session, actor, "export.delete", target=f"export:{export_id}", cohort=exp.cohort_id)
    session.flush()


# ---------------------------------------------------------------- running an export
class _Progress:
    """Writes done/total to the row at most every half second (one short transaction each)."""

    def __init__(self, sessions, export_id: int, total: int, checkpoint=None):
        self.sessions, self.export_id, self.total, self.last = sessions, export_id, total, 0.0
        self.checkpoint = checkpoint

    def __call__(self, done: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < 0.5:
            return
        if self.checkpoint is not None:
            self.checkpoint()  # a cancelled or handed-over job stops here
        self.last = now
        with session_scope(self.sessions) as s:
            exp = s.get(Export, self.export_id)
            exp.done, exp.total = done, self.total


def _resolve(store_dir: Path, file_path: str | None) -> Path | None:
    if not file_path:
        return None
    p = Path(file_path)
    return p if p.is_absolute() else store_dir / p


def run_export(ctx, export_id: int, target: Path | None = None, checkpoint=None) -> dict:
    """Build export `export_id`: files under a work folder, then the archive (or, with `target`, the
    files written to that folder and no archive). Marks the row running -> done|failed|cancelled; returns the
    report. `checkpoint()` (a job's) is called with each progress write and may raise to stop the export."""
    settings = ctx.settings
    with session_scope(ctx.sessions) as s:
        exp = s.get(Export, export_id)
        exp.status = "running"
        params, cohort_id = dict(exp.params), exp.cohort_id
        cohort = s.get(Cohort, cohort_id)
        cohort_info = {"id": cohort.id, "taxonomy": cohort.taxonomy_name, "ruleset_version": cohort.ruleset_version,
                       "seed": cohort.seed, "classes": [c["name"] for c in cohort.taxonomy.get("classes", [])],
                       "cohort_excluded": cohort.excluded, "created_at": cohort.created_at.isoformat()
                       if cohort.created_at else None, "params": cohort.params}
        items = training_items(s, cohort_id)
    base = settings.data_dir / "exports" / str(export_id)
    work = target if target is not None else base / "work"
    try:
        if target is None and work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        report = _write(ctx, params, cohort_info, items, work,
                        _Progress(ctx.sessions, export_id, len(items), checkpoint))
        archive_rel = None
        if target is None:
            archive = base / f"export-{export_id}.{params['archive']}"
            _pack(work, archive, params["archive"])
            shutil.rmtree(work, ignore_errors=True)
            archive_rel = str(archive.relative_to(settings.data_dir))
        with session_scope(ctx.sessions) as s:
            exp = s.get(Export, export_id)
            exp.status, exp.archive_path = "done", archive_rel
            exp.report = {**report, "runner": (exp.report or {}).get("runner")}
            exp.done, exp.total = len(items), len(items)
            exp.finished_at = datetime.now(timezone.utc)
            audit.record(s, exp.actor or "cli", "export.done", target=f"export:{export_id}", cohort=cohort_id,
                         format=params["format"], exported=report["exported"], excluded=report["excluded"])
        return report
    except Exception as exc:
        from app.jobs.runner import JobCancelled, JobStopped

        if isinstance(exc, JobStopped):  # the job goes back to the queue (or to its new holder): no end here
            raise
        # the message names the failing step, never a header value (none is put in our messages)
        cancelled = isinstance(exc, JobCancelled)
        if not cancelled:
            log.exception("export %s failed", export_id)
        with session_scope(ctx.sessions) as s:
            exp = s.get(Export, export_id)
            exp.status = "cancelled" if cancelled else "failed"
            exp.error = "cancelled" if cancelled else f"{type(exc).__name__}: {exc}"[:500]
            exp.finished_at = datetime.now(timezone.utc)
        if target is None:
            shutil.rmtree(work, ignore_errors=True)
        raise


def _pack(src: Path, archive: Path, kind: str) -> None:
    tmp = archive.with_suffix(archive.suffix + ".part")
    files = sorted(p for p in src.rglob("*") if p.is_file())
    if kind == "zip":
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as z:
            for p in files:
                z.write(p, p.relative_to(src).as_posix())
    else:
        with tarfile.open(tmp, "w") as t:
            for p in files:
                t.add(p, p.relative_to(src).as_posix(), recursive=False)
    tmp.replace(archive)


def _write(ctx, params: dict, cohort: dict, items: list[dict], work: Path, progress) -> dict:
    from app.exports.deid import Deidentifier, DeidOptions

    fmt = params["format"]
    key = ctx.settings.get_pseudonym_key()
    deid = Deidentifier(key, DeidOptions(burned_in=params["burned_in"]))
    excluded: Counter = Counter()
    flagged: Counter = Counter()
    flagged_rows: list[tuple[str, str]] = []
    manifest: list[tuple] = []
    counts: Counter = Counter()
    shards = _Shards(work) if fmt == "webdataset" else None
    class_index = {c: i for i, c in enumerate(cohort["classes"])}
    for n, it in enumerate(items, start=1):
        path = _resolve(ctx.settings.store_dir, it["file_path"])
        if path is None or not path.exists():
            excluded["file_missing"] += 1
            progress(n)
            continue
        try:
            ds = pydicom.dcmread(path)
        except Exception:  # noqa: BLE001 - one unreadable file is counted, the export goes on
            excluded["unreadable"] += 1
            progress(n)
            continue
        new_uid = deid._uids._new_ui(it["sop_instance_uid"])
        if fmt == "dicom":
            rel = f"dicom/{it['split']}/{it['class_name']}/{it['sop_instance_uid']}.dcm"
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, work / rel)
            manifest.append((rel, it["sop_instance_uid"], it["class_name"], it["split"], it["patient_key"]))
            counts[(it["split"], it["class_name"])] += 1
            progress(n)
            continue
        res = deid.deidentify(ds, it["patient_key"])
        if res.dataset is None:
            excluded[res.excluded] += 1
            progress(n)
            continue
        for reason in res.flagged:
            flagged[reason] += 1
        if fmt == "dicom-deid":
            rel = f"dicom/{it['patient_key'][:16]}/{ds.StudyInstanceUID}/{ds.SOPInstanceUID}.dcm"
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(work / rel, enforce_file_format=True)
        else:
            try:
                img = _image(ds, params)
            except Exception:  # noqa: BLE001 - undecodable pixels are an exclusion, not a failed export
                excluded["undecodable_pixels"] += 1
                progress(n)
                continue
            if shards is not None:
                rel = shards.add(it["split"], new_uid, img, {"class": it["class_name"], "split": it["split"],
                                                             "patient_key": it["patient_key"],
                                                             "class_index": class_index.get(it["class_name"])})
            else:
                ext = "png" if fmt == "png" else "npy"
                rel = f"{it['split']}/{it['class_name']}/{new_uid}.{ext}"
                (work / rel).parent.mkdir(parents=True, exist_ok=True)
                (work / rel).write_bytes(_encode(img, ext))
        if res.flagged:
            flagged_rows.append((rel, "+".join(res.flagged)))
        manifest.append((rel, new_uid, it["class_name"], it["split"], it["patient_key"]))
        counts[(it["split"], it["class_name"])] += 1
        progress(n)
    if shards is not None:
        shards.close()
    progress(len(items), force=True)
    _write_csv(work / "manifest.csv", MANIFEST_COLUMNS, manifest)
    if flagged_rows:
        _write_csv(work / "flagged.csv", ("file", "reason"), flagged_rows)
    report = {"exported": len(manifest), "excluded": dict(excluded), "flagged": dict(flagged)}
    card = dataset_card(params, cohort, counts, report, deid)
    (work / "dataset_card.json").write_text(json.dumps(card, indent=2, default=str))
    (work / "README.md").write_text(card_markdown(card))
    report["card"] = card
    return report


def _write_csv(path: Path, header, rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def _image(ds, params: dict):
    """The worker's preprocessing (models.preprocess) at the chosen size; 16-bit PNG keeps the same
    windowing and resize at 16-bit precision."""
    import numpy as np

    from models import preprocess as pp

    size = params["image_size"]
    if params.get("bit_depth", 8) == 8:
        img, _shape = pp.preprocess_dataset(ds, size)
        return img
    from PIL import Image

    arr = ds.pixel_array
    unit = pp._to_unit(ds, arr)  # the worker's modality/VOI LUT and MONOCHROME1 handling, as float 0..1
    h, w = unit.shape
    new_w = max(1, round(w * size / h))
    res = np.asarray(Image.fromarray(unit.astype(np.float32), mode="F").resize((new_w, size), Image.BILINEAR))
    out = np.clip(res * 65535.0 + 0.5, 0, 65535).astype(np.uint16)
    canvas = np.zeros((size, size), dtype=np.uint16)
    if new_w >= size:
        x0 = (new_w - size) // 2
        canvas[:] = out[:, x0:x0 + size]
    else:
        x0 = (size - new_w) // 2
        canvas[:, x0:x0 + new_w] = out
    return canvas


def _encode(img, ext: str) -> bytes:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    if ext == "npy":
        np.save(buf, img)
    else:
        Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


class _Shards:
    """WebDataset shards: {split}-{n:06d}.tar, each sample `key.png`, `key.cls`, `key.json`."""

    def __init__(self, work: Path):
        self.work, self.open = work, {}

    def add(self, split: str, key: str, img, meta: dict) -> str:
        tar, n, count = self.open.get(split, (None, -1, SHARD_SIZE))
        if count >= SHARD_SIZE:
            if tar is not None:
                tar.close()
            n += 1
            (self.work / "shards").mkdir(exist_ok=True)
            tar = tarfile.open(self.work / "shards" / f"{split}-{n:06d}.tar", "w")
            count = 0
        stem = key.replace(".", "_")  # WebDataset splits keys at the first dot
        for ext, data in (("png", _encode(img, "png")), ("cls", str(meta.get("class_index")).encode()),
                          ("json", json.dumps(meta).encode())):
            info = tarfile.TarInfo(f"{stem}.{ext}")
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
        self.open[split] = (tar, n, count + 1)
        return f"shards/{split}-{n:06d}.tar#{stem}"

    def close(self) -> None:
        for tar, _n, _c in self.open.values():
            tar.close()


def dataset_card(params: dict, cohort: dict, counts: Counter, report: dict, deid) -> dict:
    """What a reader of the shared dataset needs: counts, label provenance, exclusions, preprocessing,
    de-identification, seed."""
    from app import __version__

    per_split: dict[str, dict[str, int]] = {}
    for (split, cls), n in sorted(counts.items()):
        per_split.setdefault(split, {})[cls] = n
    fmt = params["format"]
    identified = fmt in IDENTIFIED_FORMATS
    card = {
        "name": f"radcohort cohort {cohort['id']} ({cohort['taxonomy']})",
        "generated_by": f"radcohort {__version__}",
        "generated_at": datetime.now(timezone.utc).isoformat(),
        "format": fmt,
        "counts": per_split,
        "total": report["exported"],
        "classes": cohort["classes"],
        "labels": {"source": "rules over DICOM header attributes (no image reading)",
                   "ruleset_version": cohort["ruleset_version"], "taxonomy": cohort["taxonomy"]},
        "cohort": {"id": cohort["id"], "seed": cohort["seed"], "created_at": cohort["created_at"],
                   "selection": {k: v for k, v in (cohort["params"] or {}).items() if k != "preview"},
                   "excluded_at_build": {k: v for k, v in (cohort["cohort_excluded"] or {}).items() if v}},
        "excluded_at_export": report["excluded"],
        "flagged": report["flagged"],
        "seed": cohort["seed"],
        "split": "patient-level: all images of a patient are in one split",
        "patient_key": "HMAC-SHA256 pseudonym of the patient, the same as in the cohort manifest",
    }
    if fmt in IMAGE_FORMATS:
        card["preprocessing"] = {"function": "models.preprocess.preprocess_dataset (the training worker's)",
                                 "image_size": params["image_size"], "bit_depth": params["bit_depth"],
                                 "steps": "modality LUT, VOI LUT/window (else min-max), MONOCHROME1 inverted, "
                                          "resized to image_size rows keeping aspect, centre padded/cropped square"}
    if identified:
        card["deidentification"] = "NONE: identified original DICOM files (export-identified scope)"
    else:
        card["deidentification"] = {
            "library": f"dicognito {deid.version}",
            "profile": "DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile",
            "options": ["Retain Longitudinal Temporal Information with Modified Dates (one shift per patient)",
                        "Retain Patient Characteristics (sex, age, size, weight)", "Clean Descriptors"],
            "uids": "remapped consistently, keyed by the deployment's pseudonym key",
            "private_attributes": "removed", "overlays": "removed",
            "burned_in_text": params["burned_in"] + " (BurnedInAnnotation YES, or absent on a modality that "
                                                    "often burns in text)",
        }
    return card


def card_markdown(card: dict) -> str:
    lines = [f"# {card['name']}", "", f"Format: {card['format']}; {card['total']} images; seed {card['seed']}.", "",
             "| split | " + " | ".join(card["classes"]) + " |", "|---|" + "---|" * len(card["classes"])]
    for split, per in card["counts"].items():
        lines.append(f"| {split} | " + " | ".join(str(per.get(c, 0)) for c in card["classes"]) + " |")
    lines += ["", f"Labels: rule set {card['labels']['ruleset_version']} ({card['labels']['source']}).",
              f"Excluded at build: {card['cohort']['excluded_at_build'] or 'none'}; at export: "
              f"{card['excluded_at_export'] or 'none'}; flagged: {card['flagged'] or 'none'}.",
              f"Split: {card['split']}.", "", "De-identification: " + json.dumps(card["deidentification"]), ""]
    if "preprocessing" in card:
        lines += ["Preprocessing: " + json.dumps(card["preprocessing"]), ""]
    lines += ["Full card: dataset_card.json; per-image list: manifest.csv.", ""]
    return "\n".join(lines)
