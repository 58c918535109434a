"""Data sets: scikit-learn's digits (embedded default) and CIFAR-10 / ImageNet / image folders from a path.

Nothing is ever downloaded: every torchvision data set is opened with ``download=False``, and a missing path
raises `DataError` naming it before any work starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset, TensorDataset

from fliqs.errors import BadInput

DATASETS = ("digits", "cifar10", "imagenet", "imagefolder")
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class DataError(BadInput):
    pass


@dataclass
class Splits:
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    in_chans: int
    input_size: int


def _split_indices(labels: np.ndarray, fractions: tuple[float, float], seed: int) -> tuple[np.ndarray, ...]:
    """Deterministic stratified split into train / val / test index arrays."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    val_frac, test_frac = fractions
    rest, test = train_test_split(idx, test_size=test_frac, stratify=labels, random_state=seed)
    train, val = train_test_split(rest, test_size=val_frac / (1 - test_frac), stratify=labels[rest],
                                  random_state=seed)
    return np.sort(train), np.sort(val), np.sort(test)


def load_digits(input_size: int | None = None, val_fraction: float = 0.15, test_fraction: float = 0.15,
                seed: int = 0) -> Splits:
    """The 1,797 8x8 handwritten digits shipped inside scikit-learn, normalised with train statistics."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = np.asarray(bunch.target)
    size = input_size or 8
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    train, val, test = _split_indices(labels, (val_fraction, test_fraction), seed)
    mean, std = images[train].mean(), images[train].std()
    images = (images - mean) / std
    y = torch.tensor(labels, dtype=torch.long)
    part = lambda idx: TensorDataset(images[idx], y[idx])  # noqa: E731
    return Splits(part(train), part(val), part(test), num_classes=10, in_chans=1, input_size=size)


def _require_path(path: str | None, what: str) -> str:
    if not path:
        raise DataError(f"data set {what!r} needs data.path (nothing is downloaded)")
    if not os.path.isdir(path):
        raise DataError(f"data set {what!r}: path {path!r} does not exist (nothing is downloaded)")
    return path


def _image_transforms(size: int, mean, std, train: bool):
    from torchvision import transforms as T

    if train:
        ops = [T.RandomResizedCrop(size), T.RandomHorizontalFlip()] if size > 64 else \
              [T.RandomCrop(size, padding=size // 8), T.RandomHorizontalFlip()]
    else:
        ops = [T.Resize(int(size * 256 / 224)), T.CenterCrop(size)] if size > 64 else [T.Resize(size)]
    return T.Compose([*ops, T.ToTensor(), T.Normalize(mean, std)])


def _holdout(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction))
    return sorted(perm[n_val:].tolist()), sorted(perm[:n_val].tolist())


def load_cifar10(path: str | None, input_size: int | None, val_fraction: float, seed: int) -> Splits:
    from torchvision.datasets import CIFAR10

    root = _require_path(path, "cifar10")
    size = input_size or 32
    try:
        train_aug = CIFAR10(root, train=True, download=False, transform=_image_transforms(size, CIFAR10_MEAN,
                                                                                         CIFAR10_STD, True))
        train_plain = CIFAR10(root, train=True, download=False,
                              transform=_image_transforms(size, CIFAR10_MEAN, CIFAR10_STD, False))
        test = CIFAR10(root, train=False, download=False,
                       transform=_image_transforms(size, CIFAR10_MEAN, CIFAR10_STD, False))
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted."
        raise DataError(f"CIFAR-10 not found under {root!r} (expected cifar-10-batches-py/): {err}") from None
    tr, va = _holdout(len(train_aug), val_fraction, seed)
    return Splits(Subset(train_aug, tr), Subset(train_plain, va), test, 10, 3, size)


def load_image_folders(path: str | None, name: str, input_size: int | None, val_fraction: float,
                       seed: int) -> Splits:
    """ImageNet layout: ``path/train/<class>/*`` and ``path/val/<class>/*``; the val folder is the test split and
    a held-out part of train is the validation split used by searches."""
    from torchvision.datasets import ImageFolder

    root = _require_path(path, name)
    for sub in ("train", "val"):
        if not os.path.isdir(os.path.join(root, sub)):
            raise DataError(f"data set {name!r}: expected {os.path.join(root, sub)!r} (class sub-folders)")
    size = input_size or 224
    train_aug = ImageFolder(os.path.join(root, "train"), _image_transforms(size, IMAGENET_MEAN, IMAGENET_STD, True))
    train_plain = ImageFolder(os.path.join(root, "train"),
                              _image_transforms(size, IMAGENET_MEAN, IMAGENET_STD, False))
    test = ImageFolder(os.path.join(root, "val"), _image_transforms(size, IMAGENET_MEAN, IMAGENET_STD, False))
    tr, va = _holdout(len(train_aug), val_fraction, seed)
    return Splits(Subset(train_aug, tr), Subset(train_plain, va), test, len(train_aug.classes), 3, size)


def check_data(name: str, path: str | None) -> None:
    """Validate a data configuration without loading anything (used before any work starts)."""
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; valid: {', '.join(DATASETS)}")
    if name != "digits":
        _require_path(path, name)


def load_data(name: str = "digits", path: str | None = None, input_size: int | None = None,
              val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0) -> Splits:
    check_data(name, path)
    if name == "digits":
        return load_digits(input_size, val_fraction, test_fraction, seed)
    if name == "cifar10":
        return load_cifar10(path, input_size, val_fraction, seed)
    return load_image_folders(path, name, input_size, val_fraction, seed)
