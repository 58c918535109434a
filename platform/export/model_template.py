"""The template of the ``model.py`` that ``fliqs export`` writes. fliqs reads this file as text and never imports it.

`fliqs.export.pytorch` makes model.py from it: this docstring gives way to model.py's own, the text after the
line "model.py's docstring ..." below with its ``{fields}`` filled (the run's title, the export format, the input
shape, the evaluation batch size). Everything after this docstring is copied as it stands, except five placeholder
lines, which the exporter replaces (each must occur exactly once):

* ``FORMATS = {}  # filled by fliqs export``: every fliqs format as its format buffer
  (`fliqs.quant.rounding.format_tensor`: max_value, 2**man_bits, 2**emin, scaled, MX blocks, NVFP4 blocks, 2**emax);
* ``PREPROCESSING = {}  # filled by fliqs export``: what a raw input goes through before the network
  (`fliqs.data.datasets.Preprocessing`), the label names included;
* the import of ``fliqs.quant.rounding``: the source of the rounding functions and the constants they read, copied
  verbatim with ``inspect.getsource``, so that model.py rounds as fliqs does and needs only PyTorch (in this file
  the import defines the names the classes below call);
* ``# filled by fliqs export: the modules`` in ``Network.__init__``: one ``self._put`` / ``self._put_tensor`` line
  per module and tensor of the traced network;
* ``# filled by fliqs export: forward``: the traced network's ``forward``, the code ``torch.fx`` generates.

model.py's docstring, its {fields} filled by fliqs export:
{title}: exported by fliqs ({export_format}); needs only PyTorch.

    import importlib.util
    spec = importlib.util.spec_from_file_location("model", "<export folder>/model.py")
    model = importlib.util.module_from_spec(spec); spec.loader.exec_module(model)
    net = model.load()            # weights.pt and assignment.json beside this file; evaluation mode, CPU
    x = model.preprocess(raw)     # raw images as the data set stores them -> N x {in_chans} x {size} x {size} float32
    labels = model.label_names(net(x))

preprocess() does what fliqs' data pipeline does to an image ({preprocessing}); PREPROCESSING holds it as data.
Every quantized conv / linear fake-quantizes its weight and its input in its format (assignment.json) with fliqs'
own rounding, copied below from fliqs.quant.rounding: round to nearest, ties to even, saturate; amax mapped to the
format's largest value per output channel (weights) or per tensor (inputs), or, for a block-scaled format (MX,
NVFP4), one scale per block along the input side. The output equals fliqs' model bit for bit on the same batches.
With act_range "ema" an input's range is the calibrated constant: a sample's logits do not depend on its batch;
with "dynamic" it is the batch's own amax (fliqs evaluates in batches of {batch_size}, in order).
"""

from __future__ import annotations

import json
from math import inf, nan  # noqa: F401  (names the traced code may use)
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: F401  (the copied rounding uses it)
from torch import nn

NoneType = type(None)
device = torch.device
_torch_Tensor_ = torch.Tensor

# name: its format buffer (max_value, 2**man_bits, 2**emin, scaled, MX blocks, NVFP4 blocks, 2**emax)
FORMATS = {}  # filled by fliqs export
PREPROCESSING = {}  # filled by fliqs export

# -- fliqs' rounding (fliqs.quant.rounding), copied verbatim -------------------------------------
from fliqs.quant.rounding import E8M0_BLOCKS, NVFP4_BLOCKS, amax_per_channel, amax_per_tensor, blocks_last, blocks_restore, fake_quantize  # noqa: E402, E501, I001 # filled by fliqs export


def format_tensor(name: str) -> torch.Tensor:
    return torch.tensor(FORMATS[name], dtype=torch.float32)


def _blocked(name: str) -> bool:
    return FORMATS[name][E8M0_BLOCKS] + FORMATS[name][NVFP4_BLOCKS] > 0


def _quantize(x: torch.Tensor, amax: torch.Tensor, fmt: torch.Tensor, blocked: bool, axis) -> torch.Tensor:
    """fliqs' FormatQuantizer.quantize: blocks along ``axis`` (None: a weight's input side) when ``blocked``."""
    if not blocked:
        return fake_quantize(x, amax, fmt)
    rows = blocks_last(x, axis)
    amax = amax.flatten(1) if amax.dim() > 1 else amax
    return blocks_restore(fake_quantize(rows, amax, fmt, blocked=True), x, axis)


