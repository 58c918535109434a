"""The template of the ``model.py`` that ``fliqs export`` writes. fliqs reads this file as text and never imports it.

`fliqs.export.pytorch` makes model.py from it: this docstring gives way to model.py's own, the text after the
line "model.py's docstring ..." below with its ``{fields}`` filled (the run's title, the export format, the input
shape, the evaluation batch size). Everything after this docstring is copied as it stands, except four placeholder
lines, which the exporter replaces (each must occur exactly once):

* ``FORMATS = {}  # filled by fliqs export``: every fliqs format as (max_value, 2**man_bits, 2**emin, scaled);
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
    logits = net(x)               # x: N x {in_chans} x {size} x {size} float32, normalised as fliqs' data pipeline does

Every quantized conv / linear fake-quantizes its weight per output channel and its input per tensor in its format
(assignment.json) with fliqs' own rounding, copied below from fliqs.quant.rounding: round to nearest, ties to even,
saturate, amax mapped to the format's largest value for formats of at most 8 bits. The output equals fliqs' model
bit for bit on the same batches. With act_range "dynamic" an input's range is the batch's own amax: a sample's
logits depend on the batch it is in (fliqs evaluates in batches of {batch_size}, in order).
"""

from __future__ import annotations

import json
from math import inf, nan  # noqa: F401  (names the traced code may use)
from pathlib import Path

import torch
from torch import nn

NoneType = type(None)
device = torch.device
_torch_Tensor_ = torch.Tensor

# name: (max_value, 2**man_bits, 2**emin, scaled)
FORMATS = {}  # filled by fliqs export

# -- fliqs' rounding (fliqs.quant.rounding), copied verbatim -------------------------------------
from fliqs.quant.rounding import amax_per_channel, amax_per_tensor, fake_quantize  # noqa: E402 # filled by fliqs export


def format_tensor(name: str) -> torch.Tensor:
    return torch.tensor(FORMATS[name], dtype=torch.float32)


class _Quantized:
    """Weight (per output channel) and input (per tensor) fake quantization of a conv / linear layer."""

    def _setup(self, w: str, a: str, act_range: str) -> None:
        self.w_format, self.a_format, self.act_range = w, a, act_range
        self.register_buffer("w_fmt", format_tensor(w), persistent=False)
        self.register_buffer("a_fmt", format_tensor(a), persistent=False)
        self.register_buffer("act_amax", torch.zeros((), dtype=torch.float32))  # the calibrated range ("ema")

    def quantized_weight(self) -> torch.Tensor:
        return fake_quantize(self.weight, amax_per_channel(self.weight, 0), self.w_fmt)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        amax = self.act_amax if self.act_range == "ema" else amax_per_tensor(x)
        return fake_quantize(x, amax, self.a_fmt)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, w={self.w_format}, a={self.a_format}, range={self.act_range}"


class QuantConv2d(_Quantized, nn.Conv2d):
    def __init__(self, *args, w: str, a: str, act_range: str, **kwargs):
        super().__init__(*args, **kwargs)
        self._setup(w, a, act_range)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.quantized_weight()
        return self._conv_forward(self.quantized_input(x), weight, self.bias)


class QuantLinear(_Quantized, nn.Linear):
    def __init__(self, *args, w: str, a: str, act_range: str, **kwargs):
        super().__init__(*args, **kwargs)
        self._setup(w, a, act_range)

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


def load(folder: str | Path | None = None, map_location: str | torch.device = "cpu") -> Network:
    """The exported network from ``folder`` (default: this file's folder), in evaluation mode."""
    folder = Path(folder) if folder is not None else Path(__file__).resolve().parent
    spec = json.loads((folder / "assignment.json").read_text())
    net = Network(spec["layers"])
    net.load_state_dict(torch.load(folder / "weights.pt", map_location=map_location, weights_only=True))
    return net.eval()
