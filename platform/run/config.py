"""The configuration: one typed object (`FliqsConfig`, dataclasses), loaded once by the command line
(`fliqs.run.loading.load_config`) and handed down as it is, to drivers, runners and workers alike.

Every field says what it accepts and how it behaves on a resume or in the sensitivity method's shared scoring
(`fliqs.run.options.option`); `BOUNDS`, `RESUME_FREE_KEYS` and `SCORING_FREE_KEYS` are read off the fields. The
options' value sets are `fliqs.choices.Choice` enumerations, most of them defined where they are implemented (the
quantizers' range policy in `fliqs.quant.policy`, the reward's kinds in `fliqs.searchers.rewards`). A child
configuration (a phase, a candidate, a trial) is `derive(cfg, {"train.epochs": 3})`: a new object, checked like a
loaded one; nothing edits a configuration in place. Loading imports no torch.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fliqs.choices import Choice
from fliqs.errors import BadInput
from fliqs.quant.policy import ActClip, RangeMode, WeightClip
from fliqs.run.options import (
    FRACTION,
    NON_NEGATIVE,
    OPEN_FRACTION,
    POSITIVE,
    RESUME_FREE,
    SCORING_FREE,
    SEED,
    Bound,
    bounds,
    flagged,
    option,
)
from fliqs.searchers import methods
from fliqs.searchers.rewards import CostKind, QualityKind, RewardKind

DEFAULT_EXPERIMENT = "quantization-search"  # the MLflow experiment of every run of an output_dir, unless told
MAX_INPUT_SIZE = 1024  # pixels a side: the planning pass runs the model once at this resolution
MAX_CLASSES = 1_000_000  # a classifier head this wide is already 10^6 x width weights
_PARAM_NAME = re.compile(r"^[\w\-. :/]+$")  # what MLflow accepts in a param name


class ConfigError(BadInput):
    pass


class ScoreKind(Choice):
    """How the sensitivity method scores a decision x candidate format (`fliqs.searchers.sensitivity`)."""

    hessian = "hessian"  # HAWQ-V3: Hutchinson Hessian trace x ||Q(T) - T||^2, weights and input activations
    gradient = "gradient"  # ModelOpt AutoQuantize: Fisher diagonal of the layer output x (Y_q - Y)^2
    kl = "kl"  # KL(reference outputs || outputs with the decision at the format)


class Prior(Choice):
    """Where a one-shot controller's policy starts (`fliqs.searchers.budget.target_prior`)."""

    uniform = "uniform"  # every candidate equally likely (the paper)
    target = "target"  # the maximum-entropy policy whose expected cost is the target


class BudgetTracking(Choice):
    """How a one-shot controller is steered to its cost target while it searches (`fliqs.searchers.budget`)."""

    reward = "reward"  # the method's reward alone (the paper's soft cost term)
    dual = "dual"  # plus a Lagrange multiplier on E[C]/T - 1 in the controller's loss, by dual ascent
    projection = "projection"  # plus, after each update, the policy tilted back onto E[C] = T


class Extraction(Choice):
    """Which assignment a one-shot search returns (`fliqs.searchers.budget`)."""

    argmax = "argmax"  # the policy's most probable candidate per decision (the paper)
    within = "within"  # the most probable assignments within the target, the best on validation kept


@dataclass
class ModelConfig:
    name: str = "fliqs_cnn"
    input_size: int | None = option(None, bound=Bound(1, MAX_INPUT_SIZE))  # None: the data's (search), the model's
    num_classes: int | None = option(None, bound=Bound(1, MAX_CLASSES))  # None: the data's (search), the model's
    kwargs: dict[str, Any] = option(factory=dict)  # to the model's constructor: width_mult, arch, ...


@dataclass
class DataConfig:
    name: str = "digits"
    path: str | None = option(None, resume_free=True)  # required for cifar10 / imagenet / imagefolder; never downloaded
    batch_size: int = option(64, bound=Bound(1))
    val_fraction: float = option(0.15, bound=OPEN_FRACTION)
    test_fraction: float = option(0.15, bound=OPEN_FRACTION)
    seed: int = option(0, bound=SEED)
    loader_workers: int = option(0, bound=NON_NEGATIVE, resume_free=True)
    # fashion_mnist / cifar10: a seeded, stratified part of the training split (and the validation split in
    # proportion), to size a run for a small machine; None: all of it.
    train_subset: int | None = option(None, bound=Bound(1))


