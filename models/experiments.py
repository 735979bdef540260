"""The study's built-in experiments.

- rotate90: the trained model on the test set rotated by 90 degrees (study B's robustness test).
- scale10: the test images as if acquired at 10 % of their original size (an R-row original
  becomes 0.1 R rows), resized back to the input size; it measures what the lost detail costs
  a model trained at full size. (Training *at* 10 % is a job with a smaller image_size.)
- depth ladder: one job per depth preset (4, 19, 34, 64) on the same cohort, to queue side by side.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from models.augment import rotate90, scale_down_up
from models.engine import DeviceData
from models.registry import DEPTH_PRESETS

Transform = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def transform_for(name: str, data: DeviceData) -> Transform:
    """The test-time transform of an experiment, as used by engine.evaluate."""
    if name == "rotate90":
        return lambda x, idx: rotate90(x)
    if name == "scale10":
        return lambda x, idx: scale_down_up(x, data.orig_rows.index_select(0, idx), 0.1)
    raise ValueError(f"unknown experiment {name!r}")


def depth_ladder(params: dict[str, Any] | None = None, depths: tuple[int, ...] = tuple(sorted(DEPTH_PRESETS))) -> list[dict[str, Any]]:
    """One params dict per depth preset (copies of `params` with `depth` set), for separate jobs."""
    base = dict(params or {})
    return [{**base, "depth": d} for d in depths]
