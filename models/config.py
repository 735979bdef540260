"""The one place for training defaults (the study's settings) and merging a job spec into them."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

EXPERIMENTS = ("rotate90", "scale10")


def _default_augment() -> dict[str, Any]:
    # The study rotated every training image by +-10/20/30 degrees; small shifts, scales and
    # intensity jitter are our additions (mild, to stay faithful to radiograph geometry).
    return {"rotation": [10, 20, 30], "shift": 0.05, "scale": 0.1, "intensity": 0.1}


@dataclass
class TrainConfig:
    """Merged training parameters; saved as RUN_DIR/config.json next to the results.

    None means "choose for the device": batch_size 256 on CUDA / 32 on CPU, lr 1e-3 (AdamW),
    workers = all CPU cores for preprocessing.
    """

    model: str = "resnet18"
    depth: int | None = None  # 4, 19, 34 or 64: overrides `model` (see models/registry.py)
    epochs: int = 30  # study A: 30 epochs
    image_size: int = 256  # study A: input height 256 px, aspect ratio kept, padded square
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    seed: int = 0
    augment: dict[str, Any] = field(default_factory=_default_augment)
    experiments: list[str] = field(default_factory=list)  # none unless asked for (rotate90, scale10)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    compile: bool = False
    weights: str | None = None  # optional local weights file (no downloads)
    workers: int | None = None
    suspect_threshold: float = 0.99
    # Evaluate the test split each epoch when there is no "val" split. Off: the test set is used once,
    # after the last epoch, and val_accuracy means validation (the API holds a val split out of train).
    monitor_test: bool = False

    def resolved_batch_size(self, cuda: bool) -> int:
        return self.batch_size or (256 if cuda else 32)

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else 1e-3

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def merge_params(params: dict[str, Any] | None) -> TrainConfig:
    """Spec `params` over the defaults; unknown keys and bad values raise ValueError."""
    params = dict(params or {})
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(params) - names)
    if unknown:
        raise ValueError(f"unknown training parameter(s): {', '.join(unknown)}")
    aug = _default_augment()
    if params.get("augment") is not None:
        extra = set(params["augment"]) - set(aug)
        if extra:
            raise ValueError(f"unknown augment key(s): {', '.join(sorted(extra))}")
        aug.update(params["augment"])
    params["augment"] = aug
    # null means "the default" (for the None-able fields the default is None anyway)
    cfg = TrainConfig(**{k: v for k, v in params.items() if v is not None})
    _validate(cfg)
    return cfg


def _validate(cfg: TrainConfig) -> None:
    if cfg.depth is not None and cfg.depth not in (4, 19, 34, 64):
        raise ValueError(f"depth must be one of 4, 19, 34, 64 (got {cfg.depth})")
    if cfg.epochs < 1:
        raise ValueError("epochs must be >= 1")
    if not 16 <= cfg.image_size <= 2048:
        raise ValueError("image_size must be between 16 and 2048")
    if cfg.batch_size is not None and cfg.batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    bad = sorted(set(cfg.experiments) - set(EXPERIMENTS))
    if bad:
        raise ValueError(f"unknown experiment(s): {', '.join(bad)}; known: {', '.join(EXPERIMENTS)}")
    if not 0.0 < cfg.suspect_threshold <= 1.0:
        raise ValueError("suspect_threshold must be in (0, 1]")


def fingerprint(obj: Any) -> str:
    """Short stable hash of JSON-able data (config, item lists)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
