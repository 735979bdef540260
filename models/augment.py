"""Training-side augmentation, batched on the device: rotation, shift, scale (one affine_grid +
grid_sample per batch) and intensity jitter. Only the training loop calls this; val/test never.

`rotation` forms:
- two numbers with the first negative, e.g. [-30, 30]: an angle drawn uniformly in that range;
- positive numbers, e.g. [10, 20, 30] (the study): each image gets one of 0, +-10, +-20, +-30 degrees;
- [] / None / 0: no rotation.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F


def _angles(spec: Any, n: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    if not spec:
        return torch.zeros(n, device=device)
    vals = [float(v) for v in (spec if isinstance(spec, (list, tuple)) else [spec])]
    if len(vals) == 2 and vals[0] < 0 <= vals[1]:
        lo, hi = vals
        return lo + (hi - lo) * torch.rand(n, generator=gen, device=device)
    choices = _choices(tuple(vals), device)
    return choices[torch.randint(len(choices), (n,), generator=gen, device=device)]


@lru_cache(maxsize=16)
def _choices(vals: tuple[float, ...], device: torch.device) -> torch.Tensor:
    # built once per device: a fresh host->device copy every batch would stall the loop
    return torch.tensor([0.0] + [s * abs(v) for v in vals for s in (1.0, -1.0)], device=device)


def augment_batch(x: torch.Tensor, params: dict[str, Any], gen: torch.Generator) -> torch.Tensor:
    """x: float (B, 1, H, W) in [0, 1] on its device -> augmented copy, same shape, in [0, 1]."""
    b, dev = x.shape[0], x.device
    shift = float(params.get("shift") or 0.0)
    scale = float(params.get("scale") or 0.0)
    # decided from the params, not the drawn values: a data-dependent branch would sync the GPU
    if params.get("rotation") or shift > 0 or scale > 0:
        rot = torch.deg2rad(_angles(params.get("rotation"), b, gen, dev))
        s = 1.0 + scale * (2 * torch.rand(b, generator=gen, device=dev) - 1)
        t = shift * 2 * (2 * torch.rand(b, 2, generator=gen, device=dev) - 1)  # grid units span 2
        cos, sin = torch.cos(rot) / s, torch.sin(rot) / s
        theta = torch.stack([torch.stack([cos, -sin, t[:, 0]], 1), torch.stack([sin, cos, t[:, 1]], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    inten = float(params.get("intensity") or 0.0)
    if inten > 0:
        gain = 1.0 + inten * (2 * torch.rand(b, 1, 1, 1, generator=gen, device=dev) - 1)
        bias = inten * (2 * torch.rand(b, 1, 1, 1, generator=gen, device=dev) - 1)
        x = (x * gain + bias).clamp_(0.0, 1.0)
    return x


def rotate90(x: torch.Tensor) -> torch.Tensor:
    """The study's robustness test: every image rotated by 90 degrees (counter-clockwise)."""
    return torch.rot90(x, 1, dims=(-2, -1))


def scale_down_up(x: torch.Tensor, orig_rows: torch.Tensor, fraction: float = 0.1) -> torch.Tensor:
    """Images as if acquired at `fraction` of their original size, resized back to the input size.

    x: (B, 1, S, S) preprocessed to S rows; an original of R rows at 10 % has 0.1 R rows, i.e.
    a factor of 0.1 R / S of the cached image (capped at 1: no information is added).
    """
    size = x.shape[-1]
    out = x.clone()
    target = torch.clamp((orig_rows.float() * fraction).round(), min=1, max=size).long().cpu()
    for t in target.unique().tolist():
        if t >= size:
            continue
        sel = (target == t).nonzero().flatten().to(x.device)
        small = F.interpolate(x[sel], size=(t, t), mode="bilinear", antialias=True, align_corners=False)
        out[sel] = F.interpolate(small, size=(size, size), mode="bilinear", align_corners=False).clamp_(0, 1)
    return out
