"""Seeded, stratified splits and subsets of a labelled training set (Fashion-MNIST's and CIFAR-10's)."""

from __future__ import annotations

import numpy as np

from fliqs.data.errors import DataError


def stratified(labels: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` indices of ``labels``, every class in proportion (largest remainders), sorted."""
    classes, sizes = np.unique(labels, return_counts=True)
    share = sizes / sizes.sum() * count
    take = np.floor(share).astype(int)
    take[np.argsort(share - take)[::-1][:count - take.sum()]] += 1
    picked = [rng.choice(np.flatnonzero(labels == c), size=n, replace=False) for c, n in zip(classes, take,
                                                                                          strict=True)]
    return np.sort(np.concatenate(picked))


def split_indices(labels: np.ndarray, val_fraction: float, train_subset: int | None,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices of a training set: a stratified validation share, then, with ``train_subset``,
    that many training images and a validation split in the same proportion. A subset too large for the data, or
    one that leaves either split without every class, is one line (`DataError`)."""
    classes = len(np.unique(labels))
    rng = np.random.default_rng(seed)
    val = stratified(labels, int(round(val_fraction * len(labels))), rng)
    train = np.setdiff1d(np.arange(len(labels)), val)
    if train_subset is not None:
        if train_subset > len(train):
            raise DataError(f"data.train_subset={train_subset} is more than the {len(train)} training images left "
                            f"beside the validation split")
        keep_val = min(int(round(train_subset * val_fraction / (1 - val_fraction))), len(val))
        if min(train_subset, keep_val) < classes:
            raise DataError(f"data.train_subset={train_subset} leaves {train_subset} training and {keep_val} "
                            f"validation images, fewer than the {classes} classes (every split holds each class)")
        train = train[stratified(labels[train], train_subset, rng)]
        val = val[stratified(labels[val], keep_val, rng)]
    return train, val