@dataclass
class QuantConfig:
    # ema: static activation ranges (calibrated after training, fixed at evaluation and in an export), as hardware
    # deploys them; dynamic: each batch's own range (an output then depends on its batch).
    act_range: RangeMode = RangeMode.ema
    default_format: str = "fp32"  # format of layers that no decision covers
    pinned: dict[str, str] = option(factory=dict)  # layer-name pattern -> fixed format
    exclude: list[str] = option(factory=list)  # layer-name patterns left unquantized (fp32, not counted)
    uniform_format: str | None = None  # method=uniform: every searched layer in this format
    # Clipping (benchmarks/RESULTS.md "INT clipping" measured the defaults): per format, by name pattern.
    weight_clip: WeightClip = WeightClip.max
    act_clip: ActClip = ActClip.max
    act_percentile: float = option(99.99, bound=Bound(50, 100, low_open=True))
    clip_formats: list[str] = option(factory=lambda: ["int*"])


@dataclass
class SpaceConfig:
    name: str = "int_fp"
    candidates: list[str] = option(factory=list)  # filled from conf/space/<name>.yaml unless given
    shared_wa: bool = True  # one decision sets weights and activations; False: separate decisions
    weight_only: bool = False  # search weight formats only; activations stay at quant.default_format
    groups: dict[str, str] = option(factory=dict)  # layer-name pattern -> group; a group shares a decision


@dataclass
class ControllerConfig:
    """The FLIQS controller (`fliqs.searchers.controller`); defaults from benchmarks/controller_convergence.py."""

    lr: float | None = option(None, bound=POSITIVE)  # Adam's (beta1 = 0) rate at the RL start; None: scaled to the run
    lr_scale: float = option(15.0, bound=POSITIVE)  # with lr None: how far each logit can travel, any run length
    lr_rise: float = option(10.0, bound=Bound(1))  # the rate rises linearly this many times over the RL phase
    baseline_momentum: float = option(0.95, bound=FRACTION)
    warmup_fraction: float = option(0.25, bound=FRACTION)
    entropy_max: float = option(0.2, bound=Bound(  # the cosine entropy penalty's final weight (on the decisions' sum)
        0, why="a negative weight would reward entropy: the policy would not converge"))


@dataclass
class RewardConfig:
    kind: RewardKind = RewardKind.absolute
    beta: float = option(-0.1, bound=Bound(None, 0, why="a positive beta rewards cost: the search would prefer the "
                                                         "most expensive formats; 0 ignores cost"))
    cost: CostKind = CostKind.bops
    target_gbops: float | None = option(None, bound=POSITIVE, scoring_free=True)  # absolute target ...
    target_fraction: float | None = option(0.5, bound=POSITIVE, scoring_free=True)  # ... or a fraction of uniform int8
    quality: QualityKind = QualityKind.val_accuracy


@dataclass
class BudgetConfig:
    """How a search keeps to its cost target (`fliqs.searchers.budget`; measured in benchmarks/RESULTS.md)."""

    prior: Prior = Prior.uniform  # one-shot: where the policy starts (and what its warm-up samples)
    tracking: BudgetTracking = BudgetTracking.projection  # one-shot: the policy held at E[C] = T after each update
    dual_scale: float = option(2.0, bound=NON_NEGATIVE)  # the multiplier's travel per unit of relative cost error
    extraction: Extraction = Extraction.within  # one-shot: the most probable assignments within the target ...
    extraction_floor: float = option(0.9, bound=Bound(0, 1))  # ... costing at least this fraction of it, if any
    extraction_candidates: int = option(4, bound=Bound(1, 100))  # where the argmax is left: validated, best kept
    proposals: bool = True  # multi-trial: train only candidates within the target (others: rejected untrained)


