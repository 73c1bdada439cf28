"""Neural mask Fine-Tuning (NFT): train per-unit masks on a small clean split, then fold.

Only masks train (weights frozen); each batch is mixed with a shuffled copy of itself
(MixUp, lambda-weighted loss); an L1 pull toward one, weighted eta / N_c, keeps clean
accuracy; after every step masks are clipped to [mu(l), 1] by layer depth. At the end the
masks are folded into the weights, giving a plain model of the original architecture.

The ``official`` preset reproduces the released code's settings. The default adds what
makes NFT purify on Fashion-MNIST (docs/nft-default.md, "what the default does"): a universal
adversarial perturbation learned alongside the masks ("free" ascent on the same backward
pass) shown on half of each batch, so units that carry a backdoor get a clean-label gradient
whatever the trigger's form; the modality's strong augmentation; a short main phase; a
recovery phase without the perturbation (MixUp and strong augmentation kept) stopped by a
clean-data accuracy rule; BN recalibration on clean data.
"""
from __future__ import annotations

import copy
import functools
import math
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from .adapter import Modality
from .defenses.base import Defense, DefenseContext, DefenseResult
from .masks import NeuralMasks, forward_order, is_affine_norm
from .mixup import mixed_loss, mixup_batch
from .regularizer import mask_penalty, penalty_weight
from .registry import DEFENSES
from .schedule import lower_bounds
from .utils import autocast, progress, to_memory_format

OFFICIAL: Dict[str, Any] = {
    "steps": 1000, "batch_size": 128,
    "lr": 0.05, "momentum": 0.95, "weight_decay": 0.0, "lr_min": 0.02,
    "lr_schedule": "cosine_per_pass", "passes": 5,     # cosine over the 5 outer passes of 200 batches
    "mixup_alpha": 1.0,
    # How two inputs are mixed: None = the modality's default (pixel MixUp for images, the data
    # config's ``mix`` for video); otherwise one of the modality's mix modes (e.g. "mixup").
    "mix": None,
    "reg_norm": "l1", "eta": 1e-3,
    "schedule": "exponential", "schedule_params": {"a": 0.8, "b": 0.5},
    "bn_mode": "train", "mask_beta": False,
    # Maskable units (names as in model.named_modules()) to leave unmasked, besides the model's own
    # ``nft_mask_exclude`` (e.g. a stem BN).
    "mask_exclude": [],
    # Units to mask although the model's own ``nft_mask_exclude`` leaves them out (e.g. ["stem.1"]);
    # ``mask_model_excluded`` masks every unit that list names.
    "mask_include": [], "mask_model_excluded": False,
    "augment": "weak",
    # Universal adversarial perturbation applied to a share of each mixed batch. adv_norm "linf", "l2" or "l1"; an
    # "l1" radius counts input values per entry of the perturbation's first dim (a channel on images).
    "adv_frac": 0.0, "adv_eps": 0.0, "adv_norm": "linf", "adv_lr": 0.0, "adv_reset": 0,
    # Input dims (0 = the first after the batch) over which the perturbation is one shared value:
    # [1] on a (C, T, H, W) clip is one frame pattern for every time step, which cannot encode motion.
    "adv_shared_dims": [],
    # Several universal perturbations, each on its own slice of the perturbed share: from different
    # starts they can settle on different universal directions (a trigger among natural ones).
    "adv_count": 1,
    # Where the perturbations start: "random" (uniform in the eps ball) or "targeted": before mask
    # training, one targeted universal perturbation per class is ascended on the clean split (frozen
    # model) and the perturbations start from those of the classes reached most easily (lowest loss).
    # A backdoor target is the class every input can be sent to; an untargeted ascent can instead
    # settle on a natural universal direction (on the video blend victim, classes 8 and 9 are also
    # reachable at eps 0.2, docs/nft-default.md). The ranking is reported as the suspected target. "auto": targeted
    # when the clean split has at least ``adv_init_min_samples`` samples, else random: on a one-shot
    # split (10 images) the search ranked a wrong class first (Blend seed 1: ASR 33.74%, docs/nft-default.md).
    "adv_init": "random", "adv_init_steps": 20, "adv_init_samples": 64, "adv_init_min_samples": 100,
    # How many perturbations start from the top classes' (the rest start random).
    "adv_init_top": 1,
    # Further perturbation families the targeted search tries besides (adv_norm, adv_eps), each
    # {"norm": "linf" | "l2" | "l1", "eps": radius[, "lr": ascent step]} (an "l1" radius as adv_eps's: 12 = twelve
    # full-scale pixels per channel; lr defaults to eps * adv_lr / adv_eps). Every family is searched on the same images; the one in which the
    # easiest class stands out most (runner-up loss / easiest loss) is the family the perturbations take, start
    # and all. Why: the trigger's form is unknown, and a family stands out where the trigger lives in it: a patch
    # is a few full-scale pixels (a small L1 ball holds it, an L-inf ball of 0.2 does not), a blend is a faint
    # change of every pixel (the reverse). On the Fashion-MNIST BadNets victim the L1 search's ratio was 146-722x
    # against L-inf's 21-111x; on the Blend victim L-inf's ~2,000x against L1's 1.2x (docs/nft-default.md, item 10).
    "adv_init_families": [],
    # Successive halving in the search: every class descends a quarter of adv_init_steps, then only this many
    # easiest ones the rest (0 = every class every step). The ranking's head, which the start and the outlier
    # ratio read, is the full search's whenever the two easiest classes are among them after a quarter.
    "adv_init_keep": 0,
    # Start targeted only when the easiest class is an outlier: its loss at least this many times
    # below the runner-up's; otherwise every perturbation starts random. 0 = always start targeted.
    # (On the video victims the ratio did not separate a real trigger from a natural class: 8.6x
    # for the clean-label target, 8x for a natural class under the temporal trigger; docs/nft-default.md.)
    "adv_init_margin": 0.0,
    # Re-estimate BN running statistics on the clean split (no augmentation) after folding: True (or
    # "full") replaces them by the split's; "shift" keeps the model's own and adds only the change the
    # masks made, measured on the split before and after (recalibrate_norm_stats); False keeps them.
    "bn_recalibrate": False,
    # With "shift": reject the shift (keep the split's statistics) when the fully recalibrated model gets
    # significantly more of the clean split right (one-sided exact sign test, p below this; 0 = never
    # check). The per-channel rule alone passed a shift that took bppa@8ep from 89 to 65% (docs/nft-default.md).
    "bn_shift_check": 0.01,
    # ... and only when the shift's split accuracy is also more than this many points below the full
    # one's: full recalibration is fitted on the split itself and so gains a little there (up to 1.8
    # points, 11 of 600 images, on the fourteen Fashion-MNIST runs of session 10, where the shift did
    # not hurt test accuracy); the check is for a shift that breaks the model (bppa@8ep: 31 points).
    "bn_shift_check_margin": 5.0,
    # A learned logit temperature during mask training (not folded: argmax is unchanged).
    "learn_temperature": False,
    # Recovery phase: after the main steps, masks train on plain clean CE (no perturbation, no MixUp).
    # Units that carry the clean task get their gradient back; units that serve only the trigger get
    # none from clean data (the reason plain NFT cannot find them), so they stay where phase one put them.
    "recover_steps": 0, "recover_lr": 0.01, "recover_augment": "weak",
    # Recovery learning rate over its steps: "constant", or "cosine" from recover_lr down to 0 at the
    # last recovery step (annealing: the masks settle instead of ending on a noisy step).
    "recover_lr_schedule": "constant",
    # During recovery keep showing the universal perturbation: False (no), "frozen" (the last one, fixed)
    # or "live" (it keeps ascending, so a trigger the recovery re-opens is found again).
    "recover_adv": False,
    # Share of each recovery batch that carries it (None = adv_frac).
    "recover_adv_frac": None,
    # MixUp during recovery too (same alpha): a mixed pair is itself a blend of an image with another
    # pattern, and its soft label says the blend keeps the image's class, the opposite of a blend trigger.
    "recover_mixup": False, "recover_mixup_alpha": None,   # None = mixup_alpha
    # Share of each recovery batch that is mixed; the rest trains on plain clean cross-entropy (each part
    # weighted by its size). Training on mixed images is what recovery pays accuracy for; some of it is
    # what keeps a blend trigger closed (docs/nft-default.md, "what the default does").
    "recover_mixup_frac": 1.0,
    # Augmentation of the plain (unmixed) share of a recovery batch (None = recover_augment, the whole batch).
    "recover_plain_augment": None,
    # Weight of distillation from the original model on the plain (unmixed) share of a recovery batch:
    # loss = (1 - w) CE + w T^2 KL(teacher_T || student_T), the KL term only on images the original
    # classifies correctly (an augmented image that excites its backdoor keeps the hard label). Why: the
    # original's outputs on clean images describe its clean function more fully than 600 labels. 0 = off.
    "recover_distill": 0.0, "recover_distill_temperature": 2.0,
    # Stop recovering once accuracy on the (unaugmented) clean split is back within this many points
    # of the original model's; checked every ``recover_check_every`` steps. Clean data only.
    "recover_tolerance": 1.0, "recover_check_every": 25,
    # Exponential moving average of the masks over the recovery steps (decay per step; 0 = off): the folded model
    # takes the average, not the last step's masks (Polyak / SWA-style averaging of a noisy SGD end point).
    "recover_ema": 0.0,
    # The stopping rule needs a split that can measure a point of accuracy: on 10 images (one per
    # class) one image is 10 points, so the rule fires on noise. Smaller splits run the whole recovery.
    "recover_check_min_samples": 100,
    # Where the defense computes in bf16: whether the targeted search's descent (search_autocast) and the
    # recovery stop's clean-split checks (checks_autocast) do too; false keeps them fp32, as until session 18.
    # Together they were 40% of an image NFT run in fp32 (docs/results.md, Issue 4's run of session 19).
    "search_autocast": True, "checks_autocast": True,
    # Recovery watch (clean data only; needs the targeted start, i.e. a suspected target t and its
    # perturbation delta_t found on the victim): at each recovery check, which clean images of other
    # classes delta_t sends to t, against phase one's end. If significantly more (one-sided sign test on
    # the images that changed, p < this), recovery is re-opening the trigger: restore the masks of the
    # previous check and stop. 0 = off. Why: recovery gives back accuracy and, on some victims, the trigger
    # with it (docs/nft-default.md, "Where the Blend ASR comes back"); the victim's own delta_t follows the test ASR.
    "recover_watch": 0.0,
    # Weight of a term that pushes the perturbed share away from the suspected target t (needs the targeted
    # start): masks descend -log(1 - p_t); the perturbation ascends it, so it keeps moving toward t. 0 = off.
    "adv_target_weight": 0.0,
    # Ascent step of a perturbation that started targeted (None = adv_lr; 0 = it stays the victim's delta_t).
    "adv_targeted_lr": None,
    # Share of each recovery batch (its last images, unmixed) that carries the suspected target's delta_t and
    # is trained only away from t (the term above, weight adv_target_weight; no cross-entropy, so it is not
    # adversarial training). Needs the targeted start; 0 = off. Why: recovery re-opens the trigger as accuracy
    # comes back, and delta_t's reach on the clean split follows the test ASR through it (recover_watch).
    "recover_away_frac": 0.0,
    # Phase-one steps (at most) on a split smaller than recover_check_min_samples (None = steps). Why: on one image per
    # class every step shows each image about 13 times; the trigger is gone by ~75 steps and the rest of phase
    # one costs accuracy (docs/nft-default.md, "what the default does" item 9).
    "small_split_steps": None,
    # Further options that replace the config's own on such a split (below recover_check_min_samples), e.g.
    # {"recover_lr": 0.02}. Why: there no clean-split check can stop the recovery, so a recovery tuned to run
    # until the check fires would run its whole length on ten images and fit them (docs/nft-default.md, item 14).
    "small_split_options": {},
}

