"""Structured configs (OmegaConf dataclasses), the YAML files in ``conf/`` and command-line overrides.

One convention everywhere: every command takes ``key=value`` overrides (OmegaConf dotlist,
``train.epochs=3 reward.target_fraction=0.4``). A group folder of ``conf/`` (``model``, ``data``, ``space``,
``study``) can be selected by name: ``space=int_wide`` is short for ``space.name=int_wide`` and merges
``conf/space/int_wide.yaml``. Precedence: dataclass defaults < the selected group files < a study file (`fliqs
study` only) < overrides. Loading a config imports no torch: plain errors cost a fraction of a second.

Unknown keys, wrong types and bad values raise `ConfigError` with one line naming the key (and OmegaConf's
suggestion where it has one); the CLI turns it into exit status 2.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fliqs.data import DATASETS
from fliqs.errors import BadInput
from fliqs.formats import get_format
from fliqs.inputs import check_name, check_tracking_uri, ray_host_port
from fliqs.searchers import methods

GROUPS = ("model", "data", "space", "study")
_PARAM_NAME = re.compile(r"^[\w\-. :/]+$")  # what MLflow accepts in a param name


class ConfigError(BadInput):
    pass


class RangeMode(str, Enum):
    """How an activation quantizer finds its range."""

    dynamic = "dynamic"  # amax of the current batch, in training and evaluation
    ema = "ema"  # training: batch amax, tracked as an EMA; evaluation: the calibrated EMA


class WeightClip(str, Enum):
    """How a weight quantizer picks its per-channel range (for the formats of ``quant.clip_formats``)."""

    max = "max"  # the channel's largest magnitude
    mse = "mse"  # the clipped range with the smallest quantization error (a grid of ratios of the max)


class ActClip(str, Enum):
    """How an activation quantizer picks its per-tensor range (for the formats of ``quant.clip_formats``)."""

    max = "max"  # the largest magnitude of the batch
    percentile = "percentile"  # quant.act_percentile of the batch's magnitudes


class RewardKind(str, Enum):
    absolute = "absolute"  # TuNAS: Q + beta * |C/C_T - 1|
    one_sided = "one_sided"  # Q + beta * max(0, C/C_T - 1)
    mnas_soft = "mnas_soft"  # Q * (C/C_T) ** beta
    mnas_hard = "mnas_hard"  # Q * min(1, (C/C_T) ** beta)


class CostKind(str, Enum):
    bops = "bops"
    size = "size"


class ScoreKind(str, Enum):
    """How the sensitivity method scores a decision x candidate format (`fliqs.searchers.sensitivity`)."""

    hessian = "hessian"  # HAWQ-V3: Hutchinson Hessian trace x ||Q(T) - T||^2, weights and input activations
    gradient = "gradient"  # ModelOpt AutoQuantize: Fisher diagonal of the layer output x (Y_q - Y)^2
    kl = "kl"  # KL(reference outputs || outputs with the decision at the format)


class Prior(str, Enum):
    """Where a one-shot controller's policy starts (`fliqs.searchers.budget.target_prior`)."""

    uniform = "uniform"  # every candidate equally likely (the paper)
    target = "target"  # the maximum-entropy policy whose expected cost is the target


class BudgetTracking(str, Enum):
    """How a one-shot controller is steered to its cost target while it searches (`fliqs.searchers.budget`)."""

    reward = "reward"  # the method's reward alone (the paper's soft cost term)
    dual = "dual"  # plus a Lagrange multiplier on E[C]/T - 1 in the controller's loss, by dual ascent
    projection = "projection"  # plus, after each update, the policy tilted back onto E[C] = T


class Extraction(str, Enum):
    """Which assignment a one-shot search returns (`fliqs.searchers.budget`)."""

    argmax = "argmax"  # the policy's most probable candidate per decision (the paper)
    within = "within"  # the most probable assignment whose cost is at most the target (an integer program)


