"""Device setup, in-memory data, train_one_epoch and evaluate.

Data stays uint8 (N, S, S) in memory: on the GPU when it fits (a 12,000 x 256 x 256 cohort is
~0.8 GB), else in pinned host memory copied per batch with non_blocking transfers through two
alternating pinned buffers. Conversion to float, augmentation and normalisation happen on the
device, batched: the hot loop does no per-sample Python work and no host syncs (loss and
accuracy accumulate on the device and are read once per epoch).

Optimisation: AdamW (fused on CUDA; weight decay on all parameters), lr linearly warmed up over
`warmup_epochs` then cosine-annealed to 0 at the last step (a per-step LambdaLR, so resuming
from a checkpoint continues the same curve). On CUDA: bf16 autocast, channels_last, cudnn
benchmark, optional torch.compile. DDP when WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU); every
rank walks the same seeded permutation and takes its own stride of it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from models.augment import augment_batch

# Fixed input normalisation (images are windowed to [0, 1] by preprocessing); saved in model.pt.
NORM_MEAN, NORM_STD = 0.5, 0.25


class Cancelled(Exception):
    """RUN_DIR/CANCEL appeared: stop at the next boundary (exit code 3)."""


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    bf16: bool | None = None  # bf16 autocast; None: on CUDA only (True on CPU exercises the CUDA path's code)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def describe(self) -> str:
        if self.cuda:
            name = torch.cuda.get_device_name(self.device)
            return f"{self.world_size}x {name}" if self.distributed else name
        return f"cpu ({self.world_size} processes)" if self.distributed else "cpu"


def setup_runtime(pref: str = "auto") -> Runtime:
    """Pick the device; join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = pref.startswith("cuda") or (pref == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise RuntimeError(f"device {pref!r} requested but CUDA is not available")
    if want_cuda:
        dev = torch.device(f"cuda:{local}") if (world > 1 or pref in ("auto", "cuda")) else torch.device(pref)
        torch.cuda.set_device(dev)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if want_cuda else "gloo")
    return Runtime(dev, rank, world, local)


def teardown(rt: Runtime) -> None:
    if rt.distributed and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


class DeviceData:
    """uint8 images + int64 labels (+ original rows, for scale10) placed for fast batch fetches."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, orig_rows: np.ndarray, rt: Runtime,
                 max_batch: int, on_device: bool | None = None) -> None:
        self.rt = rt
        host = torch.from_numpy(np.ascontiguousarray(images))
        if on_device is None:
            on_device = rt.cuda and host.numel() < 0.3 * torch.cuda.mem_get_info(rt.device)[0]
        self.on_device = bool(on_device) or not rt.cuda  # on CPU "device" and host are one
        if self.on_device:
            self.images = host.to(rt.device)
        else:
            self.images = host.pin_memory()
            shape = (max_batch, *host.shape[1:])
            self._bufs = [torch.empty(shape, dtype=torch.uint8).pin_memory() for _ in range(2)]
            self._events: list[torch.cuda.Event | None] = [None, None]
            self._k = 0
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(rt.device)
        self.orig_rows = torch.from_numpy(np.asarray(orig_rows, dtype=np.int64)).to(rt.device)

    def __len__(self) -> int:
        return self.images.shape[0]

    def fetch(self, idx_host: torch.Tensor, idx_dev: torch.Tensor) -> torch.Tensor:
        """uint8 (B, S, S) on the device for these indices."""
        if self.on_device:
            return self.images.index_select(0, idx_dev)
        k, n = self._k, idx_host.numel()
        self._k ^= 1
        if self._events[k] is not None:
            self._events[k].synchronize()  # the copy out of this buffer two batches ago is done
        buf = self._bufs[k][:n]
        torch.index_select(self.images, 0, idx_host, out=buf)
        out = buf.to(self.rt.device, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        self._events[k] = ev
        return out


def to_input(xb_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, S, S) -> float (B, 1, S, S) in [0, 1]."""
    return xb_u8.unsqueeze(1).float().div_(255.0)


def normalize(x: torch.Tensor) -> torch.Tensor:
    return ((x - NORM_MEAN) / NORM_STD).contiguous(memory_format=torch.channels_last)


