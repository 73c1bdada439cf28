"""Small shared helpers: seeding, devices, speed options, progress bars."""
from __future__ import annotations

import contextlib
import os
import random
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch import nn


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch Generator for explicit sampling."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def pick_device(name: Optional[str] = None) -> torch.device:
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bf16 autocast speeds this device up: a CUDA GPU with bf16, or a CPU with AVX512-BF16 / AMX.

    Why a check and not a fixed default: on a CPU without native bf16 (the AMD EPYC of sessions 1-8)
    autocast made a training step 8x slower; on one with AVX512-BF16 it is 0.6x the fp32 time.
    """
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    # torch's own CPU feature probes (cpuinfo, any OS); private names, hence the getattr fallback.
    probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(bool(probe()) for probe in probes if probe is not None)


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast (CPU with AVX512-BF16, or GPU); a no-op when disabled."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def memory_format_for(x: Any) -> Optional[torch.memory_format]:
    """channels_last for 4-D inputs, channels_last_3d for 5-D inputs, else none."""
    if torch.is_tensor(x):
        if x.dim() == 4:
            return torch.channels_last
        if x.dim() == 5:
            return torch.channels_last_3d
    return None


def to_memory_format(model: nn.Module, x: Any, enabled: bool) -> Any:
    fmt = memory_format_for(x) if enabled else None
    if fmt is None:
        return x
    model.to(memory_format=fmt)
    return x.contiguous(memory_format=fmt)


def progress(iterable: Any = None, total: Optional[int] = None, desc: str = "", enabled: bool = True, **kw: Any) -> Any:
    from tqdm.auto import tqdm

    disable = (not enabled) or os.environ.get("NFT_NO_PROGRESS") == "1"
    return tqdm(iterable, total=total, desc=desc, disable=disable, dynamic_ncols=True, leave=False, **kw)


def cycle(loader: Any) -> Iterator[Any]:
    while True:
        for b in loader:
            yield b