class QualityKind(str, Enum):
    val_accuracy = "val_accuracy"  # accuracy on a held-out validation batch after the weight update (TuNAS)
    neg_train_loss = "neg_train_loss"  # minus the training loss of the same batch (public FLIQS code)


@dataclass
class ModelConfig:
    name: str = "fliqs_cnn"
    input_size: int | None = None  # None: the data set's resolution (search) or the model's native one (cost)
    num_classes: int | None = None  # None: the data set's classes (search) or the model's default (cost)
    kwargs: dict[str, Any] = field(default_factory=dict)  # to the model's constructor: width_mult, arch, ...


@dataclass
class DataConfig:
    name: str = "digits"
    path: str | None = None  # required for cifar10 / imagenet / imagefolder; never downloaded
    batch_size: int = 64
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    loader_workers: int = 0


@dataclass
class QuantConfig:
    act_range: RangeMode = RangeMode.dynamic
    default_format: str = "fp32"  # format of layers that no decision covers
    pinned: dict[str, str] = field(default_factory=dict)  # layer-name pattern -> fixed format
    exclude: list[str] = field(default_factory=list)  # layer-name patterns left unquantized (fp32, not counted)
    uniform_format: str | None = None  # method=uniform: every searched layer in this format
    # Clipping (benchmarks/RESULTS.md "INT clipping" measured the defaults): per format, by name pattern.
    weight_clip: WeightClip = WeightClip.max
    act_clip: ActClip = ActClip.max
    act_percentile: float = 99.99
    clip_formats: list[str] = field(default_factory=lambda: ["int*"])


@dataclass
class SpaceConfig:
    name: str = "int_fp"
    candidates: list[str] = field(default_factory=list)  # filled from conf/space/<name>.yaml unless given
    shared_wa: bool = True  # one decision sets weights and activations; False: separate decisions
    weight_only: bool = False  # search weight formats only; activations stay at quant.default_format
    groups: dict[str, str] = field(default_factory=dict)  # layer-name pattern -> group; a group shares a decision


@dataclass
class ControllerConfig:
    """The FLIQS controller (`fliqs.searchers.controller`); defaults from benchmarks/controller_convergence.py."""

    lr: float | None = None  # Adam's (beta1 = 0) rate at the start of the RL phase; None: scaled to the run
    lr_scale: float = 15.0  # with lr None: how far (about) each logit can travel over the search, any length
    lr_rise: float = 10.0  # the rate rises linearly this many times over the RL phase
    baseline_momentum: float = 0.95
    warmup_fraction: float = 0.25
    entropy_max: float = 0.2  # the cosine entropy penalty's final weight (on the sum over decisions)


@dataclass
class RewardConfig:
    kind: RewardKind = RewardKind.absolute
    beta: float = -0.1
    cost: CostKind = CostKind.bops
    target_gbops: float | None = None  # absolute target ...
    target_fraction: float | None = 0.5  # ... or a fraction of the uniform-int8 cost (ignored if target_gbops)
    quality: QualityKind = QualityKind.val_accuracy


@dataclass
class BudgetConfig:
    """How a search keeps to its cost target (`fliqs.searchers.budget`; measured in benchmarks/RESULTS.md)."""

    prior: Prior = Prior.uniform  # one-shot: where the policy starts (and what its warm-up samples)
    tracking: BudgetTracking = BudgetTracking.projection  # one-shot: the policy held at E[C] = T after each update
    dual_scale: float = 2.0  # the multiplier's travel over the RL phase per unit of relative cost error
    extraction: Extraction = Extraction.within  # one-shot: the most probable assignment within the target ...
    extraction_floor: float = 0.9  # ... an argmax below this fraction of it lifted to at least this fraction
    extraction_candidates: int = 4  # where the argmax is left, these most probable are validated; the best is kept
    proposals: bool = True  # multi-trial: train only candidates within the target (others: rejected untrained)


