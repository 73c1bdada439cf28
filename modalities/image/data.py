"""Image datasets held as uint8 tensors (N, C, H, W) with batched fetching.

Items are ``(image float [0, 1], label, index)``; the index lets attacks poison by sample
on the fly. Fashion-MNIST/MNIST are read from IDX files (the Debian package path or a
root); CIFAR-10/100, GTSRB, Tiny-ImageNet and ImageFolder go through torchvision's own
dataset classes with local roots (nothing is downloaded); ``digits`` is scikit-learn's.
"""
from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

FASHION_MNIST_ROOTS = ("/usr/share/datasets/fashion-mnist", "data/fashion-mnist", "data/FashionMNIST/raw")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]


class ImageTensorDataset(Dataset):
    """uint8 images (N, C, H, W) and int64 labels in memory."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, classes: Optional[List[str]] = None) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError("images must be a uint8 tensor of shape (N, C, H, W)")
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} labels")
        self.images, self.targets = images, targets.long()
        self.classes = classes

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.images[i].float() / 255.0, self.targets[i], torch.tensor(i)

    def __getitems__(self, idx: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = torch.as_tensor(idx, dtype=torch.long)
        return self.images[t].float() / 255.0, self.targets[t], t

    def select(self, idx: torch.Tensor) -> "ImageTensorDataset":
        return ImageTensorDataset(self.images[idx], self.targets[idx], self.classes)


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (optionally gzipped): magic, dims, big-endian payload."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file")
    dtype = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[data[2]]
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim)
    return arr.reshape(dims)


def _find_idx(roots: Sequence[str], stem: str) -> Path:
    for r in roots:
        for name in (f"{stem}.gz", stem):
            p = Path(r) / name
            if p.is_file():
                return p
    raise FileNotFoundError(
        f"{stem} not found under {', '.join(roots)}; install the Debian package dataset-fashion-mnist "
        f"(apt-get install dataset-fashion-mnist) or pass data.root=DIR holding the IDX files")


def load_idx_dataset(roots: Sequence[str], classes: Optional[List[str]] = None) -> Tuple[ImageTensorDataset, ImageTensorDataset]:
    split = {}
    for part, prefix in (("train", "train"), ("test", "t10k")):
        x = read_idx(_find_idx(roots, f"{prefix}-images-idx3-ubyte"))
        y = read_idx(_find_idx(roots, f"{prefix}-labels-idx1-ubyte"))
        split[part] = ImageTensorDataset(torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64)),
                                         classes)
    return split["train"], split["test"]


def load_fashion_mnist(root: Optional[str] = None) -> Tuple[ImageTensorDataset, ImageTensorDataset]:
    roots = [root] if root else list(FASHION_MNIST_ROOTS)
    return load_idx_dataset(roots, FASHION_MNIST_CLASSES)


def load_mnist(root: Optional[str] = None) -> Tuple[ImageTensorDataset, ImageTensorDataset]:
    roots = [root] if root else ["data/mnist", "data/MNIST/raw", "/usr/share/datasets/mnist"]
    return load_idx_dataset(roots, [str(i) for i in range(10)])


def load_digits_split(seed: int = 0, size: Optional[int] = None) -> Tuple[ImageTensorDataset, ImageTensorDataset]:
    """scikit-learn's bundled 8x8 digits (1,797 images), a seeded 75/25 stratified split; ``size``: upscaled
    (bilinear) to ``size`` x ``size``, so that a trigger of a few pixels is as small a share of the image as on
    28x28 data."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(np.clip(d.images * 16.0, 0, 255).astype(np.uint8)).unsqueeze(1)
    if size and int(size) != x.shape[-1]:
        from torchvision.transforms.v2 import functional as TF

        x = TF.resize(x, [int(size), int(size)], antialias=True)   # as _from_torchvision resizes
    y = torch.from_numpy(d.target.astype(np.int64))
    g = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    for c in range(10):
        pool = torch.nonzero(y == c).flatten()
        pool = pool[torch.randperm(len(pool), generator=g)]
        k = int(round(0.25 * len(pool)))
        test_idx.append(pool[:k]); train_idx.append(pool[k:])
    tr, te = torch.cat(train_idx).sort().values, torch.cat(test_idx).sort().values
    classes = [str(i) for i in range(10)]
    return ImageTensorDataset(x[tr], y[tr], classes), ImageTensorDataset(x[te], y[te], classes)


def _from_torchvision(ds: Any, size: Optional[int], channels: int) -> ImageTensorDataset:
    """Materialise a small torchvision dataset (CIFAR, GTSRB, Tiny-ImageNet) as uint8 tensors."""
    from torchvision.transforms import v2

    tf = [v2.PILToTensor()]
    if size:
        tf.insert(0, v2.Resize((size, size), antialias=True))
    tf = v2.Compose(tf)
    xs, ys = [], []
    for img, label in ds:
        if channels == 3 and getattr(img, "mode", "RGB") != "RGB":
            img = img.convert("RGB")
        xs.append(tf(img)); ys.append(int(label))
    return ImageTensorDataset(torch.stack(xs), torch.tensor(ys), list(getattr(ds, "classes", [])) or None)


def load_torchvision(name: str, root: str, size: Optional[int] = None) -> Tuple[ImageTensorDataset, ImageTensorDataset]:
    import torchvision.datasets as tvd

    if not root or not Path(root).exists():
        raise FileNotFoundError(f"dataset '{name}' needs a local root with its files: pass data.root=DIR "
                                f"(nothing is downloaded at run time)")
    if name == "cifar10":
        tr, te = tvd.CIFAR10(root, train=True, download=False), tvd.CIFAR10(root, train=False, download=False)
    elif name == "cifar100":
        tr, te = tvd.CIFAR100(root, train=True, download=False), tvd.CIFAR100(root, train=False, download=False)
    elif name == "gtsrb":
        tr, te = tvd.GTSRB(root, split="train", download=False), tvd.GTSRB(root, split="test", download=False)
        size = size or 32
    elif name == "tiny-imagenet":
        tr, te = tvd.ImageFolder(str(Path(root) / "train")), tvd.ImageFolder(str(Path(root) / "val"))
        size = size or 64
    elif name == "mnist":
        tr, te = tvd.MNIST(root, train=True, download=False), tvd.MNIST(root, train=False, download=False)
        return _from_torchvision(tr, size, 1), _from_torchvision(te, size, 1)
    else:
        raise KeyError(f"unknown torchvision dataset '{name}'")
    return _from_torchvision(tr, size, 3), _from_torchvision(te, size, 3)


class ImageFolderDataset(Dataset):
    """Large folders (ImageNet layout) decoded lazily and resized to ``size`` x ``size``."""

    def __init__(self, root: str, size: int = 224) -> None:
        import torchvision.datasets as tvd
        from torchvision.transforms import v2

        self.folder = tvd.ImageFolder(root)
        self.targets = torch.tensor(self.folder.targets)
        self.classes = self.folder.classes
        self.tf = v2.Compose([v2.PILToTensor(), v2.Resize(size, antialias=True), v2.CenterCrop(size)])

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        img, y = self.folder[i]
        return self.tf(img.convert("RGB")).float() / 255.0, torch.tensor(y), torch.tensor(i)