DEFAULTS: Dict[str, Any] = {
    **OFFICIAL,
    # Phase one: 200 steps (the official 1,000 overshoot: the backdoor is gone by ~100 and clean
    # accuracy only falls after), strong augmentation, a universal adversarial perturbation on half
    # of each batch. Phase two: up to 200 steps without the perturbation (its adversarial-training
    # cost is what phase one loses in accuracy) but with MixUp and the strong augmentation kept, so
    # the pathways they excite (blends, local patches) stay closed while accuracy comes back; stopped
    # early by a clean-split accuracy rule. Plain clean-CE recovery re-opened a Blend backdoor
    # (ASR 14% -> 94% in 100 steps, docs/nft-default.md); this one did not.
    "steps": 200,
    "augment": "strong",
    "adv_frac": 0.5, "adv_eps": 0.2, "adv_norm": "linf", "adv_lr": 0.01, "adv_reset": 0,
    "recover_steps": 200, "recover_lr": 0.02, "recover_augment": "strong", "recover_mixup": True,
    "bn_recalibrate": True,
}


def lr_at(step: int, cfg: Dict[str, Any]) -> float:
    """Learning rate before ``step`` (0-based): cosine from lr to lr_min, per pass or per step."""
    lr, lo, total = float(cfg["lr"]), float(cfg["lr_min"]), int(cfg["steps"])
    kind = cfg["lr_schedule"]
    if kind == "constant":
        return lr
    if kind == "cosine_per_pass":
        passes = max(int(cfg["passes"]), 1)
        per = max(total // passes, 1)
        t, T = min(step // per, passes - 1), max(passes, 1)
    elif kind == "cosine":
        t, T = step, max(total, 1)
    else:
        raise ValueError(f"unknown lr_schedule '{kind}' (cosine, cosine_per_pass, constant)")
    return lo + (lr - lo) * 0.5 * (1.0 + math.cos(math.pi * t / T))


def recover_lr_at(step: int, cfg: Dict[str, Any]) -> float:
    """Learning rate before recovery step ``step`` (0-based): constant, or cosine from recover_lr to 0."""
    lr, kind = float(cfg["recover_lr"]), cfg.get("recover_lr_schedule", "constant")
    if kind == "constant":
        return lr
    if kind == "cosine":
        total = max(int(cfg["recover_steps"]), 1)
        return lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    raise ValueError(f"nft.recover_lr_schedule must be 'constant' or 'cosine', got {kind!r}")


def _batch_norms(model: nn.Module) -> Dict[str, nn.modules.batchnorm._BatchNorm]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats}


@torch.no_grad()
def norm_reference(model: nn.Module, adapter: Modality, data: Dataset, device: torch.device,
                   batch_size: int = 256, channels_last: bool = False) -> Dict[str, Dict[str, torch.Tensor]]:
    """Per BN layer: the model's own running statistics and those of ``data`` through it (model unchanged).

    Taken before NFT changes anything, it lets :func:`recalibrate_norm_stats` estimate only the
    *change* the masks make to each layer's statistics on the clean split, and add that change to the
    running statistics the model was trained with (estimated on its whole training set).
    """
    probe = copy.deepcopy(model)
    own = {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in _batch_norms(model).items()}
    recalibrate_norm_stats(probe, adapter, data, device, batch_size, channels_last)
    return {n: {"running_mean": own[n][0], "running_var": own[n][1],
                "clean_mean": m.running_mean.clone(), "clean_var": m.running_var.clone()}
            for n, m in _batch_norms(probe).items()}


@torch.no_grad()
def recalibrate_norm_stats(model: nn.Module, adapter: Modality, data: Dataset, device: torch.device,
                           batch_size: int = 256, channels_last: bool = False,
                           reference: Optional[Dict[str, Dict[str, torch.Tensor]]] = None,
                           shift_check_alpha: float = 0.0, shift_check_margin: float = 0.0,
                           use_autocast: bool = False) -> Dict[str, Any]:
    """Replace BN running statistics by their plain average over ``data`` (clean, unaugmented).

    After training in train mode, the running statistics follow the mixed, augmented batches;
    the purified model is used on clean inputs, so its statistics should be those of clean data.
    With ``reference`` (:func:`norm_reference` of the model before NFT) only the change is taken from
    ``data``: mean = original + (new - before), var = original * new / before, all measured on the same
    images, so their sampling noise cancels (a control variate); channels whose own statistics do not
    describe the clean split at all keep the split's (see below). A 600-image split estimates the
    statistics themselves less well than the training set did: full recalibration alone costs the
    untouched Fashion-MNIST BadNets victim 0.43 points of accuracy (90.94 -> 90.51).

    ``shift_check_alpha`` > 0 checks the shift on ``data`` itself: if the fully recalibrated model
    classifies significantly more of its samples correctly (one-sided exact sign test on the samples
    only one of the two gets right, p < alpha) and by more than ``shift_check_margin`` points, the
    shift is rejected and the split's statistics are kept. Why: per channel the shift can look sound and still break the model (bppa@8ep, docs/nft-default.md: three
    channels whose own variance was half the split's took ACC from 89 to 65). Returns what was done:
    ``{"mode": "full" | "shift" | "shift rejected", "full_only": b, "shift_only": c, "p": p, "split_acc": %}``.
    """
    norms = _batch_norms(model)
    if not norms:
        return {"mode": "none"}
    saved = [(m, m.momentum) for m in norms.values()]
    for m in norms.values():
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    was = model.training
    model.train()
    for batch in adapter.loader(data, batch_size):
        x = to_memory_format(model, adapter.to_device(batch[0], device), channels_last)
        with autocast(device, use_autocast):
            adapter.forward(model, x)
    for m, mom in saved:
        m.momentum = mom
    model.train(was)
    if not reference:
        return {"mode": "full"}
    check = shift_check_alpha > 0
    if check:
        full_stats = {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in norms.items()}
        right_full = correct_predictions(model, adapter, data, device, channels_last, use_autocast)
    for name, ref in reference.items():
        m = norms.get(name)
        if m is None or m.running_mean.shape != ref["running_mean"].shape:
            continue
        eps = float(m.eps)
        own_mean, own_var = ref["running_mean"].to(m.running_mean), ref["running_var"].to(m.running_var)
        before_mean, before_var = ref["clean_mean"].to(m.running_mean), ref["clean_var"].to(m.running_var)
        # The shift assumes the model's own statistics describe clean data; a channel whose own mean is
        # more than one clean standard deviation off, or whose variance is 4x off, was fitted on other
        # data (TrojanNet's merged trigger branch, trained on trigger patterns alone) and keeps the
        # split's statistics. On the fifteen Fashion-MNIST victims only that branch's channels are.
        var_ratio = (own_var + eps) / (before_var + eps)
        consistent = (((own_mean - before_mean).abs() <= (before_var + eps).sqrt())
                      & (var_ratio <= 4.0) & (var_ratio >= 0.25))
        ratio = (m.running_var + eps) / (before_var + eps)
        shifted_mean = own_mean + m.running_mean - before_mean
        shifted_var = ((own_var + eps) * ratio - eps).clamp_min(0.0)
        m.running_mean.copy_(torch.where(consistent, shifted_mean, m.running_mean))
        m.running_var.copy_(torch.where(consistent, shifted_var, m.running_var))
    if not check:
        return {"mode": "shift"}
    right_shift = correct_predictions(model, adapter, data, device, channels_last, use_autocast)
    full_only, shift_only = int((right_full & ~right_shift).sum()), int((right_shift & ~right_full).sum())
    p = sign_test_p(full_only, shift_only)
    gap = 100.0 * (full_only - shift_only) / max(len(right_full), 1)
    rejected = p < float(shift_check_alpha) and gap > float(shift_check_margin)
    if rejected:
        for n, (mean, var) in full_stats.items():
            norms[n].running_mean.copy_(mean)
            norms[n].running_var.copy_(var)
    right = right_full if rejected else right_shift
    # split_acc: the kept statistics' accuracy on ``data`` (clean_accuracy reuses it, no third pass)
    return {"mode": "shift rejected" if rejected else "shift", "full_only": full_only, "shift_only": shift_only,
            "p": p, "split_acc": _percent(right)}


def _percent(right: torch.Tensor) -> float:
    return 100.0 * int(right.sum()) / max(len(right), 1)


def sign_test_p(wins: int, losses: int) -> float:
    """One-sided exact sign test: P(X >= wins) for X ~ Binomial(wins + losses, 1/2) (1.0 when no pairs)."""
    n = wins + losses
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2 ** n if n else 1.0


@torch.no_grad()
def _predictions(model: nn.Module, adapter: Modality, data: Dataset, device: torch.device, channels_last: bool,
                 use_autocast: bool, delta: Optional[torch.Tensor] = None) -> tuple:
    """(predictions, labels) of the model in eval mode on ``data`` as given, in order (perturbed by ``delta`` if given)."""
    was = model.training
    model.eval()
    preds, labels = [torch.zeros(0, dtype=torch.long)], [torch.zeros(0, dtype=torch.long)]
    for batch in adapter.loader(data, 256):
        x, y = adapter.to_device(batch[0], device), batch[1]
        if delta is not None:
            x = adapter.perturb(x, delta)
        with autocast(device, use_autocast):
            preds.append(adapter.predict(model, to_memory_format(model, x, channels_last)).cpu())
        labels.append(y.cpu())
    model.train(was)
    return torch.cat(preds), torch.cat(labels)


def correct_predictions(model: nn.Module, adapter: Modality, data: Dataset, device: torch.device,
                        channels_last: bool = False, use_autocast: bool = False) -> torch.Tensor:
    """Per sample of ``data`` (as given, in order), whether the model in eval mode predicts its label."""
    pred, y = _predictions(model, adapter, data, device, channels_last, use_autocast)
    return pred == y


@torch.no_grad()
def clean_accuracy(model: nn.Module, adapter: Modality, data: Dataset, device: torch.device,
                   channels_last: bool = False, use_autocast: bool = False) -> float:
    """Accuracy (%) on ``data`` as given (no augmentation), in eval mode (after BN recalibration: :func:`checked_copy`)."""
    return _percent(correct_predictions(model, adapter, data, device, channels_last, use_autocast))


def suspect_hits(model: nn.Module, adapter: Modality, data: Dataset, target: int, delta: torch.Tensor,
                 device: torch.device, channels_last: bool = False, use_autocast: bool = False) -> torch.Tensor:
    """Per sample of ``data`` not of class ``target`` (in order), whether ``delta`` sends it to ``target`` (eval mode)."""
    pred, y = _predictions(model, adapter, data, device, channels_last, use_autocast, delta)
    return pred[y != target] == target


def checked_copy(model: nn.Module, adapter: Modality, data: Dataset, device: torch.device,
                 reference: Optional[Dict[str, Dict[str, torch.Tensor]]] = None, channels_last: bool = False,
                 use_autocast: bool = False, **shift_check: float) -> tuple:
    """A copy of the model with recalibrated BN statistics (as NFT would return it) and its accuracy on ``data``.

    The copy keeps the model being trained from losing its running statistics.
    """
    ev = copy.deepcopy(model)
    done = recalibrate_norm_stats(ev, adapter, data, device, reference=reference, channels_last=channels_last,
                                  use_autocast=use_autocast, **shift_check)
    acc = done["split_acc"] if "split_acc" in done else _percent(
        correct_predictions(ev, adapter, data, device, channels_last, use_autocast))
    return ev, acc


class UniversalPerturbation:
    """A single input perturbation shared by all samples, ascended on the task loss.

    Updated from the gradient of the same backward pass that trains the masks ("free"
    adversarial training), so it costs one extra input-gradient, not extra passes.
    ``norm``: "linf" (sign steps), "l2" (normalised gradient steps) or "l1" (a sparse ball: steps on the
    largest ``L1_STEP_SHARE`` of gradient coordinates, projected onto the L1 ball; it can put its whole
    budget on a few inputs, as a patch trigger does, where an L-inf ball spreads it over all of them).
    """

    NORMS = ("linf", "l2", "l1")
    L1_STEP_SHARE = 0.05   # share of coordinates an L1 step moves (sparse L1 descent, Tramer & Boneh 2019)

    def __init__(self, shape: tuple, eps: float, lr: float, norm: str, device: torch.device,
                 generator: torch.Generator) -> None:
        if norm not in self.NORMS:
            raise ValueError(f"adv_norm must be one of {list(self.NORMS)}, got '{norm}'")
        self.eps, self.lr, self.norm = float(eps), float(lr), norm
        self.shape, self.device, self.generator = shape, device, generator
        self.delta = torch.zeros(shape, device=device)
        self.reset()

    def reset(self) -> None:
        init = (torch.rand(self.shape, generator=self.generator) * 2 - 1) * self.eps
        if self.norm == "l1":   # a random point well inside the ball, not its (dense) corner region
            init = init / max(init.numel(), 1)
        self.delta = self._project(init.to(self.device)).requires_grad_(True)

    def _project(self, d: torch.Tensor) -> torch.Tensor:
        if self.norm == "linf":
            return d.clamp(-self.eps, self.eps)
        if self.norm == "l1":
            return project_l1_ball(d, self.eps)
        n = d.norm()
        return d * min(1.0, self.eps / (float(n) + 1e-12))

    def applied(self) -> torch.Tensor:
        """The delta a training step adds: detached where it does not move (lr 0, e.g. a held targeted start), so
        the backward skips the input gradient nobody reads (the first layer's data gradient: ~5% of an image step)."""
        return self.delta if self.lr > 0 else self.delta.detach()

    @torch.no_grad()
    def ascend(self) -> None:
        g = self.delta.grad
        if g is None:
            return
        if self.norm == "linf":
            step = self.lr * g.sign()
        elif self.norm == "l1":
            a = g.abs().flatten()
            k = max(1, int(round(self.L1_STEP_SHARE * a.numel())))
            top = (g.abs() >= a.topk(k).values[-1]) & (g != 0)
            step = self.lr * g.sign() * top / max(int(top.sum()), 1)   # L1 length lr
        else:
            step = self.lr * g / (g.norm() + 1e-12)
        self.delta = self._project(self.delta + step).requires_grad_(True)


def perturbation_radius(norm: str, eps: float, shape: tuple) -> float:
    """The ball's radius for a perturbation of ``shape``: an L1 ``eps`` counts values per entry of the first dim."""
    return float(eps) * (shape[0] if norm == "l1" and shape else 1)


def project_l1_ball(d: torch.Tensor, radius: float) -> torch.Tensor:
    """Euclidean projection of ``d`` onto the L1 ball of ``radius`` (Duchi et al. 2008, sort-based)."""
    flat = d.flatten()
    if float(flat.abs().sum()) <= radius:
        return d
    if radius <= 0:
        return torch.zeros_like(d)
    u = flat.abs().sort(descending=True).values
    cum = u.cumsum(0)
    idx = torch.arange(1, u.numel() + 1, device=d.device, dtype=u.dtype)
    rho = int((u - (cum - radius) / idx > 0).nonzero().max())
    theta = (cum[rho] - radius) / (rho + 1)
    return (flat.sign() * (flat.abs() - theta).clamp_min(0)).view_as(d)


def targeted_perturbation_search(model: nn.Module, adapter: Modality, clean: Dataset, shape: tuple, eps: float,
                                 norm: str, steps: int, samples: int, device: torch.device,
                                 generator: torch.Generator, *, use_autocast: bool = False,
                                 channels_last: bool = False, keep: int = 0) -> List[Dict[str, Any]]:
    """One targeted universal perturbation per class on (a seeded subset of) the clean split.

    The model is frozen and in eval mode; each perturbation descends the cross-entropy toward its
    class with steps of length eps/8 (sign steps for L-inf; projected). Returns one record per class,
    easiest first: ``{"class", "loss", "reach"}`` (reach: % of inputs of other classes sent to it) plus
    ``"delta"``. ``keep`` > 0 halves the work (successive halving): every class descends a quarter of the
    steps, then only the ``keep`` easiest so far descend the rest, so the ranking's head (what a targeted
    start and its outlier ratio read) is what the full search gives while the tail stops early; 0 = every
    class descends every step. ``use_autocast`` / ``channels_last``: the descent computes as the mask
    training does (a sign step needs only the gradient's sign); the ranking's losses stay fp32, as they run
    down to 1e-7.
    """
    n = len(clean)
    idx = torch.randperm(n, generator=generator)[:min(max(int(samples), 1), n)].tolist()
    x, y = next(iter(adapter.loader(torch.utils.data.Subset(clean, idx), len(idx))))[:2]
    x, y = adapter.to_device(x, device), y.to(device)
    was = model.training
    model.eval()
    grads = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)

    def descend(probe: UniversalPerturbation, target: torch.Tensor, count: int) -> None:
        for _ in range(count):
            with autocast(device, use_autocast):
                out = adapter.forward(model, to_memory_format(model, adapter.perturb(x, probe.delta), channels_last))
            loss = adapter.criterion(out.float(), target)
            probe.delta.grad, = torch.autograd.grad(loss, probe.delta)
            probe.delta.grad.neg_()           # ascend() climbs; toward the class is downhill
            probe.ascend()

    @torch.no_grad()
    def logits_of(probe: UniversalPerturbation) -> torch.Tensor:
        return adapter.forward(model, to_memory_format(model, adapter.perturb(x, probe.delta), channels_last))

    try:
        with torch.no_grad():
            out = adapter.forward(model, x)
        if not torch.is_tensor(out) or out.dim() != 2:
            raise ValueError("nft.adv_init 'targeted' needs a classifier's (batch, classes) logits; "
                             "use adv_init: random for this model")
        classes, steps = out.shape[1], int(steps)
        probes = [UniversalPerturbation(shape, eps, eps / 8.0, norm, device, generator) for _ in range(classes)]
        targets = [torch.full_like(y, k) for k in range(classes)]
        first = max(steps // 4, 1) if 0 < int(keep) < classes else steps
        for k in range(classes):
            descend(probes[k], targets[k], first)
        if first < steps:
            so_far = [float(adapter.criterion(logits_of(probes[k]), targets[k])) for k in range(classes)]
            for k in sorted(range(classes), key=lambda k: so_far[k])[:int(keep)]:
                descend(probes[k], targets[k], steps - first)
        records = []
        for k in range(classes):
            logits = logits_of(probes[k])
            others = y != k
            reach = float((logits.argmax(1)[others] == k).float().mean() * 100) if others.any() else 0.0
            records.append({"class": k, "loss": float(adapter.criterion(logits, targets[k])), "reach": reach,
                            "delta": probes[k].delta.detach()})
    finally:
        for p, g in zip(model.parameters(), grads):
            p.requires_grad_(g)
        model.train(was)
    return sorted(records, key=lambda r: r["loss"])


class MaskTrainer:
    """One NFT optimisation step at a time: augment -> MixUp -> (perturb) -> loss -> step -> clip.

    Shared by :class:`NFT` and the step-time benchmark, so both time the same work.
    """

    def __init__(self, model: nn.Module, adapter: Modality, cfg: Dict[str, Any], probe_inputs: Any,
                 clean_per_class: float, device: torch.device, generator: torch.Generator,
                 channels_last: bool = False, use_autocast: bool = False) -> None:
        self.model, self.adapter, self.cfg = model, adapter, cfg
        self.device, self.g = device, generator
        self.channels_last, self.use_autocast = channels_last, use_autocast
        candidates = adapter.maskable_units(model)
        modules = dict(model.named_modules())
        include = list(cfg.get("mask_include") or [])
        if cfg.get("mask_model_excluded"):
            include += [n for n in getattr(model, "nft_mask_exclude", ()) if is_affine_norm(modules.get(n))]
        for name in include:
            if not is_affine_norm(modules.get(name)):
                raise ValueError(f"nft.mask_include names '{name}', which is not an affine normalisation layer of "
                                 f"this model; use a name from model.named_modules() such as {candidates[:3]}")
            if name not in candidates:
                candidates.append(name)
        exclude = list(cfg.get("mask_exclude") or [])
        unknown = sorted(set(exclude) - set(candidates))
        if unknown:
            raise ValueError(f"nft.mask_exclude names {unknown}, which are not maskable units of this model; "
                             f"choose from {candidates}")
        candidates = [u for u in candidates if u not in exclude]
        units = forward_order(model, candidates, lambda m: adapter.forward(m, probe_inputs))
        # The original model (before masks), for recovery's distillation; eval mode: its trained statistics.
        self.teacher: Optional[nn.Module] = None
        distill = float(cfg.get("recover_distill") or 0.0)
        if not 0.0 <= distill <= 1.0:
            raise ValueError(f"nft.recover_distill must be in [0, 1], got {cfg['recover_distill']}")
        if distill > 0:
            self.teacher = copy.deepcopy(model).eval()
            for p_ in self.teacher.parameters():
                p_.requires_grad_(False)
        self.units = units
        self.masks = NeuralMasks(model, units, scale_bias=bool(cfg["mask_beta"]))
        self.lower = lower_bounds(cfg["schedule"], len(self.masks), **(cfg.get("schedule_params") or {}))
        self.reg_w = penalty_weight(float(cfg["eta"]), clean_per_class)
        params = list(self.masks.parameters())
        # MixUp's soft targets reward less confident outputs; without a temperature the only way to get
        # them is to shrink masks everywhere, which distorts features (a masked channel outputs beta).
        self.log_temperature: Optional[torch.Tensor] = None
        if cfg.get("learn_temperature"):
            self.log_temperature = torch.zeros((), device=device, requires_grad=True)
            params.append(self.log_temperature)
        self.opt = torch.optim.SGD(params, lr=float(cfg["lr"]), momentum=float(cfg["momentum"]),
                                   weight_decay=float(cfg["weight_decay"]))
        self.mix = adapter.mix
        if cfg.get("mix") is not None:
            self.mix = functools.partial(adapter.mix, mode=str(cfg["mix"]))
            self.mix(probe_inputs, probe_inputs, 0.5, torch.Generator())  # an unknown mode fails here, not mid-run
        self.uaps: List[UniversalPerturbation] = []
        if float(cfg["adv_frac"]) > 0 and float(cfg["adv_eps"]) > 0:
            shape = list(adapter.perturbation_shape(probe_inputs))
            for d in cfg.get("adv_shared_dims") or []:
                if not 0 <= int(d) < len(shape):
                    raise ValueError(f"nft.adv_shared_dims has {d}, but a perturbation of this modality has dims "
                                     f"0..{len(shape) - 1} (shape {tuple(shape)})")
                shape[int(d)] = 1
            count = int(cfg.get("adv_count", 1))
            if count < 1:
                raise ValueError(f"nft.adv_count must be >= 1, got {count}")
            base = perturbation_families(cfg, tuple(shape))[0]   # also checks adv_init_families here, not mid-run
            self.uaps = [UniversalPerturbation(tuple(shape), base["eps"], base["lr"], base["norm"], device, generator)
                         for _ in range(count)]
        recover_lr_at(0, cfg)   # an unknown recovery schedule fails here, not after the main phase
        if float(cfg["adv_target_weight"]) < 0:
            raise ValueError(f"nft.adv_target_weight must be >= 0 (0 = off), got {cfg['adv_target_weight']}")
        if cfg["adv_targeted_lr"] is not None and float(cfg["adv_targeted_lr"]) < 0:
            raise ValueError(f"nft.adv_targeted_lr must be >= 0 or null (= adv_lr), got {cfg['adv_targeted_lr']}")
        if not 0 <= float(cfg["recover_away_frac"]) < 1:
            raise ValueError(f"nft.recover_away_frac must be in [0, 1) (0 = off), got {cfg['recover_away_frac']}")
        if not 0.0 <= float(cfg["recover_watch"]) <= 1.0:
            raise ValueError(f"nft.recover_watch is a significance level in [0, 1] (0 = off), got {cfg['recover_watch']}")
        if not 0.0 <= float(cfg["recover_ema"]) < 1.0:
            raise ValueError(f"nft.recover_ema is a decay per step in [0, 1) (0 = off), got {cfg['recover_ema']}")
        if not 0.0 <= float(cfg["recover_mixup_frac"]) <= 1.0:
            raise ValueError(f"nft.recover_mixup_frac must be in [0, 1], got {cfg['recover_mixup_frac']}")
        mode = "frozen" if cfg["recover_adv"] is True else cfg["recover_adv"]
        if mode not in (False, None, "frozen", "live"):
            raise ValueError(f"nft.recover_adv must be false, 'frozen' or 'live', got {mode!r}")
        self.recover_adv = mode or False
        # Classes ranked by a targeted search (adv_init: targeted), easiest first; see start_perturbations.
        self.suspects: List[Dict[str, Any]] = []
        # The suspected target and its perturbation on the victim, when the targeted start was taken.
        self.suspect: Optional[Dict[str, Any]] = None
        # Per perturbation family the targeted search tried: its norm, radius, easiest class and ratio.
        self.search: List[Dict[str, Any]] = []
        model.train(cfg["bn_mode"] == "train")

    @property
    def uap(self) -> Optional[UniversalPerturbation]:
        """The first universal perturbation (None without one); the log reports its size."""
        return self.uaps[0] if self.uaps else None

    def step(self, x: Any, y: Any, step: int) -> Dict[str, float]:
        c, adapter, g = self.cfg, self.adapter, self.g
        recovering = step >= int(c["steps"])
        for group in self.opt.param_groups:
            group["lr"] = recover_lr_at(step - int(c["steps"]), c) if recovering else lr_at(step, c)
        if recovering:
            return self._recovery_step(x, y)
        x = adapter.augment(x, c["augment"], g)
        if float(c["mixup_alpha"]) > 0:
            x, ya, yb, lam = mixup_batch(x, y, self.mix, float(c["mixup_alpha"]), g)
        else:
            ya, yb, lam = y, y, 1.0
        uaps = self.uaps
        if uaps:
            if c["adv_reset"] and step > 0 and step % int(c["adv_reset"]) == 0:
                for u in uaps:
                    u.reset()
            x = self._perturb_share(x, [u.applied() for u in uaps])
        x = to_memory_format(self.model, x, self.channels_last)
        with autocast(self.device, self.use_autocast):
            out = adapter.forward(self.model, x)
        if self.log_temperature is not None and torch.is_tensor(out):
            out = out / self.log_temperature.exp()
        task = mixed_loss(adapter.criterion, out, ya, yb, lam)
        loss = task + self.reg_w * mask_penalty(self.masks.parameters(), c["reg_norm"])
        away = float(c["adv_target_weight"])
        if away > 0 and uaps and self.suspect is not None:
            loss = loss + away * self._away_from_target(out, ya, yb, lam)
        self.opt.zero_grad(set_to_none=True)
        for u in uaps:
            u.delta.grad = None
        loss.backward()
        self.opt.step()
        self.masks.clip_(self.lower)
        for u in uaps:
            u.ascend()
        return {"loss": loss.detach(), "task_loss": task.detach(), "lambda": lam}

    def _perturbed_count(self, n: int, frac: Optional[float] = None) -> int:
        """How many of a batch of ``n`` carry the perturbation (the first ones): ``frac`` of it, default ``adv_frac``."""
        return int(round(float(self.cfg["adv_frac"] if frac is None else frac) * n))

    def _away_from_target(self, out: torch.Tensor, ya: torch.Tensor, yb: torch.Tensor, lam: float) -> torch.Tensor:
        """Mean -log(1 - p_t) over the perturbed share (t: the suspected target), weighted by the mixed labels' share not t.

        Masks descend it (perturbed images must not reach t); the perturbation, ascending the same loss, moves
        toward t as well as away from the true label, so it keeps seeking the backdoor as the masks change.
        """
        k = self._perturbed_count(len(out))
        if k <= 0:
            return out.new_zeros(())
        return self._away_loss(out[:k], ya[:k], yb[:k], lam)

    def _away_loss(self, out: torch.Tensor, ya: torch.Tensor, yb: Any, lam: float) -> torch.Tensor:
        """Mean -log(1 - p_t) over ``out``, each row weighted by its (mixed) label's share that is not t."""
        t = int(self.suspect["class"])
        logits = out.float()
        others = torch.cat([logits[:, :t], logits[:, t + 1:]], 1)
        log_not_t = torch.logsumexp(others, 1) - torch.logsumexp(logits, 1)
        w = lam * (ya != t).float() + (1 - lam) * (yb != t).float()
        return -(w * log_not_t).mean()

    def _perturb_share(self, x: Any, deltas: List[torch.Tensor], frac: Optional[float] = None) -> Any:
        """The first ``frac`` (default ``adv_frac``) of the batch perturbed, one contiguous slice per perturbation."""
        k = self._perturbed_count(len(x), frac)
        if k <= 0:
            return x
        bounds = [round(i * k / len(deltas)) for i in range(len(deltas) + 1)]
        parts = [self.adapter.perturb(x[a:b], d) for a, b, d in zip(bounds, bounds[1:], deltas) if b > a]
        return torch.cat(parts + ([x[k:]] if k < len(x) else []))

    def _recovery_step(self, x: Any, y: Any) -> Dict[str, float]:
        c = self.cfg
        mode = self.recover_adv
        alpha = float(c["mixup_alpha"] if c.get("recover_mixup_alpha") is None else c["recover_mixup_alpha"])
        k = int(round(float(c["recover_mixup_frac"]) * len(y))) if c.get("recover_mixup") and alpha > 0 else 0
        plain = c.get("recover_plain_augment")
        if plain is None or k == len(y):   # one policy for the whole batch
            x = self.adapter.augment(x, c["recover_augment"], self.g)
        elif k == 0:                        # nothing mixed: all of it is the plain share
            x = self.adapter.augment(x, plain, self.g)
        else:                               # the mixed share on recover_augment, the plain share on its own policy
            x = torch.cat([self.adapter.augment(x[:k], c["recover_augment"], self.g),
                           self.adapter.augment(x[k:], plain, self.g)])
        uaps = self.uaps if mode else []
        if uaps:
            x = self._perturb_share(x, [u.applied() if mode == "live" else u.delta.detach() for u in uaps],
                                    c.get("recover_adv_frac"))
        ya, yb, lam = y, y, 1.0
        if k > 0:   # the first k of the batch are mixed
            xm, ya, yb, lam = mixup_batch(x[:k], y[:k], self.mix, alpha, self.g)
            x = xm if k == len(y) else torch.cat([xm, x[k:]])
        a = self._recover_away_count(len(y), k)   # the last a images: delta_t, trained away from t only
        if a:
            x = torch.cat([x[:-a], self.adapter.perturb(x[-a:], self.suspect["delta"])])
        x = to_memory_format(self.model, x, self.channels_last)
        with autocast(self.device, self.use_autocast):
            out = self.adapter.forward(self.model, x)
        n = len(y) - a   # the images the recovery's own loss sees
        if k == 0:
            loss = self._plain_loss(x[:n], out[:n], y[:n])
        elif k == n:
            loss = mixed_loss(self.adapter.criterion, out[:n], ya, yb, lam)
        else:   # mixed share and plain share, each weighted by its size
            loss = (k * mixed_loss(self.adapter.criterion, out[:k], ya, yb, lam)
                    + (n - k) * self._plain_loss(x[k:n], out[k:n], y[k:n])) / n
        if a:
            loss = loss + float(c["adv_target_weight"]) * self._away_loss(out[n:], y[n:], y[n:], 1.0)
        self.opt.zero_grad(set_to_none=True)
        for u in uaps:
            u.delta.grad = None
        loss.backward()
        self.opt.step()
        self.masks.clip_(self.lower)
        if mode == "live":
            for u in uaps:
                u.ascend()
        return {"loss": loss.detach(), "task_loss": loss.detach(), "lambda": lam}

    def _recover_away_count(self, n: int, mixed: int) -> int:
        """How many of a recovery batch of ``n`` (``mixed`` of them mixed, first) carry delta_t: 0 without a suspect."""
        if self.suspect is None or float(self.cfg["adv_target_weight"]) <= 0:
            return 0
        return min(self._perturbed_count(n, self.cfg["recover_away_frac"]), n - mixed - 1) if n - mixed > 1 else 0

    def _plain_loss(self, x: Any, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Recovery's loss on unmixed images: CE, or CE blended with distillation from the original model."""
        ce = self.adapter.criterion(out, y)
        if self.teacher is None:
            return ce
        w, t = float(self.cfg["recover_distill"]), float(self.cfg["recover_distill_temperature"])
        with torch.no_grad(), autocast(self.device, self.use_autocast):
            teacher_out = self.adapter.forward(self.teacher, x)
        teacher_out = teacher_out.float()
        trusted = (teacher_out.argmax(1) == y).float()
        kl = F.kl_div(F.log_softmax(out.float() / t, 1), F.log_softmax(teacher_out / t, 1), reduction="none",
                      log_target=True).sum(1)
        return (1 - w) * ce + w * t * t * (kl * trusted).sum() / max(float(trusted.sum()), 1.0)


def config_for_split(cfg: Dict[str, Any], n: int) -> Dict[str, Any]:
    """The config NFT runs with on a clean split of ``n`` samples: at most ``small_split_steps`` below the check floor."""
    small = cfg.get("small_split_steps")
    if small is not None and int(small) < 1:
        raise ValueError(f"nft.small_split_steps must be a positive step count or null (= steps), got {small}")
    extra = cfg.get("small_split_options") or {}
    if not isinstance(extra, dict):
        raise ValueError(f"nft.small_split_options must be a mapping of nft options, got {extra!r}")
    unknown = sorted(set(extra) - set(cfg)) + sorted(k for k in extra if k.startswith("small_split_"))
    if unknown:
        raise ValueError(f"nft.small_split_options names {unknown}: give nft options other than small_split_*")
    if n >= int(cfg["recover_check_min_samples"]) or (small is None and not extra):
        return cfg
    out = {**cfg, **extra}
    if small is not None:
        out["steps"] = min(int(out["steps"]), int(small))
    return out


def shift_check_of(cfg: Dict[str, Any]) -> Dict[str, float]:
    """The config's BN-shift check as keyword arguments of :func:`recalibrate_norm_stats`."""
    return {"shift_check_alpha": float(cfg["bn_shift_check"]), "shift_check_margin": float(cfg["bn_shift_check_margin"])}


def norm_reference_for(cfg: Dict[str, Any], model: nn.Module, adapter: Modality, clean: Dataset,
                       device: torch.device, channels_last: bool = False) -> Optional[Dict[str, Dict[str, torch.Tensor]]]:
    """The pre-NFT statistics that ``bn_recalibrate: shift`` needs (None for the other settings)."""
    mode = cfg["bn_recalibrate"]
    if mode not in (True, False, None, "full", "shift"):
        raise ValueError(f"nft.bn_recalibrate must be true, false, 'full' or 'shift', got {mode!r}")
    return norm_reference(model, adapter, clean, device, channels_last=channels_last) if mode == "shift" else None


def start_mask_training(model: nn.Module, adapter: Modality, clean: Dataset, cfg: Dict[str, Any],
                        clean_per_class: float, device: torch.device, seed: int, channels_last: bool = False,
                        use_autocast: bool = False) -> tuple:
    """Masks attached to ``model`` and the seeded with-replacement loader of every step: (trainer, loader)."""
    steps, bs = int(cfg["steps"]) + int(cfg["recover_steps"]), int(cfg["batch_size"])
    g = torch.Generator().manual_seed(seed)
    loader = adapter.loader(clean, bs, generator=g, replacement_samples=steps * bs)
    probe = adapter.to_device(next(iter(adapter.loader(clean, min(bs, 8))))[0], device)
    trainer = MaskTrainer(model, adapter, cfg, probe, clean_per_class, device, g,
                          channels_last=channels_last, use_autocast=use_autocast)
    start_perturbations(trainer, clean, device)
    return trainer, loader


def perturbation_families(cfg: Dict[str, Any], shape: tuple) -> List[Dict[str, Any]]:
    """The perturbation families the targeted search tries: (adv_norm, adv_eps, adv_lr) first, then
    ``adv_init_families``, each ``{"norm", "eps", "lr"}`` with an L1 radius scaled to the perturbation's first dim."""
    base_eps, base_lr = float(cfg["adv_eps"]), float(cfg["adv_lr"])
    families = [{"norm": cfg["adv_norm"], "eps": perturbation_radius(cfg["adv_norm"], base_eps, shape),
                 "lr": perturbation_radius(cfg["adv_norm"], base_lr, shape)}]
    for f in cfg.get("adv_init_families") or []:
        if not isinstance(f, dict) or f.get("norm") not in UniversalPerturbation.NORMS or float(f.get("eps", 0)) <= 0:
            raise ValueError(f"nft.adv_init_families entries are {{norm: one of {list(UniversalPerturbation.NORMS)}, "
                             f"eps: a positive radius[, lr: step]}}, got {f!r}")
        unknown = sorted(set(f) - {"norm", "eps", "lr"})
        if unknown:
            raise ValueError(f"nft.adv_init_families entry {f!r} has unknown keys {unknown}; use norm, eps, lr")
        eps = perturbation_radius(f["norm"], f["eps"], shape)
        lr = perturbation_radius(f["norm"], f["lr"], shape) if f.get("lr") is not None else eps * base_lr / base_eps
        families.append({"norm": f["norm"], "eps": eps, "lr": lr})
    return families


def start_perturbations(trainer: "MaskTrainer", clean: Dataset, device: torch.device) -> None:
    """With ``adv_init: targeted``, start the perturbations from the easiest classes' targeted ones.

    Each perturbation family (:func:`perturbation_families`) is searched on the same clean images; the family
    whose easiest class stands out most is kept, and the perturbations switch to it when it is not the first.
    The ranking (class, loss, reach; easiest first) is kept in ``trainer.suspects``; ``trainer.search`` has each
    family's ratio (runner-up loss / easiest loss).
    """
    c = trainer.cfg
    if c["adv_init"] not in ("random", "targeted", "auto"):
        raise ValueError(f"nft.adv_init must be 'random', 'targeted' or 'auto', got {c['adv_init']!r}")
    targeted = c["adv_init"] == "targeted" or (c["adv_init"] == "auto"
                                               and len(clean) >= int(c["adv_init_min_samples"]))
    if not trainer.uaps or not targeted:
        return
    u0 = trainer.uaps[0]
    # Every family draws the same search images; families after the first search with a copy of the
    # generator, so a run whose first family wins consumes the random stream exactly as with one family.
    g_state = trainer.g.get_state()
    results = []
    for i, fam in enumerate(perturbation_families(c, u0.shape)):
        g = trainer.g if i == 0 else torch.Generator().set_state(g_state)
        found = targeted_perturbation_search(trainer.model, trainer.adapter, clean, u0.shape, fam["eps"], fam["norm"],
                                             int(c["adv_init_steps"]), int(c["adv_init_samples"]), device, g,
                                             use_autocast=trainer.use_autocast and bool(c["search_autocast"]),
                                             channels_last=trainer.channels_last, keep=int(c["adv_init_keep"] or 0))
        ratio = found[1]["loss"] / max(found[0]["loss"], 1e-12) if len(found) > 1 else math.inf
        results.append((ratio, i, fam, found))
    ratio, best, fam, found = max(results, key=lambda r: (r[0], -r[1]))   # ties: the earlier family
    trainer.search = [{"norm": f["norm"], "eps": f["eps"], "class": int(fd[0]["class"]),
                       "ratio": r if math.isfinite(r) else None} for r, _, f, fd in results]
    outlier = ratio >= float(c["adv_init_margin"])
    if outlier:
        if best != 0:   # the perturbations take the winning family (norm, radius, step)
            trainer.uaps = [UniversalPerturbation(u.shape, fam["eps"], fam["lr"], fam["norm"], device, trainer.g)
                            for u in trainer.uaps]
        for u, rec in zip(trainer.uaps[:max(int(c["adv_init_top"]), 0)], found):
            u.delta = rec["delta"].clone().requires_grad_(True)
            if c["adv_targeted_lr"] is not None:
                u.lr = float(c["adv_targeted_lr"])
        trainer.suspect = {"class": int(found[0]["class"]), "delta": found[0]["delta"].detach().clone()}
    else:   # no family singles a class out: report the first family's ranking, start random in it
        _, _, fam, found = results[0]
    trainer.suspects = [{k: v for k, v in r.items() if k != "delta"} for r in found]
    trainer.suspects[0].update(targeted_start=bool(outlier), norm=fam["norm"], eps=fam["eps"])


FAMILY_NAMES = {"linf": "L-inf ball", "l2": "L2 ball", "l1": "L1 ball"}


def describe_suspects(defense_info: Dict[str, Any]) -> Optional[str]:
    """One line on the targeted search's ranking in a purified run's ``defense_info`` (None without one).

    A practitioner's question besides "is it gone": which class was the backdoor's target. The search
    sends the clean split to each class with one universal perturbation; the easiest class is suspect.
    """
    found = defense_info.get("suspected_targets") or []
    if not found:
        return None
    top = found[0]
    family = f" ({FAMILY_NAMES.get(top['norm'], top['norm'])} {top['eps']:g})" if "norm" in top else ""
    head = f"targeted search{family}: class {top['class']} is reached most easily (loss {top['loss']:.3g}"
    if len(found) > 1:
        ratio = found[1]["loss"] / max(top["loss"], 1e-12)
        head += f", {ratio:,.0f}x" if ratio >= 100 else f", {ratio:.2f}x"
        head += f" below class {found[1]['class']}'s"
    head += f"; {top['reach']:.1f}% of other classes' clean images sent to it)"
    others = [f for f in defense_info.get("perturbation_search") or []
              if (f["norm"], f["eps"]) != (top.get("norm"), top.get("eps"))]
    if others:
        head += " [" + "; ".join(f"{FAMILY_NAMES.get(f['norm'], f['norm'])} {f['eps']:g}: class {f['class']}"
                                 + (f" {f['ratio']:.3g}x" if f["ratio"] is not None else "") for f in others) + "]"
    if top.get("targeted_start"):
        return head + ": the suspected backdoor target; the perturbation started from it"
    return head + ": no class stood out (ratio below adv_init_margin), so the perturbation started random"


PHASE_NAMES = {"perturbation_search": "perturbation search", "phase_one": "phase one", "recovery": "recovery",
               "norm_reference": "BN reference", "fold_and_recalibrate": "fold + BN recalibration"}


def describe_seconds(defense_info: Dict[str, Any]) -> Optional[str]:
    """One line: where an NFT run's seconds went (None for a defense that does not record its phases)."""
    phases = defense_info.get("seconds_by_phase")
    if not phases:
        return None
    parts = ", ".join(f"{PHASE_NAMES.get(k, k)} {v:.1f}" for k, v in phases.items())
    return f"NFT's {sum(phases.values()):.1f} s of steps and set-up: {parts}"


@DEFENSES.register("nft")
class NFT(Defense):
    """Neural mask Fine-Tuning. Presets: ``official`` (released code), default (augmented)."""

    name = "nft"
    defaults = DEFAULTS
    # "generic": the core default alone, without a modality's measured settings (on images, the
    # default of sessions 1-6; the grids that produced those rows name it).
    presets = {"official": OFFICIAL, "generic": DEFAULTS}

    def run(self, model: nn.Module, adapter: Modality, clean: Dataset, ctx: DefenseContext) -> DefenseResult:
        c = config_for_split(self.cfg, len(clean))
        steps = int(c["steps"]) + int(c["recover_steps"])
        # Where the wall time goes (info["seconds_by_phase"]): the comparison with other defenses is on time,
        # and the targeted search is a fixed cost before the first step.
        clock = {"start": time.perf_counter()}
        reference = norm_reference_for(c, model.to(ctx.device), adapter, clean, ctx.device, ctx.channels_last)
        clock["reference"] = time.perf_counter()
        trainer, loader = start_mask_training(model.to(ctx.device), adapter, clean, c, ctx.clean_per_class,
                                              ctx.device, ctx.seed, ctx.channels_last, ctx.autocast)
        clock["search"] = time.perf_counter()
        masks = trainer.masks
        main_steps = int(c["steps"])
        target_acc = None
        check_bf16 = bool(ctx.autocast) and bool(c["checks_autocast"])
        if (int(c["recover_steps"]) > 0 and float(c["recover_tolerance"]) >= 0
                and len(clean) >= int(c["recover_check_min_samples"])):
            with torch.no_grad():
                masks.fill_(1.0)
                target_acc = clean_accuracy(model, adapter, clean, ctx.device, channels_last=ctx.channels_last,
                                            use_autocast=check_bf16) - float(c["recover_tolerance"])
        log: List[Dict[str, Any]] = []
        watch_alpha = float(c["recover_watch"])
        watching = watch_alpha > 0 and target_acc is not None and trainer.suspect is not None
        watch: Dict[str, Any] = {"alpha": watch_alpha, "active": watching}
        speed = {"channels_last": ctx.channels_last, "use_autocast": check_bf16}

        def state() -> Dict[str, torch.Tensor]:   # masks and BN buffers: what a restore needs
            return {**{f"mask:{k}": v for k, v in masks.state_dict().items()},
                    **{k: b.detach().clone() for k, b in model.named_buffers()}}

        def restore(saved: Dict[str, torch.Tensor]) -> None:
            masks.load_state_dict({k[5:]: v for k, v in saved.items() if k.startswith("mask:")})
            with torch.no_grad():
                for k, b in model.named_buffers():
                    b.copy_(saved[k])

        def check() -> tuple:
            ev, acc = checked_copy(model, adapter, clean, ctx.device, reference, **speed, **shift_check_of(c))
            hits = (suspect_hits(ev, adapter, clean, trainer.suspect["class"], trainer.suspect["delta"], ctx.device,
                                 **speed) if watching else None)
            model.train(c["bn_mode"] == "train")
            return acc, hits

        ema_decay = float(c["recover_ema"])
        ema: Optional[Dict[str, torch.Tensor]] = None   # per unit, on the masks' device
        t0 = time.perf_counter()
        bar = progress(loader, total=steps, desc="nft", enabled=ctx.show_progress)
        for step, batch in enumerate(bar):
            x, y = adapter.to_device(batch[0], ctx.device), batch[1].to(ctx.device)
            out = trainer.step(x, y, step)
            if ema_decay > 0 and step >= main_steps:
                with torch.no_grad():
                    if ema is None:
                        ema = {u.name: u.mask.detach().clone() for u in masks.units}
                    else:
                        for u in masks.units:
                            ema[u.name].lerp_(u.mask, 1 - ema_decay)
            done_recovering = False
            if watching and step == main_steps - 1:
                _, watch["reference"] = check()   # what delta_t reaches when phase one ends
                watch["saved"] = (step + 1, state())
                log.append({"step": step + 1, "suspect_reach": _percent(watch["reference"])})
            if target_acc is not None and step >= main_steps and (step + 1 - main_steps) % int(c["recover_check_every"]) == 0:
                acc, hits = check()
                row = {"step": step + 1, "clean_split_acc": acc, "target_acc": target_acc}
                done_recovering = acc >= target_acc
                if hits is not None:
                    ref = watch["reference"]
                    gained, lost = int((hits & ~ref).sum()), int((ref & ~hits).sum())
                    p = sign_test_p(gained, lost)
                    row.update(suspect_reach=_percent(hits), watch_p=p)
                    if p < watch_alpha:
                        at, saved = watch["saved"]
                        restore(saved)
                        watch.update(fired_at=step + 1, restored_step=at, p=p, gained=gained, lost=lost)
                        done_recovering = True
                    else:
                        watch["saved"] = (step + 1, state())
                log.append(row)
            if step % 10 == 0 or step == steps - 1:
                loss = out["loss"].item()
                if not math.isfinite(loss):
                    raise FloatingPointError(f"NFT loss became {loss} at step {step}; lower nft.lr")
                row = {"step": step + 1, "loss": loss, "task_loss": out["task_loss"].item(), "lambda": out["lambda"],
                       "lr": trainer.opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0, **masks.stats()}
                if trainer.uap is not None:
                    row["adv_linf"] = float(trainer.uap.delta.detach().abs().max())
                log.append(row)
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{loss:.3f}", m=f"{row['mask_mean']:.3f}")
            if step == main_steps - 1:
                clock["phase_one"] = time.perf_counter()
            if done_recovering:
                break
        clock["steps"] = time.perf_counter()
        if ema is not None and "fired_at" not in watch:
            masks.load_state_dict(ema)
        mask_values = masks.state_dict()
        model = masks.fold()
        recalibration = {"mode": "off"}
        if c["bn_recalibrate"]:
            recalibration = recalibrate_norm_stats(model, adapter, clean, ctx.device, channels_last=ctx.channels_last,
                                                   reference=reference, **shift_check_of(c))
        model.eval()
        clock["end"] = time.perf_counter()
        phase_one_end = clock.get("phase_one", t0 if main_steps == 0 else clock["steps"])
        seconds_by_phase = {
            "norm_reference": clock["reference"] - clock["start"],
            "perturbation_search": clock["search"] - clock["reference"],   # with building the masks and the loader
            "phase_one": phase_one_end - t0,
            # the clean split's accuracy before the steps is the recovery's stopping reference
            "recovery": (clock["steps"] - phase_one_end) + (t0 - clock["search"]),
            "fold_and_recalibrate": clock["end"] - clock["steps"],
        }
        return DefenseResult(model=model, log=log, extras={"masks": mask_values},
                             info={"config": dict(c), "units": trainer.units, "lower_bounds": trainer.lower,
                                   "seconds_by_phase": seconds_by_phase,
                                   "num_masks": int(sum(v.numel() for v in mask_values.values())),
                                   "bn_recalibration": recalibration,
                                   **({"recover_watch": {k: v for k, v in watch.items() if k not in ("reference", "saved")}}
                                      if watch_alpha > 0 else {}),
                                   **({"suspected_targets": trainer.suspects[:3],
                                       "perturbation_search": trainer.search} if trainer.suspects else {})})


def trace_nft(model: nn.Module, adapter: Modality, clean: Dataset, cfg: Dict[str, Any],
              evaluate: Callable[[nn.Module], Dict[str, float]], *, every: int = 50,
              clean_per_class: float = 60, device: torch.device = torch.device("cpu"), seed: int = 0,
              interpolate: Sequence[float] = (), show_progress: bool = True) -> List[Dict[str, Any]]:
    """NFT's trajectory: every ``every`` steps, the model as it would be returned, evaluated.

    Runs every main and recovery step (the clean-split early stop is not applied, so the
    whole recovery phase is seen). Each checkpoint is a copy of the masked model (its outputs
    equal the folded model's) with BN statistics recalibrated when the config says so, as
    :class:`NFT` returns its model;
    ``evaluate`` gets that copy (a tool passes test ACC/ASR, a defender clean data only).
    ``interpolate``: after the last step, masks m -> 1 - t (1 - m) for each t, evaluated the
    same way (does a milder mask keep the removal at less accuracy cost?). A diagnostic tool,
    not a defense: never choose settings on its test numbers.
    """
    c = config_for_split(cfg, len(clean))
    steps = int(c["steps"]) + int(c["recover_steps"])
    model = copy.deepcopy(model).to(device)
    reference = norm_reference_for(c, model, adapter, clean, device)
    trainer, loader = start_mask_training(model, adapter, clean, c, clean_per_class, device, seed)

    def snapshot() -> Dict[str, Any]:
        ev = copy.deepcopy(model)
        if c["bn_recalibrate"]:
            recalibrate_norm_stats(ev, adapter, clean, device, reference=reference, **shift_check_of(c))
        ev.eval()
        row = {**evaluate(ev), "clean_split_acc": clean_accuracy(ev, adapter, clean, device), **trainer.masks.stats()}
        model.train(c["bn_mode"] == "train")
        return row

    rows: List[Dict[str, Any]] = []
    t0 = time.perf_counter()
    for step, batch in enumerate(progress(loader, total=steps, desc="nft-trace", enabled=show_progress)):
        trainer.step(adapter.to_device(batch[0], device), batch[1].to(device), step)
        if (step + 1) % every == 0 or step == steps - 1:
            phase = "main" if step < int(c["steps"]) else "recovery"
            rows.append({"step": step + 1, "phase": phase, "t": 1.0, **snapshot(),
                         "seconds": time.perf_counter() - t0})
    final = [u.mask.detach().clone() for u in trainer.masks.units]
    for t in interpolate:
        with torch.no_grad():
            for u, v in zip(trainer.masks.units, final):
                u.mask.copy_(1.0 - float(t) * (1.0 - v))
        rows.append({"step": steps, "phase": "interpolated", "t": float(t), **snapshot(),
                     "seconds": time.perf_counter() - t0})
    return rows
