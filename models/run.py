"""One training job from RUN_DIR/spec.json: cache -> train (resumable) -> evaluate -> artifacts.

    python -m models.run RUN_DIR/spec.json
    torchrun --nproc_per_node N -m models.run RUN_DIR/spec.json

Exit codes: 0 done (metrics.json written), 3 cancelled (RUN_DIR/CANCEL), 1 failed (error.txt).
Rank 0 writes every output; progress.jsonl is appended to (a resumed run continues the file).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from models.cache import build_cache, load_cached
from models.config import TrainConfig, fingerprint, merge_params
from models.engine import (
    NORM_MEAN,
    NORM_STD,
    Cancelled,
    DeviceData,
    Runtime,
    epoch_indices,
    evaluate,
    make_optimizer,
    make_scheduler,
    rank_shard,
    seed_everything,
    setup_runtime,
    steps_per_epoch,
    teardown,
    train_one_epoch,
)
from models.experiments import transform_for
from models.metrics import compute_metrics, overall_accuracy, summary
from models.preprocess import preprocess_params
from models.registry import build_model, resolve_name
from models.spec import SPLITS, RunSpec, SpecError  # noqa: F401 - SpecError: models.run's error, as before

EXIT_OK, EXIT_FAILED, EXIT_CANCELLED = 0, 1, 3


class Progress:
    """Appends JSON events to RUN_DIR/progress.jsonl (flushed per line) and calls `callback`."""

    def __init__(self, path: Path, callback: Callable[[dict], None] | None, enabled: bool) -> None:
        self.enabled, self.callback = enabled, callback
        self.fh = open(path, "a", buffering=1) if enabled else None  # noqa: SIM115 - closed in close()

    def emit(self, event: dict) -> None:
        if not self.enabled:
            return
        self.fh.write(json.dumps(event) + "\n")
        self.fh.flush()
        if self.callback:
            self.callback(event)

    def close(self) -> None:
        if self.fh:
            self.fh.close()


def _to_cpu(obj: Any) -> Any:
    """Deep copy with every tensor cloned to the CPU (training goes on mutating the originals)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


