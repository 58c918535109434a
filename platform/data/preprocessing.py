"""What a raw input goes through before the network, as data: what an exported model carries (model.py's
``preprocess``, the ONNX graph's metadata), so that a user without fliqs can classify a raw image.

`preprocessing` describes the evaluation pipeline of `fliqs.data.datasets` for a data set: scale the raw pixel
values, resize (and centre-crop) to the model's input size, normalise per channel, and name the labels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from fliqs.data import datasets, fashion_mnist

CIFAR10_LABELS = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass(frozen=True)
class Preprocessing:
    """Raw image -> network input: ``x = (resize(raw / divide_by) - mean) / std``, channels first."""

    raw: str  # what a raw image is
    channels: int  # 1: gray (H x W), 3: RGB (H x W x 3)
    channel_order: str
    divide_by: float  # raw values are divided by this first (the data's full scale: 16 for digits, 255 for images)
    # "bilinear" to input_size (digits), "average_pool" (2 x 2, Fashion-MNIST at 14), "none", or
    # "shorter_side_then_center_crop" (the shorter side to resize_to, then the centre input_size, as torchvision's
    # Resize and CenterCrop do)
    resize: str
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    labels: tuple[str, ...]
    resize_to: int | None = None

    def describe(self) -> dict:
        return {**asdict(self), "steps": f"x / {self.divide_by:g}, {self.resize} to {self.input_size} px, "
                                         f"(x - mean) / std per channel"}


def preprocessing(name: str, path: str | None = None, input_size: int | None = None, val_fraction: float = 0.15,
                  test_fraction: float = 0.15, seed: int = 0, train_subset: int | None = None) -> Preprocessing:
    """The evaluation pipeline of data set ``name`` as `fliqs.data.datasets` applies it (digits and Fashion-MNIST:
    the statistics of the run's own training split, so the same fractions, subset and seed as the run)."""
    info = datasets.describe(name, path, input_size)
    size = info.input_size
    if name == "digits":
        *_, mean, std = datasets._digits(input_size, val_fraction, test_fraction, seed)
        return Preprocessing("8 x 8 gray levels 0..16, as sklearn.datasets.load_digits().images", 1, "gray",
                             datasets.DIGITS_RAW_RANGE, "bilinear", size, (mean,), (std,),
                             tuple(str(d) for d in range(10)))
    if name == "fashion_mnist":
        *_, mean, std = datasets.fashion_mnist_statistics(path, input_size, val_fraction, seed, train_subset)
        return Preprocessing("28 x 28 gray levels 0..255 (uint8), as the IDX files hold them", 1, "gray",
                             fashion_mnist.RAW_RANGE, "average_pool" if size != fashion_mnist.NATIVE_SIZE else "none",
                             size, (mean,), (std,), fashion_mnist.CLASSES)
    if name == "cifar10":
        return Preprocessing("32 x 32 x 3 uint8 RGB, as CIFAR-10's python batches hold them", 3, "RGB", 255,
                             "shorter_side_then_center_crop", size, datasets.CIFAR10_MEAN, datasets.CIFAR10_STD,
                             CIFAR10_LABELS, datasets.eval_resize(size))
    classes = tuple(datasets._class_folders(path, name))
    return Preprocessing("H x W x 3 uint8 RGB (a decoded image file)", 3, "RGB", 255,
                         "shorter_side_then_center_crop", size, datasets.IMAGENET_MEAN, datasets.IMAGENET_STD, classes,
                         datasets.eval_resize(size))
