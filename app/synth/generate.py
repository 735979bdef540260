"""Generate a synthetic radiograph collection: DICOM files plus the truth sidecar (truth.csv).

Deterministic for a seed whatever the number of workers: the plan is made sequentially, and
each instance renders from its own RNG seeded by (seed, index).
"""

from __future__ import annotations

import csv
import math
import multiprocessing as mp
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from app.synth.codecs import TRANSFER_SYNTAXES, set_pixels
from app.synth.headers import (
    DETECTORS,
    PlannedInstance,
    add_spacing,
    add_voi,
    build_dataset,
    plan,
    subject_of,
)
from app.synth.render import FOV_MM, Acquisition, render

TRUTH_COLUMNS = ["sop_instance_uid", "true_class", "patient_id", "study_uid", "series_uid",
                 "transfer_syntax", "header_error", "file", "region", "side", "sex", "age", "vendor"]


def parse_size(size: str | tuple[int, int] | None) -> tuple[str, object]:
    """'full' (vendor detector), 'small' (1/8 of it), 'scale:F' or 'WxH' (columns x rows)."""
    if size is None or size == "full":
        return "scale", 1.0
    if isinstance(size, tuple):
        return "fixed", (int(size[0]), int(size[1]))
    s = str(size).strip().lower()
    if s == "small":
        return "scale", 0.125
    if s.startswith("scale:"):
        f = float(s.split(":", 1)[1])
        if not 0.01 <= f <= 1.0:
            raise ValueError("scale must be within 0.01..1")
        return "scale", f
    if "x" in s:
        w, h = (int(v) for v in s.split("x", 1))
        if not (32 <= w <= 4096 and 32 <= h <= 4096):
            raise ValueError("WxH must be within 32..4096 on each side")
        return "fixed", (w, h)
    raise ValueError(f"size must be full, small, scale:F or WxH, not {size!r}")


def check_options(taxonomy: str, size, syntaxes: list[str] | None, header_error_rate: float) -> None:
    """Raise ValueError for bad options before any work starts."""
    from app.synth.headers import TAXONOMIES

    if taxonomy not in TAXONOMIES:
        raise ValueError(f"unknown taxonomy {taxonomy!r}; choose from {sorted(TAXONOMIES)}")
    parse_size(size)
    if syntaxes is not None and (not syntaxes or set(syntaxes) - set(TRANSFER_SYNTAXES)):
        raise ValueError(f"unknown transfer syntax in {syntaxes}; choose from {sorted(TRANSFER_SYNTAXES)}")
    if not 0.0 <= header_error_rate <= 1.0:
        raise ValueError("header_error_rate must be within 0..1")


def _dims(p: PlannedInstance, size_spec: tuple[str, object]) -> tuple[int, int]:
    kind, val = size_spec
    if kind == "fixed":
        return val  # type: ignore[return-value]
    cols, rows = DETECTORS[p.vendor.detector]
    return max(32, int(round(cols * val))), max(32, int(round(rows * val)))  # type: ignore[operator]


def _acquisition(p: PlannedInstance, rows: int, cols: int, photometric: str, bits: int, marker: bool,
                 burned_in: bool, rng: np.random.Generator) -> Acquisition:
    chest = p.region == "chest"
    fov = FOV_MM[p.region]
    coll = (0.0, 0.0, 0.0, 0.0) if chest and rng.random() < 0.5 else tuple(
        float(rng.uniform(0.0, 0.05 if chest else 0.10)) for _ in range(4))
    letter = p.side or ("R" if rng.random() < 0.6 else "L")
    # lead markers sit on the lateral side for limbs (viewer's left for a right limb)
    corner = "t" + ("l" if letter == "R" else "r")  # top: the burned-in text sits bottom-left
    text = []
    if burned_in:
        text = [f"S:{int(rng.integers(80, 600))} L:{rng.uniform(1.4, 2.6):.1f}",
                p.study_date.strftime("%Y/%m/%d")]
    return Acquisition(
        rows=rows, cols=cols, bits_stored=bits, monochrome1=photometric == "MONOCHROME1",
        rotation_deg=float(np.clip(rng.normal(0, 5), -15, 15)),
        shift_mm=(float(rng.normal(0, 0.025 * fov)), float(rng.normal(0, 0.025 * fov))),
        zoom=float(rng.uniform(0.92, 1.08)), exposure=float(np.exp(rng.normal(0, 0.4))),
        contrast=(float(rng.uniform(0.04, 0.2)), float(rng.uniform(0.7, 0.93))),
        collimation=coll, edge_enhance=float(rng.uniform(0.2, 1.2)), marker=letter if marker else "", marker_corner=corner, text=text)


