"""What a run is before it trains: the network every worker rebuilds identically, and the one validation pass.

`plan_run` is the single place where an input is judged before any work starts (the config itself was checked by
`fliqs.config.load_config`, without torch): model name and supernet requirement, data metadata (no data is
loaded), the search space, the cost target against the cheapest and the most expensive assignment. It builds the
network once on the CPU to measure it. Every failure is a `fliqs.errors.BadInput`: one line, exit status 2.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from fliqs.cost import ArchShapes, LayerShape, measure_layers
from fliqs.data import DataInfo, describe
from fliqs.errors import BadInput
from fliqs.formats import get_format
from fliqs.layers import ClipPolicy, QuantLayer, quantize_model
from fliqs.models import check_model_name, create_model, is_supernet_name
from fliqs.searchers import methods
from fliqs.searchers.space import SearchSpace, assignment_cost, build_space, on_architecture
from fliqs.supernet import block_options, extract, measure_architectures

REFERENCE_FORMAT = "int8"  # targets are fractions of the cost of every searched layer in this format


@dataclass
class Network:
    """The model with its quantized layers, their shapes (per architecture for a supernet) and the search space."""

    model: nn.Module
    layers: list[QuantLayer]
    shapes: list[LayerShape] | ArchShapes
    space: SearchSpace

    @property
    def total_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def build_network(cfg: DictConfig, info: DataInfo, searches_architecture: bool | None = None) -> Network:
    """Deterministic in ``cfg``: the driver calls it to plan, every worker to train, and they agree.

    A supernet model is searched only by a method that searches architecture (``searches_architecture``, by
    default the method's); otherwise it is built at its fixed architecture (MobileNetV2's own unless
    ``model.kwargs.arch`` says otherwise) as a plain network.
    """
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = create_model(cfg.model.name, num_classes=cfg.model.num_classes or info.num_classes,
                         in_chans=info.in_chans, **cfg.model.kwargs)
    search_arch = methods.get(cfg.method).searches_architecture if searches_architecture is None \
        else searches_architecture
    if is_supernet_name(cfg.model.name) and not search_arch:
        model = extract(model)
    quant = cfg.quant
    clip = ClipPolicy(quant.weight_clip, quant.act_clip, quant.act_percentile, tuple(quant.clip_formats))
    layers = quantize_model(model, default=cfg.quant.default_format, pinned=cfg.quant.pinned,
                            range_mode=cfg.quant.act_range, exclude=cfg.quant.exclude, clip=clip)
    shapes = measure_architectures(model, info.input_size, info.in_chans) if search_arch else \
        measure_layers(model, info.input_size, info.in_chans)
    space = build_space([layer.name for layer in layers], cfg.space.candidates, shared_wa=cfg.space.shared_wa,
                        weight_only=cfg.space.weight_only, groups=cfg.space.groups, pinned=cfg.quant.pinned,
                        activation_format=cfg.quant.default_format,
                        blocks=block_options(model) if search_arch else None)
    return Network(model, layers, shapes, space)


@dataclass
class Plan:
    """What the driver knows before training: the data's metadata, the network and the resolved cost target.

    With an architecture search the extremes span architectures too (smallest blocks at the cheapest format,
    largest at the widest), and the reference cost is measured on the supernet's reference architecture, so
    targets mean the same for FLIQS and FLIQNAS.
    """

    info: DataInfo
    network: Network
    target: float
    cheapest: float
    most_expensive: float
    reference: float  # every searched layer in REFERENCE_FORMAT
    unit: str  # "GBOPs" or "MB"

    def target_for(self, fraction: float) -> float:
        """The target that is ``fraction`` of the reference cost."""
        return fraction * self.reference

    def check_reachable(self, target: float, what: str) -> None:
        if not self.cheapest <= target <= self.most_expensive:
            raise BadInput(f"{what} {target:.4g} {self.unit} is outside what the space can reach: "
                           f"[{self.cheapest:.4g}, {self.most_expensive:.4g}] {self.unit} (uniform "
                           f"{REFERENCE_FORMAT}: {self.reference:.4g})")


def check_splits(cfg: DictConfig, info: DataInfo) -> None:
    """The stratified split needs every split to hold each class at least once (where the size is known)."""
    if info.samples is None:
        return
    for key in ("val_fraction", "test_fraction"):
        fraction = cfg.data[key]
        if fraction * info.samples < info.num_classes:
            raise BadInput(f"data.{key}={fraction:g} leaves {int(fraction * info.samples)} of {info.samples} "
                           f"samples, fewer than the {info.num_classes} classes (every split holds each class)")


def check_output_dir(path: str) -> None:
    """``output_dir`` is (or can be made) a writable folder: checked before anything is written there."""
    p = Path(path).resolve()
    existing = next(q for q in (p, *p.parents) if q.exists())
    if not existing.is_dir():
        raise BadInput(f"output_dir={path!r}: {existing} is a file, not a folder")
    try:  # a real write: permission bits say nothing for root, nor for read-only or virtual file systems
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise BadInput(f"output_dir={path!r}: {existing} is not writable ({err.strerror})") from None


def plan_run(cfg: DictConfig) -> Plan:
    """Check everything about a run's input that can be checked before it trains. Raises BadInput."""
    method = methods.get(cfg.method)
    check_model_name(cfg.model.name)
    if method.supernet and not is_supernet_name(cfg.model.name):
        raise BadInput(f"method={cfg.method} searches a supernet's architecture; {cfg.model.name!r} is not one "
                       f"(use model=fliqnas_digits or model=fliqnas_mbv2)")
    if cfg.reward.cost == "size" and cfg.reward.target_gbops is not None:
        raise BadInput("reward.target_gbops is a BOPs target; with reward.cost=size use reward.target_fraction")
    info = describe(cfg.data.name, cfg.data.path, cfg.model.input_size)
    if cfg.model.num_classes is not None and cfg.model.num_classes < info.num_classes:
        raise BadInput(f"model.num_classes={cfg.model.num_classes} is fewer than the {info.num_classes} classes of "
                       f"data set {cfg.data.name!r} (leave it unset to take the data's)")
    check_splits(cfg, info)
    check_output_dir(cfg.output_dir)
    network = build_network(cfg, info)
    shapes, space = network.shapes, network.space
    total = network.total_params

    def cost(fmt: str, arch=None) -> float:  # on the reference architecture unless told
        return assignment_cost(*on_architecture(shapes, space.uniform(fmt), arch), total, cfg.reward.cost)

    by_bits = sorted(space.format_candidates or [cfg.quant.default_format], key=lambda f: get_format(f).bits)
    small, large = (shapes.smallest(), shapes.largest()) if isinstance(shapes, ArchShapes) else (None, None)
    reference = cost(REFERENCE_FORMAT)
    target = cfg.reward.target_gbops if cfg.reward.target_gbops is not None \
        else cfg.reward.target_fraction * reference
    plan = Plan(info, network, target, cost(by_bits[0], small), cost(by_bits[-1], large), reference,
                "GBOPs" if cfg.reward.cost == "bops" else "MB")
    if not method.per_format:
        plan.check_reachable(target, "cost target")
    return plan
