"""Models by name: fliqs' own registry (the small CNN and ResNet for the embedded digits data set, ResNet-18 with the
CIFAR stem, the FLIQNAS supernets of `fliqs.models.supernet`), then timm's for every other name.

``create_model`` is the one way to build a model (``pretrained=False`` for timm's: nothing is downloaded), so a
user's model name works the same in `fliqs cost`, `fliqs search` and the study runner. timm is imported only when a
timm model is asked for: with torchvision it adds a noticeable import time to every process beyond torch's own
(benchmarks/RESULTS.md, issue 11), and every Ray Train worker and Ray Tune trial builds its model in a fresh process.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from fliqs.errors import BadInput
from fliqs.models.supernet import MobileNetV2Like


class DigitsCNN(nn.Module):
    """A small CNN for 8x8 digits (timm-style: ``forward_features`` / ``forward_head``).

    Three 3x3 convs (the middle one strided) and a linear classifier: small enough for 2 CPU cores, deep
    enough that layers differ in their sensitivity to the format.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1, width: int = 32):
        super().__init__()
        self.num_classes = num_classes
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2 * width, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(x), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 convs with BatchNorm, a 1x1 projection where the shape changes."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample = None if stride == 1 and in_ch == out_ch else nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.downsample is None else self.downsample(x)
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + skip)


class DigitsResNet(nn.Module):
    """A small ResNet for 8x8 digits: stem, three stages of two basic blocks (8x8, 4x4, 2x2), classifier.

    16 quantized layers (stem, 12 block convs, 2 projections, the head) whose MACs span two orders of magnitude,
    so mixed precision has room to matter and a study can separate search methods on 2 CPU cores.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1, width: int = 16):
        super().__init__()
        self.num_classes = num_classes
        self.stem = nn.Sequential(nn.Conv2d(in_chans, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        blocks, ch = [], width
        for out_ch, stride in ((width, 1), (2 * width, 2), (4 * width, 2)):
            blocks += [BasicBlock(ch, out_ch, stride), BasicBlock(out_ch, out_ch, 1)]
            ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(ch, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(x), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def cifar_resnet18(num_classes: int = 10, in_chans: int = 3, **kwargs) -> nn.Module:
    """timm's ResNet-18 with the stem CIFAR results are reported on: a 3x3 stride-1 convolution and no max-pool, so
    the four stages run at 32, 16, 8 and 4 px (0.556 GMACs at 32 px; ImageNet's 7x7/2 stem and pool leave 1 px at the
    last stage and 0.037 GMACs)."""
    import timm

    model = timm.create_model("resnet18", pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
    model.conv1 = nn.Conv2d(in_chans, model.conv1.out_channels, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


@dataclass(frozen=True)
class ModelEntry:
    """One of fliqs' own models: its builder and the input it is made for."""

    build: Callable[..., nn.Module]  # build(num_classes=..., in_chans=..., **model.kwargs)
    input_size: int  # native resolution (`default_input_size`)
    in_chans: int
    supernet: bool = False  # its blocks are searchable (`fliqs.models.supernet`)


MODELS: dict[str, ModelEntry] = {
    "fliqs_cnn": ModelEntry(DigitsCNN, 8, 1),  # the embedded digits' CNN
    "fliqs_resnet": ModelEntry(DigitsResNet, 8, 1),  # a small ResNet for digits (16 quantized layers)
    "resnet18_cifar": ModelEntry(cifar_resnet18, 32, 3),  # timm's ResNet-18 with the CIFAR stem
    # The FLIQNAS supernets: MobileNetV2's stage table (MobileNetV2 at its default choice), and one for digits
    "fliqnas_mbv2": ModelEntry(partial(MobileNetV2Like, preset="mbv2"), 224, 3, supernet=True),
    "fliqnas_digits": ModelEntry(partial(MobileNetV2Like, preset="digits"), 8, 3, supernet=True),
}


class UnknownModelError(BadInput):
    pass


def check_model_name(name: str) -> None:
    if name in MODELS:
        return
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, [*MODELS, *timm.list_models()], n=5, cutoff=0.6)
        hint = (f"; did you mean: {', '.join(close)}" if close else
                f"; fliqs' models are {', '.join(MODELS)}, timm's are listed by timm.list_models()")
        raise UnknownModelError(f"unknown model {name!r}{hint}")


def create_model(name: str, num_classes: int | None = None, in_chans: int | None = None, **kwargs) -> nn.Module:
    """One of fliqs' models, else ``timm.create_model(name, pretrained=False, ...)``; a clear error and close
    matches for bad names.

    Extra ``kwargs`` (``model.kwargs`` in the config) go to the model's constructor; ones it does not take are a
    one-line error.
    """
    check_model_name(name)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if in_chans is not None:
        kwargs["in_chans"] = in_chans
    try:
        if name not in MODELS:
            import timm

            return timm.create_model(name, pretrained=False, **kwargs)
        entry = MODELS[name]
        model = entry.build(**kwargs)
        # timm's own record of a model's input, read by `default_input_size` for timm's and fliqs' models alike
        model.pretrained_cfg = {"input_size": (kwargs.get("in_chans", entry.in_chans), entry.input_size,
                                               entry.input_size), "num_classes": model.num_classes}
        return model
    except TypeError as err:
        if "keyword argument" not in str(err):
            raise
        raise BadInput(f"model {name!r}: {str(err).splitlines()[0]} (from model.kwargs)") from None


def is_supernet_name(name: str) -> bool:
    """Whether the registered model ``name`` is a FLIQNAS supernet (known without building it)."""
    return name in MODELS and MODELS[name].supernet


def default_input_size(model: nn.Module) -> int:
    """The model's native input resolution (224 for ImageNet models, 8 for fliqs_cnn)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    return int(cfg.get("input_size", (3, 224, 224))[-1])


def input_channels(model: nn.Module) -> int:
    """Channels the model expects: those of its first convolution (3 when it has none)."""
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return first.in_channels if first is not None else 3
