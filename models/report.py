"""RUN_DIR/report.md with confusion.png, per_class.png and curves.png (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table2(rows: list[dict]) -> str:
    """Markdown table in the study's Table 2 format."""
    lines = ["| class | n | accuracy % | confidence mean ± SD |", "| --- | ---: | ---: | --- |"]
    for r in rows:
        conf = f"{_fmt(r['confidence_mean'], '.3f')} ± {_fmt(r['confidence_sd'], '.3g')}"
        lines.append(f"| {r['class']} | {r['n']} | {_fmt(r['accuracy'], '.1f')} | {conf} |")
    return "\n".join(lines)


def _plots(run_dir: Path, metrics: dict, history: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = metrics["confusion_matrix"]["labels"]
    m = metrics["confusion_matrix"]["matrix"]
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(labels), 0.8 + 0.6 * len(labels)))
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (header)")
    top = max((max(r) for r in m), default=0)
    for i, row in enumerate(m):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black", fontsize=8)
    fig.tight_layout()
    fig.savefig(run_dir / "confusion.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(4, 0.7 * len(labels) + 2), 3.5))
    series = {"test": metrics["per_class"]} | {k: v["per_class"] for k, v in metrics.get("experiments", {}).items()}
    width = 0.8 / len(series)
    for s, (name, rows) in enumerate(series.items()):
        ax.bar([i + s * width for i in range(len(rows))], [r["accuracy"] or 0 for r in rows], width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], labels, rotation=45, ha="right")
    ax.set_ylabel("accuracy %")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(run_dir / "per_class.png", dpi=100)
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3))
    ep = [h["epoch"] for h in history]
    a1.plot(ep, [h["loss"] for h in history], marker=".")
    a1.set_xlabel("epoch")
    a1.set_ylabel("training loss")
    a2.plot(ep, [h["train_accuracy"] for h in history], marker=".", label="train")
    if any(h.get("val_accuracy") is not None for h in history):
        a2.plot(ep, [h.get("val_accuracy") for h in history], marker=".", label="held-out")
    a2.set_xlabel("epoch")
    a2.set_ylabel("accuracy %")
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(run_dir / "curves.png", dpi=100)
    plt.close(fig)


def write_report(run_dir: str | Path, metrics: dict, history: list[dict], card: dict) -> Path:
    """Write report.md and its PNGs; returns the report path."""
    run_dir = Path(run_dir)
    _plots(run_dir, metrics, history)
    cfg = card.get("config", {})
    parts = [
        f"# Training job {card.get('job_id', '?')}: {card.get('model', '')}",
        "",
        f"Cohort {card.get('cohort_id')} · taxonomy {card.get('taxonomy')} · rule set {card.get('ruleset_version')} · "
        f"code {card.get('code_version')} · device {card.get('device')}",
        f"Epochs {cfg.get('epochs')} · input {cfg.get('image_size')} px · train {card.get('n_train')} · "
        f"test {card.get('n_test')} images · skipped {len(metrics.get('skipped', []))}",
        "",
        f"## Test set: overall accuracy {_fmt(metrics['overall_accuracy'], '.2f')} %",
        "",
        table2(metrics["per_class"]),
        "",
        "![per-class accuracy](per_class.png)",
        "",
        "![confusion matrix](confusion.png)",
        "",
    ]
    for name, exp in metrics.get("experiments", {}).items():
        parts += [f"## Experiment {name}: overall accuracy {_fmt(exp['overall_accuracy'], '.2f')} %", "",
                  table2(exp["per_class"]), ""]
    parts += ["## Training curves", "", "![curves](curves.png)", ""]
    sus = metrics.get("header_suspects", [])
    parts += [f"## Header suspects ({len(sus)}): the model contradicts the header class with high confidence", ""]
    if sus:
        parts += ["| SOPInstanceUID | header class | predicted | confidence |", "| --- | --- | --- | ---: |"]
        parts += [f"| {s['sop_instance_uid']} | {s['header_class']} | {s['predicted']} | {s['confidence']:.4f} |"
                  for s in sus[:200]]
    mis = metrics.get("misclassified", [])
    parts += ["", f"## Misclassified ({len(mis)})", ""]
    if mis:
        parts += ["| SOPInstanceUID | true | predicted | confidence |", "| --- | --- | --- | ---: |"]
        parts += [f"| {m['sop_instance_uid']} | {m['true']} | {m['predicted']} | {m['confidence']:.4f} |"
                  for m in mis[:200]]
    skipped = metrics.get("skipped", [])
    if skipped:
        parts += ["", f"## Skipped (could not be decoded): {len(skipped)}", ""]
        parts += [f"- {s['sop_instance_uid']}: {s['reason']}" for s in skipped[:200]]
    path = run_dir / "report.md"
    path.write_text("\n".join(parts) + "\n")
    return path