@dataclass
class TrainConfig:
    epochs: int = 10
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    num_workers: int = 0  # Ray Train workers; 0 runs the loop in-process
    use_gpu: bool = False
    compile: bool | None = None  # None: on GPU only
    checkpoint_every: int = 50  # steps
    max_failures: int = 0
    finetune_epochs: int = 0  # a short QAT fine-tune of the final assignment, reported apart (every method)
    # FLIQNAS: batches that re-estimate the extracted network's BatchNorm statistics (weights unchanged; the
    # supernet's statistics mix every sampled architecture, as in Once-for-All). 0: keep the supernet's.
    bn_recalibration_batches: int = 20
    grad_clip: float | None = 5.0  # max gradient norm of the weights (very low-bit QAT diverges without it)
    log_every: int = 10  # steps


@dataclass
class TrackingConfig:
    uri: str | None = None  # None: sqlite:///<output_dir>/mlflow.db
    experiment: str = "fliqs"
    artifact_location: str | None = None  # None: <output_dir>/mlartifacts


@dataclass
class MultiTrialConfig:
    """Multi-trial searches: candidates trained briefly, within a budget of epochs."""

    trial_epochs: int = 2  # epochs of QAT for each candidate
    budget: float = 1.0  # candidates' epochs in total, as a multiple of train.epochs (the one-shot budget)
    retrain_epochs: int | None = None  # the best candidate retrained from scratch; None: train.epochs, 0: not


@dataclass
class RelaxedConfig:
    """Differentiable searches (EdMIPS, DNAS)."""

    cost_weight: float = 1.0  # EdMIPS: lambda of the cost loss (E[GBOPs] / target)
    arch_lr: float = 0.01  # Adam learning rate of the architecture logits
    retrain_epochs: int | None = None  # the argmax retrained from scratch; None: train.epochs, 0: not
    # DNAS (Wu et al. 2018): loss CE * beta * log(cost)^gamma under the Gumbel sample, cost in units of the target / e;
    # the weights train on 1 - arch_fraction of the training split, the logits on the rest, after a warm-up;
    # temperature tau0 * exp(-tau_decay * epoch).
    dnas_beta: float = 0.2
    dnas_gamma: float = 0.6
    arch_fraction: float = 0.2
    arch_warmup_epochs: int | None = None  # None: the paper's 10, or half the run when it is shorter than 20
    tau0: float = 5.0
    tau_decay: float = 0.065


@dataclass
class SensitivityConfig:
    """Sensitivity + integer program: pre-train, score every decision x format, solve under the budget, QAT."""

    pretrain_format: str = "int8"  # the uniform QAT format of the pre-training (fp32: plain training)
    pretrain_epochs: int | None = None  # None: pretrain_fraction x train.epochs (at least 1)
    pretrain_fraction: float = 0.5
    qat_epochs: int | None = None  # QAT of the solution; None: train.epochs - the pre-training epochs
    score: ScoreKind = ScoreKind.hessian
    batches: int = 4  # training batches scored (per worker; scores are averaged over the workers)
    hutchinson_samples: int = 16  # Rademacher vectors per batch for the Hessian traces (score=hessian)


@dataclass
class StudyConfig:
    """A baseline comparison (`fliqs study`): one Ray Tune trial per (method, cost target, seed)."""

    name: str = "digits"  # selects conf/study/<name>.yaml; also the study's Tune and MLflow parent-run name
    methods: list[str] = field(default_factory=lambda: list(methods.STUDY_DEFAULT))
    uniform_formats: list[str] = field(default_factory=list)  # empty: every candidate of the space, plus bf16
    target_fractions: list[float] = field(default_factory=lambda: [0.35, 0.5])  # of the uniform-int8 cost
    seeds: list[int] = field(default_factory=lambda: [0])
    max_concurrent_trials: int = 1
    cpus_per_trial: float = 1.0


