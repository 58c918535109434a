"""Fashion-MNIST from its four original IDX files (Debian: ``apt-get install dataset-fashion-mnist``, which puts
them under `DEFAULT_PATH`; any folder holding the four files works). NumPy only; nothing is ever downloaded.

IDX (the MNIST file format): a big-endian header (two zero bytes, the element type 0x08 for unsigned bytes, the
number of dimensions) followed by one big-endian uint32 per dimension, then the data. Files may be gzipped (the
originals are) or plain.

Splits: the official 10,000 test images are the test split; a seeded, stratified `val_fraction` of the 60,000
training images is the validation split, the rest the training split. ``train_subset`` (seeded, stratified) keeps
that many training images and a validation split in the same proportion, to size a run for 2 cores. Images are
scaled to [0, 1], average-pooled 2 x 2 for ``input_size=14``, and normalised with the training split's mean and std.
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass

import numpy as np

from fliqs.data.errors import DataError
from fliqs.data.splits import split_indices

DEFAULT_PATH = "/usr/share/datasets/fashion-mnist"
APT_PACKAGE = "dataset-fashion-mnist"
FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
         "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
NATIVE_SIZE, SIZES = 28, (14, 28)  # 14: average-pooled 2 x 2
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
RAW_RANGE = 255  # raw values are divided by this (as torchvision's ToTensor does)
_UBYTE = 0x08


class FashionMnistError(DataError):
    pass


@dataclass(frozen=True)
class IdxHeader:
    dims: tuple[int, ...]
    offset: int  # where the data start


def _file(root: str, stem: str) -> str:
    for name in (f"{stem}.gz", stem):
        if os.path.isfile(os.path.join(root, name)):
            return os.path.join(root, name)
    raise FashionMnistError(f"Fashion-MNIST: {stem}(.gz) not found in {root!r} (apt-get install {APT_PACKAGE} puts "
                            f"the four IDX files in {DEFAULT_PATH}; or give data.path=<a folder holding them>)")


def _read(path: str) -> bytes:
    try:
        with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as err:  # a truncated or corrupt gzip stream, an unreadable file
        raise FashionMnistError(f"Fashion-MNIST file {path!r} is unreadable or truncated ({err})") from None


def _header(data: bytes, path: str, ndim: int) -> IdxHeader:
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != _UBYTE or data[3] != ndim:
        raise FashionMnistError(f"Fashion-MNIST file {path!r} is not an IDX file of {ndim}-D unsigned bytes")
    offset = 4 + 4 * ndim
    if len(data) < offset:
        raise FashionMnistError(f"Fashion-MNIST file {path!r} is truncated (its header)")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    if len(data) != offset + int(np.prod(dims)):
        raise FashionMnistError(f"Fashion-MNIST file {path!r} holds {len(data) - offset} bytes of data where its "
                                f"header says {dims} (truncated or corrupt)")
    return IdxHeader(dims, offset)


def read_split(root: str, part: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images N x 28 x 28, int64 labels) of ``part`` ("train" or "test"), checked: headers, sizes, matching
    counts, labels in 0..9."""
    images_path, labels_path = _file(root, FILES[f"{part}_images"]), _file(root, FILES[f"{part}_labels"])
    raw_images, raw_labels = _read(images_path), _read(labels_path)
    images, labels = _header(raw_images, images_path, 3), _header(raw_labels, labels_path, 1)
    if images.dims[1:] != (NATIVE_SIZE, NATIVE_SIZE):
        raise FashionMnistError(f"Fashion-MNIST file {images_path!r} holds {images.dims[1:]} images, not 28 x 28")
    if images.dims[0] != labels.dims[0]:
        raise FashionMnistError(f"Fashion-MNIST {part} split: {images.dims[0]} images but {labels.dims[0]} labels")
    y = np.frombuffer(raw_labels, dtype=np.uint8, offset=labels.offset).astype(np.int64)
    if y.size and int(y.max()) >= len(CLASSES):
        raise FashionMnistError(f"Fashion-MNIST file {labels_path!r} has label {int(y.max())}; labels are 0..9")
    x = np.frombuffer(raw_images, dtype=np.uint8, offset=images.offset).reshape(images.dims)
    return x, y


def locate(root: str | None) -> str:
    """The folder holding the four files (default `DEFAULT_PATH`), checked for their presence only (cheap): a missing
    package, folder or file is one line naming the apt package and the path."""
    root = root or DEFAULT_PATH
    if not os.path.isdir(root):
        raise FashionMnistError(f"Fashion-MNIST not found: {root!r} does not exist (apt-get install {APT_PACKAGE}, "
                                f"or give data.path=<a folder holding the four IDX files>)")
    for stem in FILES.values():
        _file(root, stem)
    return root


def check(root: str | None, val_fraction: float = 0.15, train_subset: int | None = None) -> str:
    """`locate`, then every file read and checked (about a second): a truncated or corrupt file, a label out of
    range and a ``train_subset`` larger than the training split are one line each, before any work."""
    root = locate(root)
    _, labels = read_split(root, "train")
    read_split(root, "test")
    split_indices(labels, val_fraction, train_subset, 0)  # a subset the data cannot give fails here
    return root


def to_inputs(images: np.ndarray, input_size: int):
    """uint8 N x 28 x 28 -> float32 N x 1 x size x size in [0, 1] (average-pooled 2 x 2 for size 14)."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(images.astype(np.float32)).unsqueeze(1) / RAW_RANGE
    return F.avg_pool2d(x, NATIVE_SIZE // input_size) if input_size != NATIVE_SIZE else x
