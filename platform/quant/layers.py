"""Quantizing wrappers for conv and linear layers, and the model surgery that installs them.

A `QuantLayer` wraps any ``nn.Conv2d`` or ``nn.Linear`` (timm's ``Conv2dSame``, ``StdConv2d`` and ``Linear``
included) and calls the wrapped module's *own* forward with the fake-quantized weight substituted
(``torch.func.functional_call``), so padding rules, weight standardisation and dtype handling of the original
class are kept. Its weight and activation formats live in buffers (`fliqs.quant.rounding.format_tensor`):
`QuantLayer.set_formats` copies new values in place, so the format can change at every step without new
parameters and without recompiling a compiled model.

Block-scaled formats (MX, NVFP4) take their blocks along the reduction axis: a weight's input side (in_channels x
kh x kw of a conv, flattened in that order; in_features of a linear), an activation's channels. A quantizer builds
that path once it may hold such a format (``blocked``: set by `quantize_model` for a model whose formats include
one, or by the first `FormatQuantizer.set_format` to one); then every format of that quantizer runs through it, so
switching between block-scaled and other formats still compiles to one graph.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from fliqs.errors import BadInput
from fliqs.quant.formats import FULL_PRECISION, Format, format_pair, get_format
from fliqs.quant.policy import NO_CLIP, ActClip, ClipPolicy, RangeMode, WeightClip
from fliqs.quant.rounding import (
    amax_per_channel,
    amax_per_tensor,
    blocks_last,
    blocks_restore,
    cached_format_tensor,
    fake_quantize,
    format_tensor,
    mse_clip_amax,
    percentile_amax,
)


class FormatQuantizer(nn.Module):
    """Fake-quantizes a tensor into the format held in its ``fmt`` buffer.

    ``per_channel_axis`` set: one scale per slice along that axis (weights: output channels). Otherwise one scale
    per tensor (activations), dynamic or EMA-calibrated. A block-scaled format replaces that scale by one per block
    along the reduction axis: a weight's flattened input side, or ``channel_axis`` of an activation.
    """

    def __init__(self, fmt: Format | str = FULL_PRECISION, per_channel_axis: int | None = None,
                 range_mode: RangeMode | str = RangeMode.dynamic, momentum: float = 0.9, clip: ClipPolicy = NO_CLIP,
                 channel_axis: int = 1, blocked: bool = False):
        super().__init__()
        self.per_channel_axis = per_channel_axis
        self.channel_axis = channel_axis
        # Builds the block-scale path (module docstring); never turned off.
        self.blocked = blocked or get_format(fmt).block is not None
        self.range_mode = RangeMode(range_mode)
        self.momentum = momentum
        self.clip = clip
        self.track_range = True  # False: a training-mode forward uses the batch's range without updating the EMA
        # Set by the calibration pass (`fliqs.training.evaluation.recalibrate`): batches seen so far, for a cumulative
        # average of their ranges in place of the EMA.
        self.calibrated_batches: int | None = None
        self.format = get_format(fmt)
        # Non-persistent: the sampled format is search state, not model state; checkpoints stay format-free.
        self.register_buffer("fmt", format_tensor(self.format), persistent=False)
        self.register_buffer("clip_on", torch.tensor(float(clip.applies(self.format))), persistent=False)
        self.register_buffer("running_amax", torch.zeros((), dtype=torch.float32))

    @property
    def clips(self) -> bool:
        """Whether this quantizer's policy clips at all (weights: MSE; activations: percentile)."""
        return self.clip.weight is WeightClip.mse if self.per_channel_axis is not None else \
            self.clip.act is ActClip.percentile

    def set_format(self, fmt: Format | str) -> None:
        fmt = get_format(fmt)
        self.blocked = self.blocked or fmt.block is not None
        if fmt is not self.format:
            self.fmt.copy_(cached_format_tensor(fmt, self.fmt.device))
            self.clip_on.fill_(float(self.clip.applies(fmt)))
            self.format = fmt

    def _batch_amax(self, x: torch.Tensor) -> torch.Tensor:
        """The range of this tensor: the max, or the clipped range when the policy clips the current format."""
        if self.per_channel_axis is not None:
            amax = amax_per_channel(x, self.per_channel_axis)
            return torch.where(self.clip_on > 0, mse_clip_amax(x, amax, self.fmt, self.per_channel_axis), amax) \
                if self.clips else amax
        amax = amax_per_tensor(x)
        return torch.where(self.clip_on > 0, percentile_amax(x, self.clip.percentile), amax) if self.clips else amax

    def amax(self, x: torch.Tensor) -> torch.Tensor:
        """The range ``x`` is scaled into the format by: per channel for weights; for activations the batch's, or in
        ``ema`` mode tracked while training and the calibrated one in evaluation."""
        if self.per_channel_axis is not None:
            return self._batch_amax(x)
        if self.range_mode is RangeMode.ema:
            if self.training:
                amax = self._batch_amax(x)
                if not self.track_range:
                    return amax
                with torch.no_grad():
                    if self.calibrated_batches is not None:  # the calibration pass: a cumulative average
                        self.calibrated_batches += 1
                        self.running_amax.add_((amax - self.running_amax) / self.calibrated_batches)
                        return amax
                    seen = self.running_amax > 0
                    self.running_amax.copy_(torch.where(
                        seen, self.momentum * self.running_amax + (1 - self.momentum) * amax, amax))
                return amax
            return self.running_amax
        return self._batch_amax(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantize(x, self.amax(x), self.fmt, self.blocked)

    def quantize(self, x: torch.Tensor, amax: torch.Tensor, fmt: torch.Tensor, blocked: bool = False) -> torch.Tensor:
        """``x`` fake-quantized into the format buffer ``fmt`` (this quantizer's or a candidate's, as the relaxed
        searches do) at range ``amax``, laid out as this quantizer lays its blocks out when ``blocked``."""
        if not blocked:
            return fake_quantize(x, amax, fmt)
        axis = None if self.per_channel_axis is not None else self.channel_axis  # None: a weight's input side
        rows = blocks_last(x, axis)
        amax = amax.flatten(1) if amax.dim() > 1 else amax  # per-channel [O, 1, ...] -> [O, 1] beside the rows
        return blocks_restore(fake_quantize(rows, amax, fmt, blocked=True), x, axis)

    def extra_repr(self) -> str:
        axis = f"per_channel_axis={self.per_channel_axis}" if self.per_channel_axis is not None else "per_tensor"
        clip = f", clip={'mse' if self.per_channel_axis is not None else 'percentile'}" if self.clips else ""
        return f"{self.format.name}, {axis}, range={self.range_mode.value}{clip}"


QUANTIZABLE = (nn.Conv2d, nn.Linear)


class QuantLayer(nn.Module):
    """A conv/linear layer whose weights (per output channel) and input activations (per tensor) are quantized."""

    def __init__(self, layer: nn.Module, name: str, range_mode: RangeMode | str = RangeMode.dynamic,
                 clip: ClipPolicy = NO_CLIP, blocked: bool = False):
        super().__init__()
        if not isinstance(layer, QUANTIZABLE):
            raise TypeError(f"{name}: cannot quantize {type(layer).__name__}; expected Conv2d or Linear")
        self.layer = layer
        self.name = name
        self.pinned = False
        self.weight_quant = FormatQuantizer(per_channel_axis=0, clip=clip, blocked=blocked)
        # A conv's input has its channels at dim 1, a linear's last.
        self.act_quant = FormatQuantizer(range_mode=range_mode, clip=clip, blocked=blocked,
                                         channel_axis=1 if isinstance(layer, nn.Conv2d) else -1)

    @property
    def kind(self) -> str:
        return "conv" if isinstance(self.layer, nn.Conv2d) else "linear"

    @property
    def w_format(self) -> Format:
        return self.weight_quant.format

    @property
    def a_format(self) -> Format:
        return self.act_quant.format

    def set_formats(self, w_format: Format | str, a_format: Format | str | None = None) -> None:
        """Set the weight format and the activation format (the weight format when not given)."""
        self.weight_quant.set_format(w_format)
        self.act_quant.set_format(w_format if a_format is None else a_format)

    def rewrap(self, layer: nn.Module) -> QuantLayer:
        """A QuantLayer around ``layer`` with this one's name, formats and calibrated activation range."""
        clone = QuantLayer(layer, self.name, self.act_quant.range_mode, self.act_quant.clip,
                           self.weight_quant.blocked or self.act_quant.blocked)
        clone.set_formats(self.w_format, self.a_format)
        clone.pinned = self.pinned
        clone.act_quant.momentum = self.act_quant.momentum
        clone.act_quant.running_amax.copy_(self.act_quant.running_amax)
        return clone.to(self.act_quant.running_amax.device)

    def source_weight(self) -> torch.Tensor:
        """The weight that runs, before quantization. An elastic layer (`fliqs.models.supernet.ElasticConv2d`) runs a
        slice of its parameter: quantizing that slice gives the per-channel scales of the layer that runs (and of the
        standalone model extracted from it)."""
        layer = self.layer
        return layer.active_weight() if hasattr(layer, "active_weight") else layer.weight

    def run(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The wrapped layer on ``x`` with ``weight`` in place of its own (every search's layer forward uses it)."""
        layer = self.layer
        if hasattr(layer, "forward_with_weight"):
            return layer.forward_with_weight(x, weight)
        # A class that keeps torch's own forward is called through the functional op it would call (no
        # parameter swapping); any override (timm's Conv2dSame, StdConv2d, Linear) runs with the weight swapped.
        if type(layer).forward is nn.Conv2d.forward:
            return layer._conv_forward(x, weight, layer.bias)
        if type(layer).forward is nn.Linear.forward:
            return F.linear(x, weight, layer.bias)
        return torch.func.functional_call(layer, {"weight": weight}, (x,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_quant(self.source_weight())
        return self.run(self.act_quant(x), weight)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, w={self.w_format.name}, a={self.a_format.name}" + (
            ", pinned" if self.pinned else "")


def _matches(name: str, patterns: Iterable[str]) -> str | None:
    return next((p for p in patterns if fnmatch.fnmatchcase(name, p)), None)


def quantize_model(model: nn.Module, *, default: Format | str = FULL_PRECISION,
                   pinned: Mapping[str, str] | None = None, range_mode: RangeMode | str = RangeMode.dynamic,
                   exclude: Iterable[str] = (), clip: ClipPolicy = NO_CLIP, blocked: bool = False) -> list[QuantLayer]:
    """Replace every conv/linear of ``model`` in place by a `QuantLayer`; return them in module order.

    Layer names are the module names of the original model (``"conv1"``, ``"layer1.0.conv2"``, ``"fc"``), so
    they are stable across runs. ``pinned`` maps name patterns (fnmatch) to a format that the layer keeps (a
    search never changes it); ``exclude`` patterns leave layers unwrapped (full precision, not counted as
    quantizable); ``blocked``: the quantizers build the block-scale path from the start (the model's formats include
    a block-scaled one). Calling it twice on the same model returns the existing layers.
    """
    pinned = dict(pinned or {})
    for fmt in pinned.values():
        get_format(fmt)
    existing = [m for m in model.modules() if isinstance(m, QuantLayer)]
    if existing:
        return existing
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, QUANTIZABLE) and not _matches(name, exclude)]
    unused = [p for p in pinned if not any(fnmatch.fnmatchcase(n, p) for n, _ in targets)]
    if unused:
        raise BadInput(f"pinned pattern(s) {unused} match no conv/linear layer; layers: "
                         f"{', '.join(n for n, _ in targets[:8])}{', ...' if len(targets) > 8 else ''}")
    layers = []
    for name, module in targets:
        qlayer = QuantLayer(module, name, range_mode, clip, blocked)
        pattern = _matches(name, pinned)
        qlayer.set_formats(pinned[pattern] if pattern else default)
        qlayer.pinned = pattern is not None
        replace_module(model, name, qlayer)
        layers.append(qlayer)
    return layers


def replace_module(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put ``module`` where the submodule called ``name`` is (the one way fliqs rewrites a model); returns the old."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, module)
    return old


def quant_layers(model: nn.Module) -> list[QuantLayer]:
    return [m for m in model.modules() if isinstance(m, QuantLayer)]


def set_assignment(layers: Iterable[QuantLayer], assignment: Mapping[str, str | tuple[str, str]]) -> None:
    """Apply ``{layer name: format}`` or ``{layer name: (weight format, activation format)}``; pinned layers
    keep their format, unknown names raise."""
    by_name = {layer.name: layer for layer in layers}
    unknown = set(assignment) - set(by_name)
    if unknown:
        raise BadInput(f"assignment names unknown layer(s): {sorted(unknown)}")
    for name, fmt in assignment.items():
        layer = by_name[name]
        if layer.pinned:
            continue
        layer.set_formats(*format_pair(fmt))


def get_assignment(layers: Iterable[QuantLayer]) -> dict[str, dict[str, str]]:
    return {layer.name: {"w": layer.w_format.name, "a": layer.a_format.name} for layer in layers}