@dataclass
class FliqsConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    space: SpaceConfig = field(default_factory=SpaceConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    multi_trial: MultiTrialConfig = field(default_factory=MultiTrialConfig)
    relaxed: RelaxedConfig = field(default_factory=RelaxedConfig)
    sensitivity: SensitivityConfig = field(default_factory=SensitivityConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    method: str = methods.DEFAULT  # a name of `fliqs.searchers.methods.METHODS` (`fliqs methods` lists them)
    output_dir: str = "runs"
    name: str | None = None  # run name (fliqs.inputs.NAME_CHARS); reusing one resumes that run ...
    allow_resume_changes: bool = False  # ... refused when its configuration changed, unless this is true
    seed: int = 0
    ray_address: str | None = None  # None: start a local Ray instance


def conf_dir() -> Path:
    return Path(str(resources.files("fliqs.conf")))


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


def _one_line(err: OmegaConfBaseException) -> str:
    msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    key = getattr(err, "full_key", None)
    return f"{msg} (key: {key})" if key and key not in msg else msg


def load_config(overrides: list[str] | None = None, study: bool = False) -> DictConfig:
    """Defaults < ``conf/<group>/<name>.yaml`` of the selected model, data and space < the study file < overrides.

    A study file (``conf/study/<name>.yaml``, used with ``study=True``: `fliqs study`) fixes a whole experiment: its
    ``study:`` section is the grid, and it may set any other section (model, data, budgets) as well. Validated.
    """
    overrides = list(overrides or [])
    dotlist = []
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        dotlist.append(f"{key}.name={value}" if key in GROUPS else item)
    try:
        base = OmegaConf.structured(FliqsConfig)
        user = OmegaConf.from_dotlist(dotlist)
        study_file = OmegaConf.create()
        if study:
            path = conf_dir() / "study" / f"{OmegaConf.merge(base, user).study.name}.yaml"
            study_file = OmegaConf.load(path) if path.is_file() else study_file
        selected = OmegaConf.merge(base, study_file, user)  # validates keys and types early
        layers = [base]
        for group in GROUPS:
            path = conf_dir() / group / f"{selected[group].name}.yaml"
            if group != "study" and path.is_file():
                layers.append(OmegaConf.create({group: OmegaConf.load(path)}))
        cfg = OmegaConf.merge(*layers, study_file, user)
    except OmegaConfBaseException as err:
        raise ConfigError(_one_line(err)) from None
    except yaml.YAMLError as err:  # an override's value is parsed as YAML: `*` starts an alias, `[` a list
        raise ConfigError(f"an override's value is not valid YAML ({str(err).splitlines()[0]}); quote it, e.g. "
                          f"key=\"'*'\"") from None
    validate(cfg)
    return cfg


@dataclass(frozen=True)
class Bound:
    """The values a numeric key accepts: ``low``/``high`` (None: unbounded), each end open or closed; ``why`` is
    the consequence a refused value would have had, when it is not obvious."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    why: str = ""

    def admits(self, v: float) -> bool:
        return (self.low is None or (v > self.low if self.low_open else v >= self.low)) and \
            (self.high is None or (v < self.high if self.high_open else v <= self.high))

    def __str__(self) -> str:
        low = "(-inf" if self.low is None else f"{'(' if self.low_open else '['}{self.low:g}"
        high = "inf)" if self.high is None else f"{self.high:.10g}{')' if self.high_open else ']'}"
        return f"{low}, {high}"


POSITIVE, NON_NEGATIVE, FRACTION = Bound(0, None, low_open=True), Bound(0), Bound(0, 1, high_open=True)
OPEN_FRACTION = Bound(0, 1, low_open=True, high_open=True)
SEED = Bound(0, 2**32 - 1)  # numpy's SeedSequence and torch's manual_seed both take these
MAX_HELD_OUT = 0.9  # data.val_fraction + data.test_fraction stay below this
MAX_INPUT_SIZE = 1024  # pixels a side: the planning pass runs the model once at this resolution
MAX_CLASSES = 1_000_000  # a classifier head this wide is already 10^6 x width weights
# Every numeric key and what it accepts; a key missing here accepts any finite value (a test checks that every
# numeric key of FliqsConfig is listed). None is accepted where the dataclass allows it.
BOUNDS: dict[str, Bound] = {
    "model.input_size": Bound(1, MAX_INPUT_SIZE), "model.num_classes": Bound(1, MAX_CLASSES),
    "data.batch_size": Bound(1), "data.val_fraction": OPEN_FRACTION, "data.test_fraction": OPEN_FRACTION,
    "data.seed": SEED, "data.loader_workers": NON_NEGATIVE,
    "quant.act_percentile": Bound(50, 100, low_open=True),
    "controller.lr": POSITIVE, "controller.lr_scale": POSITIVE, "controller.lr_rise": Bound(1),
    "controller.baseline_momentum": FRACTION, "controller.warmup_fraction": FRACTION,
    "controller.entropy_max": Bound(0, why="a negative weight would reward entropy: the policy would not converge"),
    "reward.beta": Bound(None, 0, why="a positive beta rewards cost: the search would prefer the most expensive "
                                      "formats; 0 ignores cost"),
    "reward.target_gbops": POSITIVE, "reward.target_fraction": POSITIVE, "budget.dual_scale": NON_NEGATIVE,
    "budget.extraction_floor": Bound(0, 1), "budget.extraction_candidates": Bound(1, 100),
    "train.epochs": Bound(1), "train.lr": POSITIVE, "train.momentum": FRACTION, "train.weight_decay": NON_NEGATIVE,
    "train.num_workers": NON_NEGATIVE, "train.checkpoint_every": Bound(1), "train.max_failures": Bound(-1),
    "train.finetune_epochs": NON_NEGATIVE, "train.bn_recalibration_batches": NON_NEGATIVE,
    "train.grad_clip": POSITIVE, "train.log_every": Bound(1),
    "multi_trial.trial_epochs": Bound(1), "multi_trial.budget": POSITIVE, "multi_trial.retrain_epochs": NON_NEGATIVE,
    "relaxed.cost_weight": NON_NEGATIVE, "relaxed.arch_lr": POSITIVE, "relaxed.retrain_epochs": NON_NEGATIVE,
    "relaxed.dnas_beta": POSITIVE, "relaxed.dnas_gamma": NON_NEGATIVE, "relaxed.arch_fraction": OPEN_FRACTION,
    "relaxed.arch_warmup_epochs": NON_NEGATIVE, "relaxed.tau0": POSITIVE, "relaxed.tau_decay": NON_NEGATIVE,
    "sensitivity.pretrain_epochs": Bound(1), "sensitivity.pretrain_fraction": OPEN_FRACTION,
    "sensitivity.qat_epochs": Bound(1), "sensitivity.batches": Bound(1),
    "sensitivity.hutchinson_samples": Bound(1),
    "study.max_concurrent_trials": Bound(1), "study.cpus_per_trial": POSITIVE,
    "seed": SEED,
}
LIST_BOUNDS = {"study.target_fractions": POSITIVE, "study.seeds": SEED}


def check_numbers(cfg: DictConfig) -> None:
    """ConfigError naming the key for a non-finite number or one outside its `BOUNDS`."""
    for key, bound in BOUNDS.items():
        value = OmegaConf.select(cfg, key)
        if value is not None:
            _check_number(key, value, bound)
    for key, bound in LIST_BOUNDS.items():
        for value in OmegaConf.select(cfg, key):
            _check_number(key, value, bound)


def _check_number(key: str, value: float, bound: Bound) -> None:
    if not math.isfinite(value):
        raise ConfigError(f"{key}={value}: must be a finite number")
    if not bound.admits(value):
        raise ConfigError(f"{key}={value}: must be in {bound}" + (f" ({bound.why})" if bound.why else ""))


def validate(cfg: DictConfig) -> None:
    """Semantic checks OmegaConf's types cannot express. Raises ConfigError naming the key."""
    try:
        method = methods.get(cfg.method)
    except BadInput as err:
        raise ConfigError(f"method: {err}") from None
    if cfg.data.name not in DATASETS:
        raise ConfigError(f"data.name={cfg.data.name!r}: unknown data set; valid: {', '.join(DATASETS)}")
    if not cfg.space.candidates:
        raise ConfigError(f"space.name={cfg.space.name!r}: unknown search space; valid: "
                          f"{', '.join(group_options('space'))} (or give space.candidates=[...])")
    for key, names in (("space.candidates", cfg.space.candidates), ("quant.pinned", cfg.quant.pinned.values()),
                       ("quant.default_format", [cfg.quant.default_format]),
                       ("sensitivity.pretrain_format", [cfg.sensitivity.pretrain_format]),
                       ("quant.uniform_format", [cfg.quant.uniform_format] if cfg.quant.uniform_format else [])):
        for name in names:
            try:
                get_format(name)
            except ValueError as err:
                raise ConfigError(f"{key}: {err}") from None
    check_numbers(cfg)
    if cfg.data.val_fraction + cfg.data.test_fraction >= MAX_HELD_OUT:
        raise ConfigError(f"data.val_fraction + data.test_fraction = "
                          f"{cfg.data.val_fraction + cfg.data.test_fraction:g}: must stay below {MAX_HELD_OUT} "
                          f"(the rest is the training split)")
    if cfg.reward.target_gbops is None and cfg.reward.target_fraction is None:
        raise ConfigError("reward: set reward.target_gbops or reward.target_fraction")
    if cfg.reward.kind in (RewardKind.mnas_soft, RewardKind.mnas_hard) and \
            cfg.reward.quality == QualityKind.neg_train_loss:
        raise ConfigError(f"reward.kind={cfg.reward.kind.value} multiplies the quality by (C/T)^beta, which needs a "
                          f"positive quality; reward.quality=neg_train_loss is negative (use val_accuracy, or an "
                          f"additive reward: absolute, one_sided)")
    duplicates = sorted({f for f in cfg.space.candidates if list(cfg.space.candidates).count(f) > 1})
    if duplicates:
        raise ConfigError(f"space.candidates lists {', '.join(duplicates)} more than once (a duplicate would get "
                          f"twice the controller's prior probability)")
    for key in ("name", "study.name"):
        check_name(key, OmegaConf.select(cfg, key))
    check_tracking_uri(cfg.tracking.uri)
    if cfg.ray_address is not None:
        ray_host_port(cfg.ray_address)
    for rule in method.checks:  # after the values they may read are known to be valid
        message = rule(cfg)
        if message:
            raise ConfigError(message)


def sensitivity_epochs(cfg: DictConfig) -> tuple[int, int]:
    """(pre-training epochs, QAT epochs of the solution) of the sensitivity method; the QAT may be 0 (the
    method's registry check refuses that)."""
    s = cfg.sensitivity
    pretrain = s.pretrain_epochs if s.pretrain_epochs is not None else \
        max(1, int(s.pretrain_fraction * cfg.train.epochs + 0.5))
    qat = s.qat_epochs if s.qat_epochs is not None else max(0, cfg.train.epochs - pretrain)
    return int(pretrain), int(qat)


def to_flat_dict(cfg: DictConfig) -> dict[str, Any]:
    """``{"train.epochs": 10, ...}``: the config as MLflow params.

    A mapping whose keys are not valid MLflow names (layer patterns such as ``quant.pinned={"*": fp32}``) is one
    param holding its JSON.
    """
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node and not all(_PARAM_NAME.match(str(k)) for k in node):
            out[prefix[:-1]] = json.dumps(node, sort_keys=True)
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node

    walk(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), "")
    return out
