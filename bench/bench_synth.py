"""Synthetic radiograph throughput: render-only and full pipeline, one core, against an in-run baseline.

Target (issue 3): >= 20 full-size images per second per core for rendering.
Baseline: the least work any full-size image needs (fill a 2048 x 2500 float32 image, scale it,
convert to uint16), timed in the same run so ratios hold on a busy or different machine.

    .venv/bin/python bench/bench_synth.py [--n 40] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.synth.codecs import set_pixels  # noqa: E402
from app.synth.generate import generate, make_instance, parse_size  # noqa: E402
from app.synth.headers import plan  # noqa: E402


CPU: list[float] = []


def _timeit(fn, n: int) -> float:
    """Wall seconds per call; the CPU seconds per call go to CPU (the per-core cost on a shared machine)."""
    fn()  # warm-up (noise bank, glyph cache)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        fn()
    CPU.append((time.process_time() - c0) / n)
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=40, help="images per measurement")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()

    def baseline():
        a = np.full((2500, 2048), 0.5, np.float32)
        a *= 4095
        return a.astype(np.uint16)

    t_base = _timeit(baseline, args.n)
    c_base = CPU[-1]
    print(f"baseline (fill+scale+uint16 of 2048x2500): {t_base * 1e3:.1f} ms wall, {c_base * 1e3:.1f} ms CPU")

    spec = parse_size("2048x2500")
    planned = plan("xr10", max(1, args.n // 10 + 1), seed=0)[: args.n]
    it = iter(range(10**9))

    def render_one():
        p = planned[next(it) % len(planned)]
        return make_instance(p, 0, spec, encode=False)

    t_render = _timeit(render_one, args.n)
    c_render = CPU[-1]
    print(f"render only, 2048x2500, mixed classes: {t_render * 1e3:.1f} ms wall = {1 / t_render:.1f} img/s; "
          f"{c_render * 1e3:.1f} ms CPU = {1 / c_render:.1f} img/s per core "
          f"(x{c_render / c_base:.1f} baseline CPU; target >= 20 img/s per core)")

    ds, arr, _ = make_instance(planned[0], 0, spec, encode=False)
    for syntax in ("explicit", "rle", "jpeg_sv1", "jpegls", "j2k"):
        def enc():
            set_pixels(ds, arr, syntax)

        _timeit(enc, max(3, args.n // 8))
        print(f"  encode {syntax:9s}: {CPU[-1] * 1e3:7.1f} ms CPU (x{CPU[-1] / c_base:.1f} baseline)")

    for syntaxes in (["explicit"], None):
        with tempfile.TemporaryDirectory() as d:
            s = generate(d, max(1, args.n // 10), seed=1, size="full", workers=args.workers, syntaxes=syntaxes)
            what = "explicit VR only" if syntaxes else "vendor mix of syntaxes"
            print(f"generate(full sizes, {what}, {s.workers} workers): {s.count} files in {s.seconds:.1f} s = "
                  f"{s.images_per_second:.1f} img/s wall, {s.images_per_second / s.workers:.1f} per worker")


if __name__ == "__main__":
    main()
