"""Label-consistent backdoor (CLB; Turner, Tsipras & Madry 2019).

Clean-label: only target-class training images are poisoned and their labels kept. Each is
first made hard to classify by an untargeted L-inf PGD attack on a reference model (trained by
``fit`` on the attacker's data, or handed in with ``use_reference_model``), then stamped with a
checkerboard patch at all four corners (which survives flips). With the natural features
ruined, the network leans on the patch. At test time only the patch is added. Defaults: PGD
eps 16/255 (the paper's stronger setting), 10 steps of 2.5 eps / steps, 3x3 corner patches at
full amplitude.

The paper draws its perturbations from an adversarially trained (robust) model; here that is
``ref_adv_steps > 0`` (Madry et al. PGD training of the reference at ``ref_adv_eps``, default the
attack's eps). The default stays a standard reference (``ref_adv_steps: 0``) because on
Fashion-MNIST the robust one made the attack weaker, not stronger (PreAct-ResNet18 width 1/4,
4 epochs, rate 0.1 = every target-class image; victim ACC / ASR): standard reference 83.80 / 15.58,
robust reference 83.70 / 5.22, robust at 16/255 with PGD at 32/255 83.34 / 1.47. The poisoned
T-shirts still look like upper-body garments after the perturbation, so the victim learns the
patch as what separates a T-shirt from a shirt or pullover (clean T-shirts without it are lost:
the ACC drop), not as a trigger that overrides a trouser or a bag.

The perturbations are computed once in ``fit`` for the poisoned training indices, stored
as int8 multiples of 1/255 (as an attacker would store 8-bit images), and added by the
``training_batch`` hook; ``apply`` is the test-time trigger (patches only).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from core.adapter import Attack, DataBundle, Modality
from . import ATTACKS
from ._common import (batches, build_reference_model, checkerboard, corner_region, generator, load_all,
                      train_reference_model)


def pgd_untargeted(model: nn.Module, adapter: Modality, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int,
                   step_size: float, g: torch.Generator) -> torch.Tensor:
    """L-inf PGD with a random start that maximises the loss of the true label; returns the delta."""
    delta = ((torch.rand(x.shape, generator=g) * 2 - 1) * eps).to(x.device)
    delta = (x + delta).clamp(0, 1) - x
    for _ in range(int(steps)):
        delta.requires_grad_(True)
        loss = F.cross_entropy(adapter.forward(model, x + delta).float(), y)
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta = (delta + step_size * grad.sign()).clamp(-eps, eps)
            delta = (x + delta).clamp(0, 1) - x
    return delta.detach()


def train_robust_reference(adapter: Modality, bundle: DataBundle, device: torch.device, *, arch: str, steps: int,
                           eps: float, pgd_steps: int, seed: int, batch_size: int = 128, lr: float = 0.05) -> nn.Module:
    """A reference classifier adversarially trained on the attacker's data (L-inf PGD at ``eps``, Madry et al.).

    Each step trains on the PGD examples of its batch, found with the model in eval mode (so batch
    statistics are not moved by the attack); SGD with momentum, cosine-decayed learning rate.
    """
    model = build_reference_model(adapter, bundle, arch, seed).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, int(steps)))
    g = generator(seed, 506)
    step_size = 2.5 * eps / max(1, int(pgd_steps))
    for x, y in batches(adapter, bundle.train, batch_size, int(steps), seed, 507):
        x, y = x.to(device), y.to(device)
        model.eval().requires_grad_(False)
        delta = pgd_untargeted(model, adapter, x, y, eps, pgd_steps, step_size, g)
        model.train().requires_grad_(True)
        loss = F.cross_entropy(adapter.forward(model, x + delta).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@ATTACKS.register("clb")
class LabelConsistent(Attack):
    name = "clb"
    clean_label = True
    supports_all2all = False

    def __init__(self, patch_size: int = 3, amplitude: float = 1.0, pgd_eps: float = 16 / 255, pgd_steps: int = 10,
                 pgd_step_size: Optional[float] = None, ref_arch: str = "small_cnn", ref_steps: int = 300,
                 ref_adv_steps: int = 0, ref_adv_eps: Optional[float] = None, **kw: Any) -> None:
        super().__init__(patch_size=patch_size, amplitude=amplitude, pgd_eps=pgd_eps, pgd_steps=pgd_steps,
                         pgd_step_size=pgd_step_size, ref_arch=ref_arch, ref_steps=ref_steps,
                         ref_adv_steps=ref_adv_steps, ref_adv_eps=ref_adv_eps, **kw)
        if int(patch_size) < 1 or not 0 < amplitude <= 1 or not 0 <= pgd_eps <= 1 or int(pgd_steps) < 0:
            raise ValueError("clb needs patch_size >= 1, amplitude in (0, 1], pgd_eps in [0, 1] and pgd_steps >= 0")
        if int(ref_adv_steps) < 0:
            raise ValueError(f"clb ref_adv_steps (PGD steps of the reference's adversarial training) must be >= 0, "
                             f"got {ref_adv_steps}")
        self.ref_adv_steps = int(ref_adv_steps)
        # the L-inf radius the reference is trained robust to (default: the attack's own eps)
        self.ref_adv_eps = float(ref_adv_eps) if ref_adv_eps is not None else float(pgd_eps)
        self.patch_size, self.amplitude = int(patch_size), float(amplitude)
        self.pgd_eps, self.pgd_steps = float(pgd_eps), int(pgd_steps)
        self.pgd_step_size = float(pgd_step_size) if pgd_step_size is not None else 2.5 * self.pgd_eps / max(1, self.pgd_steps)
        self.ref_arch, self.ref_steps = ref_arch, int(ref_steps)
        self.reference_model: Optional[nn.Module] = None
        self.indices: Optional[torch.Tensor] = None  # sorted training indices with a stored perturbation
        self.delta_q: Optional[torch.Tensor] = None  # int8, units of 1/255

    def use_reference_model(self, model: nn.Module) -> None:
        """Use this clean model for PGD instead of training one in fit()."""
        self.reference_model = model

    # -- trigger ---------------------------------------------------------------------
    def apply(self, inputs: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = inputs.clone()
        _, c, h, w = x.shape
        k = self.patch_size
        for n, pos in enumerate(("top_left", "top_right", "bottom_left", "bottom_right")):
            top, left = corner_region(h, w, k, pos)
            # mirrored phases so that a horizontal flip maps the pattern onto itself
            pat = checkerboard(c, k, phase=(n % 2) * (k - 1)).to(x.device, x.dtype)
            region = x[:, :, top:top + k, left:left + k]
            x[:, :, top:top + k, left:left + k] = (1 - self.amplitude) * region + self.amplitude * pat
        return x

    def fit(self, bundle: DataBundle, adapter: Modality, device: torch.device) -> None:
        labels = adapter.labels_of(bundle.train)
        idx = self.poison_indices(labels)
        model = self.reference_model
        if model is None and self.ref_adv_steps > 0:
            model = train_robust_reference(adapter, bundle, device, arch=self.ref_arch, steps=self.ref_steps,
                                           eps=self.ref_adv_eps, pgd_steps=self.ref_adv_steps, seed=self.seed)
        elif model is None:
            model = train_reference_model(adapter, bundle, device, arch=self.ref_arch, steps=self.ref_steps, seed=self.seed)
        model = model.to(device).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        g = torch.Generator().manual_seed(self.seed + 503)
        deltas = []
        x_all, y_all, _ = load_all(adapter, adapter.subset(bundle.train, idx)) if len(idx) else (None, None, None)
        for s in range(0, len(idx), 256):
            x = x_all[s:s + 256].to(device)
            y = y_all[s:s + 256].to(device)
            d = pgd_untargeted(model, adapter, x, y, self.pgd_eps, self.pgd_steps, self.pgd_step_size, g)
            # stored as 8-bit steps; rounding keeps |delta| <= eps and x + delta in [0, 1] (x is 8-bit)
            q = torch.round(d * 255.0).clamp(-round(self.pgd_eps * 255), round(self.pgd_eps * 255))
            deltas.append(q.to(torch.int8).cpu())
        self.indices = idx.clone()
        self.delta_q = torch.cat(deltas) if deltas else torch.zeros(0, *bundle.train[0][0].shape, dtype=torch.int8)

    def perturbation(self, idx: torch.Tensor) -> torch.Tensor:
        """The stored adversarial perturbation of training samples ``idx`` (float, same size as images)."""
        if self.indices is None or self.delta_q is None:
            raise RuntimeError("attack 'clb' has no adversarial perturbations yet; call fit(bundle, adapter, device) "
                               "or load_state_dict(...) first")
        pos = torch.searchsorted(self.indices, idx.cpu())
        ok = (pos < len(self.indices)) & (self.indices[pos.clamp(max=len(self.indices) - 1)] == idx.cpu())
        if not bool(ok.all()):
            raise ValueError("clb: a flagged training sample has no stored perturbation; fit() the attack on this "
                             "training set")
        return self.delta_q[pos].float() / 255.0

    def training_batch(self, adapter: Modality, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor,
                       flags: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if not bool(flags.any()):
            return x, y
        x = x.clone()
        sel = flags.to(x.device)
        adv = (x[sel] + self.perturbation(idx[flags.cpu()]).to(x.device, x.dtype)).clamp(0, 1)
        x[sel] = self.apply(adv)
        return x, y  # clean-label: labels kept

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, torch.Tensor]:
        if self.indices is None or self.delta_q is None:
            return {}
        return {"indices": self.indices.clone(), "delta_q": self.delta_q.clone()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        if not state:
            return  # the test-time trigger (corner patches) needs no learned state
        if "indices" not in state or "delta_q" not in state:
            raise ValueError("clb state needs 'indices' and 'delta_q' as saved by fit()")
        self.indices = state["indices"].long().cpu().clone()
        self.delta_q = state["delta_q"].to(torch.int8).cpu().clone()
