"""Data sets: scikit-learn's digits (embedded default), Fashion-MNIST's IDX files (`fliqs.data.fashion_mnist`) and
CIFAR-10 / ImageNet / image folders from a path.

Nothing is ever downloaded: every torchvision data set is opened with ``download=False``, and a missing path
raises `DataError` naming it before any work starts.

`describe` tells what a data set is (classes, channels, resolution) from metadata alone (a directory listing at
most, never a scan of the images), so a run can be planned and validated without loading anything; `load_data`
loads the splits. torch is imported by the loaders only: config validation never pays for it.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fliqs.data import fashion_mnist
from fliqs.data.errors import DataError
from fliqs.data.splits import split_indices

if TYPE_CHECKING:
    from torch.utils.data import Dataset

DATASETS = ("digits", "fashion_mnist", "cifar10", "imagenet", "imagefolder")
SUBSET_DATASETS = ("fashion_mnist", "cifar10")  # data.train_subset: a seeded stratified part of the training split
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR10_FOLDER = "cifar-10-batches-py"
DIGITS_CLASSES, DIGITS_SIZE, DIGITS_SAMPLES = 10, 8, 1797


@dataclass(frozen=True)
class DataInfo:
    """What a model needs to know about its data: label count, input channels, input resolution."""

    num_classes: int
    in_chans: int
    input_size: int
    samples: int | None = None  # where known without loading (digits): the split sizes are checked before work


@dataclass
class Splits:
    train: Dataset
    val: Dataset
    test: Dataset
    info: DataInfo

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def in_chans(self) -> int:
        return self.info.in_chans

    @property
    def input_size(self) -> int:
        return self.info.input_size


def _require_path(path: str | None, what: str) -> str:
    if not path:
        raise DataError(f"data set {what!r} needs data.path (nothing is downloaded)")
    if not os.path.isdir(path):
        raise DataError(f"data set {what!r}: path {path!r} does not exist (nothing is downloaded)")
    return path


def _class_folders(root: str, name: str) -> list[str]:
    for sub in ("train", "val"):
        if not os.path.isdir(os.path.join(root, sub)):
            raise DataError(f"data set {name!r}: expected {os.path.join(root, sub)!r} (class sub-folders)")
    classes = sorted(e.name for e in os.scandir(os.path.join(root, "train")) if e.is_dir())
    if not classes:
        raise DataError(f"data set {name!r}: {os.path.join(root, 'train')!r} has no class sub-folders")
    return classes


def describe(name: str, path: str | None = None, input_size: int | None = None) -> DataInfo:
    """The data set's metadata without loading it (a missing path raises `DataError` naming it)."""
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; valid: {', '.join(DATASETS)}")
    if name == "digits":
        return DataInfo(DIGITS_CLASSES, 1, input_size or DIGITS_SIZE, DIGITS_SAMPLES)
    if name == "fashion_mnist":
        fashion_mnist.locate(path)
        if input_size not in (None, *fashion_mnist.SIZES):
            raise DataError(f"model.input_size={input_size}: Fashion-MNIST runs at 28 (its own) or 14 (pooled 2 x 2)")
        return DataInfo(len(fashion_mnist.CLASSES), 1, input_size or fashion_mnist.NATIVE_SIZE)
    root = _require_path(path, name)
    if name == "cifar10":
        if not os.path.isdir(os.path.join(root, CIFAR10_FOLDER)):
            raise DataError(f"CIFAR-10 not found under {root!r} (expected {CIFAR10_FOLDER}/)")
        return DataInfo(10, 3, input_size or 32)
    return DataInfo(len(_class_folders(root, name)), 3, input_size or 224)


def _split_indices(labels: np.ndarray, fractions: tuple[float, float], seed: int) -> tuple[np.ndarray, ...]:
    """Deterministic stratified split into train / val / test index arrays."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    val_frac, test_frac = fractions
    try:
        rest, test = train_test_split(idx, test_size=test_frac, stratify=labels, random_state=seed)
        train, val = train_test_split(rest, test_size=val_frac / (1 - test_frac), stratify=labels[rest],
                                      random_state=seed)
    except ValueError as err:  # a split too small to hold every class
        raise DataError(f"data.val_fraction={val_frac:g} / data.test_fraction={test_frac:g}: {err}") from None
    return np.sort(train), np.sort(val), np.sort(test)


DIGITS_RAW_RANGE = 16  # scikit-learn's digits are 0..16 gray levels: divided by this


def _digits(input_size: int | None, val_fraction: float, test_fraction: float, seed: int):
    """(images scaled to [0, 1] and resized, N x 1 x size x size; labels; split indices; the train split's mean and
    std): what `load_digits` normalises with, and what an export's preprocessing must repeat."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits as sk_digits

    info = describe("digits", None, input_size)
    bunch = sk_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / DIGITS_RAW_RANGE
    labels = np.asarray(bunch.target)
    if info.input_size != DIGITS_SIZE:
        images = F.interpolate(images, size=(info.input_size,) * 2, mode="bilinear", align_corners=False)
    splits = _split_indices(labels, (val_fraction, test_fraction), seed)
    return images, labels, splits, float(images[splits[0]].mean()), float(images[splits[0]].std())


