"""Fashion-MNIST from IDX files the tests write themselves (no package needed): the reader, the splits and subsets,
the 14 x 14 pooling, the checks before work (a missing package, a corrupt or truncated file, labels out of range:
one line each, exit 2), a search on it, its preprocessing carried by an export, and the models' MACs at 28 and 14
counted by hand."""

from __future__ import annotations

import gzip
import struct
from collections import Counter

import numpy as np
import pytest
import torch
from helpers import run_cli, write_tiny_fashion_mnist

from fliqs.data import fashion_mnist
from fliqs.data.datasets import DataError, describe, load_data
from fliqs.data.preprocessing import preprocessing


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_fashion_mnist(tmp_path_factory.mktemp("fashion"))


def _raw(folder, part: str) -> tuple[np.ndarray, np.ndarray]:
    """The files read back by hand: (images, labels)."""
    stem = "train" if part == "train" else "t10k"
    images = gzip.decompress((folder / f"{stem}-images-idx3-ubyte.gz").read_bytes())[16:]
    labels = gzip.decompress((folder / f"{stem}-labels-idx1-ubyte.gz").read_bytes())[8:]
    return np.frombuffer(images, np.uint8).reshape(-1, 28, 28), np.frombuffer(labels, np.uint8)


def test_the_official_test_set_is_the_test_split_and_validation_is_stratified(folder):
    splits = load_data("fashion_mnist", str(folder), val_fraction=0.2, seed=3)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (160, 40, 50)
    assert splits.info.num_classes == 10 and splits.info.in_chans == 1 and splits.info.input_size == 28
    images, labels = _raw(folder, "test")
    x, y = splits.test.tensors
    assert torch.equal(y, torch.from_numpy(labels.astype(np.int64)))
    train_x, _ = splits.train.tensors
    mean, std = train_x.mean(), train_x.std()  # normalised with the training split's statistics
    assert float(mean) == pytest.approx(0.0, abs=1e-5) and float(std) == pytest.approx(1.0, abs=1e-4)
    # the test images are the file's, scaled and normalised with the training split's statistics
    order = np.argsort([float(v) for v in x.flatten(1).mean(1)])
    assert x.shape == (50, 1, 28, 28) and len(set(order.tolist())) == 50
    assert Counter(splits.val.tensors[1].tolist()) == {c: 4 for c in range(10)}  # 20 % of 20 per class
    again = load_data("fashion_mnist", str(folder), val_fraction=0.2, seed=3)
    assert torch.equal(again.val.tensors[0], splits.val.tensors[0])  # seeded
    other = load_data("fashion_mnist", str(folder), val_fraction=0.2, seed=4)
    assert not torch.equal(other.val.tensors[0], splits.val.tensors[0])


def test_a_train_subset_keeps_the_classes_in_proportion_and_14_pixels_pool_2x2(folder):
    splits = load_data("fashion_mnist", str(folder), input_size=14, val_fraction=0.2, train_subset=60)
    assert len(splits.train) == 60 and len(splits.val) == 15
    assert Counter(splits.train.tensors[1].tolist()) == {c: 6 for c in range(10)}
    assert splits.train.tensors[0].shape[1:] == (1, 14, 14)
    images, _ = _raw(folder, "test")
    pooled = torch.nn.functional.avg_pool2d(torch.from_numpy(images[:1].astype(np.float32)).unsqueeze(1) / 255, 2)
    p = preprocessing("fashion_mnist", str(folder), 14, 0.2, 0.15, 0, 60)
    expected = (pooled - p.mean[0]) / p.std[0]
    assert torch.allclose(splits.test.tensors[0][:1], expected, atol=1e-6)
    assert p.labels[0] == "T-shirt/top" and p.resize == "average_pool"
    with pytest.raises(DataError, match="train_subset=500 is more than the 160"):
        load_data("fashion_mnist", str(folder), val_fraction=0.2, train_subset=500)


def test_plain_idx_files_work_too(tmp_path):
    plain = write_tiny_fashion_mnist(tmp_path / "plain", train=40, test=10, gz=False)
    assert len(load_data("fashion_mnist", str(plain), val_fraction=0.25).test) == 10


def _corrupt(tmp_path, name: str, damage) -> str:
    root = write_tiny_fashion_mnist(tmp_path / name, train=40, test=10)
    damage(root)
    return str(root)


def _truncate(root):
    path = root / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-40])  # a cut gzip stream


def _short_data(root):
    path = root / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-100]))  # the header says more


def _bad_deflate(root):
    path = root / "t10k-images-idx3-ubyte.gz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2:len(data) // 2 + 100] = bytes(100)  # damaged compressed data, whole length
    path.write_bytes(bytes(data))


def _bad_label(root):
    path = root / "train-labels-idx1-ubyte.gz"
    data = bytearray(gzip.decompress(path.read_bytes()))
    data[-1] = 12
    path.write_bytes(gzip.compress(bytes(data)))


def _not_idx(root):
    (root / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"<html>not found</html>"))


def _count_mismatch(root):
    path = root / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(struct.pack(">BBBBI", 0, 0, 8, 1, 9) + bytes(9)))


