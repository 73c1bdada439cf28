"""The modality adapter: the questions the engine asks of a modality, and nothing else.

``core`` is written against this class only. A modality subclasses it, fills in models,
datasets, attacks, how inputs are mixed and augmented, and registers itself with
``@MODALITIES.register("name")`` (or the entry-point group ``nft_purify.modalities``).
Defaults here fit classification tasks (inputs tensor, integer labels, cross-entropy);
detection and generation override the loss and evaluation.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .masks import find_maskable_units
from .mixup import pixel_mix
from .metrics import backdoor_metrics
from .registry import Registry


@dataclass
class DataBundle:
    """The data of one experiment.

    ``train``: what the attacker trains on (clean; the attack poisons it).
    ``reserve``: the defender's pool, never seen or poisoned by the attacker; clean splits
    are drawn from it. ``test``: the clean test set.
    """
    train: Dataset
    test: Dataset
    reserve: Dataset
    num_classes: int
    info: Dict[str, Any] = field(default_factory=dict)


class Attack:
    """A backdoor attack: which training samples to poison, the trigger, and the labels.

    Subclasses implement :meth:`apply` (inputs -> triggered inputs, deterministic given
    the attack's seed) and, when they learn their trigger, :meth:`fit` with the trained
    parts returned by :meth:`state_dict` (saved in the victim run dir as safetensors).
    """

    name = "attack"
    clean_label = False         # clean-label attacks poison only target-class samples, keeping labels
    supports_all2all = True

    def __init__(self, target: int = 0, rate: float = 0.1, mode: str = "all2one", seed: int = 0,
                 num_classes: int = 10, **params: Any) -> None:
        if mode not in ("all2one", "all2all"):
            raise ValueError(f"attack mode must be 'all2one' or 'all2all', got '{mode}'")
        if mode == "all2all" and not self.supports_all2all:
            raise ValueError(f"attack '{self.name}' has no all-to-all form; use mode=all2one")
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"poison rate must be in [0, 1], got {rate}")
        if not 0 <= target < num_classes:
            raise ValueError(f"target {target} is not a class index (0..{num_classes - 1})")
        self.target, self.rate, self.mode, self.seed = int(target), float(rate), mode, int(seed)
        self.num_classes = int(num_classes)
        self.params = params

    # -- labels ---------------------------------------------------------------
    def target_of(self, labels: torch.Tensor) -> torch.Tensor:
        if self.mode == "all2one":
            return torch.full_like(labels, self.target)
        return (labels + 1) % self.num_classes

    def poison_indices(self, labels: torch.Tensor) -> torch.Tensor:
        """Indices of the training samples to poison (seeded). Clean-label: target class only."""
        g = torch.Generator().manual_seed(self.seed + 7919)
        labels = labels.flatten()
        if self.clean_label:
            pool = torch.nonzero(labels == self.target).flatten()
            n = min(len(pool), int(round(self.rate * len(labels))))
        else:
            pool = torch.arange(len(labels))
            n = int(round(self.rate * len(labels)))
        return pool[torch.randperm(len(pool), generator=g)[:n]].sort().values

    def eval_mask(self, labels: torch.Tensor) -> torch.Tensor:
        """Test samples that get a trigger for ASR: all-to-one skips the target class."""
        if self.mode == "all2one":
            return labels != self.target
        return torch.ones_like(labels, dtype=torch.bool)

    # -- trigger ----------------------------------------------------------------
    def fit(self, bundle: DataBundle, adapter: "Modality", device: torch.device) -> None:
        """Learn anything the trigger needs (generators, encoders). Static triggers: nothing."""

    def apply(self, inputs: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        raise NotImplementedError

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"attack '{self.name}' has no learned state to load")

    def spec(self) -> Dict[str, Any]:
        return {"name": self.name, "target": self.target, "rate": self.rate, "mode": self.mode,
                "seed": self.seed, **self.params}


class Modality:
    """Base adapter. Subclasses set ``name``, ``models`` and ``attacks`` registries."""

    name = "base"
    models: Registry = Registry("model")
    attacks: Registry = Registry("attack")
    # Per-defense settings this modality has measured to work better than the method's own
    # defaults (e.g. {"nft": {"adv_frac": 0.0}}). They sit between the defaults and the user's
    # options; a named preset (e.g. nft's "official") is used as it is, without them.
    defense_defaults: Dict[str, Dict[str, Any]] = {}
    # Per-defense computation (``autocast``: true / false / "auto", ``channels_last``) this modality has
    # measured to leave the defense's ACC and ASR unchanged: it is the default there, because it is only
    # faster. The config's ``defense.autocast`` / ``defense.channels_last`` override it; a named preset
    # computes in fp32 unless the config says otherwise, as it always did.
    defense_speed: Dict[str, Dict[str, Any]] = {}

    # -- models -------------------------------------------------------------------
    def build_model(self, arch: str, num_classes: int, **kwargs: Any) -> nn.Module:
        return self.models.build(arch, num_classes=num_classes, **kwargs)

    def maskable_units(self, model: nn.Module) -> List[str]:
        return find_maskable_units(model)

    def classifier_layer(self, model: nn.Module) -> nn.Module:
        """The last linear layer (FST re-initialises it; fine-pruning masks its input)."""
        last = None
        for m in model.modules():
            if isinstance(m, nn.Linear):
                last = m
        if last is None:
            raise ValueError("the model has no Linear classifier layer")
        return last

    # -- data ---------------------------------------------------------------------
    def load_data(self, spec: Dict[str, Any]) -> DataBundle:
        raise NotImplementedError

    def labels_of(self, dataset: Dataset) -> torch.Tensor:
        return torch.as_tensor(getattr(dataset, "targets"))

    def subset(self, dataset: Dataset, indices: torch.Tensor) -> Dataset:
        return torch.utils.data.Subset(dataset, indices.tolist())

    def clean_split(self, bundle: DataBundle, per_class: int, seed: int = 0) -> Tuple[Dataset, torch.Tensor]:
        """``per_class`` samples per class from the defender's reserve, seeded; returns indices too."""
        labels = self.labels_of(bundle.reserve)
        g = torch.Generator().manual_seed(int(seed) + 104729)
        picks = []
        for c in range(bundle.num_classes):
            pool = torch.nonzero(labels == c).flatten()
            if len(pool) < per_class:
                raise ValueError(f"the defender's reserve has only {len(pool)} samples of class {c}; "
                                 f"ask for --clean-per-class <= {len(pool)}")
            picks.append(pool[torch.randperm(len(pool), generator=g)[:per_class]])
        idx = torch.cat(picks).sort().values
        return self.subset(bundle.reserve, idx), idx

    def loader(self, dataset: Dataset, batch_size: int, shuffle: bool = False,
               generator: Optional[torch.Generator] = None, replacement_samples: Optional[int] = None) -> DataLoader:
        if replacement_samples is not None:
            sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=replacement_samples,
                                                     generator=generator)
            return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=self.collate)
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, collate_fn=self.collate)

    def collate(self, items: Any) -> Any:
        return torch.utils.data.default_collate(items)

    def to_device(self, batch: Any, device: torch.device) -> Any:
        if torch.is_tensor(batch):
            return batch.to(device, non_blocking=True)
        if isinstance(batch, (list, tuple)):
            return type(batch)(self.to_device(b, device) for b in batch)
        if isinstance(batch, dict):
            return {k: self.to_device(v, device) for k, v in batch.items()}
        return batch

    # -- training questions ---------------------------------------------------------------
    def forward(self, model: nn.Module, inputs: Any) -> Any:
        return model(inputs)

    def criterion(self, outputs: Any, targets: Any, label_smoothing: float = 0.0) -> torch.Tensor:
        return F.cross_entropy(outputs.float(), targets, label_smoothing=label_smoothing)

    def task_loss(self, model: nn.Module, inputs: Any, targets: Any) -> torch.Tensor:
        return self.criterion(self.forward(model, inputs), targets)

    def mix(self, a: Any, b: Any, lam: float, generator: Optional[torch.Generator] = None,
            mode: Optional[str] = None) -> Tuple[Any, float]:
        """Mix two input batches with weight ``lam``; returns (mixed, effective lambda).

        ``mode`` picks one of the modality's mix kinds (None: its default); the base knows ``mixup``.
        """
        if mode not in (None, "mixup"):
            raise ValueError(f"the {self.name} modality has no mix mode '{mode}'; use mixup (or leave nft.mix unset)")
        return pixel_mix(a, b, lam)

    def augment(self, inputs: Any, policy: Any, generator: Optional[torch.Generator] = None) -> Any:
        """Apply an augmentation policy to a batch of inputs. ``none`` returns them as they are."""
        return inputs

    def perturb(self, inputs: Any, delta: torch.Tensor) -> Any:
        """Input-space perturbation hook: ``inputs + delta`` kept in the valid input range."""
        return inputs + delta

    def perturbation_shape(self, inputs: Any) -> Tuple[int, ...]:
        """Shape of one universal perturbation for this batch (broadcast over the batch)."""
        return tuple(inputs.shape[1:])

    def features(self, model: nn.Module, inputs: Any) -> torch.Tensor:
        """Penultimate features (input of the classifier layer)."""
        store: Dict[str, torch.Tensor] = {}
        head = self.classifier_layer(model)
        h = head.register_forward_hook(lambda _m, i, _o: store.__setitem__("f", i[0].detach()))
        try:
            self.forward(model, inputs)
        finally:
            h.remove()
        return store["f"].flatten(1)

    def attention_layers(self, model: nn.Module) -> List[str]:
        """Modules whose outputs NAD distils as attention maps, shallow to deep.

        Outputs must be channels-first feature maps ``(B, C, ...)``. Default: ResNet-style
        stages (modules named ``layer1`` ... ``layerN`` at any depth), else the last
        channel normalisation (its output has a fixed scale, so the normalised map's
        gradient stays bounded), else the last convolution. Modalities whose feature
        maps differ override this.
        """
        stages = [n for n, _ in model.named_modules() if re.fullmatch(r"(?:.*\.)?layer\d+", n)]
        if stages:
            return stages
        chan_norms = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
        for kinds in (chan_norms, nn.modules.conv._ConvNd):
            found = [n for n, m in model.named_modules() if isinstance(m, kinds)]
            if found:
                return found[-1:]
        raise ValueError("the model has no layerN stages, channel norms or convolutions; override "
                         "Modality.attention_layers to name NAD's attention layers")

    def predict(self, model: nn.Module, inputs: Any) -> torch.Tensor:
        return self.forward(model, inputs).argmax(1)

    # -- attacks ------------------------------------------------------------------------
    def build_attack(self, spec: Dict[str, Any], num_classes: int) -> Attack:
        spec = dict(spec)
        name = spec.pop("name", None)
        if not name:
            raise ValueError("attack spec needs a name (e.g. attack.name=badnets)")
        return self.attacks.build(name, num_classes=num_classes, **spec)

    def poison_batch(self, attack: Attack, inputs: Any, targets: torch.Tensor, flags: torch.Tensor) -> Tuple[Any, torch.Tensor]:
        """Apply the trigger to the flagged samples of a batch and relabel them (training)."""
        if not bool(flags.any()):
            return inputs, targets
        inputs = inputs.clone()
        targets = targets.clone()
        inputs[flags] = attack.apply(inputs[flags], targets[flags])
        if not attack.clean_label:
            targets[flags] = attack.target_of(targets[flags])
        return inputs, targets

    # -- evaluation -----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module, test: Dataset, attack: Optional[Attack] = None,
                 device: torch.device = torch.device("cpu"), batch_size: int = 512,
                 autocast: bool = False) -> Dict[str, float]:
        """ACC on the clean test set, ASR and RA on its triggered copies, in one pass per batch."""
        was = model.training
        model.eval()
        preds, labels, flags, orig = [], [], [], []
        for batch in self.loader(test, batch_size):
            x, y = self.to_device(batch[0], device), batch[1].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                p = self.predict(model, x)
            preds.append(p); labels.append(y); flags.append(torch.zeros_like(y, dtype=torch.bool)); orig.append(y)
            if attack is not None:
                sel = attack.eval_mask(y)
                if bool(sel.any()):
                    xt = attack.apply(x[sel], y[sel])
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                        pt = self.predict(model, xt)
                    preds.append(pt); labels.append(attack.target_of(y[sel]))
                    flags.append(torch.ones_like(pt, dtype=torch.bool)); orig.append(y[sel])
        model.train(was)
        return backdoor_metrics(torch.cat(preds), torch.cat(labels), torch.cat(flags), torch.cat(orig))
