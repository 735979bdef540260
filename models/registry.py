"""One way to build a model: `build_model` over `timm.create_model` (1 input channel, no downloads).

Depth presets for the study's depth experiment (study B: 4, 19, 34 and 64 layers). "Layers" counts
weight layers on the main path (conv + fully connected), the way VGG/ResNet names count them;
1x1 shortcut projections are not counted.

| depth | architecture            | how the count is made                                        |
|-------|-------------------------|--------------------------------------------------------------|
| 4     | radcohort_cnn4 (ours)   | 3 conv (32/64/128 ch, BN, ReLU, pooling) + 1 fc              |
| 19    | timm vgg19_bn           | 16 conv + 2 conv-as-fc (ConvMlp) + 1 fc = VGG-19             |
| 34    | timm resnet34           | 1 stem conv + 16 basic blocks x 2 conv + 1 fc = ResNet-34    |
| 64    | radcohort_resnet64 (ours, timm ResNet class) | 1 stem conv + 31 basic blocks ([5, 8, 12, 6]) x 2 conv + 1 fc |

The two custom entries are registered in timm's registry, so they too are built by
`timm.create_model`. Any other timm name (resnet18, resnet50, efficientnet_b0, ...) works as is.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import timm
import torch
from torch import nn

DEPTH_PRESETS: dict[int, str] = {4: "radcohort_cnn4", 19: "vgg19_bn", 34: "resnet34", 64: "radcohort_resnet64"}


class CNN4(nn.Module):
    """Four weight layers: three conv blocks and a linear classifier (the study's smallest net)."""

    def __init__(self, num_classes: int = 1000, in_chans: int = 1, **_: object) -> None:
        super().__init__()

        def block(cin: int, cout: int, pool: bool) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
                                       nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            return layers + ([nn.MaxPool2d(2)] if pool else [])

        self.features = nn.Sequential(*block(in_chans, 32, True), *block(32, 64, True), *block(64, 128, False))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, num_classes)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def _register() -> None:
    # timm warns on re-registration; register once per process.
    from timm.models import register_model
    from timm.models.resnet import BasicBlock, ResNet

    if not timm.is_model("radcohort_cnn4"):

        @register_model
        def radcohort_cnn4(pretrained: bool = False, **kwargs) -> nn.Module:  # noqa: ARG001
            return CNN4(num_classes=kwargs.get("num_classes", 1000), in_chans=kwargs.get("in_chans", 1))

    if not timm.is_model("radcohort_resnet64"):

        @register_model
        def radcohort_resnet64(pretrained: bool = False, **kwargs) -> nn.Module:  # noqa: ARG001
            # timm passes loader options (cache_dir, pretrained_cfg, ...) the class does not take
            known = set(inspect.signature(ResNet.__init__).parameters)
            kwargs = {k: v for k, v in kwargs.items() if k in known}
            return ResNet(block=BasicBlock, layers=(5, 8, 12, 6), **kwargs)


def resolve_name(model: str, depth: int | None) -> str:
    """The timm name to build: a depth preset wins over `model`."""
    if depth is None:
        return model
    if depth not in DEPTH_PRESETS:
        raise ValueError(f"depth must be one of {sorted(DEPTH_PRESETS)}")
    return DEPTH_PRESETS[depth]


def build_model(model: str, num_classes: int, depth: int | None = None, weights: str | Path | None = None) -> nn.Module:
    """A fresh model with one input channel and `num_classes` outputs; optional local weights.

    Weights: a state dict (or {"model": state_dict}, e.g. our model.pt). Tensors whose shape does
    not fit (typically the classifier of another taxonomy) are skipped; a file that matches
    nothing raises ValueError rather than training silently from scratch.
    """
    _register()
    name = resolve_name(model, depth)
    if not timm.is_model(name):
        raise ValueError(f"unknown model {name!r} (not in timm's registry)")
    net = timm.create_model(name, pretrained=False, in_chans=1, num_classes=num_classes)
    if weights:
        load_weights(net, weights)
    return net


def load_weights(net: nn.Module, weights: str | Path) -> dict[str, int]:
    path = Path(weights)
    if not path.is_file():
        raise ValueError(f"weights file not found: {path}")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    state = obj.get("model", obj.get("state_dict", obj)) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"weights file {path} holds no state dict")
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    own = net.state_dict()
    fit = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    if not fit:
        raise ValueError(f"weights file {path} matches no parameter of this model")
    net.load_state_dict(fit, strict=False)
    return {"loaded": len(fit), "skipped": len(state) - len(fit), "missing": len(own) - len(fit)}