def make_instance(p: PlannedInstance, seed: int, size_spec: tuple[str, object], encode: bool = True):
    """Header + pixels for one planned instance: (Dataset, pixel array, truth row without file).

    With encode=False the pixel data is not written into the Dataset (faster, for analysis).
    """
    rng_h = np.random.default_rng([seed, p.index, 1])
    rng_p = np.random.default_rng([seed, p.index, 2])
    cols, rows = _dims(p, size_spec)
    ds, info = build_dataset(p, seed, rng_h, (cols, rows))
    acq = _acquisition(p, rows, cols, info.photometric, info.bits_stored, info.marker, info.burned_in, rng_p)
    arr = render(subject_of(p, rng_p), acq, rng_p)
    if not encode:
        return ds, arr, None
    add_spacing(ds, FOV_MM[p.region] / acq.zoom / cols, rng_h)
    lo, hi = np.percentile(arr[::8, ::8], [1, 99])
    add_voi(ds, int(lo), int(hi), rng_h, p.vendor)
    set_pixels(ds, arr, p.syntax)
    row = {
        "sop_instance_uid": str(ds.SOPInstanceUID), "true_class": p.true_class, "patient_id": p.patient.patient_id,
        "study_uid": str(ds.StudyInstanceUID), "series_uid": str(ds.SeriesInstanceUID),
        "transfer_syntax": str(TRANSFER_SYNTAXES[p.syntax]), "header_error": p.header_error,
        "region": p.region, "side": p.side, "sex": p.sex, "age": p.age, "vendor": p.vendor.key,
    }
    return ds, arr, row


def _write_one(args) -> dict:
    p, seed, size_spec, out_dir = args
    ds, _, row = make_instance(p, seed, size_spec)
    rel = Path("dicom") / f"{p.index // 1000:03d}" / f"{p.index:06d}.dcm"
    path = Path(out_dir) / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    ds.save_as(tmp, enforce_file_format=True)
    os.replace(tmp, path)  # never leave a half-written .dcm behind
    row["file"] = rel.as_posix()
    return row


@dataclass
class SynthSummary:
    out_dir: Path
    count: int
    seconds: float
    workers: int
    per_class: dict[str, int] = field(default_factory=dict)
    per_syntax: dict[str, int] = field(default_factory=dict)
    header_errors: dict[str, int] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.count / self.seconds if self.seconds else math.inf


def generate(out_dir: str | Path, per_class: int, seed: int = 0, taxonomy: str = "xr10",
             header_error_rate: float = 0.0, size: str | tuple[int, int] | None = "full",
             workers: int | None = None, progress: Callable[[int, int], None] | None = None,
             syntaxes: list[str] | None = None) -> SynthSummary:
    """Write per_class instances of every class of `taxonomy` under out_dir/dicom and out_dir/truth.csv.

    `syntaxes` (names from codecs.TRANSFER_SYNTAXES) overrides the vendors' transfer syntax mix.
    """
    if per_class < 1:
        raise ValueError("per_class must be at least 1")
    size_spec = parse_size(size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    planned = plan(taxonomy, per_class, seed, header_error_rate, syntaxes=syntaxes)
    workers = max(1, min(workers or os.cpu_count() or 1, len(planned)))
    jobs = [(p, seed, size_spec, str(out)) for p in planned]
    rows: list[dict] = []
    t0 = time.perf_counter()
    if workers == 1:
        for j in jobs:
            rows.append(_write_one(j))
            if progress:
                progress(len(rows), len(jobs))
    else:
        # spawn: safe next to threads (progress bars) in the parent; each worker builds its own noise bank
        with mp.get_context("spawn").Pool(workers) as pool:
            for r in pool.imap_unordered(_write_one, jobs, chunksize=max(1, min(8, len(jobs) // (workers * 4)))):
                rows.append(r)
                if progress:
                    progress(len(rows), len(jobs))
    seconds = time.perf_counter() - t0
    rows.sort(key=lambda r: r["file"])
    tmp = out / "truth.csv.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=TRUTH_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, out / "truth.csv")
    return SynthSummary(out, len(rows), seconds, workers,
                        dict(Counter(r["true_class"] for r in rows)),
                        dict(Counter(r["transfer_syntax"] for r in rows)),
                        dict(Counter(r["header_error"] for r in rows if r["header_error"])))


def read_truth(out_dir: str | Path) -> list[dict]:
    with open(Path(out_dir) / "truth.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))
