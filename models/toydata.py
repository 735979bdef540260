"""Tiny synthetic radiograph-like DICOMs for tests and benches (no torch; not for the demo).

Classes are shapes a small CNN separates quickly, including a mirrored left/right pair:
C (two "lung" ellipses), H (a ring), LtK / RtK (a bar with a condyle bump on one side,
mirror images of each other), E (an L-shaped bend).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CRImageStorage = "1.2.840.10008.5.1.4.1.1.1"

TOY_CLASSES = ("C", "H", "LtK", "RtK", "E")


def _shape(cls: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    cy = rows / 2 + rng.uniform(-0.06, 0.06) * rows
    cx = cols / 2 + rng.uniform(-0.06, 0.06) * cols
    s = min(rows, cols) * rng.uniform(0.9, 1.1)
    img = np.zeros((rows, cols), np.float32)

    def ellipse(y, x, ry, rx):
        return ((yy - y) / ry) ** 2 + ((xx - x) / rx) ** 2 <= 1

    if cls == "C":
        img[ellipse(cy, cx - 0.2 * s, 0.32 * s, 0.14 * s)] = 1
        img[ellipse(cy, cx + 0.2 * s, 0.32 * s, 0.14 * s)] = 1
    elif cls == "H":
        img[ellipse(cy, cx, 0.36 * s, 0.3 * s) & ~ellipse(cy, cx, 0.26 * s, 0.2 * s)] = 1
    elif cls in ("LtK", "RtK"):
        img[(abs(xx - cx) < 0.07 * s) & (abs(yy - cy) < 0.4 * s)] = 1
        img[ellipse(cy - 0.05 * s, cx - 0.16 * s, 0.12 * s, 0.12 * s)] = 1  # the bump: left of the bar
        img[(abs(yy - (cy + 0.3 * s)) < 0.05 * s) & (xx > cx) & (xx < cx + 0.25 * s)] = 1
        if cls == "RtK":
            img = img[:, ::-1]
    elif cls == "E":
        img[(abs(xx - cx) < 0.07 * s) & (yy > cy - 0.4 * s) & (yy < cy)] = 1
        img[(abs(yy - cy) < 0.07 * s) & (xx > cx - 0.35 * s) & (xx < cx + 0.07 * s)] = 1
    else:
        raise ValueError(f"unknown toy class {cls}")
    return img


def write_toy_dicom(path: str | Path, cls: str, rng: np.random.Generator, rows: int = 80, cols: int = 64,
                    monochrome1: bool = False, sop_uid: str | None = None) -> str:
    """Write one 12-bit CR image of class `cls` (with window and rescale tags); returns its SOPInstanceUID."""
    img = _shape(cls, rows, cols, rng) * rng.uniform(0.6, 0.9) + rng.normal(0.1, 0.03, (rows, cols))
    stored = np.clip(img * 4000, 0, 4095).astype(np.uint16)
    if monochrome1:
        stored = (4095 - stored).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CRImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = CRImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "CR"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope = -1000, 1
    ds.WindowCenter, ds.WindowWidth = 1048, 4096  # covers the rescaled range -1000..3095
    ds.PixelData = stored.tobytes()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)
    return str(ds.SOPInstanceUID)


def build_toy_items(out_dir: str | Path, classes=TOY_CLASSES, n_train: int = 24, n_test: int = 8, seed: int = 0,
                    rows: int = 80, cols: int = 64) -> list[dict]:
    """Write n_train + n_test toy DICOMs per class; returns spec items (half MONOCHROME1)."""
    rng = np.random.default_rng(seed)
    items = []
    for cls in classes:
        for i in range(n_train + n_test):
            uid = generate_uid()
            path = Path(out_dir) / cls / f"{uid}.dcm"
            write_toy_dicom(path, cls, rng, rows, cols, monochrome1=bool(i % 2), sop_uid=uid)
            items.append({"sop_instance_uid": uid, "path": str(path), "class": cls,
                          "split": "train" if i < n_train else "test"})
    return items
