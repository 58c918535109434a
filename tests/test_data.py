"""fliqs.data.datasets: the embedded digits splits, resizing, and data sets from a path that never download."""

from __future__ import annotations

import socket
from collections import Counter

import numpy as np
import pytest
import torch
from helpers import run_without_torch
from sklearn.datasets import load_digits as sk_digits

from fliqs.data.datasets import DataError, DataInfo, describe, load_data, load_digits
from fliqs.errors import BadInput

N_DIGITS = 1797


def _tensors(ds):
    x, y = ds.tensors
    return x, y


def _rows(x: torch.Tensor, y: torch.Tensor) -> list[bytes]:
    """One hashable row per sample (image bytes + label), for multiset comparisons."""
    return [xi.numpy().tobytes() + int(yi).to_bytes(1, "little") for xi, yi in zip(x, y, strict=True)]


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection or to call torchvision's downloaders fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network/download attempted: {args[:2]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    import torchvision.datasets.utils as tvu

    for fn in ("download_url", "download_and_extract_archive", "download_file_from_google_drive"):
        if hasattr(tvu, fn):
            monkeypatch.setattr(tvu, fn, refuse)


def test_digits_sizes_and_shapes(digits):
    sizes = [len(digits.train), len(digits.val), len(digits.test)]
    assert sum(sizes) == N_DIGITS
    assert sizes[1] == pytest.approx(0.15 * N_DIGITS, abs=2)
    assert sizes[2] == pytest.approx(0.15 * N_DIGITS, abs=2)
    assert (digits.num_classes, digits.in_chans, digits.input_size) == (10, 1, 8)
    x, y = _tensors(digits.train)
    assert x.shape[1:] == (1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.long


def test_digits_splits_are_deterministic(digits):
    again = load_digits()
    for a, b in ((digits.train, again.train), (digits.val, again.val), (digits.test, again.test)):
        assert all(torch.equal(t, u) for t, u in zip(a.tensors, b.tensors, strict=True))
    other = load_digits(seed=1)
    assert not torch.equal(_tensors(other.test)[1], _tensors(digits.test)[1]) or not torch.equal(
        _tensors(other.test)[0], _tensors(digits.test)[0])


def test_digits_splits_are_disjoint_and_cover_the_data_set(digits):
    """As multisets, train + val + test is exactly the data set: nothing lost, nothing in two splits."""
    bunch = sk_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    parts = [_tensors(s) for s in (digits.train, digits.val, digits.test)]
    normed = torch.cat([x for x, _ in parts])
    labels = torch.cat([y for _, y in parts])
    # Undo the (affine) normalisation: raw pixels are multiples of 1/16 in [0, 1], and both 0 and 1 occur in
    # the train split, so its min and max are the normalised images of 0 and 1.
    x_tr = parts[0][0]
    zero, one = x_tr.min(), x_tr.max()
    raw = (normed - zero) / (one - zero)
    snapped = (raw * 16).round() / 16
    assert torch.allclose(raw, snapped, atol=1e-4)
    assert Counter(_rows(snapped, labels)) == Counter(_rows(images, torch.tensor(bunch.target)))


def test_digits_splits_are_stratified(digits):
    overall = Counter(sk_digits().target.tolist())
    for split in (digits.train, digits.val, digits.test):
        counts = Counter(_tensors(split)[1].tolist())
        n = len(split)
        for cls, total in overall.items():
            assert abs(counts[cls] - total * n / N_DIGITS) <= 2, (cls, counts[cls], total * n / N_DIGITS)


def test_digits_are_normalised_with_train_statistics(digits):
    x, _ = _tensors(digits.train)
    assert float(x.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(x.std()) == pytest.approx(1.0, abs=1e-5)
    for split in (digits.val, digits.test):
        xs, _ = _tensors(split)
        assert abs(float(xs.mean())) < 0.1 and abs(float(xs.std()) - 1) < 0.1


def test_digits_input_size_resize():
    big = load_digits(input_size=16)
    small = load_digits()
    x, y = _tensors(big.train)
    assert big.input_size == 16 and x.shape[1:] == (1, 16, 16)
    assert torch.equal(y, _tensors(small.train)[1])  # same split, only the pixels differ
    assert float(x.mean()) == pytest.approx(0.0, abs=1e-5) and float(x.std()) == pytest.approx(1.0, abs=1e-5)
    # Downsampling the upsampled images by averaging 2x2 blocks gives back (almost) the original layout.
    back = torch.nn.functional.avg_pool2d(x, 2)
    corr = torch.corrcoef(torch.stack([back.flatten(), _tensors(small.train)[0].flatten()]))[0, 1]
    assert corr > 0.9


def test_load_data_defaults_to_digits():
    splits = load_data()
    assert splits.num_classes == 10 and splits.input_size == 8
    assert len(splits.train) + len(splits.val) + len(splits.test) == N_DIGITS


@pytest.mark.parametrize("name", ["cifar10", "imagenet", "imagefolder"])
def test_missing_path_raises_naming_it(name, tmp_path, no_network):
    missing = tmp_path / "does" / "not" / "exist"
    with pytest.raises(DataError) as info:
        load_data(name, path=str(missing))
    assert str(missing) in str(info.value)
    assert isinstance(info.value, BadInput)
    assert not (tmp_path / "does").exists()  # nothing created, nothing downloaded
    with pytest.raises(DataError, match="path"):
        load_data(name, path=None)
    with pytest.raises(DataError, match=str(missing)):
        describe(name, str(missing))
    with pytest.raises(DataError, match="path"):
        describe(name)


def test_cifar10_empty_folder_raises_without_download(tmp_path, no_network):
    with pytest.raises(DataError) as info:
        load_data("cifar10", path=str(tmp_path))
    assert str(tmp_path) in str(info.value)
    assert list(tmp_path.iterdir()) == []  # nothing was downloaded into it


def test_imagenet_without_train_val_raises(tmp_path, no_network):
    with pytest.raises(DataError) as info:
        load_data("imagenet", path=str(tmp_path))
    assert str(tmp_path / "train") in str(info.value)
    assert list(tmp_path.iterdir()) == []


def _image_folders(root, classes=("cat", "dog"), counts=(("train", 5), ("val", 2))):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in counts:
        for cls in classes:
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_image_folder_from_a_path(tmp_path, no_network):
    _image_folders(tmp_path)
    splits = load_data("imagefolder", path=str(tmp_path), input_size=16, val_fraction=0.2)
    assert splits.num_classes == 2 and splits.in_chans == 3 and splits.input_size == 16
    assert splits.info == describe("imagefolder", str(tmp_path), 16) == DataInfo(2, 3, 16)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (8, 2, 4)
    x, y = splits.val[0]
    assert x.shape == (3, 16, 16) and y in (0, 1)


def test_unknown_data_set():
    with pytest.raises(DataError, match="mnist"):
        load_data("mnist")


# ------------------------------------------------------------------------------ describe: metadata only
def test_describe_digits_agrees_with_load_data(digits):
    assert describe("digits") == DataInfo(10, 1, 8, 1797)
    assert describe("digits", input_size=16) == DataInfo(10, 1, 16, 1797)
    assert describe("digits", path="/ignored/for/digits") == DataInfo(10, 1, 8, 1797)
    assert digits.info == describe("digits")
    assert (digits.info.num_classes, digits.info.in_chans, digits.info.input_size) == (10, 1, 8)
    big = load_data("digits", input_size=12)
    assert big.info == describe("digits", input_size=12) and big.input_size == 12
    x, y = _tensors(digits.train)
    assert x.shape[1] == digits.in_chans and x.shape[-1] == digits.input_size
    assert int(y.max()) + 1 == digits.num_classes


def test_describe_cifar10_needs_its_folder(tmp_path, no_network):
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        describe("cifar10", str(tmp_path))
    (tmp_path / "cifar-10-batches-py").mkdir()
    assert describe("cifar10", str(tmp_path)) == DataInfo(10, 3, 32)
    assert describe("cifar10", str(tmp_path), input_size=64) == DataInfo(10, 3, 64)
    assert [p.name for p in tmp_path.iterdir()] == ["cifar-10-batches-py"]  # nothing read or written
    assert list((tmp_path / "cifar-10-batches-py").iterdir()) == []


@pytest.mark.parametrize("name", ["imagenet", "imagefolder"])
def test_describe_image_folders_counts_the_train_class_folders(name, tmp_path, no_network):
    for cls in ("a", "b", "c"):
        (tmp_path / "train" / cls).mkdir(parents=True)
    (tmp_path / "train" / "stray.txt").write_text("not a class")  # files are not classes
    (tmp_path / "val" / "a").mkdir(parents=True)
    assert describe(name, str(tmp_path)) == DataInfo(3, 3, 224)
    assert describe(name, str(tmp_path), input_size=96) == DataInfo(3, 3, 96)


def test_describe_image_folder_errors(tmp_path, no_network):
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="val"):
        describe("imagefolder", str(tmp_path))
    (tmp_path / "val").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        describe("imagefolder", str(tmp_path))


def test_describe_image_folder_agrees_with_load_data(tmp_path, no_network):
    _image_folders(tmp_path, classes=("ant", "bee", "cow"), counts=(("train", 2), ("val", 1)))
    splits = load_data("imagefolder", path=str(tmp_path), input_size=16, val_fraction=0.2)
    info = describe("imagefolder", str(tmp_path), input_size=16)
    assert splits.info == info == DataInfo(3, 3, 16)
    assert (splits.num_classes, splits.in_chans, splits.input_size) == (3, 3, 16)
    assert splits.test.classes == ["ant", "bee", "cow"]
    x, _ = splits.test[0]
    assert x.shape == (info.in_chans, info.input_size, info.input_size)


def test_describe_unknown_data_set():
    with pytest.raises(DataError, match="unknown data set 'mnist'; valid: digits, fashion_mnist, cifar10") as info:
        describe("mnist")
    assert isinstance(info.value, BadInput)


def test_importing_fliqs_data_does_not_import_torch():
    code = "import fliqs.data.datasets\nprint(fliqs.data.datasets.describe('digits').num_classes)"
    assert run_without_torch(code).strip() == "10"


def test_cifar10_loads_the_python_batches(tmp_path):
    """The pickled batches read directly (a subset or a re-packed copy passes; torchvision's md5 check would refuse
    it): the images and labels as written, normalised tensors out; a corrupt batch is one DataError naming it."""
    import pickle

    from helpers import write_tiny_cifar10

    root = write_tiny_cifar10(tmp_path, per_batch=4)
    splits = load_data("cifar10", str(root), val_fraction=0.25)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (15, 5, 4)
    x, y = splits.test[1]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    batch = pickle.loads((root / "cifar-10-batches-py" / "test_batch").read_bytes())
    assert y == batch[b"labels"][1]
    pixel = batch[b"data"][1].reshape(3, 32, 32)[:, 0, 0] / 255.0  # un-normalise the first pixel
    expected = (torch.tensor(pixel, dtype=torch.float32) - torch.tensor([0.4914, 0.4822, 0.4465])) / torch.tensor(
        [0.2470, 0.2435, 0.2616])
    torch.testing.assert_close(x[:, 0, 0], expected)
    (root / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"truncated")
    with pytest.raises(DataError, match="data_batch_3 is missing or corrupt"):
        load_data("cifar10", str(root))