class _Quantized:
    """Weight (per output channel, or per block) and input (per tensor, or per block) fake quantization of a conv /
    linear layer."""

    def _setup(self, w: str, a: str, act_range: str, channel_axis: int) -> None:
        self.w_format, self.a_format, self.act_range, self.channel_axis = w, a, act_range, channel_axis
        self.register_buffer("w_fmt", format_tensor(w), persistent=False)
        self.register_buffer("a_fmt", format_tensor(a), persistent=False)
        self.register_buffer("act_amax", torch.zeros((), dtype=torch.float32))  # the calibrated range ("ema")

    def quantized_weight(self) -> torch.Tensor:
        return _quantize(self.weight, amax_per_channel(self.weight, 0), self.w_fmt, _blocked(self.w_format), None)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        amax = self.act_amax if self.act_range == "ema" else amax_per_tensor(x)
        return _quantize(x, amax, self.a_fmt, _blocked(self.a_format), self.channel_axis)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, w={self.w_format}, a={self.a_format}, range={self.act_range}"


class QuantConv2d(_Quantized, nn.Conv2d):
    def __init__(self, *args, w: str, a: str, act_range: str, **kwargs):
        super().__init__(*args, **kwargs)
        self._setup(w, a, act_range, channel_axis=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.quantized_weight()
        return self._conv_forward(self.quantized_input(x), weight, self.bias)


class QuantLinear(_Quantized, nn.Linear):
    def __init__(self, *args, w: str, a: str, act_range: str, **kwargs):
        super().__init__(*args, **kwargs)
        self._setup(w, a, act_range, channel_axis=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.quantized_weight()
        return torch.nn.functional.linear(self.quantized_input(x), weight, self.bias)


class Network(nn.Module):
    """The exported network; ``layers``: assignment.json's {layer: {"w", "a", "act_range"}}."""

    def __init__(self, layers: dict):
        super().__init__()
        # filled by fliqs export: the modules

    def _put(self, path: str, module: nn.Module) -> None:
        parent = self
        *outer, last = path.split(".")
        for part in outer:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(last, module)

    def _put_tensor(self, path: str, shape: tuple, parameter: bool) -> None:
        parent = self
        *outer, last = path.split(".")
        for part in outer:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        tensor = torch.zeros(shape)
        if parameter:
            parent.register_parameter(last, nn.Parameter(tensor))
        else:
            parent.register_buffer(last, tensor)

    # filled by fliqs export: forward


def preprocess(raw) -> torch.Tensor:
    """Raw images as the data set stores them (PREPROCESSING["raw"]: one image or a batch, H x W or H x W x C, or
    N x ...) -> the network's input, N x C x size x size float32: divided, resized, cropped and normalised as fliqs'
    data pipeline does (PREPROCESSING["steps"]; for digits and Fashion-MNIST exactly; for CIFAR-10 and image folders
    up to the resampling filter: fliqs resizes PIL images with torchvision, this resizes tensors with torch's
    antialiased bilinear interpolation)."""
    p = PREPROCESSING
    x = torch.as_tensor(raw, dtype=torch.float32)
    image_dims = 2 if p["channels"] == 1 else 3
    if x.dim() == image_dims:
        x = x.unsqueeze(0)
    x = x.unsqueeze(1) if p["channels"] == 1 else x.permute(0, 3, 1, 2)  # N x C x H x W
    x = x / p["divide_by"]
    size = p["input_size"]
    if p["resize"] == "shorter_side_then_center_crop":
        short, (h, w) = p["resize_to"], x.shape[-2:]
        # torchvision's Resize(int): the shorter side to `short`, the longer in proportion, truncated
        new = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
        if new != (h, w):
            x = torch.nn.functional.interpolate(x, size=new, mode="bilinear", align_corners=False, antialias=True)
        top, left = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))  # CenterCrop's offsets
        x = x[..., top:top + size, left:left + size]
    elif p["resize"] == "average_pool":
        x = torch.nn.functional.avg_pool2d(x, x.shape[-1] // size)
    elif tuple(x.shape[-2:]) != (size, size):
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    mean = torch.tensor(p["mean"], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(p["std"], dtype=torch.float32).view(1, -1, 1, 1)
    return (x - mean) / std


def label_names(logits: torch.Tensor) -> list[str]:
    """The predicted label of each row of ``logits``, by name."""
    return [PREPROCESSING["labels"][i] for i in logits.argmax(-1).tolist()]


def load(folder: str | Path | None = None, map_location: str | torch.device = "cpu") -> Network:
    """The exported network from ``folder`` (default: this file's folder), in evaluation mode."""
    folder = Path(folder) if folder is not None else Path(__file__).resolve().parent
    spec = json.loads((folder / "assignment.json").read_text())
    net = Network(spec["layers"])
    net.load_state_dict(torch.load(folder / "weights.pt", map_location=map_location, weights_only=True))
    return net.eval()
