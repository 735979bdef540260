"""A tiny trainable cohort built directly in the DB and the store (test factory; no torch).

Two or more classes told apart by where a bright block sits (left/right/top/bottom), like laterality:
learnable in a few CPU epochs at 32-48 px.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy.orm import Session

from app.config import Settings
from app.db.models import Cohort, CohortMember
from tests.factories.index_rows import add_index_rows

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
_PLACES = ("left", "right", "top", "bottom")


def write_tiny_dicom(path: Path, place: str, *, size: int = 48, seed: int = 0, sop_uid: str | None = None,
                     monochrome1: bool = False) -> str:
    """A small 12-bit CR with a bright block on one side; returns its SOPInstanceUID."""
    rng = np.random.default_rng(seed)
    img = rng.normal(800, 120, (size, size + size // 4)).clip(0, 4095)
    h, w = img.shape
    block = {"left": (slice(h // 4, 3 * h // 4), slice(2, w // 3)),
             "right": (slice(h // 4, 3 * h // 4), slice(2 * w // 3, w - 2)),
             "top": (slice(2, h // 3), slice(w // 4, 3 * w // 4)),
             "bottom": (slice(2 * h // 3, h - 2), slice(w // 4, 3 * w // 4))}[place]
    img[block] += 2500
    pixels = img.clip(0, 4095).astype(np.uint16)
    if monochrome1:
        pixels = (4095 - pixels).astype(np.uint16)
    sop_uid = sop_uid or generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CR_STORAGE, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID, ds.PatientName = "CR", f"T{seed}", "Tiny^Test"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 16, 12, 11
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.PixelData = pixels.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return sop_uid


def make_tiny_cohort(session: Session, settings: Settings, *, per_class: int = 20, n_classes: int = 2,
                     size: int = 48, split: tuple[float, float, float] = (0.6, 0.2, 0.2),
                     undecodable: int = 0, seed: int = 0) -> int:
    """Write per_class DICOMs per class into the store, index them and freeze a cohort; returns its id.

    `undecodable` extra training members point at files that are not DICOM (reported and skipped).
    """
    classes = [f"C{p.capitalize()}" for p in _PLACES[:n_classes]]
    cohort = Cohort(taxonomy_name="tiny", taxonomy={"name": "tiny", "classes": [
        {"name": c, "where": {"body_part": "KNEE", "laterality": p[0].upper()}}
        for c, p in zip(classes, _PLACES)]}, ruleset_version="tiny-1", seed=seed, params={"tiny": True})
    session.add(cohort)
    session.flush()
    members: list[tuple[str, str, str, str]] = []  # uid, class, split, rel path
    n_train, n_val = round(per_class * split[0]), round(per_class * split[1])
    for ci, (cls, place) in enumerate(zip(classes, _PLACES)):
        for i in range(per_class):
            which = "train" if i < n_train else "val" if i < n_train + n_val else "test"
            uid = generate_uid()
            rel = f"tiny/{cohort.id}/{uid}.dcm"
            write_tiny_dicom(settings.store_dir / rel, place, size=size, seed=seed * 100_000 + ci * 1000 + i,
                             sop_uid=uid, monochrome1=(i % 5 == 4))
            members.append((uid, cls, which, rel))
    for j in range(undecodable):
        uid = generate_uid()
        rel = f"tiny/{cohort.id}/{uid}.dcm"
        (settings.store_dir / rel).write_bytes(b"this is not a DICOM file\n" * 10)
        members.append((uid, classes[j % n_classes], "train", rel))
    add_index_rows(session, [{"patient_id": f"tiny-{cohort.id}-{n}", "sop_instance_uid": uid, "file_path": rel,
                              "body_part_examined": "KNEE"} for n, (uid, _c, _s, rel) in enumerate(members)])
    session.add_all(CohortMember(cohort_id=cohort.id, sop_instance_uid=uid, class_name=cls, split=which,
                                 patient_key=f"pk{n:05d}", file_path=rel)
                    for n, (uid, cls, which, rel) in enumerate(members))
    cohort.size = len(members)
    cohort.summary = {"classes": [{"name": c, **{s: sum(1 for m in members if m[1] == c and m[2] == s)
                                                 for s in ("train", "val", "test")}} for c in classes]}
    session.flush()
    return cohort.id
