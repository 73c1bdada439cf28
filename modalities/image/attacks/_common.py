"""Shared pieces of the image attacks: seeding, batch extras, learned-part plumbing, small nets.

Not an attack itself (nothing here is registered). Everything an attack learns is trained
from the data at hand by the helpers below and travels as plain tensors (state_dict).
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from core.adapter import DataBundle, Modality

CORNERS = ("bottom_right", "top_left", "bottom_left", "top_right")


def generator(seed: int, salt: int) -> torch.Generator:
    """A CPU generator for one purpose of one attack (``salt`` keeps purposes independent)."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(salt)) % (2 ** 63 - 1))


@contextlib.contextmanager
def seeded(seed: int, salt: int) -> Iterator[None]:
    """Module initialisation from the attack's seed without touching the global RNG stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed((int(seed) * 1_000_003 + int(salt)) % (2 ** 63 - 1))
        yield


def stochastic_count(expected: float, g: torch.Generator) -> int:
    """Round ``expected`` up or down at random so that the mean count is exact (small batches)."""
    base = math.floor(expected)
    return base + int(float(torch.rand(1, generator=g)) < expected - base)


def pick(candidates: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """``k`` random positions where the boolean ``candidates`` is true (CPU indices)."""
    pool = torch.nonzero(candidates.cpu()).flatten()
    k = min(int(k), len(pool))
    return pool[torch.randperm(len(pool), generator=g)[:k]]


def corner_region(h: int, w: int, size: int, position: str, margin: int = 0) -> Tuple[int, int]:
    """Top-left pixel of a ``size`` x ``size`` patch at a corner."""
    if position not in CORNERS:
        raise ValueError(f"patch position '{position}' is not a corner; choose one of {', '.join(CORNERS)}")
    if size + margin > min(h, w):
        raise ValueError(f"a {size}x{size} patch (margin {margin}) does not fit a {h}x{w} image; lower attack.patch_size")
    top = h - size - margin if "bottom" in position else margin
    left = w - size - margin if "right" in position else margin
    return top, left


def image_shape(bundle: DataBundle) -> Tuple[int, int, int]:
    x = bundle.train[0][0]
    return int(x.shape[0]), int(x.shape[1]), int(x.shape[2])


def take(adapter: Modality, dataset: Any, n: Optional[int], seed: int, salt: int) -> Any:
    """At most ``n`` samples of a dataset (seeded); the whole set when ``n`` is None or larger."""
    if n is None or n >= len(dataset):
        return dataset
    idx = torch.randperm(len(dataset), generator=generator(seed, salt))[: int(n)].sort().values
    return adapter.subset(dataset, idx)


def load_all(adapter: Modality, dataset: Any, batch_size: int = 1024) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A (small) dataset as tensors: images, labels, indices."""
    xs, ys, ids = [], [], []
    for batch in adapter.loader(dataset, batch_size):
        xs.append(batch[0]); ys.append(batch[1]); ids.append(batch[2])
    return torch.cat(xs), torch.cat(ys), torch.cat(ids)


