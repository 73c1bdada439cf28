"""Mixing two clip batches for NFT's MixUp: clip MixUp, and VideoMix (Yun et al., arXiv 2012.03457).

VideoMix pastes a cuboid of clip ``b`` into clip ``a`` (the same cuboid for the whole batch,
as CutMix does) and returns the effective lambda: the share of ``a``'s volume that was kept,
so the loss weights follow what the model actually sees. Modes:

- ``videomix`` (default): a spatio-temporal cuboid of random shape whose volume is (1 - lambda)
- ``videomix_spatial``: a spatial box over all frames (the paper's S-VideoMix)
- ``videomix_temporal``: whole frames over a run of time (T-VideoMix)
- ``mixup``: pixel-wise ``lambda * a + (1 - lambda) * b``
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from core.mixup import pixel_mix, random_span

MIX_MODES = ("videomix", "videomix_spatial", "videomix_temporal", "mixup")


def videomix(a: torch.Tensor, b: torch.Tensor, lam: float, g: Optional[torch.Generator] = None,
             mode: str = "videomix") -> Tuple[torch.Tensor, float]:
    """Paste a cuboid of ``b`` into ``a``; returns (mixed, kept share of ``a``'s volume)."""
    if a.dim() != 5 or a.shape != b.shape:
        raise ValueError(f"VideoMix takes two clip batches of one shape (B, C, T, H, W); got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    _, _, t, h, w = a.shape
    cut = min(max(1.0 - float(lam), 0.0), 1.0)
    if mode == "videomix_spatial":
        ft, fs = 1.0, cut
    elif mode == "videomix_temporal":
        ft, fs = cut, 1.0
    elif mode == "videomix":
        # Split the cut volume between time and space at random: time share in [cut, 1],
        # the spatial box takes the rest, so every shape from a full-frame slab to a full-length tube occurs.
        ft = cut + (1.0 - cut) * float(torch.rand(1, generator=g))
        fs = cut / ft if ft > 0 else 0.0
    else:
        raise ValueError(f"unknown VideoMix mode '{mode}'; choose from {MIX_MODES}")
    side = math.sqrt(fs)
    t0, t1 = random_span(t, ft, g)
    y0, y1 = random_span(h, side, g)
    x0, x1 = random_span(w, side, g)
    out = a.clone()
    out[:, :, t0:t1, y0:y1, x0:x1] = b[:, :, t0:t1, y0:y1, x0:x1]
    kept = 1.0 - (t1 - t0) * (y1 - y0) * (x1 - x0) / float(t * h * w)
    return out, kept


def mix_clips(a: torch.Tensor, b: torch.Tensor, lam: float, g: Optional[torch.Generator] = None,
              mode: str = "videomix") -> Tuple[torch.Tensor, float]:
    if mode == "mixup":
        return pixel_mix(a, b, lam)
    return videomix(a, b, lam, g, mode)
