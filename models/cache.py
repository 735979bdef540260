"""Preprocessed-image cache: one .npz per instance, keyed by SOPInstanceUID and the preprocessing params.

Layout: CACHE_DIR/pp-<params hash>/<uid[-2:]>/<uid>.npz holding `img` (uint8 S x S) and `orig`
(original rows, cols). Entries are written atomically (tmp + rename), so concurrent jobs and a
killed worker never leave a half-written entry; any job with the same params reuses them.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from models.config import fingerprint
from models.preprocess import PreprocessError, preprocess_file, preprocess_params


def cache_root(cache_dir: str | Path, image_size: int) -> Path:
    return Path(cache_dir) / f"pp-{fingerprint(preprocess_params(image_size))}"


def entry_path(root: Path, uid: str) -> Path:
    return root / uid[-2:] / f"{uid}.npz"


def _write_entry(path: Path, img: np.ndarray, orig: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # host and pid: local rank 0 of several hosts may fill one shared cache at once
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, img=img, orig=np.asarray(orig, dtype=np.int32))
    os.replace(tmp, path)


def _work(args: tuple[str, str, str, int]) -> tuple[str, str | None]:
    """Pool task: preprocess one file into the cache; returns (uid, error or None)."""
    uid, path, out, size = args
    try:
        img, orig = preprocess_file(path, size)
        _write_entry(Path(out), img, orig)
        return uid, None
    except PreprocessError as exc:
        return uid, str(exc)
    except Exception as exc:  # noqa: BLE001 - one bad file must not stop the job
        return uid, f"{type(exc).__name__}: {exc}"


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def build_cache(
    items: Sequence[dict],
    cache_dir: str | Path,
    image_size: int,
    workers: int | None = None,
    progress: Callable[[dict], None] | None = None,
) -> dict[str, str]:
    """Preprocess every item not yet cached, with `workers` processes; returns {uid: error} of failures.

    Emits {"event": "preprocess", "done", "total"} at most ~20 times plus once at the end.
    """
    root = cache_root(cache_dir, image_size)
    todo = [
        (it["sop_instance_uid"], str(it["path"]), str(entry_path(root, it["sop_instance_uid"])), int(image_size))
        for it in items
        if not entry_path(root, it["sop_instance_uid"]).exists()
    ]
    total, done, errors = len(items), len(items) - len(todo), {}
    emit = progress or (lambda e: None)
    emit({"event": "preprocess", "done": done, "total": total})
    if not todo:
        return errors
    workers = min(workers or default_workers(), len(todo))
    step, last = max(1, total // 20), time.monotonic()

    def record(res: tuple[str, str | None]) -> None:
        nonlocal done, last
        uid, err = res
        done += 1
        if err is not None:
            errors[uid] = err
        if done % step == 0 or time.monotonic() - last > 5:
            last = time.monotonic()
            emit({"event": "preprocess", "done": done, "total": total})

    if workers <= 1 or len(todo) < 16:
        for args in todo:
            record(_work(args))
    else:
        # fork, like torch's DataLoader workers: children never touch torch/CUDA, and spawn would
        # re-import the caller's __main__ (breaking scripts without a main guard).
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ctx.Pool(workers) as pool:
            for res in pool.imap_unordered(_work, todo, chunksize=max(1, min(32, len(todo) // (workers * 8)))):
                record(res)
    emit({"event": "preprocess", "done": done, "total": total})
    return errors


def load_cached(items: Sequence[dict], cache_dir: str | Path, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Stack the cached images of `items` (all must be cached) -> (uint8 N x S x S, int32 N x 2 orig shapes)."""
    root = cache_root(cache_dir, image_size)
    images = np.empty((len(items), image_size, image_size), dtype=np.uint8)
    orig = np.empty((len(items), 2), dtype=np.int32)
    for i, it in enumerate(items):
        with np.load(entry_path(root, it["sop_instance_uid"])) as z:
            images[i] = z["img"]
            orig[i] = z["orig"]
    return images, orig
