"""A searchable MobileNetV2-style supernet for FLIQNAS (joint architecture and format search), and extraction.

Each searchable inverted-residual block chooses a depthwise kernel size (3, 5, 7) and an expansion ratio (3, 6),
and, where the stage allows (stride 1, same channels in and out), may be skipped (expansion 0: identity). All
choices of a block share one set of weights (TuNAS / Once-for-All style):

* a ``k x k`` depthwise kernel is the centre ``k x k`` crop of the largest kernel;
* an expansion ratio ``e`` uses the first ``in_channels * e`` channels of the expansion conv, its BatchNorm, the
  depthwise conv and the projection's inputs.

The convs are `ElasticConv2d`: an ``nn.Conv2d`` holding the largest weights whose *active* slice is set per step.
`fliqs.quant.layers.QuantLayer` quantizes the active slice (``active_weight``), so per-channel scales and the cost model
(`fliqs.quant.cost.measure_layers`) see exactly the layer that runs. `extract` turns a supernet at one architecture into
a standalone model of plain ``nn.Conv2d``/``nn.BatchNorm2d`` blocks (skipped blocks become ``nn.Identity``) with the
same layer names, weights, formats and calibration: it computes the same function, without retraining.

An architecture is written ``"k3e6,k5e3,skip,..."``: one entry per searchable block, in model order.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fliqs.errors import BadInput
from fliqs.quant.layers import QuantLayer, replace_module

KERNELS = (3, 5, 7)
EXPANSIONS = (3, 6)
SKIP = 0  # the expansion ratio of a skipped block (the block is an identity)

# Stages as (expansion of the fixed default, output channels, blocks, stride), MobileNetV2's table. The first stage
# (expansion 1: no expansion conv) is fixed, as in ProxylessNAS / TuNAS search spaces; later blocks are searchable.
STAGES = {
    "mbv2": ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
             (6, 320, 1, 1)),
    # For 8x8 digits on CPUs: a strided stem (4x4), then four stages at 4x4 and 2x2.
    "digits": ((1, 8, 1, 1), (6, 16, 2, 1), (6, 24, 2, 2), (6, 32, 2, 1)),
}
STEM = {"mbv2": (32, 2, 1280), "digits": (16, 2, 128)}  # stem channels, stem stride, head channels
DEFAULT_CHOICE = (3, 6)  # MobileNetV2 itself: 3x3 depthwise, expansion 6, no block skipped


@dataclass(frozen=True)
class BlockChoice:
    kernel: int
    expansion: int  # SKIP: the block is an identity

    @property
    def label(self) -> str:
        return "skip" if self.expansion == SKIP else f"k{self.kernel}e{self.expansion}"


def make_divisible(v: float, divisor: int = 8) -> int:
    """MobileNet's channel rounding for width multipliers (never more than 10 % below ``v``)."""
    out = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * v else out


