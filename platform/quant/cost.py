"""Cost model: MACs, BOPs and model size per layer and in total.

Convention (FLIQS.md section 5):

* MACs of a layer come from its real output shape at the model's input resolution, batch 1:
  conv ``out_numel * in_channels / groups * kh * kw``; linear ``out_numel * in_features`` (tokens included).
* BOPs = MACs x weight bits x activation bits. An FP format counts its total width (E2M1 = 4, E4M3 = 8),
  BF16/FP16 count 16 and full precision 32. A block-scaled format counts its effective bits, the element's plus its
  share of the block scale (`fliqs.quant.formats.Format.effective_bits`: MXFP4 4.25, MXFP8 8.25, NVFP4 4.5). The
  alternative convention, not used here, counts the scale multiply of each block as an extra operation.
* Size = weight parameters of the quantized layers x their weight bits, plus every other parameter (biases,
  norms, embeddings) at 32 bits. Block scales are in the weight bits (effective bits); per-channel and per-tensor
  FP32 scales are not counted.
* Attention matmuls between two activations (``q @ k^T`` and ``attn @ v`` in ViTs) belong to no conv/linear
  module and fliqs does not quantize them, so they are counted as an extra entry per attention module, named
  ``<module>.attn_matmul``, with ``2 * N**2 * C`` MACs (N tokens, C = heads x head dim) at full precision
  (32 x 32 bits) and no weights. Any module with ``qkv`` and ``num_heads`` attributes (timm's ``Attention``)
  is counted this way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
from torch import nn

from fliqs.errors import BadInput
from fliqs.quant.formats import FULL_PRECISION, Format, format_pair
from fliqs.quant.layers import QUANTIZABLE, QuantLayer

ATTENTION_MATMUL_FORMAT = FULL_PRECISION
OTHER_PARAM_BITS = 32


@dataclass(frozen=True)
class LayerShape:
    """What a layer costs independent of its format."""

    name: str
    kind: str  # conv | linear | attn_matmul
    macs: int
    weight_params: int


@dataclass(frozen=True)
class LayerCost:
    name: str
    kind: str
    macs: int
    weight_params: int
    w_format: str
    a_format: str
    bops: float
    weight_bits: float


@dataclass(frozen=True)
class CostSummary:
    layers: list[LayerCost]
    gmacs: float
    gbops: float
    size_mb: float

    def to_dict(self) -> dict:
        return {"gmacs": self.gmacs, "gbops": self.gbops, "size_mb": self.size_mb,
                "layers": [asdict(layer) for layer in self.layers]}


def bops(macs: int, w_bits: float, a_bits: float) -> float:
    return macs * w_bits * a_bits


def _weight(layer: nn.Module) -> torch.Tensor:
    """The weight that runs: an elastic supernet layer (`fliqs.models.supernet`) runs a slice of its parameter."""
    return layer.active_weight() if hasattr(layer, "active_weight") else layer.weight


def _conv_macs(conv: nn.Conv2d, out: torch.Tensor) -> int:
    _, in_per_group, kh, kw = _weight(conv).shape
    return out.numel() * in_per_group * kh * kw


def _linear_macs(linear: nn.Linear, out: torch.Tensor) -> int:
    return out.numel() * linear.in_features


def _is_attention(module: nn.Module) -> bool:
    return hasattr(module, "qkv") and hasattr(module, "num_heads")


def measure_layers(model: nn.Module, input_size: int, in_chans: int) -> list[LayerShape]:
    """Run one batch-1 forward at ``input_size`` and record each conv/linear layer's MACs and weights.

    Works on a plain model or one rewritten by `fliqs.quant.layers.quantize_model` (the names are the same).
    """
    wrapped = {id(m.layer) for m in model.modules() if isinstance(m, QuantLayer)}
    macs: dict[str, list] = {}  # name -> [kind, macs, weight_params], in call order
    hooks = []

    def record(name, kind, layer, fn):
        def hook(module, inputs, out):
            weight_params = _weight(layer).numel() if layer is not None else 0
            entry = macs.setdefault(name, [kind, 0, weight_params])
            entry[1] += fn(module, inputs, out)  # a module called twice counts twice
        return hook

    for name, module in model.named_modules():
        # A QuantLayer may call its wrapped layer's functional op directly (no module call, no hook there):
        # hook the wrapper, with the wrapped layer's shape rule.
        layer, layer_name = (module.layer, module.name) if isinstance(module, QuantLayer) else (module, name)
        if isinstance(layer, QUANTIZABLE) and (module is not layer or id(layer) not in wrapped):
            is_conv = isinstance(layer, nn.Conv2d)
            rule = (lambda lyr: lambda m, i, o: _conv_macs(lyr, o)) if is_conv else \
                (lambda lyr: lambda m, i, o: _linear_macs(lyr, o))
            hooks.append(module.register_forward_hook(record(
                layer_name, "conv" if is_conv else "linear", layer, rule(layer))))
        elif _is_attention(module):
            def attn_macs(m, inputs, out):
                n_tokens = inputs[0].shape[-2]
                width = m.num_heads * getattr(m, "head_dim", inputs[0].shape[-1] // m.num_heads)
                return 2 * n_tokens * n_tokens * width
            hooks.append(module.register_forward_hook(record(f"{name}.attn_matmul", "attn_matmul", None, attn_macs)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            param = next(model.parameters(), None)
            device = param.device if param is not None else "cpu"
            model(torch.zeros(1, in_chans, input_size, input_size, device=device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return [LayerShape(name, kind, int(m), int(w)) for name, (kind, m, w) in macs.items()]


FormatSpec = str | Format | tuple[str, str] | Mapping[str, str]


def summarize(shapes: list[LayerShape], assignment: Mapping[str, FormatSpec] | None = None,
              default: FormatSpec = FULL_PRECISION, total_params: int | None = None) -> CostSummary:
    """Cost of an assignment ``{layer: format | (w, a) | {"w":..,"a":..}}``; unassigned layers use ``default``.

    ``total_params`` (all parameters of the model) adds the non-quantized parameters to the size at 32 bits.
    """
    assignment = dict(assignment or {})
    unknown = set(assignment) - {s.name for s in shapes}
    if unknown:
        raise BadInput(f"assignment names unknown layer(s): {sorted(unknown)}")
    layers = []
    for s in shapes:
        if s.kind == "attn_matmul":
            w = a = ATTENTION_MATMUL_FORMAT
        else:
            w, a = format_pair(assignment.get(s.name, default))
        layers.append(LayerCost(s.name, s.kind, s.macs, s.weight_params, w.name, a.name,
                                bops(s.macs, w.effective_bits, a.effective_bits), w.effective_bits))
    weight_bits = sum(layer.weight_params * layer.weight_bits for layer in layers)
    other = 0 if total_params is None else total_params - sum(s.weight_params for s in shapes)
    size_bits = weight_bits + other * OTHER_PARAM_BITS
    return CostSummary(layers, sum(layer.macs for layer in layers) / 1e9,
                       sum(layer.bops for layer in layers) / 1e9, size_bits / 8 / 1e6)


def model_cost(model: nn.Module, input_size: int, in_chans: int,
               assignment: Mapping[str, FormatSpec] | None = None,
               default: FormatSpec = FULL_PRECISION) -> CostSummary:
    shapes = measure_layers(model, input_size, in_chans)
    return summarize(shapes, assignment, default, sum(p.numel() for p in model.parameters()))


@dataclass(frozen=True)
class ArchShapes:
    """Layer shapes of a supernet for every architecture: what a sampled architecture costs, without a forward.

    A searchable block's MACs depend only on its own choice (its input resolution and channels are fixed by the
    stage), so the table holds the shapes of each block under each of its options (``{block: {label: shapes}}``,
    an empty tuple for a skipped block) and the fixed layers around them; `shapes` assembles one architecture in
    model order. Built by `fliqs.models.supernet.measure_architectures`.
    """

    segments: tuple[LayerShape | str, ...]  # model order: a fixed layer's shape, or a searchable block's name
    options: Mapping[str, Mapping[str, tuple[LayerShape, ...]]]
    reference: Mapping[str, str]  # the architecture the model was built with (MobileNetV2's own by default)

    def _extreme(self, pick) -> dict[str, str]:
        return {block: pick(opts, key=lambda label: sum(s.macs for s in opts[label])) for block, opts in
                self.options.items()}

    def smallest(self) -> dict[str, str]:
        """The architecture with the fewest MACs (each block's cheapest option)."""
        return self._extreme(min)

    def largest(self) -> dict[str, str]:
        return self._extreme(max)

    def shapes(self, arch: Mapping[str, str]) -> list[LayerShape]:
        """The layer shapes of the architecture ``{block name: option label}`` (every block named)."""
        out: list[LayerShape] = []
        for segment in self.segments:
            out.extend(self.options[segment][arch[segment]] if isinstance(segment, str) else (segment,))
        return out
