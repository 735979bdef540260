"""The trainer's defaults (the study's settings) and merging a spec's `params` into them.

The contract itself (which parameters exist, their limits) is models/spec.py's RunParams."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import Field

from models.spec import RUN_EXPERIMENTS as EXPERIMENTS  # noqa: F401 - the names a run evaluates
from models.spec import RunParams


def _default_augment() -> dict[str, Any]:
    # The study rotated every training image by +-10/20/30 degrees; small shifts, scales and
    # intensity jitter are our additions (mild, to stay faithful to radiograph geometry).
    return {"rotation": [10, 20, 30], "shift": 0.05, "scale": 0.1, "intensity": 0.1}


class TrainConfig(RunParams):
    """The run's parameters resolved over the defaults (spec.json `params` validated by RunParams, the
    augmentation merged over the study's); saved as RUN_DIR/config.json next to the results.

    None still means "choose for the device": batch_size 256 on CUDA / 32 on CPU, lr 1e-3 (AdamW),
    workers = all CPU cores for preprocessing.
    """

    augment: dict[str, Any] = Field(default_factory=_default_augment)  # type: ignore[assignment]

    def resolved_batch_size(self, cuda: bool) -> int:
        return self.batch_size or (256 if cuda else 32)

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else 1e-3

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def merge_params(params: dict[str, Any] | RunParams | None) -> TrainConfig:
    """Spec `params` over the defaults; unknown keys and bad values raise ValueError."""
    rp = params if isinstance(params, RunParams) else RunParams.model_validate(dict(params or {}))
    values = rp.model_dump(exclude_none=True)
    aug = _default_augment()
    aug.update({k: v for k, v in (rp.augment or {}).items() if v is not None})
    values["augment"] = aug
    return TrainConfig(**values)


def fingerprint(obj: Any) -> str:
    """Short stable hash of JSON-able data (config, item lists)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