def load_digits(input_size: int | None = None, val_fraction: float = 0.15, test_fraction: float = 0.15,
                seed: int = 0) -> Splits:
    """The 1,797 8x8 handwritten digits shipped inside scikit-learn, normalised with train statistics."""
    import torch
    from torch.utils.data import TensorDataset

    info = describe("digits", None, input_size)
    images, labels, (train, val, test), mean, std = _digits(input_size, val_fraction, test_fraction, seed)
    images = (images - torch.tensor(mean)) / torch.tensor(std)
    y = torch.tensor(labels, dtype=torch.long)
    part = lambda idx: TensorDataset(images[idx], y[idx])  # noqa: E731
    return Splits(part(train), part(val), part(test), info)


def eval_resize(size: int) -> int:
    """The shorter side an evaluation image is resized to before its centre ``size`` x ``size`` crop: ImageNet's
    256 / 224 ratio for large inputs, the size itself for small ones (CIFAR-10 at 32: no change)."""
    return int(size * 256 / 224) if size > 64 else size


def _image_transforms(size: int, mean, std, train: bool):
    from torchvision import transforms as T

    if train:
        ops = [T.RandomResizedCrop(size), T.RandomHorizontalFlip()] if size > 64 else \
              [T.RandomCrop(size, padding=size // 8), T.RandomHorizontalFlip()]
    else:
        ops = [T.Resize(eval_resize(size)), T.CenterCrop(size)]
    return T.Compose([*ops, T.ToTensor(), T.Normalize(mean, std)])


def _holdout(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction))
    return sorted(perm[n_val:].tolist()), sorted(perm[:n_val].tolist())


CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = ("test_batch",)


# What a CIFAR-10 python batch may reference: its arrays. Unpickling anything else could run code from a data
# folder (SECURITY.md); a batch that needs more is refused.
_CIFAR10_PICKLE_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                           ("numpy", "ndarray"), ("numpy", "dtype")}


def _load_batch(f):
    import pickle

    class Restricted(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) not in _CIFAR10_PICKLE_GLOBALS:
                raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR-10 batch")
            return super().find_class(module, name)

    return Restricted(f, encoding="bytes").load()


