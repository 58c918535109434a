"""What a run is before it trains: the one validation pass, the network every worker rebuilds identically, and the
plan a run carries.

* `validate_run` judges an input before any work starts and builds nothing (the configuration's own values were
  checked when it was loaded, without torch): model name and supernet requirement, the data's metadata (no data is
  loaded), the splits, the output folder.
* `make_plan` builds the network once on the CPU to measure it and resolves the cost target against the cheapest
  and the most expensive assignment. The `Plan` travels in the run's context (`fliqs.trainables.fit.RunContext`);
  a phase, a candidate or a study trial derives its own from it (`Plan.derive`): the same network whenever its
  configuration builds the same one, and a pickled plan (a Ray Tune trial's) rebuilds it where it is used.

Every failure is a `fliqs.errors.BadInput`: one line, exit status 2.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fliqs.data.datasets import SUBSET_DATASETS, DataInfo, describe, verify
from fliqs.errors import BadInput
from fliqs.models.registry import check_model_name, create_model, is_supernet_name
from fliqs.models.supernet import block_options, extract, measure_architectures
from fliqs.quant.cost import ArchShapes, LayerShape, measure_layers
from fliqs.quant.formats import get_format
from fliqs.quant.layers import QuantLayer, quantize_model
from fliqs.quant.policy import ClipPolicy
from fliqs.run.config import FliqsConfig, to_dict
from fliqs.searchers import methods
from fliqs.searchers.rewards import CostKind
from fliqs.searchers.space import SearchSpace, assignment_cost, build_space, on_architecture

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


def searches_architecture(cfg: FliqsConfig) -> bool:
    """Whether ``cfg``'s method samples a supernet's blocks (otherwise a supernet is built at a fixed architecture)."""
    return methods.get(cfg.method).searches_architecture


def build_network(cfg: FliqsConfig, info: DataInfo, search_arch: bool | None = None) -> Network:
    """Deterministic in ``cfg``: the driver builds it to plan, every worker to train, and they agree.

    A supernet model is searched only by a method that searches architecture (``search_arch``, by default the
    method's); otherwise it is built at its fixed architecture (MobileNetV2's own unless ``model.kwargs.arch`` says
    otherwise) as a plain network.
    """
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = create_model(cfg.model.name, num_classes=cfg.model.num_classes or info.num_classes,
                         in_chans=info.in_chans, **cfg.model.kwargs)
    search_arch = searches_architecture(cfg) if search_arch is None else search_arch
    if is_supernet_name(cfg.model.name) and not search_arch:
        model = extract(model)
    quant = cfg.quant
    clip = ClipPolicy(quant.weight_clip, quant.act_clip, quant.act_percentile, tuple(quant.clip_formats))
    formats = {*cfg.space.candidates, quant.default_format, quant.uniform_format, *quant.pinned.values()}
    layers = quantize_model(model, default=quant.default_format, pinned=quant.pinned, range_mode=quant.act_range,
                            exclude=quant.exclude, clip=clip,
                            blocked=any(get_format(f).block is not None for f in formats if f))
    shapes = measure_architectures(model, info.input_size, info.in_chans) if search_arch else \
        measure_layers(model, info.input_size, info.in_chans)
    space = build_space([layer.name for layer in layers], cfg.space.candidates, shared_wa=cfg.space.shared_wa,
                        weight_only=cfg.space.weight_only, groups=cfg.space.groups, pinned=quant.pinned,
                        activation_format=quant.default_format, blocks=block_options(model) if search_arch else None)
    return Network(model, layers, shapes, space)


def structure(cfg: FliqsConfig) -> tuple:
    """What decides the network `build_network` makes: two configurations with the same structure build the same."""
    return (to_dict(cfg.model), to_dict(cfg.data), to_dict(cfg.quant), to_dict(cfg.space), cfg.seed,
            searches_architecture(cfg), cfg.reward.cost)


@dataclass
class Plan:
    """What the driver knows before training: the data's metadata, the network, the costs and the resolved target.

    With an architecture search the extremes span architectures too (smallest blocks at the cheapest format,
    largest at the widest), and the reference cost is measured on the supernet's reference architecture, so
    targets mean the same for FLIQS and FLIQNAS.
    """

    cfg: FliqsConfig
    info: DataInfo
    target: float
    cheapest: float
    most_expensive: float
    reference: float  # every searched layer in REFERENCE_FORMAT
    unit: str  # "GBOPs" or "MB"
    _network: Network | None = field(default=None, repr=False)

    @property
    def network(self) -> Network:
        """The network (built where it is first used after a pickle: a plan travels without it)."""
        if self._network is None:
            self._network = build_network(self.cfg, self.info)
        return self._network

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_network": None}

    def target_for(self, fraction: float) -> float:
        """The target that is ``fraction`` of the reference cost."""
        return fraction * self.reference

    def check_reachable(self, target: float, what: str) -> None:
        if not self.cheapest <= target <= self.most_expensive:
            raise BadInput(f"{what} {target:.4g} {self.unit} is outside what the space can reach: "
                           f"[{self.cheapest:.4g}, {self.most_expensive:.4g}] {self.unit} (uniform "
                           f"{REFERENCE_FORMAT}: {self.reference:.4g})")

    def derive(self, cfg: FliqsConfig) -> Plan:
        """The plan of a child configuration (a phase, a candidate, a trial): this network and its costs when ``cfg``
        builds the same one, a new plan otherwise; its own target, checked when its method has one."""
        if structure(cfg) != structure(self.cfg):
            return make_plan(cfg, self.info if describe_key(cfg) == describe_key(self.cfg) else None)
        child = Plan(cfg, self.info, resolve_target(cfg, self.reference), self.cheapest, self.most_expensive,
                     self.reference, self.unit, self._network)
        if not methods.get(cfg.method).per_format:
            child.check_reachable(child.target, "cost target")
        return child


def describe_key(cfg: FliqsConfig) -> tuple:
    return cfg.data.name, cfg.data.path, cfg.model.input_size


def resolve_target(cfg: FliqsConfig, reference: float) -> float:
    """``reward.target_gbops`` when set, else ``reward.target_fraction`` of the reference cost."""
    return cfg.reward.target_gbops if cfg.reward.target_gbops is not None else cfg.reward.target_fraction * reference


def check_splits(cfg: FliqsConfig, info: DataInfo) -> None:
    """The stratified split needs every split to hold each class at least once (where the size is known)."""
    if info.samples is None:
        return
    for key in ("val_fraction", "test_fraction"):
        fraction = getattr(cfg.data, key)
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


def validate_run(cfg: FliqsConfig) -> DataInfo:
    """Everything about a run's input that can be judged without building anything; returns the data's metadata.
    Raises BadInput."""
    method = methods.get(cfg.method)
    check_model_name(cfg.model.name)
    if method.supernet and not is_supernet_name(cfg.model.name):
        raise BadInput(f"method={cfg.method} searches a supernet's architecture; {cfg.model.name!r} is not one "
                       f"(use model=fliqnas_digits or model=fliqnas_mbv2)")
    if cfg.reward.cost == CostKind.size and cfg.reward.target_gbops is not None:
        raise BadInput("reward.target_gbops is a BOPs target; with reward.cost=size use reward.target_fraction")
    info = describe(cfg.data.name, cfg.data.path, cfg.model.input_size)
    verify(cfg.data.name, cfg.data.path, cfg.data.val_fraction, cfg.data.train_subset)
    if cfg.data.train_subset is not None and cfg.data.name not in SUBSET_DATASETS:
        raise BadInput(f"data.train_subset is for {', '.join(SUBSET_DATASETS)}, not {cfg.data.name!r}")
    if cfg.model.num_classes is not None and cfg.model.num_classes < info.num_classes:
        raise BadInput(f"model.num_classes={cfg.model.num_classes} is fewer than the {info.num_classes} classes of "
                       f"data set {cfg.data.name!r} (leave it unset to take the data's)")
    check_splits(cfg, info)
    check_output_dir(cfg.output_dir)
    return info


def make_plan(cfg: FliqsConfig, info: DataInfo | None = None) -> Plan:
    """Validate (unless ``info`` says it was), build and measure the network once, resolve and check the target."""
    info = validate_run(cfg) if info is None else info
    network = build_network(cfg, info)
    shapes, space, total = network.shapes, network.space, network.total_params

    def cost(fmt: str, arch=None) -> float:  # on the reference architecture unless told
        return assignment_cost(*on_architecture(shapes, space.uniform(fmt), arch), total, cfg.reward.cost)

    by_bits = sorted(space.format_candidates or [cfg.quant.default_format],
                     key=lambda f: get_format(f).effective_bits)
    small, large = (shapes.smallest(), shapes.largest()) if isinstance(shapes, ArchShapes) else (None, None)
    reference = cost(REFERENCE_FORMAT)
    plan = Plan(cfg, info, resolve_target(cfg, reference), cost(by_bits[0], small), cost(by_bits[-1], large),
                reference, "GBOPs" if cfg.reward.cost == CostKind.bops else "MB", network)
    if not methods.get(cfg.method).per_format:
        plan.check_reachable(plan.target, "cost target")
    return plan
