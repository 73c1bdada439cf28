"""The image modality: classifiers on Fashion-MNIST, MNIST, CIFAR, GTSRB, Tiny-ImageNet, ImageNet."""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn
from torch.utils.data import Dataset

from core.adapter import DataBundle, Modality
from core.registry import MODALITIES

from . import data as image_data
from .attacks import ATTACKS
from .augment import augment_batch
from .mix import mix_images
from .models import MODELS

DATA_DEFAULTS: Dict[str, Any] = {"name": "fashion-mnist", "root": None, "reserve_per_class": 300, "size": None,
                                 "seed": 0, "train_per_class": None, "test_per_class": None}


def first_per_class(ds: image_data.ImageTensorDataset, per_class: int) -> image_data.ImageTensorDataset:
    """The first ``per_class`` samples of each class (small, fast subsets for tests and smoke runs)."""
    keep = torch.cat([torch.nonzero(ds.targets == c).flatten()[:per_class] for c in ds.targets.unique()])
    return ds.select(keep.sort().values)


def split_reserve(train: image_data.ImageTensorDataset, per_class: int, num_classes: int, seed: int
                  ) -> Tuple[image_data.ImageTensorDataset, image_data.ImageTensorDataset]:
    """Hold ``per_class`` samples of each class out of the attacker's training set (the defender's pool)."""
    g = torch.Generator().manual_seed(seed + 15485863)
    reserve = []
    for c in range(num_classes):
        pool = torch.nonzero(train.targets == c).flatten()
        reserve.append(pool[torch.randperm(len(pool), generator=g)[:per_class]])
    r = torch.cat(reserve).sort().values
    keep = torch.ones(len(train), dtype=torch.bool)
    keep[r] = False
    return train.select(torch.nonzero(keep).flatten()), train.select(r)


