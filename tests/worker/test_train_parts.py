"""Registry depth presets, local weights, augmentation semantics and the experiment transforms."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

from models.augment import _angles, augment_batch, rotate90, scale_down_up  # noqa: E402
from models.config import merge_params  # noqa: E402
from models.experiments import depth_ladder  # noqa: E402
from models.registry import DEPTH_PRESETS, build_model  # noqa: E402

pytestmark = pytest.mark.worker


def _main_path_layers(net: torch.nn.Module) -> int:
    """Conv + Linear weight layers, not counting 1x1 shortcut projections (named 'downsample')."""
    return sum(1 for name, m in net.named_modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and "downsample" not in name)


@pytest.mark.parametrize("depth", sorted(DEPTH_PRESETS))
def test_depth_presets_have_the_documented_layer_count_and_run(depth):
    net = build_model("ignored", num_classes=3, depth=depth)
    assert _main_path_layers(net) == depth
    net.eval()
    with torch.no_grad():
        out = net(torch.randn(2, 1, 64, 48 if depth != 19 else 64))
    assert out.shape == (2, 3)


def test_unknown_model_and_depth_are_rejected():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("no_such_net", 3)
    with pytest.raises(ValueError, match="depth"):
        merge_params({"depth": 18})


def test_local_weights_load_the_backbone_and_skip_a_foreign_head(tmp_path):
    a = build_model("resnet10t", 5)
    torch.save({"model": a.state_dict(), "classes": list("abcde")}, tmp_path / "model.pt")
    b = build_model("resnet10t", 3, weights=tmp_path / "model.pt")
    assert torch.equal(a.conv1[0].weight, b.conv1[0].weight)
    assert b.fc.weight.shape == (3, a.fc.weight.shape[1])
    torch.save({"x.y": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="matches no parameter"):
        build_model("resnet10t", 3, weights=tmp_path / "other.pt")


def test_rotation_spec_forms():
    g = torch.Generator().manual_seed(0)
    study = set(_angles([10, 20, 30], 4000, g, torch.device("cpu")).tolist())
    assert study == {0.0, 10.0, -10.0, 20.0, -20.0, 30.0, -30.0}
    rng = _angles([-5, 5], 4000, g, torch.device("cpu"))
    assert rng.min() >= -5 and rng.max() <= 5 and len(set(rng.tolist())) > 100
    assert _angles(0, 3, g, torch.device("cpu")).tolist() == [0.0, 0.0, 0.0]


def test_augment_batch_keeps_shape_and_range_and_changes_images():
    x = torch.zeros(8, 1, 32, 32)
    x[:, :, 8:24, 14:18] = 1.0  # a vertical bar
    g = torch.Generator().manual_seed(1)
    y = augment_batch(x, {"rotation": [30], "shift": 0.0, "scale": 0.0, "intensity": 0.0}, g)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    rotated = [not torch.allclose(y[i], x[i]) for i in range(8)]
    assert any(rotated)  # +-30 degrees applied to some ...
    assert all(torch.allclose(y[i], x[i], atol=1e-5) or rotated[i] for i in range(8))  # ... and 0 to the others
    y2 = augment_batch(x, {"rotation": 0, "shift": 0, "scale": 0, "intensity": 0}, g)
    assert torch.equal(y2, x)  # nothing requested: identity


def test_experiment_transforms():
    x = torch.rand(2, 1, 16, 16)
    assert torch.equal(rotate90(x)[0, 0, 0, :], x[0, 0, :, -1])
    # 10 % of an original 1600 rows is 160 >= 16: nothing lost; of 80 rows it is 8 rows: detail lost
    y = scale_down_up(x, torch.tensor([1600, 80]))
    assert torch.equal(y[0], x[0]) and not torch.allclose(y[1], x[1])
    assert y.shape == x.shape


def test_depth_ladder_one_job_per_preset():
    ladder = depth_ladder({"epochs": 5, "model": "resnet18"})
    assert [p["depth"] for p in ladder] == [4, 19, 34, 64] and all(p["epochs"] == 5 for p in ladder)
    assert math.isclose(merge_params(ladder[1]).epochs, 5)


def test_evaluation_is_deterministic_and_unaugmented_while_training_augments():
    import numpy as np

    from models.engine import DeviceData, evaluate, make_optimizer, make_scheduler, setup_runtime, train_one_epoch

    rt = setup_runtime("cpu")
    rng = np.random.default_rng(0)
    data = DeviceData(rng.integers(0, 256, (12, 32, 32), dtype=np.uint8), rng.integers(0, 3, 12),
                      np.full(12, 320), rt, max_batch=6)
    net = build_model("ignored", 3, depth=4)
    p1, p2 = evaluate(net, data, 6, rt), evaluate(net, data, 6, rt)
    assert p1.shape == (12, 3) and np.array_equal(p1, p2)  # no random transform at evaluation
    assert np.allclose(p1.sum(axis=1), 1.0)
    opt = make_optimizer(net, 1e-2, 0.0, rt)
    sched = make_scheduler(opt, 2, 0)
    stats = train_one_epoch(net, opt, sched, data, torch.randperm(12), 6, rt, {"rotation": [-30, 30]},
                            torch.Generator().manual_seed(0))
    assert stats["images"] == 12 and np.isfinite(stats["loss"])
    assert not np.array_equal(evaluate(net, data, 6, rt), p1)  # the weights did change


def test_the_cuda_paths_bf16_autocast_and_channels_last_train_on_cpu():
    """The CUDA hot loop's numerics (bf16 autocast, channels_last inputs) run here too, so a change that
    breaks them fails without a GPU."""
    import numpy as np

    from models.engine import (DeviceData, Runtime, autocast, evaluate, make_optimizer, make_scheduler, normalize,
                               to_input, train_one_epoch)

    rt = Runtime(torch.device("cpu"), bf16=True)
    rng = np.random.default_rng(1)
    # two separable classes: bright and dark images
    labels = np.arange(16) % 2
    imgs = np.where(labels[:, None, None] == 1, 200, 40).astype(np.uint8) + rng.integers(0, 30, (16, 32, 32),
                                                                                          dtype=np.uint8)
    data = DeviceData(imgs, labels, np.full(16, 320), rt, max_batch=8)
    net = build_model("ignored", 2, depth=4)
    x = normalize(to_input(data.fetch(torch.arange(4), torch.arange(4))))
    assert x.is_contiguous(memory_format=torch.channels_last)
    with autocast(rt):
        assert net(x).dtype == torch.bfloat16  # autocast is on
    with autocast(Runtime(torch.device("cpu"))):
        assert net(x).dtype == torch.float32  # the CPU default leaves it off
    opt = make_optimizer(net, 3e-3, 0.0, rt)
    sched = make_scheduler(opt, 40, 0)
    losses = [train_one_epoch(net, opt, sched, data, torch.randperm(16, generator=torch.Generator().manual_seed(e)),
                              8, rt, {}, torch.Generator().manual_seed(e))["loss"] for e in range(20)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    p = evaluate(net, data, 8, rt)
    assert p.dtype == np.float64 and np.allclose(p.sum(axis=1), 1.0)
    assert (p.argmax(1) == labels).mean() >= 0.9
