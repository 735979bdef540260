"""What header suspects are worth: recall and precision of "the model contradicts the header" against
wrong headers injected by the phantom generator (truth from its plan, as in its truth.csv sidecar).

1. Plan a synthetic xr10 PACS with a known rate of wrong body-part / laterality headers and render it.
2. Label every header with the built-in rules and give it its header class (xr10 presets); images
   whose labels conflict, or that match no class, stay out as the cohort builder leaves them out.
3. Out-of-fold predictions: k folds split by patient, a CNN (models.registry, models.engine, the
   default augmentation) trained on the header classes of k-1 folds predicts the held-out fold.
4. A suspect is an image whose predicted class differs from its header class with confidence >= t
   (also reported: only where the classes differ in body part or side, since the injected errors
   are anatomical and age/sex within chest is the model's hard part). Against the images whose
   header class is wrong (the injected errors that reached the cohort), report recall and precision
   for a sweep of t, and the thresholds that meet the target (>= 90 % recall at >= 95 % precision).

    python bench/bench_qc.py                          # CPU: 40 per class, 64 px, cnn4, 3 folds, 12 epochs
    python bench/bench_qc.py --per-class 1500 --image-size 256 --model resnet18 --epochs 30 --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TAXONOMY = "xr10"


def _render(args) -> tuple[int, np.ndarray, dict]:
    """One planned instance -> (index, uint8 image, header record)."""
    from app.index.extract import extract_record
    from app.synth.generate import make_instance, parse_size
    from models.preprocess import preprocess_dataset

    p, seed, image_size = args
    # render at about twice the training size: enough detail, fast on a CPU
    ds, _, _ = make_instance(p, seed, parse_size(f"{image_size * 2}x{int(image_size * 2.5)}"))
    img, _ = preprocess_dataset(ds, image_size, reduced=False)
    return p.index, img, extract_record(ds)


def build(per_class: int, error_rate: float, seed: int, image_size: int, workers: int,
          include_conflicts: bool = False):
    """Planned instances, images, and each one's header class (None = not in the cohort)."""
    from app.cohorts.taxonomies import matches, presets
    from app.labels.engine import compute_labels, load_rules
    from app.synth.headers import plan

    planned = plan(TAXONOMY, per_class, seed, header_error_rate=error_rate, syntaxes=["explicit"])
    rules = load_rules()
    classes = presets()[TAXONOMY]["classes"]
    images = [None] * len(planned)
    header_class: list[str | None] = [None] * len(planned)
    excluded = Counter()
    jobs = [(p, seed, image_size) for p in planned]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for idx, img, rec in pool.map(_render, jobs, chunksize=8):
            images[idx] = img
            r = compute_labels(rec, rules)
            labels = {"modality": rec["modality"], "body_part": r.body_part, "view": r.view,
                      "laterality": r.laterality, "sex": r.sex, "age_years": r.age_years}
            got = [c["name"] for c in classes if matches(c["where"], labels)]
            if r.has_conflict and not include_conflicts:
                excluded["conflict"] += 1
            elif len(got) != 1:
                excluded["no_class" if not got else "several_classes"] += 1
            else:
                header_class[idx] = got[0]
    return planned, np.stack(images), header_class, [c["name"] for c in classes], excluded