@pytest.mark.parametrize("damage, fragment", [
    (_truncate, "unreadable or truncated"), (_bad_deflate, "unreadable or truncated"),
    (_short_data, "truncated or corrupt"), (_bad_label, "label 12"),
    (_not_idx, "not an IDX file"), (_count_mismatch, "10 images but 9 labels")])
def test_a_damaged_file_is_one_line_before_any_work(tmp_path, damage, fragment):
    root = _corrupt(tmp_path, damage.__name__, damage)
    out = tmp_path / "out"
    status, _, err = run_cli("search", f"output_dir={out}", "data=fashion_mnist", f"data.path={root}",
                             "train.num_workers=0")
    assert status == 2 and len(err.strip().splitlines()) == 1 and fragment in err, err
    assert not out.exists(), "nothing may be written before the check"


def test_a_missing_package_names_it_and_the_path(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "DEFAULT_PATH", str(tmp_path / "not-installed"))
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist.*data.path"):
        describe("fashion_mnist")
    status, _, err = run_cli("search", f"output_dir={tmp_path / 'out'}", "data=fashion_mnist")
    assert status == 2 and "dataset-fashion-mnist" in err and str(tmp_path / "not-installed") in err
    partial = write_tiny_fashion_mnist(tmp_path / "partial", train=20, test=10)
    (partial / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        describe("fashion_mnist", str(partial))
    whole = write_tiny_fashion_mnist(tmp_path / "whole", train=20, test=10)
    with pytest.raises(DataError, match="28 .* or 14"):
        describe("fashion_mnist", str(whole), input_size=20)


def test_a_search_on_fashion_mnist_exports_its_preprocessing(folder, tmp_path):
    status, stdout, err = run_cli("search", f"output_dir={tmp_path}", "name=f", "data=fashion_mnist",
                                  f"data.path={folder}", "model.input_size=14", "data.train_subset=100",
                                  "train.num_workers=0", "train.epochs=2", "space=int", "data.batch_size=32")
    assert status == 0, err
    status, _, err = run_cli("export", "f", f"output_dir={tmp_path}", "--to", str(tmp_path / "export"))
    assert status == 0, err
    import json

    spec = json.loads((tmp_path / "export" / "assignment.json").read_text())
    steps = spec["input"]["preprocessing"]
    assert steps["labels"][9] == "Ankle boot" and steps["input_size"] == 14 and steps["resize"] == "average_pool"


@pytest.mark.parametrize("size", [28, 14])
def test_macs_of_fliqs_models_at_fashion_resolutions_counted_by_hand(size):
    """fliqs_cnn: conv 1->32 3x3 at s x s, conv 32->64 3x3 stride 2 at s/2, conv 64->64 3x3 at s/2, linear 64->10.
    fliqs_resnet: the stem 1->16 at s, stage i of two basic blocks (16, 32, 64 channels at s, s/2, s/4), 1x1
    projections where the shape changes, linear 64->10."""
    from fliqs.models.registry import create_model
    from fliqs.quant.cost import measure_layers

    h = size // 2
    cnn = {"features.0": size * size * 32 * 1 * 9, "features.3": h * h * 64 * 32 * 9,
           "features.6": h * h * 64 * 64 * 9, "head": 64 * 10}
    shapes = measure_layers(create_model("fliqs_cnn", num_classes=10, in_chans=1), size, 1)
    assert {s.name: s.macs for s in shapes} == cnn
    s1, s2, s3 = size, -(-size // 2), -(-size // 4)
    expected = (s1 * s1 * 16 * 9  # stem
                + 4 * s1 * s1 * 16 * 16 * 9  # stage 1: two blocks of two 16->16 convs
                + s2 * s2 * 32 * 16 * 9 + 3 * s2 * s2 * 32 * 32 * 9 + s2 * s2 * 32 * 16  # stage 2 and projection
                + s3 * s3 * 64 * 32 * 9 + 3 * s3 * s3 * 64 * 64 * 9 + s3 * s3 * 64 * 32  # stage 3 and projection
                + 64 * 10)
    resnet = measure_layers(create_model("fliqs_resnet", num_classes=10, in_chans=1), size, 1)
    assert sum(s.macs for s in resnet) == expected and len(resnet) == 16  # stem, 12 block convs, 2 projections, head


def test_a_train_subset_larger_than_the_data_is_refused_before_any_work(folder, tmp_path):
    status, _, err = run_cli("search", f"output_dir={tmp_path / 'out'}", "data=fashion_mnist", f"data.path={folder}",
                             "data.train_subset=5000", "train.num_workers=0")
    assert status == 2 and "data.train_subset=5000 is more than the 170" in err and len(err.splitlines()) == 1
    status, _, err = run_cli("search", f"output_dir={tmp_path / 'out'}", "data=fashion_mnist", f"data.path={folder}",
                             "data.train_subset=20", "train.num_workers=0")  # 20 train, 4 validation images
    assert status == 2 and "fewer than the 10 classes" in err
    status, _, err = run_cli("search", f"output_dir={tmp_path / 'out'}", "data.train_subset=50")  # digits
    assert status == 2 and "train_subset is for fashion_mnist, cifar10" in err
    assert not (tmp_path / "out").exists()
