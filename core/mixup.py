"""MixUp with a shuffled copy of the batch; modalities supply only how inputs are mixed."""
from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import torch


def sample_lambda(alpha: float, generator: Optional[torch.Generator] = None) -> float:
    """lambda ~ Beta(alpha, alpha), drawn from ``generator`` so it is reproducible."""
    if alpha <= 0:
        return 1.0
    # Beta from two Gammas with the seeded generator (torch.distributions has no generator arg).
    g1 = torch._standard_gamma(torch.full((1,), float(alpha)), generator=generator)
    g2 = torch._standard_gamma(torch.full((1,), float(alpha)), generator=generator)
    return float(g1 / (g1 + g2))


def mixup_batch(inputs: Any, targets: Any, mix: Callable[[Any, Any, float, Optional[torch.Generator]], Tuple[Any, float]],
                alpha: float = 1.0, generator: Optional[torch.Generator] = None,
                batch_size: Optional[int] = None) -> Tuple[Any, Any, Any, float]:
    """Return ``(mixed inputs, targets, targets[perm], lambda)``.

    ``mix(x, x[perm], lam, generator)`` returns the mixed inputs and the effective lambda
    (region-based mixes such as VideoMix change it to the pasted volume's share).
    """
    n = batch_size if batch_size is not None else len(targets)
    lam = sample_lambda(alpha, generator)
    perm = torch.randperm(n, generator=generator)
    x_mix, lam = mix(inputs, index_batch(inputs, perm), lam, generator)
    return x_mix, targets, index_batch(targets, perm), lam


def pixel_mix(a: Any, b: Any, lam: float) -> Tuple[Any, float]:
    """MixUp's own mix, ``lam * a + (1 - lam) * b``, and its lambda (the default of every modality that mixes tensors)."""
    return lam * a + (1.0 - lam) * b, float(lam)


def random_span(n: int, frac: float, generator: Optional[torch.Generator] = None) -> Tuple[int, int]:
    """A run of ``round(frac * n)`` cells placed uniformly at random inside [0, n), for region mixes (CutMix, VideoMix).

    Placing the whole run inside (rather than clipping a run around a random centre, as CutMix's reference
    does) keeps the pasted share close to the drawn (1 - lambda).
    """
    size = min(max(int(round(n * frac)), 0), n)
    lo = int(torch.randint(0, n - size + 1, (1,), generator=generator))
    return lo, lo + size


def index_batch(batch: Any, idx: torch.Tensor) -> Any:
    """Index a tensor, or every tensor of a list/tuple/dict batch, along dim 0."""
    if torch.is_tensor(batch):
        return batch[idx.to(batch.device)]
    if isinstance(batch, dict):
        return {k: index_batch(v, idx) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        # A list of per-sample items (e.g. detection targets): pick the items.
        return type(batch)(batch[i] for i in idx.tolist())
    raise TypeError(f"cannot index a batch of type {type(batch).__name__}")


def mixed_loss(loss_fn: Callable[[Any], torch.Tensor], outputs: Any, y_a: Any, y_b: Any, lam: float) -> torch.Tensor:
    """lambda * loss(out, y_a) + (1 - lambda) * loss(out, y_b), one forward for both terms."""
    return lam * loss_fn(outputs, y_a) + (1.0 - lam) * loss_fn(outputs, y_b)