class CheckpointWriter:
    """Writes the epoch checkpoint on a background thread while the next epoch trains, then emits
    that epoch's event: an "epoch k" event still means epoch k is on disk and resumable.

    At most one write is in flight (the next submit waits for it): two copies in memory at most.
    """

    def __init__(self, path: Path, prog: Progress) -> None:
        self.path, self.prog = path, prog
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self.pending: Future | None = None

    def _write(self, state: dict, event: dict) -> None:
        _atomic_torch(self.path, state)
        self.prog.emit(event)

    def submit(self, state: dict, event: dict) -> None:
        self.wait()
        self.pending = self.pool.submit(self._write, _to_cpu(state), event)

    def wait(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()  # a failed write raises here, in the training thread

    def close(self, raise_errors: bool = True) -> None:
        try:
            self.wait()
        except Exception:
            if raise_errors:
                raise
        finally:
            self.pool.shutdown(wait=True)


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def _atomic_torch(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def validate_spec(spec: dict | RunSpec) -> tuple[list[str], list[dict]]:
    """(classes, items as dicts) of a valid spec; SpecError says what is wrong."""
    rs = spec if isinstance(spec, RunSpec) else RunSpec.parse(spec)
    return list(rs.classes), [it.as_dict() for it in rs.items]


def _broadcast(obj: Any, rt: Runtime) -> Any:
    if not rt.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _stop_check(run_dir: Path, rt: Runtime) -> Callable[[], bool]:
    cancel = run_dir / "CANCEL"
    if not rt.distributed:
        return cancel.exists
    flag = torch.zeros(1, device=rt.device)

    def check() -> bool:  # every rank must stop on the same batch
        flag.fill_(1.0 if (rt.is_main and cancel.exists()) else 0.0)
        dist.all_reduce(flag)
        return bool(flag.item())

    return check


def run_spec(spec: dict | RunSpec, progress: Callable[[dict], None] | None = None) -> dict:
    """Run one job in-process. Returns the metrics dict on rank 0 ({} on other ranks).

    Raises Cancelled when RUN_DIR/CANCEL appears, SpecError/ValueError for bad input.
    """
    rs = spec if isinstance(spec, RunSpec) else RunSpec.parse(spec)
    classes, items = validate_spec(rs)
    cfg = merge_params(rs.params)
    spec = rs.to_json()
    run_dir = Path(spec["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    rt = setup_runtime(cfg.device)
    prog = Progress(run_dir / "progress.jsonl", progress, rt.is_main)
    saver = CheckpointWriter(run_dir / "checkpoint.pt", prog)
    try:
        return _run(spec, cfg, classes, items, run_dir, rt, prog, saver)
    finally:
        saver.close(raise_errors=False)  # no-op after a clean run; never masks the real error
        prog.close()
        teardown(rt)


def _run(spec: dict, cfg: TrainConfig, classes: list[str], items: list[dict], run_dir: Path, rt: Runtime,
         prog: Progress, saver: CheckpointWriter) -> dict:
    t_start = time.monotonic()
    stop = _stop_check(run_dir, rt)
    check_every = 10 if rt.distributed else 1
    if stop():
        raise Cancelled()
    bs = cfg.resolved_batch_size(rt.cuda)
    model_name = resolve_name(cfg.model, cfg.depth)
    if rt.is_main:
        (run_dir / "error.txt").unlink(missing_ok=True)  # a stale failure from an earlier attempt
        resolved = cfg.to_dict() | {"resolved": {"model": model_name, "batch_size": bs, "lr": cfg.resolved_lr(),
                                                 "world_size": rt.world_size, "device": str(rt.device),
                                                 "preprocess": preprocess_params(cfg.image_size)}}
        _atomic_json(run_dir / "config.json", resolved)

    # 1. cache: local rank 0 of every host builds it (hosts need not share a file system; on a shared one
    # the writes are atomic and the second host finds the entries made), the others wait at the broadcast
    errors = (build_cache(items, spec["cache_dir"], cfg.image_size, cfg.workers, prog.emit)
              if rt.local_rank == 0 else None)
    errors = _broadcast(errors, rt)
    skipped = [{"sop_instance_uid": uid, "reason": why} for uid, why in errors.items()]
    for s in skipped:
        prog.emit({"event": "skipped", **s})
    usable = [it for it in items if it["sop_instance_uid"] not in errors]
    by_split = {s: [it for it in usable if it["split"] == s] for s in SPLITS}
    if len(by_split["train"]) < 2:
        raise ValueError(f"only {len(by_split['train'])} usable training image(s) ({len(skipped)} skipped)")
    if not by_split["test"]:
        raise ValueError(f"no usable test images ({len(skipped)} skipped)")
    cidx = {c: i for i, c in enumerate(classes)}

    def place(split_items: list[dict]) -> DeviceData:
        imgs, orig = load_cached(split_items, spec["cache_dir"], cfg.image_size)
        return DeviceData(imgs, np.array([cidx[it["class"]] for it in split_items]), orig[:, 0], rt, bs)

    # every rank loads only its shard of the training split
    train_items = by_split["train"]
    train = place([train_items[i] for i in rank_shard(len(train_items), rt)])
    if rt.distributed:
        sizes: list = [None] * rt.world_size
        dist.all_gather_object(sizes, len(train))
        prog.emit({"event": "shards", "train": len(train_items), "per_rank": sizes})
    monitor_items = by_split["val"] or (by_split["test"] if cfg.monitor_test else [])
    monitor = place(monitor_items) if (monitor_items and rt.is_main) else None

    # 2. model, optimiser, schedule; resume from the last epoch checkpoint when it fits this job
    seed_everything(cfg.seed)
    model = build_model(cfg.model, len(classes), cfg.depth, cfg.weights).to(rt.device)
    if rt.cuda:
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, cfg.resolved_lr(), cfg.weight_decay, rt)
    spe = steps_per_epoch(len(train), bs)
    sched = make_scheduler(opt, spe * cfg.epochs, round(spe * cfg.warmup_epochs))
    job_fp = fingerprint({"cfg": {k: v for k, v in cfg.to_dict().items() if k not in ("workers", "device")},
                          "classes": classes, "world": rt.world_size,
                          "train": [it["sop_instance_uid"] for it in by_split["train"]]})
    ckpt_path, start_epoch, history = run_dir / "checkpoint.pt", 0, []
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ck.get("fingerprint") == job_fp:
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
            start_epoch, history = int(ck["epoch"]), list(ck["history"])
            # the checkpoint's history restores epochs whose progress line died with the previous run
            prog.emit({"event": "resume", "from_epoch": start_epoch + 1, "epochs": cfg.epochs, "history": history})
        else:
            prog.emit({"event": "resume_ignored", "reason": "checkpoint belongs to different parameters or data"})
    net = model
    if rt.distributed:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rt.device.index] if rt.cuda else None)
    if cfg.compile:
        net = torch.compile(net)
    device_desc = rt.describe()

    # 3. epochs
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.monotonic()
        gen = torch.Generator(device=rt.device).manual_seed(cfg.seed * 100_003 + epoch * 1_009 + rt.rank)
        idx = epoch_indices(len(train), epoch, cfg.seed, rt)
        stats = train_one_epoch(net, opt, sched, train, idx, bs, rt, cfg.augment, gen, stop, check_every)
        if rt.cuda:
            torch.cuda.synchronize()
        train_s = time.monotonic() - t0
        val_acc = None
        if monitor is not None:
            y = monitor.labels.cpu().numpy()
            val_acc = overall_accuracy(y, evaluate(model, monitor, bs, rt))
        epoch_s = time.monotonic() - t0
        rec = {"epoch": epoch + 1, "epochs": cfg.epochs, "loss": stats["loss"], "train_accuracy": stats["accuracy"],
               "val_accuracy": val_acc, "images_per_second": stats["images"] / max(train_s, 1e-9),
               "eta_seconds": epoch_s * (cfg.epochs - epoch - 1), "device": device_desc}
        history.append(rec)
        if rt.is_main:
            saver.submit({"epoch": epoch + 1, "model": model.state_dict(), "optimizer": opt.state_dict(),
                          "scheduler": sched.state_dict(), "history": list(history), "fingerprint": job_fp},
                         {"event": "epoch", **rec})
        if stop():
            raise Cancelled()
    saver.wait()
    train_seconds = time.monotonic() - t_start

    # 4. evaluation, experiments and artifacts (rank 0)
    if not rt.is_main:
        return {}
    test_items = by_split["test"]
    test = place(test_items)
    y_test = test.labels.cpu().numpy()
    uids = [it["sop_instance_uid"] for it in test_items]
    metrics = compute_metrics(y_test, evaluate(model, test, bs, rt), classes, uids, cfg.suspect_threshold)
    metrics["experiments"] = {name: summary(y_test, evaluate(model, test, bs, rt, transform_for(name, test)), classes)
                              for name in cfg.experiments}
    metrics["skipped"] = skipped
    meta = spec.get("meta") or {}
    _atomic_torch(run_dir / "model.pt", {
        "model": {k: v.cpu() for k, v in model.state_dict().items()}, "classes": classes, "model_name": model_name,
        "arch": {"model": cfg.model, "depth": cfg.depth}, "image_size": cfg.image_size,
        "preprocess": preprocess_params(cfg.image_size), "normalize": {"mean": NORM_MEAN, "std": NORM_STD},
    })
    card = {
        "job_id": spec.get("job_id"), "cohort_id": meta.get("cohort_id"), "taxonomy": meta.get("taxonomy"),
        "ruleset_version": meta.get("ruleset_version"), "code_version": meta.get("code_version"),
        "created": datetime.now(timezone.utc).isoformat(), "model": model_name, "classes": classes,
        "device": device_desc, "n_train": len(train), "n_test": len(test_items), "train_seconds": train_seconds,
        "metrics": {"overall_accuracy": metrics["overall_accuracy"],
                    "per_class": [{k: r[k] for k in ("class", "n", "accuracy", "confidence_mean", "confidence_sd")}
                                  for r in metrics["per_class"]],
                    "experiments": {k: v["overall_accuracy"] for k, v in metrics["experiments"].items()},
                    "misclassified": len(metrics["misclassified"]), "header_suspects": len(metrics["header_suspects"]),
                    "skipped": len(skipped)},
        "config": cfg.to_dict(),
    }
    _atomic_json(run_dir / "model_card.json", card)
    from models.report import write_report

    write_report(run_dir, metrics, history, card)
    _atomic_json(run_dir / "metrics.json", metrics)  # last: its presence means the job's outputs are complete
    prog.emit({"event": "done", "overall_accuracy": metrics["overall_accuracy"], "seconds": time.monotonic() - t_start})
    return metrics


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m models.run RUN_DIR/spec.json", file=sys.stderr)
        return 2
    spec_path = Path(argv[0])
    run_dir = spec_path.parent
    rank = int(os.environ.get("RANK", "0"))
    try:
        spec = json.loads(spec_path.read_text())
        run_dir = Path(spec.get("run_dir") or run_dir)
        run_spec(spec)
        return EXIT_OK
    except Cancelled:
        if rank == 0:
            with open(run_dir / "progress.jsonl", "a") as fh:
                fh.write(json.dumps({"event": "cancelled"}) + "\n")
        return EXIT_CANCELLED
    except Exception as exc:  # noqa: BLE001 - every failure ends as error.txt + non-zero exit
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "error.txt").write_text(f"{type(exc).__name__}: {exc}\n")
            traceback.print_exc()
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