@MODALITIES.register("image")
class ImageModality(Modality):
    name = "image"
    models = MODELS
    attacks = ATTACKS
    # Measured on the Fashion-MNIST BadNets and Blend victims (docs/nft-default.md, "what the default does"): BN
    # statistics that keep the model's own and add only the masks' change (a full recalibration on the
    # 600-image split costs the untouched victim 0.43 points and left Blend at 3.4% ASR where the shift
    # left 1.0%), and a recovery that mixes half of each batch instead of all of it (accuracy after NFT
    # BadNets 86.1 -> 88.1, Blend 87.3 -> 88.6; ASR 3.1 -> 3.2 and 2.6 -> 1.0).
    # Session 17: the perturbation starts targeted ("auto": on splits of >= 100 samples, and only when the
    # easiest class's loss is at most half the runner-up's). On the Fashion-MNIST victims that ratio was
    # 22-2,500 and the targeted start lowered BadNets' ASR (3 seeds, 11.0 -> 2.6%); on the 8x8 digits
    # victim it was 1.01 and the search ranked a wrong class first (ASR 22 -> 46%), so there it starts
    # random (docs/results.md, "Results").
    # Session 20: where the start is targeted, the perturbation stays the victim's delta_t (no ascent) and the
    # perturbed share is also pushed away from the suspected target (-log(1 - p_t), weight 1). Six seeds of
    # both design victims: Blend mean ASR 12.85 -> 3.45% and ACC drop 2.11 -> 1.75; BadNets 2.55 -> 2.02% and
    # 2.52 -> 2.46 (docs/nft-default.md, "what the default does" item 8).
    # Session 21: on a split below the recovery check's floor (one image per class) phase one runs 100 steps, not
    # 200: three seeds of both design victims, one-shot, mean ACC drop 12.88 -> 10.14 (BadNets) and 12.29 -> 9.44
    # (Blend), mean ASR 8.06 -> 10.63 and 3.29 -> 3.86 (docs/nft-default.md, item 9).
    # Session 22: the targeted search tries an L1 ball of 12 full-scale pixels per channel beside the L-inf ball of
    # 0.2, and the perturbations take the family in which a class stands out most (a patch is a few full-scale
    # pixels, which the L-inf ball cannot hold); the search keeps the 3 easiest classes after a quarter of its
    # steps, so the two families cost what one did. Where L-inf wins the run is the one before, to the bit (docs/nft-default.md,
    # "what the default does" item 10). With the two families the search also runs on splits of 10 samples and up
    # (one image per class on ten classes; the floor was 100): one-shot, three seeds each, it named the target on
    # BadNets, Blend, trojan-one and SIG and left the mean ASR 20.48 -> 1.20 (BadNets), 5.37 -> 3.97 (Blend), 3.17 ->
    # 0.66 (trojan-one), 5.32 -> 5.67 (SIG), 5.07 -> 6.90 (WaNet, a wrong class as at 60 per class), accuracy up on
    # all five (docs/nft-default.md, item 11).
    # Session 25: the margin that counts as "a class stands out" is 5, not 2: on two clean (unattacked) Fashion-MNIST
    # models the search's ratio was 1.11-4.68 over twenty clean splits (60 and 1 per class, five seeds each) and above
    # 2 on thirteen of them, so margin 2 named a "target" on most clean models. On the design victims it was 41 or more
    # (docs/nft-default.md, "what the default does" item 13).
    defense_defaults = {"nft": {"bn_recalibrate": "shift", "recover_mixup_frac": 0.5,
                                "adv_init": "auto", "adv_init_margin": 5.0, "adv_init_min_samples": 10,
                                "adv_targeted_lr": 0.0, "adv_target_weight": 1.0,
                                "small_split_steps": 100,
                                "adv_init_families": [{"norm": "l1", "eps": 12.0}], "adv_init_keep": 3,
                                # Session 26 (docs/nft-default.md item 14): recovery at lr 0.04, its plain half on crop + flip (the
                                # mixed half keeps noise erasing), stopped within 0.5 points of the original; a split too
                                # small for the stop keeps session 25's recovery (there it runs whole).
                                "recover_lr": 0.04, "recover_plain_augment": "weak", "recover_tolerance": 0.5,
                                "small_split_options": {"recover_lr": 0.02, "recover_plain_augment": None}}}
    # NFT in bf16 + channels_last where bf16 is native (session 12: mean ACC / ASR on three seeds of both
    # design victims within 0.13 points of fp32, 2.3x faster, with the random start; session 19, targeted
    # start: means within 0.09 on BadNets, Blend's within its 7-20% seed spread, 2.1x faster:
    # configs/benchmarks/image_fashionmnist_compare.yaml).
    # Elsewhere "auto" is fp32, with channels_last (11% faster, same results). Baselines stay fp32: bf16 moved
    # some of their results (AWM on Blend 43.57 -> 76.58% ASR).
    defense_speed = {"nft": {"autocast": "auto", "channels_last": True}}

    def load_data(self, spec: Optional[Dict[str, Any]] = None) -> DataBundle:
        s = {**DATA_DEFAULTS, **(spec or {})}
        name = str(s["name"]).lower()
        if name in ("fashion-mnist", "fashion_mnist", "fmnist"):
            train, test = image_data.load_fashion_mnist(s["root"])
        elif name == "mnist" and not s["root"]:
            train, test = image_data.load_mnist()
        elif name == "digits":
            train, test = image_data.load_digits_split(int(s["seed"]), s["size"])
        elif name in ("mnist", "cifar10", "cifar100", "gtsrb", "tiny-imagenet"):
            train, test = image_data.load_torchvision(name, s["root"], s["size"])
        elif name == "imagefolder":
            raise ValueError("imagefolder data (ImageNet layout) are decoded lazily and cannot be loaded whole: use "
                             "modalities.image.data.ImageFolderDataset(root, size) from Python; the tools take "
                             "fashion-mnist, mnist, digits, cifar10, cifar100, gtsrb or tiny-imagenet")
        else:
            raise ValueError(f"unknown image dataset '{s['name']}'; choose fashion-mnist, mnist, digits, cifar10, "
                             f"cifar100, gtsrb, tiny-imagenet")
        num_classes = int(max(int(train.targets.max()), int(test.targets.max())) + 1)
        train, reserve = split_reserve(train, int(s["reserve_per_class"]), num_classes, int(s["seed"]))
        if s["train_per_class"]:
            train = first_per_class(train, int(s["train_per_class"]))
        if s["test_per_class"]:
            test = first_per_class(test, int(s["test_per_class"]))
        _, c, h, w = train.images.shape
        info = {"name": name, "channels": c, "height": h, "width": w, "classes": train.classes,
                "n_train": len(train), "n_reserve": len(reserve), "n_test": len(test)}
        return DataBundle(train=train, test=test, reserve=reserve, num_classes=num_classes, info=info)

    def labels_of(self, dataset: Dataset) -> torch.Tensor:
        if isinstance(dataset, image_data.ImageTensorDataset):
            return dataset.targets
        if isinstance(dataset, torch.utils.data.Subset):
            return self.labels_of(dataset.dataset)[torch.as_tensor(dataset.indices)]
        return torch.as_tensor(getattr(dataset, "targets"))

    def subset(self, dataset: Dataset, indices: torch.Tensor) -> Dataset:
        if isinstance(dataset, image_data.ImageTensorDataset):
            return dataset.select(indices)
        return super().subset(dataset, indices)

    def collate(self, items: Any) -> Any:
        # ImageTensorDataset.__getitems__ already returns a batch.
        if isinstance(items, tuple) and len(items) == 3 and torch.is_tensor(items[0]) and items[0].dim() == 4:
            return items
        return torch.utils.data.default_collate(items)

    def build_model(self, arch: str, num_classes: int, **kwargs: Any) -> nn.Module:
        return self.models.build(arch, num_classes=num_classes, **kwargs)

    def augment(self, inputs: torch.Tensor, policy: Any, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return augment_batch(inputs, policy, generator)

    def mix(self, a: torch.Tensor, b: torch.Tensor, lam: float, generator: Optional[torch.Generator] = None,
            mode: Optional[str] = None) -> Tuple[torch.Tensor, float]:
        return mix_images(a, b, lam, generator, mode or "mixup")

    def perturb(self, inputs: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return (inputs + delta).clamp(0.0, 1.0)