def batches(adapter: Modality, dataset: Any, batch_size: int, steps: int, seed: int, salt: int
            ) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` shuffled minibatches (x, y), cycling over the data as often as needed."""
    g = generator(seed, salt)
    done = 0
    while done < steps:
        for batch in adapter.loader(dataset, batch_size, shuffle=True, generator=g):
            if done >= steps:
                return
            yield batch[0], batch[1]
            done += 1


def build_reference_model(adapter: Modality, bundle: DataBundle, arch: str, seed: int,
                          model_kwargs: Optional[Dict[str, Any]] = None) -> nn.Module:
    """The untrained reference classifier of :func:`train_reference_model` (seeded; small_cnn at width 16)."""
    c, _, _ = image_shape(bundle)
    kwargs = {"in_channels": c, **({"width": 16} if arch == "small_cnn" else {}), **(model_kwargs or {})}
    with seeded(seed, 17):
        return adapter.build_model(arch, bundle.num_classes, **kwargs)


def train_reference_model(adapter: Modality, bundle: DataBundle, device: torch.device, *, arch: str = "small_cnn",
                          steps: int = 300, seed: int = 0, batch_size: int = 128, lr: float = 0.05,
                          model_kwargs: Optional[Dict[str, Any]] = None) -> nn.Module:
    """A clean classifier trained on the attacker's data (for TrojanNN's neurons, CLB's PGD, surrogates)."""
    from core.train import train_classifier

    model = build_reference_model(adapter, bundle, arch, seed, model_kwargs)
    steps_per_epoch = max(1, math.ceil(len(bundle.train) / batch_size))
    cfg = {"epochs": max(1, math.ceil(steps / steps_per_epoch)), "max_steps": int(steps), "batch_size": batch_size,
           "lr": lr, "augment": "none"}
    train_classifier(model, adapter, bundle.train, cfg, device=device, seed=seed + 17, show_progress=False)
    return model.eval()


def module_state(prefix: str, module: nn.Module) -> Dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().cpu().clone() for k, v in module.state_dict().items()}


def load_module_state(prefix: str, module: nn.Module, state: Dict[str, torch.Tensor], attack: str) -> None:
    sub = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
    try:
        module.load_state_dict(sub, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"attack '{attack}' state does not fit its '{prefix}' network; build the attack with the "
                         f"same options it was fitted with") from exc


def meta_tensor(**values: int) -> Dict[str, torch.Tensor]:
    return {f"meta.{k}": torch.tensor(int(v), dtype=torch.int64) for k, v in values.items()}


def meta_value(state: Dict[str, torch.Tensor], key: str, attack: str) -> int:
    if f"meta.{key}" not in state:
        raise ValueError(f"attack '{attack}' state lacks meta.{key}; it was not saved by this attack")
    return int(state[f"meta.{key}"])


def need(obj: Optional[Any], attack: str) -> Any:
    if obj is None:
        raise RuntimeError(f"attack '{attack}' has no trained trigger yet; call fit(bundle, adapter, device) "
                           f"or load_state_dict(...) first")
    return obj


def check_channels(x: torch.Tensor, channels: int, attack: str) -> None:
    if x.shape[1] != channels:
        raise ValueError(f"attack '{attack}' was fitted on {channels}-channel images but got {x.shape[1]}; "
                         f"fit it on data of this kind")


def _norm(kind: str, c: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(c)
    if kind == "group":  # per-sample statistics: the same output in train and eval mode, any batch
        return nn.GroupNorm(min(4, c), c)
    raise ValueError(f"generator norm must be 'batch' or 'group', got '{kind}'")


class _Block(nn.Sequential):
    def __init__(self, cin: int, cout: int, norm: str = "batch") -> None:
        super().__init__(nn.Conv2d(cin, cout, 3, 1, 1), _norm(norm, cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, 1, 1), _norm(norm, cout), nn.ReLU(inplace=True))


class ConvGenerator(nn.Module):
    """A two-level U-Net for any input size: pooled with ceil mode, upsampled back to the skip's size.

    Output is raw (unbounded); each attack squashes it as its paper does. ``norm="group"`` for
    generators trained jointly with a victim, where train- and eval-mode outputs must agree.
    """

    def __init__(self, in_channels: int, out_channels: int, width: int = 16, norm: str = "batch") -> None:
        super().__init__()
        w = int(width)
        self.enc1 = _Block(in_channels, w, norm)
        self.enc2 = _Block(w, 2 * w, norm)
        self.mid = _Block(2 * w, 2 * w, norm)
        self.dec2 = _Block(4 * w, w, norm)
        self.dec1 = _Block(2 * w, w, norm)
        self.out = nn.Conv2d(w, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2, ceil_mode=True))
        m = self.mid(F.max_pool2d(e2, 2, ceil_mode=True))
        d2 = self.dec2(torch.cat([F.interpolate(m, size=e2.shape[-2:], mode="nearest"), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, size=e1.shape[-2:], mode="nearest"), e1], 1))
        return self.out(d1)


@torch.no_grad()
def run_eval(module: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    """Forward in eval mode on the inputs' device, leaving the module's mode as it was."""
    was = module.training
    module.eval()
    module.to(inputs[0].device)
    try:
        return module(*inputs)
    finally:
        module.train(was)


def checkerboard(c: int, size: int, phase: int = 0) -> torch.Tensor:
    i = torch.arange(size)
    return (((i[:, None] + i[None, :] + phase) % 2) == 0).float().expand(c, size, size).clone()


def to_channels(img: torch.Tensor, c: int) -> torch.Tensor:
    """(N, C', H, W) -> (N, c, H, W): grey repeated to colour, colour averaged to grey."""
    if img.shape[1] == c:
        return img
    if img.shape[1] == 1:
        return img.expand(-1, c, -1, -1)
    if c == 1:
        return img.mean(1, keepdim=True)
    raise ValueError(f"cannot map {img.shape[1]}-channel trigger images to {c} channels; fit the attack on this data")


def resize_to(img: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    return F.interpolate(img, size=tuple(size), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)


def joint_train(attack: Any, model: nn.Module, adapter: Modality, bundle: DataBundle, train_cfg: Optional[Dict[str, Any]],
                flags: torch.Tensor, device: torch.device, seed: int, show_progress: bool, fraction: float,
                step: Any, desc: str) -> list:
    """Victim training for attacks that learn their trigger together with the classifier.

    The first ``fraction`` of the steps call ``step(model, opt, x, y, flagged, g) -> log dict``,
    which does its own backward passes and optimiser steps (classifier and trigger); the rest
    is plain poisoned training with the frozen trigger (core's trainer, the attack's hooks).
    One cosine learning-rate schedule spans both phases.
    """
    from core.train import TRAIN_DEFAULTS, train_classifier
    from core.utils import progress

    c = {**TRAIN_DEFAULTS, **(train_cfg or {})}
    g = torch.Generator().manual_seed(int(seed))
    loader = adapter.loader(bundle.train, c["batch_size"], shuffle=True, generator=g)
    total = len(loader) * int(c["epochs"])
    if c.get("max_steps"):
        total = min(total, int(c["max_steps"]))
    joint = min(total, max(1 if fraction > 0 else 0, int(math.ceil(fraction * total))))
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=c["lr"], momentum=c["momentum"], weight_decay=c["weight_decay"],
                          nesterov=bool(c["nesterov"]))

    def lr_at(i: int) -> float:
        return c["lr"] * 0.5 * (1 + math.cos(math.pi * i / max(total, 1))) if c["schedule"] == "cosine" else c["lr"]

    log: list = []
    done, t0 = 0, time.perf_counter()
    bar = progress(total=joint, desc=desc, enabled=show_progress)
    while done < joint:
        for batch in loader:
            if done >= joint:
                break
            for group in opt.param_groups:
                group["lr"] = lr_at(done)
            x, y, idx = adapter.to_device(batch[0], device), batch[1].to(device), batch[2]
            row = step(model, opt, x, y, flags[idx].to(device), g)
            if not all(math.isfinite(v) for v in row.values()):
                raise FloatingPointError(f"{desc}: training loss became non-finite at step {done}; lower train.lr")
            done += 1
            bar.update(1)
            if done % 50 == 0 or done == joint:
                log.append({"step": done, "epoch": done / len(loader), **row, "lr": lr_at(done - 1),
                            "seconds": time.perf_counter() - t0})
    bar.close()
    rest = total - joint
    if rest > 0:
        cfg = {**c, "lr": lr_at(joint), "epochs": int(math.ceil(rest / len(loader))), "max_steps": rest}
        for row in train_classifier(model, adapter, bundle.train, cfg, attack=attack, poison_flags=flags,
                                    device=device, seed=seed, show_progress=show_progress):
            log.append({**row, "step": row["step"] + joint, "epoch": (row["step"] + joint) / len(loader)})
    model.eval()
    return log
