"""Loading the configuration: ``key=value`` overrides (OmegaConf dotlist, ``train.epochs=3``) over the YAML files of
``conf/`` over the dataclass defaults, checked, with every default that depends on another key resolved, once.

A group folder of ``conf/`` (``model``, ``data``, ``space``, ``study``) is selected by name: ``space=int_wide`` is
short for ``space.name=int_wide`` and merges ``conf/space/int_wide.yaml``. Precedence: dataclass defaults < the
selected group files < a study file (`fliqs study` only) < overrides. Loading imports no torch: plain errors cost a
fraction of a second.

Unknown keys, wrong types and bad values raise `fliqs.run.config.ConfigError` with one line naming the key (and
OmegaConf's suggestion where it has one); the CLI turns it into exit status 2. `load_config` is called by the
command line only; everything below takes the typed `fliqs.run.config.FliqsConfig` it returns.
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fliqs.data.datasets import DATASETS
from fliqs.errors import BadInput
from fliqs.quant.formats import get_format
from fliqs.run.config import BOUNDS, LIST_BOUNDS, ConfigError, FliqsConfig, one_line, typed
from fliqs.run.inputs import check_name, check_tracking_uri, ray_host_port
from fliqs.run.options import Bound
from fliqs.searchers import methods
from fliqs.searchers.rewards import QualityKind, RewardKind

GROUPS = ("model", "data", "space", "study")
MAX_HELD_OUT = 0.9  # data.val_fraction + data.test_fraction stay below this
DNAS_WARMUP_EPOCHS = 10  # relaxed.arch_warmup_epochs unless set: the paper's, or half a run shorter than twice it


def conf_dir() -> Path:
    return Path(str(resources.files("fliqs.conf")))


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


def load_config(overrides: list[str] | None = None, study: bool = False) -> FliqsConfig:
    """Defaults < ``conf/<group>/<name>.yaml`` of the selected model, data and space < the study file < overrides.

    A study file (``conf/study/<name>.yaml``, used with ``study=True``: `fliqs study`) fixes a whole experiment: its
    ``study:`` section is the grid, and it may set any other section (model, data, budgets) as well. Checked, and
    the defaults that depend on other keys resolved (`resolve`).
    """
    dotlist = []
    for item in overrides or []:
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
        merged = OmegaConf.merge(*layers, study_file, user)
    except OmegaConfBaseException as err:
        raise ConfigError(one_line(err)) from None
    except yaml.YAMLError as err:  # an override's value is parsed as YAML: `*` starts an alias, `[` a list
        raise ConfigError(f"an override's value is not valid YAML ({str(err).splitlines()[0]}); quote it, e.g. "
                          f"key=\"'*'\"") from None
    cfg = typed(merged)
    validate(cfg)
    resolve(cfg)
    check_methods(cfg)
    return cfg


def resolve(cfg: FliqsConfig) -> None:
    """The defaults that depend on other keys, set on the freshly loaded object (before anyone else holds it):
    "None means the full schedule" (``multi_trial.retrain_epochs``, ``relaxed.retrain_epochs``), the sensitivity
    method's split of ``train.epochs`` and DNAS' architecture warm-up."""
    epochs = cfg.train.epochs
    for section in (cfg.multi_trial, cfg.relaxed):
        if section.retrain_epochs is None:
            section.retrain_epochs = epochs
    s = cfg.sensitivity
    if s.pretrain_epochs is None:
        s.pretrain_epochs = max(1, int(s.pretrain_fraction * epochs + 0.5))
    if s.qat_epochs is None:
        s.qat_epochs = max(0, epochs - s.pretrain_epochs)  # 0 is refused by the method's own check
    if cfg.relaxed.arch_warmup_epochs is None:
        cfg.relaxed.arch_warmup_epochs = min(DNAS_WARMUP_EPOCHS, epochs // 2)


def check_numbers(cfg: FliqsConfig) -> None:
    """ConfigError naming the key for a non-finite number or one outside its bound (`fliqs.run.config.BOUNDS`)."""
    for key, bound in BOUNDS.items():
        value = select(cfg, key)
        if value is not None:
            _check_number(key, value, bound)
    for key, bound in LIST_BOUNDS.items():
        for value in select(cfg, key):
            _check_number(key, value, bound)


def select(cfg: FliqsConfig, key: str):
    """The value of the dotted ``key``."""
    node = cfg
    for part in key.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


def _check_number(key: str, value: float, bound: Bound) -> None:
    if not math.isfinite(value):
        raise ConfigError(f"{key}={value}: must be a finite number")
    if not bound.admits(value):
        raise ConfigError(f"{key}={value}: must be in {bound}" + (f" ({bound.why})" if bound.why else ""))


def validate(cfg: FliqsConfig) -> None:
    """Semantic checks the types cannot express. Raises ConfigError naming the key."""
    try:
        methods.get(cfg.method)
    except BadInput as err:
        raise ConfigError(f"method: {err}") from None
    if cfg.data.name not in DATASETS:
        raise ConfigError(f"data.name={cfg.data.name!r}: unknown data set; valid: {', '.join(DATASETS)}")
    if not cfg.space.candidates:
        raise ConfigError(f"space.name={cfg.space.name!r}: unknown search space; valid: "
                          f"{', '.join(group_options('space'))} (or give space.candidates=[...])")
    _check_formats(cfg)
    check_numbers(cfg)
    held_out = cfg.data.val_fraction + cfg.data.test_fraction
    if held_out >= MAX_HELD_OUT:
        raise ConfigError(f"data.val_fraction + data.test_fraction = {held_out:g}: must stay below {MAX_HELD_OUT} "
                          f"(the rest is the training split)")
    if cfg.reward.target_gbops is None and cfg.reward.target_fraction is None:
        raise ConfigError("reward: set reward.target_gbops or reward.target_fraction")
    if cfg.reward.kind in (RewardKind.mnas_soft, RewardKind.mnas_hard) and \
            cfg.reward.quality == QualityKind.neg_train_loss:
        raise ConfigError(f"reward.kind={cfg.reward.kind} multiplies the quality by (C/T)^beta, which needs a "
                          f"positive quality; reward.quality=neg_train_loss is negative (use val_accuracy, or an "
                          f"additive reward: absolute, one_sided)")
    duplicates = sorted({f for f in cfg.space.candidates if list(cfg.space.candidates).count(f) > 1})
    if duplicates:
        raise ConfigError(f"space.candidates lists {', '.join(duplicates)} more than once (a duplicate would get "
                          f"twice the controller's prior probability)")
    for key in ("name", "study.name"):
        check_name(key, select(cfg, key))
    check_tracking_uri(cfg.tracking.uri)
    if cfg.ray_address is not None:
        ray_host_port(cfg.ray_address)


def _check_formats(cfg: FliqsConfig) -> None:
    for key, names in (("space.candidates", cfg.space.candidates), ("quant.pinned", cfg.quant.pinned.values()),
                       ("quant.default_format", [cfg.quant.default_format]),
                       ("sensitivity.pretrain_format", [cfg.sensitivity.pretrain_format]),
                       ("quant.uniform_format", [cfg.quant.uniform_format] if cfg.quant.uniform_format else [])):
        for name in names:
            try:
                get_format(name)
            except ValueError as err:
                raise ConfigError(f"{key}: {err}") from None


def check_methods(cfg: FliqsConfig) -> None:
    """The method's own checks (`fliqs.searchers.methods.Method.checks`), on the resolved values."""
    for rule in methods.get(cfg.method).checks:
        message = rule(cfg)
        if message:
            raise ConfigError(message)
