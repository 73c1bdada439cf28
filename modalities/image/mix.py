"""Mixing two image batches for NFT's MixUp: pixel MixUp, CutMix (Yun et al., ICCV 2019), or either per batch.

CutMix pastes one box of ``b`` into ``a`` (the same box for the whole batch, as the reference
does) and returns the effective lambda, the share of ``a``'s pixels kept, so the loss weights
follow what the model sees. The box is placed wholly inside the image (not clipped around a
random centre), so the pasted area stays close to the drawn (1 - lambda). Modes:

- ``mixup`` (default): ``lambda * a + (1 - lambda) * b``
- ``cutmix``: a box of ``b`` with area (1 - lambda), aspect ratio 1 up to rounding
- ``mixup_cutmix``: one of the two per batch, with equal odds (timm's ``Mixup`` with ``switch_prob`` 0.5)
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from core.mixup import pixel_mix, random_span

MIX_MODES = ("mixup", "cutmix", "mixup_cutmix")


def cutmix(a: torch.Tensor, b: torch.Tensor, lam: float, g: Optional[torch.Generator] = None
           ) -> Tuple[torch.Tensor, float]:
    """Paste a box of ``b`` covering about (1 - lam) of the image into ``a``; returns (mixed, kept share of ``a``)."""
    if a.dim() != 4 or a.shape != b.shape:
        raise ValueError(f"CutMix takes two image batches of one shape (B, C, H, W); got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    _, _, h, w = a.shape
    side = math.sqrt(min(max(1.0 - float(lam), 0.0), 1.0))
    y0, y1 = random_span(h, side, g)
    x0, x1 = random_span(w, side, g)
    out = a.clone()
    out[:, :, y0:y1, x0:x1] = b[:, :, y0:y1, x0:x1]
    return out, 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)


def mix_images(a: torch.Tensor, b: torch.Tensor, lam: float, g: Optional[torch.Generator] = None,
               mode: str = "mixup") -> Tuple[torch.Tensor, float]:
    if mode == "mixup_cutmix":
        mode = "cutmix" if float(torch.rand(1, generator=g)) < 0.5 else "mixup"
    if mode == "mixup":
        return pixel_mix(a, b, lam)
    if mode == "cutmix":
        return cutmix(a, b, lam, g)
    raise ValueError(f"the image modality has no mix mode '{mode}'; choose from {list(MIX_MODES)}")
