"""Per-unit neural masks: attach, clip, fold back into a plain model.

A mask is one scalar per output channel / neuron of a maskable layer. On a normalisation
layer it multiplies the affine scale (``BN(x; gamma*m, beta)``, the reference placement);
on a layer without one (a Linear or Conv unit) it scales the unit's output rows and bias.
Masks are attached with ``torch.nn.utils.parametrize`` so the module keeps its own
forward; ``fold`` writes ``gamma*m`` (or ``W*m``, ``b*m``) into the weights and removes
the parametrisation, leaving an instance of the original class.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm,
              nn.modules.instancenorm._InstanceNorm)
OUTPUT_TYPES = (nn.Linear, nn.modules.conv._ConvNd)


class ChannelScale(nn.Module):
    """Parametrisation ``w -> w * (mask + noise)`` along dim 0 (output channels).

    ``mask`` may be shared between a weight and its bias; ``noise`` is an optional
    additive perturbation used by adversarial-neuron defenses (ANP), ``None`` otherwise.
    ``mask=None`` means a scale of one (only the noise acts).
    """

    def __init__(self, mask: Optional[nn.Parameter]) -> None:
        super().__init__()
        self.mask = mask
        self.noise: Optional[torch.Tensor] = None

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            if self.noise is None:
                return w
            scale = 1.0 + self.noise
        else:
            scale = self.mask if self.noise is None else self.mask + self.noise
        return w * scale.to(w.dtype).view(-1, *([1] * (w.dim() - 1)))


@dataclass
class MaskUnit:
    name: str            # dotted module name in the model
    kind: str            # "norm" (scales gamma) or "output" (scales W rows and b)
    layer_index: int     # 1-based, input to output
    mask: nn.Parameter
    weight_scale: ChannelScale
    bias_scale: Optional[ChannelScale] = None

    @property
    def size(self) -> int:
        return self.mask.numel()


def is_affine_norm(m: Optional[nn.Module]) -> bool:
    """A normalisation layer with a per-channel scale (what a mask multiplies)."""
    if m is None:
        return False
    if isinstance(m, nn.LayerNorm):
        return m.elementwise_affine and m.weight is not None and m.weight.dim() == 1
    return isinstance(m, NORM_TYPES) and getattr(m, "affine", False) and m.weight is not None


def _out_features(m: nn.Module) -> int:
    if isinstance(m, nn.modules.batchnorm._BatchNorm) or isinstance(m, nn.modules.instancenorm._InstanceNorm):
        return m.num_features
    if isinstance(m, nn.GroupNorm):
        return m.num_channels
    if isinstance(m, nn.LayerNorm):
        return m.weight.shape[0]
    return m.weight.shape[0]


def find_maskable_units(model: nn.Module, exclude: Iterable[str] = (),
                        output_units: Iterable[str] = ()) -> List[str]:
    """Names of maskable modules in registration order.

    Default: every affine normalisation layer, minus ``exclude`` and minus the names in the
    model's own ``nft_mask_exclude`` attribute (e.g. a stem BN). ``output_units`` adds
    Linear/Conv layers whose outputs are masked directly (units with no norm after them).
    """
    excluded = set(exclude) | set(getattr(model, "nft_mask_exclude", ()))
    outputs = set(output_units)
    names = []
    for name, m in model.named_modules():
        if name in excluded:
            continue
        if name in outputs:
            if not isinstance(m, OUTPUT_TYPES):
                raise ValueError(f"output unit '{name}' is a {type(m).__name__}; only Linear/Conv units can be output-masked")
            names.append(name)
        elif is_affine_norm(m):
            names.append(name)
    missing = outputs - set(names)
    if missing:
        raise ValueError(f"output units not found in the model: {sorted(missing)}")
    return names


def forward_order(model: nn.Module, names: Sequence[str], run: Callable[[nn.Module], Any]) -> List[str]:
    """Sort ``names`` by the order in which the modules are first called by ``run(model)``."""
    seen: Dict[str, int] = {}
    handles = []
    modules = dict(model.named_modules())
    for n in names:
        def hook(_m, _i, _o, n=n):
            seen.setdefault(n, len(seen))
        handles.append(modules[n].register_forward_hook(hook))
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            run(model)
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    big = len(names) + 1
    return sorted(names, key=lambda n: (seen.get(n, big), names.index(n)))


class NeuralMasks:
    """Masks attached to a model. Weights are frozen; only ``parameters()`` train."""

    def __init__(self, model: nn.Module, units: Optional[Sequence[str]] = None, *,
                 scale_bias: bool = False, freeze: bool = True) -> None:
        self.model = model
        self.scale_bias = scale_bias
        names = list(units) if units is not None else find_maskable_units(model)
        if not names:
            raise ValueError("the model has no maskable units (no affine normalisation layers); "
                             "name Linear/Conv units to mask with output_units=...")
        self._frozen: Dict[str, bool] = {}
        if freeze:
            for pname, p in model.named_parameters():
                self._frozen[pname] = p.requires_grad
                p.requires_grad_(False)
        modules = dict(model.named_modules())
        self.units: List[MaskUnit] = []
        for idx, name in enumerate(names, start=1):
            if name not in modules:
                raise ValueError(f"no module named '{name}' in the model")
            m = modules[name]
            if parametrize.is_parametrized(m):
                raise ValueError(f"module '{name}' already carries masks; fold or detach them first")
            kind = "norm" if is_affine_norm(m) else "output"
            if kind == "output" and not isinstance(m, OUTPUT_TYPES):
                raise ValueError(f"module '{name}' ({type(m).__name__}) cannot be masked")
            dev = m.weight.device
            mask = nn.Parameter(torch.ones(_out_features(m), device=dev, dtype=torch.float32))
            wscale = ChannelScale(mask)
            parametrize.register_parametrization(m, "weight", wscale, unsafe=True)
            bscale = None
            if getattr(m, "bias", None) is not None:
                # Output units: the mask scales the whole unit (W and b). Norm units: beta is
                # scaled only when asked (the reference masks gamma alone).
                if kind == "output" or scale_bias:
                    bscale = ChannelScale(mask)
                else:
                    bscale = ChannelScale(None)  # identity; carries optional noise (ANP)
                parametrize.register_parametrization(m, "bias", bscale, unsafe=True)
            self.units.append(MaskUnit(name, kind, idx, mask, wscale, bscale))
        self._folded = False

    # -- access ---------------------------------------------------------------
    def parameters(self) -> List[nn.Parameter]:
        return [u.mask for u in self.units]

    def __len__(self) -> int:
        return len(self.units)

    @property
    def num_masks(self) -> int:
        return sum(u.size for u in self.units)

    def flat(self) -> torch.Tensor:
        return torch.cat([u.mask.detach().flatten() for u in self.units])

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {u.name: u.mask.detach().clone().cpu() for u in self.units}

    def load_state_dict(self, values: Dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for u in self.units:
                u.mask.copy_(values[u.name].to(u.mask.device))

    def stats(self, low: float = 0.1) -> Dict[str, float]:
        v = self.flat()
        return {"mask_mean": float(v.mean()), "mask_min": float(v.min()),
                "mask_frac_below": float((v < low).float().mean())}

    # -- updates --------------------------------------------------------------
    @torch.no_grad()
    def clip_(self, lower: Sequence[float] | float = 0.0, upper: float = 1.0) -> None:
        if isinstance(lower, (int, float)):
            lower = [float(lower)] * len(self.units)
        if len(lower) != len(self.units):
            raise ValueError(f"{len(lower)} lower bounds for {len(self.units)} mask layers")
        for u, lo in zip(self.units, lower):
            u.mask.clamp_(min=float(lo), max=upper)

    @torch.no_grad()
    def fill_(self, value: float) -> None:
        for u in self.units:
            u.mask.fill_(value)

    def set_noise(self, weight_noise: Optional[List[torch.Tensor]], bias_noise: Optional[List[torch.Tensor]] = None) -> None:
        """Additive mask noise per unit (ANP): weight uses ``m + n``, bias ``1 + n_b``."""
        for i, u in enumerate(self.units):
            u.weight_scale.noise = None if weight_noise is None else weight_noise[i]
            if u.bias_scale is not None:
                u.bias_scale.noise = None if bias_noise is None else bias_noise[i]

    # -- fold -------------------------------------------------------------------
    def detach(self, fold: bool = True) -> nn.Module:
        """Remove the masks. ``fold=True`` multiplies them into the weights first."""
        if self._folded:
            return self.model
        modules = dict(self.model.named_modules())
        self.set_noise(None, None)
        for u in self.units:
            m = modules[u.name]
            for pname in ("weight", "bias"):
                if parametrize.is_parametrized(m, pname):
                    if not fold:
                        # Drop the scale: reset the mask to one before removing.
                        with torch.no_grad():
                            u.mask.fill_(1.0)
                    parametrize.remove_parametrizations(m, pname, leave_parametrized=True)
        for pname, p in self.model.named_parameters():
            p.requires_grad_(self._frozen.get(pname, True))
            if p.grad is not None:
                p.grad = None
        self._folded = True
        return self.model

    def fold(self) -> nn.Module:
        return self.detach(fold=True)


def prune_units_(masks: NeuralMasks, threshold: Optional[float] = None, count: Optional[int] = None,
                 scores: Optional[torch.Tensor] = None) -> int:
    """Set masks to 0 where score <= threshold, or the ``count`` lowest; others to 1.

    Used by pruning defenses (ANP, RNP). Returns the number of pruned units.
    """
    s = masks.flat() if scores is None else scores.flatten()
    if (threshold is None) == (count is None):
        raise ValueError("give exactly one of threshold or count")
    if count is not None:
        keep = torch.ones_like(s, dtype=torch.bool)
        if count > 0:
            keep[torch.argsort(s)[:count]] = False
    else:
        keep = s > threshold
    with torch.no_grad():
        off = 0
        for u in masks.units:
            n = u.size
            u.mask.copy_(keep[off:off + n].to(u.mask.dtype).view_as(u.mask))
            off += n
    return int((~keep).sum())