class ElasticConv2d(nn.Conv2d):
    """A conv holding the largest weights; the active kernel size and channel counts are set per step.

    The active weight is ``weight[:out, :in, c:c+k, c:c+k]`` with ``c`` centring the kernel; a depthwise conv's
    active input and output channels are the same. Padding follows the active kernel (``k // 2``), so the output
    resolution does not depend on the choice.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
                 depthwise: bool = False):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2,
                         groups=in_channels if depthwise else 1, bias=False)
        self.depthwise = depthwise
        self.active_in, self.active_out, self.active_kernel = in_channels, out_channels, kernel_size

    def set_active(self, in_channels: int | None = None, out_channels: int | None = None,
                   kernel: int | None = None) -> None:
        self.active_in = in_channels or self.active_in
        self.active_out = out_channels or self.active_out
        self.active_kernel = kernel or self.active_kernel
        if self.depthwise:
            self.active_in = self.active_out = out_channels or in_channels or self.active_out

    def active_weight(self) -> torch.Tensor:
        cut = (self.kernel_size[0] - self.active_kernel) // 2
        weight = self.weight[:self.active_out, :1 if self.depthwise else self.active_in]
        return weight[:, :, cut:cut + self.active_kernel, cut:cut + self.active_kernel] if cut else weight

    def forward_with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, weight, None, self.stride, self.active_kernel // 2, 1,
                        self.active_out if self.depthwise else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_weight(x, self.active_weight())

    def to_conv(self) -> nn.Conv2d:
        """A plain conv of the active shape with a copy of the active weight."""
        weight = self.active_weight()
        conv = nn.Conv2d(weight.shape[1] * (self.active_out if self.depthwise else 1), self.active_out,
                         self.active_kernel, self.stride, self.active_kernel // 2,
                         groups=self.active_out if self.depthwise else 1, bias=False)
        conv.weight.data.copy_(weight.detach())
        return conv.to(weight.device)


class ElasticBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over the first ``C`` channels of its parameters and statistics, ``C`` = the input's channels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        if c == self.num_features:
            return super().forward(x)
        momentum = self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if momentum is None:  # a cumulative average (BatchNorm recalibration), as nn.BatchNorm2d computes it
                momentum = 1.0 / float(self.num_batches_tracked)
        # As nn.BatchNorm2d: batch statistics when training or when no statistics are tracked (stateless), and the
        # running ones are updated only when tracked. Slices of them are views: batch_norm updates them in place.
        tracked = not self.training or self.track_running_stats
        return F.batch_norm(x, self.running_mean[:c] if tracked else None, self.running_var[:c] if tracked else None,
                            self.weight[:c], self.bias[:c], self.training or not tracked,
                            0.0 if momentum is None else momentum, self.eps)

    def to_batchnorm(self, channels: int) -> nn.BatchNorm2d:
        bn = nn.BatchNorm2d(channels, eps=self.eps, momentum=self.momentum).to(self.weight.device)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(bn, name).copy_(getattr(self, name)[:channels])
            bn.num_batches_tracked.copy_(self.num_batches_tracked)
        return bn


def _unwrap(module: nn.Module) -> nn.Module:
    """The conv inside a `fliqs.quant.layers.QuantLayer` (or the module itself)."""
    return getattr(module, "layer", module)


class InvertedResidual(nn.Module):
    """A plain MobileNetV2 block: [1x1 expand, BN, ReLU6], kxk depthwise, BN, ReLU6, 1x1 project, BN (+ x)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, kernel: int, expansion: int):
        super().__init__()
        mid = in_channels * expansion
        self.residual = stride == 1 and in_channels == out_channels
        self.expand = nn.Conv2d(in_channels, mid, 1, bias=False) if expansion != 1 else None
        self.bn1 = nn.BatchNorm2d(mid) if expansion != 1 else None
        self.depthwise = nn.Conv2d(mid, mid, kernel, stride, kernel // 2, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.project = nn.Conv2d(mid, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self.bn1(self.expand(x))) if self.expand is not None else x
        h = self.bn3(self.project(F.relu6(self.bn2(self.depthwise(h)))))
        return x + h if self.residual else h


class SearchableBlock(nn.Module):
    """An inverted residual block whose kernel size and expansion ratio (or skipping) are chosen per step."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, kernels: Sequence[int] = KERNELS,
                 expansions: Sequence[int] = EXPANSIONS, allow_skip: bool = True):
        super().__init__()
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.residual = stride == 1 and in_channels == out_channels
        self.kernels = tuple(sorted(kernels))
        self.expansions = ((SKIP,) if allow_skip and self.residual else ()) + tuple(sorted(expansions))
        mid = in_channels * max(expansions)
        self.expand = ElasticConv2d(in_channels, mid, 1)
        self.bn1 = ElasticBatchNorm2d(mid)
        self.depthwise = ElasticConv2d(mid, mid, max(kernels), stride, depthwise=True)
        self.bn2 = ElasticBatchNorm2d(mid)
        self.project = ElasticConv2d(mid, out_channels, 1)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.set_choice(self.default_choice())

    def default_choice(self) -> BlockChoice:
        """MobileNetV2's own choice (3x3, expansion 6), or the nearest this block allows."""
        kernel, expansion = DEFAULT_CHOICE
        return BlockChoice(kernel if kernel in self.kernels else self.kernels[0],
                           expansion if expansion in self.expansions else self.expansions[-1])

    @property
    def options(self) -> list[BlockChoice]:
        """Every distinct choice of this block (a skipped block has one, whatever its kernel)."""
        return [BlockChoice(self.kernels[0], SKIP)] * (SKIP in self.expansions) + [
            BlockChoice(k, e) for e in self.expansions if e != SKIP for k in self.kernels]

    def set_choice(self, choice: BlockChoice) -> None:
        if choice.kernel not in self.kernels or choice.expansion not in self.expansions:
            raise BadInput(f"block choice {choice.label} is not one of kernels {self.kernels} x expansions "
                           f"{self.expansions}")
        self.choice = choice
        if choice.expansion == SKIP:
            return
        mid = self.in_channels * choice.expansion
        _unwrap(self.expand).set_active(out_channels=mid)
        _unwrap(self.depthwise).set_active(out_channels=mid, kernel=choice.kernel)
        _unwrap(self.project).set_active(in_channels=mid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.choice.expansion == SKIP:
            return x
        h = F.relu6(self.bn1(self.expand(x)))
        h = self.bn3(self.project(F.relu6(self.bn2(self.depthwise(h)))))
        return x + h if self.residual else h


class MobileNetV2Like(nn.Module):
    """Stem, blocks, 1x1 head conv, classifier (timm-style ``forward_features`` / ``forward_head``); registered with
    timm as ``fliqnas_mbv2`` and ``fliqnas_digits`` in `fliqs.models.registry`.

    With `SearchableBlock`s it is the supernet; after `extract` every block is an `InvertedResidual` or an
    ``nn.Identity`` and the model is a plain MobileNetV2 variant.
    """

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, preset: str = "mbv2", width_mult: float = 1.0,
                 kernels: Sequence[int] = KERNELS, expansions: Sequence[int] = EXPANSIONS, allow_skip: bool = True,
                 arch: str | None = None):
        super().__init__()
        if preset not in STAGES:
            raise BadInput(f"supernet preset {preset!r} is unknown; valid: {', '.join(STAGES)}")
        bad = [k for k in kernels if k not in KERNELS] + [e for e in expansions if e not in EXPANSIONS]
        if bad or not kernels or not expansions:
            raise BadInput(f"supernet choices {bad or 'empty'}: kernels must be from {KERNELS}, expansions from "
                           f"{EXPANSIONS}")
        self.num_classes = num_classes
        stem, stem_stride, head = STEM[preset]
        channels = make_divisible(stem * width_mult)
        self.stem = nn.Sequential(nn.Conv2d(in_chans, channels, 3, stem_stride, 1, bias=False),
                                  nn.BatchNorm2d(channels), nn.ReLU6(inplace=True))
        blocks: list[nn.Module] = []
        for expansion, out, n, stride in STAGES[preset]:
            out = make_divisible(out * width_mult)
            for i in range(n):
                s = stride if i == 0 else 1
                block = InvertedResidual(channels, out, s, 3, 1) if expansion == 1 else \
                    SearchableBlock(channels, out, s, kernels, expansions, allow_skip)
                blocks.append(block)
                channels = out
        self.blocks = nn.Sequential(*blocks)
        self.num_features = max(head, make_divisible(head * width_mult)) if width_mult > 1 else head
        self.head = nn.Sequential(nn.Conv2d(channels, self.num_features, 1, bias=False),
                                  nn.BatchNorm2d(self.num_features), nn.ReLU6(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(self.num_features, num_classes)
        if arch is not None:
            set_architecture(self, parse_architecture(self, arch))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(x), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# -- architectures: plain data ----------------------------------------------------------------------------------
def searchable_blocks(model: nn.Module) -> list[tuple[str, SearchableBlock]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SearchableBlock)]


def is_supernet(model: nn.Module) -> bool:
    return bool(searchable_blocks(model))


def block_options(model: nn.Module) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """``{block name: (kernels, expansions)}`` of every searchable block (expansion 0: skippable)."""
    return {name: (b.kernels, b.expansions) for name, b in searchable_blocks(model)}


def get_architecture(model: nn.Module) -> dict[str, BlockChoice]:
    return {name: b.choice for name, b in searchable_blocks(model)}


def set_architecture(model: nn.Module, arch: Mapping[str, BlockChoice | str]) -> None:
    """Set blocks' choices: ``{block name: BlockChoice or label ("k5e3", "skip")}``."""
    blocks = dict(searchable_blocks(model))
    unknown = set(arch) - set(blocks)
    if unknown:
        raise BadInput(f"architecture names unknown block(s): {sorted(unknown)}")
    for name, choice in arch.items():
        block = blocks[name]
        block.set_choice(choice if isinstance(choice, BlockChoice) else _from_label(name, block, choice))


def format_architecture(arch: Mapping[str, BlockChoice]) -> str:
    return ",".join(choice.label for choice in arch.values())


_LABEL = re.compile(r"^k(\d+)e(\d+)$")


def parse_architecture(model: nn.Module, text: str) -> dict[str, BlockChoice]:
    """``"k3e6,skip,k5e3"`` (one label per searchable block, in order) as ``{block name: BlockChoice}``."""
    blocks = searchable_blocks(model)
    labels = [s.strip() for s in text.split(",")]
    if len(labels) != len(blocks):
        raise BadInput(f"architecture {text!r} has {len(labels)} entries; the model has {len(blocks)} searchable "
                       f"blocks")
    return {name: _from_label(name, block, label) for (name, block), label in zip(blocks, labels, strict=True)}


def _from_label(name: str, block: SearchableBlock, label: str) -> BlockChoice:
    found = _LABEL.match(label)
    if label != "skip" and not found:
        raise BadInput(f"architecture entry {label!r} is neither 'skip' nor 'k<kernel>e<expansion>'")
    choice = BlockChoice(block.kernels[0], SKIP) if label == "skip" else \
        BlockChoice(int(found.group(1)), int(found.group(2)))
    if choice not in block.options:
        raise BadInput(f"architecture entry {label!r} for {name}: options are "
                       f"{', '.join(o.label for o in block.options)}")
    return choice


# -- extraction --------------------------------------------------------------------------------------------------
def _plain_block(block: SearchableBlock) -> nn.Module:
    """The block at its current choice as an `InvertedResidual` (weights, statistics, quantizers copied)."""
    choice = block.choice
    if choice.expansion == SKIP:
        return nn.Identity()
    mid = block.in_channels * choice.expansion
    plain = InvertedResidual(block.in_channels, block.out_channels, block.stride, choice.kernel, choice.expansion)
    for name in ("expand", "depthwise", "project"):
        setattr(plain, name, _plain_conv(getattr(block, name)))
    plain.bn1, plain.bn2 = block.bn1.to_batchnorm(mid), block.bn2.to_batchnorm(mid)
    plain.bn3 = copy.deepcopy(block.bn3)
    return plain


def _plain_conv(module: nn.Module) -> nn.Module:
    if isinstance(module, QuantLayer):
        return module.rewrap(module.layer.to_conv())
    return module.to_conv()


def extract(model: nn.Module, arch: Mapping[str, BlockChoice] | None = None) -> nn.Module:
    """A standalone copy of ``model`` at ``arch`` (default: its current architecture) with no supernet left.

    Searchable blocks become plain `InvertedResidual`s of the chosen shape (or ``nn.Identity`` when skipped),
    holding copies of the active weights, BatchNorm statistics and quantizers (formats and calibrated ranges).
    Layer names are unchanged, so an assignment of the supernet applies to it as it is. ``model`` is not changed.
    """
    standalone = copy.deepcopy(model)
    if arch is not None:
        set_architecture(standalone, arch)
    for name, block in searchable_blocks(standalone):
        replace_module(standalone, name, _plain_block(block))
    return standalone


def measure_architectures(model: nn.Module, input_size: int, in_chans: int):
    """The `fliqs.quant.cost.ArchShapes` of a supernet: one batch-1 forward per option (at most 7), then pure data."""
    from fliqs.quant.cost import ArchShapes, measure_layers

    blocks = searchable_blocks(model)
    saved = get_architecture(model)
    options: dict[str, dict[str, tuple]] = {name: {} for name, _ in blocks}
    segments: list = []
    try:
        labels = {o.label: o for _, b in blocks for o in b.options}
        for label in labels:
            set_architecture(model, {name: labels[label] for name, b in blocks if labels[label] in b.options})
            shapes = measure_layers(model, input_size, in_chans)
            for name, b in blocks:
                if labels[label] in b.options:
                    options[name][label] = tuple(s for s in shapes if s.name.startswith(f"{name}."))
            if not segments and labels[label].expansion != SKIP:  # every block runs: the model's layer order
                for s in shapes:
                    owner = next((name for name, _ in blocks if s.name.startswith(f"{name}.")), None)
                    if owner is None:
                        segments.append(s)
                    elif owner not in segments:
                        segments.append(owner)
    finally:
        set_architecture(model, saved)
    return ArchShapes(tuple(segments), options, {name: choice.label for name, choice in saved.items()})