def _read_cifar10(root: str, names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The python version's pickled batches as (uint8 images N x 32 x 32 x 3, labels), unpickled with only their
    arrays allowed. Read directly rather than through torchvision, whose md5 check would refuse a subset or a
    re-packed copy of the data set (and which unpickles without restriction)."""
    import pickle

    images, labels = [], []
    for name in names:
        file = os.path.join(root, CIFAR10_FOLDER, name)
        try:
            with open(file, "rb") as f:
                batch = _load_batch(f)
            images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
        except (OSError, pickle.UnpicklingError, KeyError, ValueError, EOFError) as err:
            raise DataError(f"CIFAR-10 batch {file} is missing or corrupt: {type(err).__name__}: {err}") from None
    return np.concatenate(images), np.concatenate(labels)


class ImageArray:
    """A data set of HWC uint8 images and labels, each image through ``transform`` (a PIL-image transform)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def load_cifar10(path: str | None, input_size: int | None, val_fraction: float, seed: int,
                 train_subset: int | None = None) -> Splits:
    from torch.utils.data import Subset

    info = describe("cifar10", path, input_size)
    size = info.input_size
    train_x, train_y = _read_cifar10(path, CIFAR10_TRAIN)
    test_x, test_y = _read_cifar10(path, CIFAR10_TEST)
    train_aug = ImageArray(train_x, train_y, _image_transforms(size, CIFAR10_MEAN, CIFAR10_STD, True))
    train_plain = ImageArray(train_x, train_y, _image_transforms(size, CIFAR10_MEAN, CIFAR10_STD, False))
    test = ImageArray(test_x, test_y, _image_transforms(size, CIFAR10_MEAN, CIFAR10_STD, False))
    if train_subset is None:
        tr, va = _holdout(len(train_aug), val_fraction, seed)
    else:  # the same stratified rule as Fashion-MNIST's
        tr, va = (idx.tolist() for idx in split_indices(train_y, val_fraction, train_subset, seed))
    return Splits(Subset(train_aug, tr), Subset(train_plain, va), test, info)


def load_image_folders(path: str | None, name: str, input_size: int | None, val_fraction: float,
                       seed: int) -> Splits:
    """ImageNet layout: ``path/train/<class>/*`` and ``path/val/<class>/*``; the val folder is the test split and
    a held-out part of train is the validation split used by searches."""
    from torch.utils.data import Subset
    from torchvision.datasets import ImageFolder

    info = describe(name, path, input_size)
    size = info.input_size
    train_aug = ImageFolder(os.path.join(path, "train"), _image_transforms(size, IMAGENET_MEAN, IMAGENET_STD, True))
    # The same files with evaluation transforms: reuse the scan instead of listing the folder again.
    train_plain = copy.copy(train_aug)
    train_plain.transform = _image_transforms(size, IMAGENET_MEAN, IMAGENET_STD, False)
    test = ImageFolder(os.path.join(path, "val"), _image_transforms(size, IMAGENET_MEAN, IMAGENET_STD, False))
    tr, va = _holdout(len(train_aug), val_fraction, seed)
    return Splits(Subset(train_aug, tr), Subset(train_plain, va), test, info)


def load_configured(data, input_size: int | None) -> Splits:
    """`load_data` for a configuration's ``data`` section (name, path, fractions, seed, train_subset) at the model's
    ``input_size``: the one call every worker, evaluation and benchmark makes."""
    return load_data(data.name, data.path, input_size, data.val_fraction, data.test_fraction, data.seed,
                     data.train_subset)


def verify(name: str, path: str | None = None, val_fraction: float = 0.15, train_subset: int | None = None) -> None:
    """What `describe` cannot see without reading the files, where a read is cheap: Fashion-MNIST's four files read
    whole (headers, sizes, labels) and the training subset against them. Part of the validation before any work."""
    if name == "fashion_mnist":
        fashion_mnist.check(path, val_fraction, train_subset)


def fashion_mnist_statistics(path: str | None, input_size: int | None, val_fraction: float, seed: int,
                             train_subset: int | None = None):
    """(info, the training images as inputs in [0, 1], their labels, train and validation indices, the training
    split's mean and std): what `load_fashion_mnist` normalises with, and what an export's preprocessing repeats."""
    info = describe("fashion_mnist", path, input_size)
    train_x, train_y = fashion_mnist.read_split(fashion_mnist.locate(path), "train")
    train, val = split_indices(train_y, val_fraction, train_subset, seed)
    images = fashion_mnist.to_inputs(train_x, info.input_size)
    return info, images, train_y, train, val, float(images[train].mean()), float(images[train].std())


def load_fashion_mnist(path: str | None, input_size: int | None, val_fraction: float, seed: int,
                       train_subset: int | None = None) -> Splits:
    import torch
    from torch.utils.data import TensorDataset

    info, images, train_y, train, val, mean, std = fashion_mnist_statistics(path, input_size, val_fraction, seed,
                                                                           train_subset)
    test_x, test_y = fashion_mnist.read_split(fashion_mnist.locate(path), "test")
    mean, std = torch.tensor(mean), torch.tensor(std)
    part = lambda x, y: TensorDataset((x - mean) / std, torch.from_numpy(y))  # noqa: E731
    return Splits(part(images[train], train_y[train]), part(images[val], train_y[val]),
                  part(fashion_mnist.to_inputs(test_x, info.input_size), test_y), info)


def load_data(name: str = "digits", path: str | None = None, input_size: int | None = None,
              val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0,
              train_subset: int | None = None) -> Splits:
    """The splits of data set ``name``. ``test_fraction`` applies to digits (the others have their own test set);
    ``train_subset`` to `SUBSET_DATASETS`."""
    describe(name, path, input_size)
    if train_subset is not None and name not in SUBSET_DATASETS:
        raise DataError(f"data.train_subset is for {', '.join(SUBSET_DATASETS)}, not {name!r}")
    if name == "digits":
        return load_digits(input_size, val_fraction, test_fraction, seed)
    if name == "fashion_mnist":
        return load_fashion_mnist(path, input_size, val_fraction, seed, train_subset)
    if name == "cifar10":
        return load_cifar10(path, input_size, val_fraction, seed, train_subset)
    return load_image_folders(path, name, input_size, val_fraction, seed)
