"""What a number becomes: numeric formats as data, the one rounding routine, quantized layers and their cost.

* `formats`: every format (INT, FP, block-scaled MX and NVFP4, the wide casts) as a frozen dataclass, its limits
  and overflow policy as data; the registry by name (`get_format`, `FORMATS`). Torch-free, like `policy`.
* `policy`: how a quantizer finds its range (`RangeMode`, `WeightClip`, `ActClip`, `ClipPolicy`).
* `rounding`: the one generic rounding routine for every format, block scales, and fake quantization with a
  straight-through gradient.
* `layers`: `QuantLayer` (a conv or linear whose weight and activation formats live in buffers), model surgery
  (`quantize_model`), assignments.
* `cost`: MACs from real output shapes, BOPs and model size.

The public face, imported on first use (so that the torch-free modules stay torch-free):
``from fliqs.quant import fake_quantize; y = fake_quantize(x, "mxfp4_e2m1")`` (blocks along the last axis for the
block-scaled formats, one scale per tensor for the others), and `get_format`, `FORMATS`,
`quantize_model`, `QuantLayer`, `set_assignment`, `get_assignment`.
"""

from __future__ import annotations

import importlib

_PUBLIC = {"fake_quantize": ("rounding", "fake_quantize_any"), "get_format": ("formats", "get_format"),
           "FORMATS": ("formats", "FORMATS"), "Format": ("formats", "Format"),
           "quantize_model": ("layers", "quantize_model"), "QuantLayer": ("layers", "QuantLayer"),
           "set_assignment": ("layers", "set_assignment"), "get_assignment": ("layers", "get_assignment")}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'fliqs.quant' has no attribute {name!r}")
    module, attribute = _PUBLIC[name]
    return getattr(importlib.import_module(f"fliqs.quant.{module}"), attribute)
