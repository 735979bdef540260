"""JPEG 2000 preprocessing per core: reduced-resolution in-memory decode against the naive full decode.

    .venv/bin/python bench/bench_preprocess.py [--size 256] [--naive-reps 3] [--reduced-reps 20]

Baseline (same run, same process): `preprocess_file(path, size, reduced=False)`, i.e. dcmread,
full `pixel_array` decode (pydicom's default JPEG 2000 plugin), Modality LUT/VOI/MONOCHROME1,
resize to `size`. Ours: `preprocess_file(path, size)` (OpenJPEG via Pillow skips the finest
wavelet levels, in memory). Rates are images per CPU second of this one process (both decoders
run single-threaded), so they are per core even on a loaded machine; wall-clock rates are shown
too. Agreement: |naive - reduced| on the 0-255 output. Target: >= 10x per core.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pydicom import dcmread  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402

from models.preprocess import preprocess_file  # noqa: E402

FILES = ["RG1_J2KR.dcm", "RG3_J2KR.dcm", "RG1_J2KI.dcm", "RG3_J2KI.dcm"]


def rate(path: str, size: int, reduced: bool, reps: int) -> tuple[float, float]:
    """(images per CPU second, images per wall second), after one warm-up call."""
    preprocess_file(path, size, reduced=reduced)
    c, w = time.process_time(), time.perf_counter()
    for _ in range(reps):
        preprocess_file(path, size, reduced=reduced)
    return reps / (time.process_time() - c), reps / (time.perf_counter() - w)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--naive-reps", type=int, default=3)
    ap.add_argument("--reduced-reps", type=int, default=20)
    args = ap.parse_args()
    print(f"image_size {args.size}; img/s per CPU second (wall-clock in brackets)")
    print(f"{'file':14s} {'size':>11s} {'naive':>14s} {'reduced':>16s} {'x naive':>8s} {'mean|d|':>8s} "
          f"{'p99|d|':>7s} {'max|d|':>7s}")
    ratios = []
    for name in FILES:
        path = get_testdata_file(name)
        if path is None:
            print(f"{name}: not found (pip install pydicom-data)")
            continue
        ds = dcmread(path, stop_before_pixels=True)
        n_cpu, n_wall = rate(path, args.size, False, args.naive_reps)
        r_cpu, r_wall = rate(path, args.size, True, args.reduced_reps)
        d = np.abs(preprocess_file(path, args.size, reduced=False)[0].astype(int)
                   - preprocess_file(path, args.size)[0].astype(int))
        ratios.append(r_cpu / n_cpu)
        print(f"{name:14s} {f'{ds.Rows}x{ds.Columns}':>11s} {n_cpu:6.2f} ({n_wall:5.2f}) {r_cpu:7.1f} ({r_wall:6.1f}) "
              f"{r_cpu / n_cpu:7.1f}x {d.mean():8.2f} {np.percentile(d, 99):7.0f} {d.max():7d}")
    if ratios:
        print(f"per-core speed-up: {min(ratios):.1f}-{max(ratios):.1f}x (target >= 10x)")


if __name__ == "__main__":
    main()