def autocast(rt: Runtime):
    on = rt.cuda if rt.bf16 is None else rt.bf16
    return torch.autocast(rt.device.type, dtype=torch.bfloat16) if on else nullcontext()


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, rt: Runtime) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=rt.cuda)


def make_scheduler(opt: torch.optim.Optimizer, total_steps: int, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    total_steps, warmup_steps = max(1, total_steps), max(0, min(warmup_steps, total_steps - 1))

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def rank_shard(n: int, rt: Runtime) -> list[int]:
    """Positions (of `n` training items) this rank loads and trains on: a stride of the list, padded by
    wrapping to ceil(n / world) so that every rank runs the same number of steps (DDP needs that).

    Each rank holds only its shard in memory (on several hosts nobody holds the whole split); the shard is
    fixed for the job and shuffled per epoch, while DDP averages every step's gradient over all shards.
    """
    if not rt.distributed:
        return list(range(n))
    per = math.ceil(n / rt.world_size)
    padded = list(range(n)) + list(range(per * rt.world_size - n))
    return padded[rt.rank :: rt.world_size]


def epoch_indices(n: int, epoch: int, seed: int, rt: Runtime) -> torch.Tensor:
    """A seeded per-epoch permutation of this rank's `n` items (its shard, see `rank_shard`)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch + (rt.rank * 7_919 if rt.distributed else 0))
    return torch.randperm(n, generator=g)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Steps over `n` items of this rank (equal on every rank: see `rank_shard`)."""
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= 2 else 0)


def train_one_epoch(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched,
    data: DeviceData,
    indices: torch.Tensor,
    batch_size: int,
    rt: Runtime,
    aug: dict,
    gen: torch.Generator,
    stop: Callable[[], bool] | None = None,
    check_every: int = 1,
) -> dict:
    """One pass over `indices` (host tensor); returns {"loss", "accuracy" (%), "images"} over all ranks.

    `stop()` is polled every `check_every` batches and raises Cancelled when true. A trailing
    batch of 1 is dropped (BatchNorm cannot train on it).
    """
    model.train()
    idx_dev = indices.to(rt.device, non_blocking=True)
    loss_sum = torch.zeros((), device=rt.device)
    correct = torch.zeros((), device=rt.device, dtype=torch.long)
    seen = 0
    for step, start in enumerate(range(0, len(indices), batch_size)):
        if stop is not None and step % check_every == 0 and stop():
            raise Cancelled()
        bi_host, bi_dev = indices[start : start + batch_size], idx_dev[start : start + batch_size]
        if bi_host.numel() < 2:
            continue
        x = augment_batch(to_input(data.fetch(bi_host, bi_dev)), aug, gen)
        y = data.labels.index_select(0, bi_dev)
        with autocast(rt):
            logits = model(normalize(x))
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        n = bi_host.numel()
        loss_sum += loss.detach() * n
        correct += (logits.detach().argmax(1) == y).sum()
        seen += n
    totals = torch.stack([loss_sum, correct.to(loss_sum.dtype), torch.tensor(float(seen), device=rt.device)])
    if rt.distributed:
        dist.all_reduce(totals)
    loss_t, corr_t, n_t = totals.tolist()
    return {"loss": loss_t / max(n_t, 1), "accuracy": corr_t / max(n_t, 1) * 100.0, "images": int(n_t)}


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    data: DeviceData,
    batch_size: int,
    rt: Runtime,
    transform: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> np.ndarray:
    """Softmax probabilities (N, C) float64 for every image in `data`, in order.

    `transform(x, idx_dev)` alters the [0, 1] batch before normalisation (the experiments).
    """
    model.eval()
    out = []
    all_host = torch.arange(len(data))
    all_dev = all_host.to(rt.device)
    for start in range(0, len(data), batch_size):
        bi_host, bi_dev = all_host[start : start + batch_size], all_dev[start : start + batch_size]
        x = to_input(data.fetch(bi_host, bi_dev))
        if transform is not None:
            x = transform(x, bi_dev)
        with autocast(rt):
            logits = model(normalize(x))
        out.append(torch.softmax(logits.float(), dim=1))
    if not out:
        return np.zeros((0, 0))
    return torch.cat(out).double().cpu().numpy()
