"""Plain-text summary of a run: the study's Table 2 (class, n, accuracy %, confidence mean +- SD) and more."""

from __future__ import annotations

from typing import Any

# Study A's Table 2 (accuracy %, confidence mean, SD) for side-by-side reading; xr10 classes only.
STUDY_TABLE2: dict[str, tuple[float, float, float]] = {
    "W": (100, 1.00, 0.001), "Ps": (100, 1.00, 0.0008), "LtE": (99.3, 0.999, 0.003),
    "RtE": (100, 0.998, 0.02), "LtK": (100, 1.00, 0.0005), "RtK": (100, 0.999, 0.003),
    "C20F": (98.0, 0.997, 0.02), "C20M": (96.3, 0.989, 0.05), "C60F": (99.0, 0.990, 0.05),
    "C60M": (98.0, 0.992, 0.04),
}


def _pct(v: Any) -> float | None:
    """Accuracies are percentages in the API (eq. 1: correct / classified x 100)."""
    return None if v is None else float(v)


def table2(metrics: dict, with_study: bool = True) -> str:
    """The study's Table 2 for this run, as aligned text."""
    rows = metrics.get("per_class") or []
    study = with_study and all(r.get("class") in STUDY_TABLE2 for r in rows)
    head = f"{'class':<8}{'n':>6}{'correct':>9}{'accuracy %':>12}{'confidence mean ± SD':>24}"
    if study:
        head += f"   {'study: acc %':>12}{'conf':>16}"
    lines = [head, "-" * len(head)]
    for r in rows:
        acc = _pct(r.get("accuracy"))
        mean, sd = r.get("confidence_mean"), r.get("confidence_sd")
        conf = "-" if mean is None else f"{mean:.3f} ± {sd:.3f}" if sd is not None else f"{mean:.3f} ± -"
        line = (f"{str(r.get('class')):<8}{r.get('n', '-'):>6}{r.get('correct', '-'):>9}"
                f"{(f'{acc:.1f}' if acc is not None else '-'):>12}{conf:>24}")
        if study:
            s_acc, s_mean, s_sd = STUDY_TABLE2[r["class"]]
            line += f"   {s_acc:>12.1f}{f'{s_mean:.3f} ± {s_sd:g}':>16}"
        lines.append(line)
    return "\n".join(lines)


def summary(metrics: dict, max_suspects: int = 10) -> str:
    """Table 2, overall accuracy, the misclassified count and the header suspects."""
    out = ["Per-class results (the study's Table 2 format; accuracy = correct / classified x 100, "
           "confidence = softmax probability of the predicted class):", "", table2(metrics), ""]
    overall = _pct(metrics.get("overall_accuracy"))
    total = sum(int(r.get("n") or 0) for r in metrics.get("per_class") or [])
    out.append(f"overall accuracy: {overall:.1f} % over {total} test images" if overall is not None
               else "overall accuracy: -")
    mis = metrics.get("misclassified") or []
    out.append(f"misclassified: {len(mis)}")
    for m in mis[:5]:
        out.append(f"  {m.get('sop_instance_uid')}: true {m.get('true')} -> predicted {m.get('predicted')} "
                   f"({float(m.get('confidence') or 0):.3f})")
    suspects = metrics.get("header_suspects") or []
    out.append(f"header suspects (model contradicts the header-derived class with high confidence): {len(suspects)}")
    for s in suspects[:max_suspects]:
        if isinstance(s, dict):
            desc = ", ".join(f"{k}={v}" for k, v in s.items() if k != "sop_instance_uid")
            out.append(f"  {s.get('sop_instance_uid')}: {desc}")
        else:
            out.append(f"  {s}")
    if len(suspects) > max_suspects:
        out.append(f"  ... and {len(suspects) - max_suspects} more")
    for name, exp in (metrics.get("experiments") or {}).items():
        rows = (exp or {}).get("per_class") or []
        if rows:
            accs = [a for a in (_pct(r.get("accuracy")) for r in rows) if a is not None]
            mean = sum(accs) / len(accs) if accs else float("nan")
            out.append(f"experiment {name}: mean per-class accuracy {mean:.1f} % "
                       + "(" + ", ".join(f"{r.get('class')} {_pct(r.get('accuracy')):.0f}" for r in rows
                                         if r.get("accuracy") is not None) + ")")
    return "\n".join(out)