def out_of_fold(images, y, groups, n_classes: int, args) -> np.ndarray:
    """Softmax probabilities for every image from a model that never trained on its patient."""
    import torch

    from models.config import _default_augment
    from models.engine import (DeviceData, evaluate, make_optimizer, make_scheduler, seed_everything,
                               setup_runtime, steps_per_epoch, train_one_epoch)
    from models.registry import build_model

    rt = setup_runtime(args.device)
    batch = args.batch_size or (256 if rt.cuda else 32)
    uniq = np.unique(groups)
    rng = np.random.default_rng(args.seed)
    fold_of = dict(zip(uniq, rng.permutation(len(uniq)) % args.folds))
    fold = np.array([fold_of[g] for g in groups])
    probs = np.zeros((len(y), n_classes))
    for k in range(args.folds):
        seed_everything(args.seed + k)
        tr, te = np.flatnonzero(fold != k), np.flatnonzero(fold == k)
        data = DeviceData(images[tr], y[tr], np.full(len(tr), args.image_size), rt, batch)
        model = build_model(args.model, n_classes).to(rt.device)
        if rt.cuda:
            model = model.to(memory_format=torch.channels_last)
        opt = make_optimizer(model, args.lr, 0.05, rt)
        steps = steps_per_epoch(len(tr), batch)
        sched = make_scheduler(opt, steps * args.epochs, max(1, steps // 2))
        gen = torch.Generator(device=rt.device).manual_seed(args.seed + k)
        aug = _default_augment()
        for epoch in range(args.epochs):
            perm = torch.from_numpy(np.random.default_rng([args.seed, k, epoch]).permutation(len(tr)))
            stats = train_one_epoch(model, opt, sched, data, perm, batch, rt, aug, gen)
        held = DeviceData(images[te], y[te], np.full(len(te), args.image_size), rt, batch)
        probs[te] = evaluate(model, held, batch, rt)
        acc = float((probs[te].argmax(1) == y[te]).mean() * 100)
        print(f"  fold {k + 1}/{args.folds}: trained on {len(tr)}, last epoch {stats['accuracy']:.1f} % "
              f"(header classes), held-out agreement with headers {acc:.1f} %", flush=True)
    return probs


def sweep(probs: np.ndarray, y: np.ndarray, wrong: np.ndarray, same_anatomy: np.ndarray | None = None) -> list[dict]:
    """Recall/precision per threshold; with `same_anatomy` (C x C, classes with the same body part and
    side), disagreements only about age or sex are not suspects (the injected errors are anatomical)."""
    pred, conf = probs.argmax(1), probs.max(1)
    disagree = pred != y if same_anatomy is None else ~same_anatomy[pred, y]
    rows = []
    for t in (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999):
        flagged = disagree & (conf >= t)
        tp = int((flagged & wrong).sum())
        rows.append({"threshold": t, "suspects": int(flagged.sum()), "true_positives": tp,
                     "recall": tp / int(wrong.sum()) if wrong.any() else None,
                     "precision": tp / int(flagged.sum()) if flagged.any() else None})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-class", type=int, default=40)
    ap.add_argument("--error-rate", type=float, default=0.1, help="share of planned headers made wrong")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--model", default="radcohort_cnn4")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--include-conflicts", action="store_true",
                    help="let images with conflicting labels in (as cohorts --include-conflicts): their header "
                         "class is the highest-priority source's, so wrong BodyPartExamined values reach the model")
    ap.add_argument("--json", type=Path, help="also write the result here")
    args = ap.parse_args()
    import os

    t0 = time.perf_counter()
    planned, images, header_class, classes, excluded = build(
        args.per_class, args.error_rate, args.seed, args.image_size, args.workers or os.cpu_count() or 1,
        args.include_conflicts)
    t_build = time.perf_counter() - t0
    injected = Counter(p.header_error for p in planned if p.header_error)
    keep = np.array([c is not None for c in header_class])
    idx = np.flatnonzero(keep)
    y = np.array([classes.index(header_class[i]) for i in idx])
    truth = np.array([classes.index(planned[i].true_class) for i in idx])
    wrong = y != truth
    reached = Counter(planned[i].header_error or "none" for i in idx[wrong])
    caught_by_rules = Counter(planned[i].header_error for i in range(len(planned))
                              if planned[i].header_error and not keep[i])
    print(f"{len(planned)} images ({args.per_class} per class) rendered and labelled in {t_build:.1f} s; "
          f"injected wrong headers: {dict(injected)}")
    print(f"left out of the cohort by the header rules: {dict(excluded)} (of them injected: {dict(caught_by_rules)})")
    print(f"in the cohort: {len(idx)}, of which header class wrong: {int(wrong.sum())} {dict(reached)}")
    t1 = time.perf_counter()
    groups = np.array([planned[i].patient.patient_id for i in idx])
    probs = out_of_fold(images[idx], y, groups, len(classes), args)
    t_train = time.perf_counter() - t1
    acc_truth = float((probs.argmax(1) == truth).mean() * 100)
    print(f"out-of-fold accuracy against the true class {acc_truth:.1f} % ({t_train:.0f} s of training)")
    from app.cohorts.taxonomies import presets

    where = {c["name"]: c["where"] for c in presets()[TAXONOMY]["classes"]}
    anatomy = [(where[c].get("body_part"), where[c].get("view"), where[c].get("laterality")) for c in classes]
    same_anatomy = np.array([[a == b for b in anatomy] for a in anatomy])
    sweeps = {}
    for name, mask in (("any class", None), ("body part or side", same_anatomy)):
        rows = sweeps[name] = sweep(probs, y, wrong, mask)
        print(f"suspects = the model's class differs from the header's in {name}:")
        print(f"{'threshold':>9} {'suspects':>8} {'right':>6} {'recall':>7} {'precision':>9}")
        for r in rows:
            pct = [("-" if v is None else f"{v:.1%}") for v in (r["recall"], r["precision"])]
            print(f"{r['threshold']:>9} {r['suspects']:>8} {r['true_positives']:>6} {pct[0]:>7} {pct[1]:>9}")
    meeting = {name: [r["threshold"] for r in rows if (r["recall"] or 0) >= 0.9 and (r["precision"] or 0) >= 0.95]
               for name, rows in sweeps.items()}
    print("thresholds meeting >= 90 % recall at >= 95 % precision:", meeting)
    result = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "images": len(planned), "in_cohort": int(len(idx)), "wrong_in_cohort": int(wrong.sum()),
              "injected": dict(injected), "excluded": dict(excluded), "excluded_injected": dict(caught_by_rules),
              "accuracy_vs_truth": acc_truth, "sweeps": sweeps, "meeting_target": meeting,
              "seconds": {"build": round(t_build, 1), "train": round(t_train, 1)}}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