@dataclass
class TrainConfig:
    epochs: int = option(10, bound=Bound(1))
    lr: float = option(0.05, bound=POSITIVE)
    momentum: float = option(0.9, bound=FRACTION)
    weight_decay: float = option(5e-4, bound=NON_NEGATIVE)
    num_workers: int = option(0, bound=NON_NEGATIVE)  # Ray Train workers; 0 runs the loop in-process
    use_gpu: bool = False
    compile: bool | None = None  # None: on GPU only
    checkpoint_every: int = option(50, bound=Bound(1))  # steps
    max_failures: int = option(0, bound=Bound(-1), resume_free=True)
    finetune_epochs: int = option(0, bound=NON_NEGATIVE)  # a short QAT fine-tune of the result, reported apart
    # Batches that re-estimate the final network's BatchNorm statistics (weights unchanged; a one-shot search's
    # statistics mix every sampled assignment, as in Once-for-All). 0: keep them.
    bn_recalibration_batches: int = option(20, bound=NON_NEGATIVE)
    grad_clip: float | None = option(5.0, bound=POSITIVE)  # max gradient norm (very low-bit QAT diverges without)
    log_every: int = option(10, bound=Bound(1), resume_free=True)  # steps


@dataclass
class TrackingConfig:
    uri: str | None = None  # None: sqlite:///<output_dir>/mlflow.db
    experiment: str = DEFAULT_EXPERIMENT
    artifact_location: str | None = None  # None: <output_dir>/mlartifacts


@dataclass
class MultiTrialConfig:
    """Multi-trial searches: candidates trained briefly, within a budget of epochs."""

    trial_epochs: int = option(2, bound=Bound(1))  # epochs of QAT for each candidate
    budget: float = option(1.0, bound=POSITIVE)  # candidates' epochs in all, as a multiple of train.epochs
    retrain_epochs: int | None = option(None, bound=NON_NEGATIVE,  # the pick from scratch; None: train.epochs, 0: not
                                        scoring_free=True)


@dataclass
class RelaxedConfig:
    """Differentiable searches (EdMIPS, DNAS)."""

    cost_weight: float = option(1.0, bound=NON_NEGATIVE)  # EdMIPS: lambda of the cost loss (E[GBOPs] / target)
    arch_lr: float = option(0.01, bound=POSITIVE)  # Adam learning rate of the architecture logits
    retrain_epochs: int | None = option(None, bound=NON_NEGATIVE,  # the argmax from scratch; None: train.epochs
                                        scoring_free=True)
    # DNAS (Wu et al. 2018): loss CE * beta * log(cost)^gamma under the Gumbel sample, cost in units of the target / e;
    # the weights train on 1 - arch_fraction of the training split, the logits on the rest, after a warm-up;
    # temperature tau0 * exp(-tau_decay * epoch).
    dnas_beta: float = option(0.2, bound=POSITIVE)
    dnas_gamma: float = option(0.6, bound=NON_NEGATIVE)
    arch_fraction: float = option(0.2, bound=OPEN_FRACTION)
    arch_warmup_epochs: int | None = option(None, bound=NON_NEGATIVE,  # None: 10, or half a run shorter than 20
                                            scoring_free=True)
    tau0: float = option(5.0, bound=POSITIVE)
    tau_decay: float = option(0.065, bound=NON_NEGATIVE)


@dataclass
class SensitivityConfig:
    """Sensitivity + integer program: pre-train, score every decision x format, solve under the budget, QAT."""

    pretrain_format: str = "int8"  # the uniform QAT format of the pre-training (fp32: plain training)
    pretrain_epochs: int | None = option(None, bound=Bound(1))  # None: pretrain_fraction x train.epochs (at least 1)
    pretrain_fraction: float = option(0.5, bound=OPEN_FRACTION)
    qat_epochs: int | None = option(None, bound=Bound(1), scoring_free=True)  # None: train.epochs - pre-training
    score: ScoreKind = ScoreKind.hessian
    batches: int = option(4, bound=Bound(1))  # training batches scored (per worker; averaged over the workers)
    hutchinson_samples: int = option(16, bound=Bound(1))  # Rademacher vectors per batch (score=hessian)


@dataclass
class StudyConfig:
    """A baseline comparison (`fliqs study`): one Ray Tune trial per (method, cost target, seed)."""

    name: str = "digits"  # selects conf/study/<name>.yaml; also the study's Tune and MLflow parent-run name
    methods: list[str] = option(factory=lambda: list(methods.STUDY_DEFAULT), resume_free=True)
    uniform_formats: list[str] = option(factory=list, resume_free=True)  # empty: the space's candidates and bf16
    target_fractions: list[float] = option(factory=lambda: [0.35, 0.5], item_bound=POSITIVE, resume_free=True)
    seeds: list[int] = option(factory=lambda: [0], item_bound=SEED, resume_free=True)
    max_concurrent_trials: int = option(1, bound=Bound(1), resume_free=True)
    cpus_per_trial: float = option(1.0, bound=POSITIVE, resume_free=True)


@dataclass
class FliqsConfig:
    model: ModelConfig = option(factory=ModelConfig)
    data: DataConfig = option(factory=DataConfig)
    quant: QuantConfig = option(factory=QuantConfig)
    space: SpaceConfig = option(factory=SpaceConfig)
    controller: ControllerConfig = option(factory=ControllerConfig)
    reward: RewardConfig = option(factory=RewardConfig)
    budget: BudgetConfig = option(factory=BudgetConfig, scoring_free=True)
    train: TrainConfig = option(factory=TrainConfig)
    tracking: TrackingConfig = option(factory=TrackingConfig, resume_free=True, scoring_free=True)
    multi_trial: MultiTrialConfig = option(factory=MultiTrialConfig)
    relaxed: RelaxedConfig = option(factory=RelaxedConfig)
    sensitivity: SensitivityConfig = option(factory=SensitivityConfig)
    study: StudyConfig = option(factory=StudyConfig, scoring_free=True)
    method: str = methods.DEFAULT  # a name of `fliqs.searchers.methods.METHODS` (`fliqs methods` lists them)
    output_dir: str = option("runs", resume_free=True, scoring_free=True)
    name: str | None = option(None, scoring_free=True)  # run name (`fliqs.run.inputs.NAME_CHARS`); reused: a resume
    allow_resume_changes: bool = option(False, resume_free=True)  # ... refused when its configuration changed
    seed: int = option(0, bound=SEED)
    ray_address: str | None = option(None, resume_free=True, scoring_free=True)  # None: a local Ray instance


BOUNDS: dict[str, Bound] = bounds(FliqsConfig)  # every numeric key and what it accepts (None where the type allows)
LIST_BOUNDS: dict[str, Bound] = bounds(FliqsConfig, item=True)
RESUME_FREE_KEYS: tuple[str, ...] = flagged(FliqsConfig, RESUME_FREE)
SCORING_FREE_KEYS: tuple[str, ...] = flagged(FliqsConfig, SCORING_FREE)


def typed(node) -> FliqsConfig:
    """The `FliqsConfig` of an OmegaConf node (merged, checked by OmegaConf's types); ConfigError in one line."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(FliqsConfig), node))
    except OmegaConfBaseException as err:
        raise ConfigError(one_line(err)) from None


def one_line(err: OmegaConfBaseException) -> str:
    msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    key = getattr(err, "full_key", None)
    return f"{msg} (key: {key})" if key and key not in msg else msg


def derive(cfg: FliqsConfig, changes: dict[str, Any]) -> FliqsConfig:
    """A child configuration: ``cfg`` with ``changes`` (dotted keys, ``{"train.epochs": 3}``, or nested sections),
    type-checked. Mappings merge (``{"model.kwargs": {"arch": ...}}`` adds a key); everything else is replaced."""
    nested: dict[str, Any] = {}
    for key, value in changes.items():
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cfg), nested)
    except OmegaConfBaseException as err:
        raise ConfigError(one_line(err)) from None
    return typed(merged)


def from_dict(data: dict[str, Any]) -> FliqsConfig:
    """The configuration a run saved (`to_dict`), with today's defaults for keys it predates."""
    return typed(OmegaConf.create(data))


def to_dict(cfg: FliqsConfig) -> dict[str, Any]:
    """Plain data (options as their values): what a saved model and a checkpoint keep."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)


def to_flat_dict(cfg: FliqsConfig) -> dict[str, Any]:
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

    walk(to_dict(cfg), "")
    return out
