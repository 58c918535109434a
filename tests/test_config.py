"""fliqs.run.config: defaults, group selection from conf/, overrides, and one-line errors for every bad input."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import pytest
import yaml

from fliqs.errors import BadInput
from fliqs.quant.formats import FORMATS
from fliqs.run.config import ConfigError, to_flat_dict
from fliqs.run.loading import conf_dir, group_options, load_config, select

REPO_ROOT = Path(__file__).resolve().parents[1]


def _yaml(group: str, name: str) -> dict:
    return yaml.safe_load((REPO_ROOT / "conf" / group / f"{name}.yaml").read_text()) or {}


def test_defaults_load():
    cfg = load_config()
    assert cfg.model.name == "fliqs_cnn"
    assert cfg.data.name == "digits"
    assert cfg.space.name == "int_fp"
    assert list(cfg.space.candidates) == _yaml("space", "int_fp")["candidates"]  # filled from conf/space
    assert cfg.quant.default_format == "fp32"
    assert cfg.train.num_workers == 0
    assert cfg.data.batch_size == _yaml("data", "digits")["batch_size"]


def test_conf_dir_is_the_repository_conf_folder():
    assert conf_dir().resolve() == (REPO_ROOT / "conf").resolve()
    assert group_options("space") == sorted(p.stem for p in (REPO_ROOT / "conf" / "space").glob("*.yaml"))


def test_space_group_selection():
    cfg = load_config(["space=int_wide"])
    assert cfg.space.name == "int_wide"
    assert list(cfg.space.candidates) == _yaml("space", "int_wide")["candidates"] == ["int2", "int3", "int4",
                                                                                        "int8"]


@pytest.mark.parametrize("space", ["fp", "int", "int_fp", "int_wide"])
def test_every_space_file_loads_and_names_real_formats(space):
    cfg = load_config([f"space={space}"])
    assert list(cfg.space.candidates) == _yaml("space", space)["candidates"]
    assert all(c in FORMATS for c in cfg.space.candidates)


def test_model_group_selection():
    cfg = load_config(["model=resnet18"])
    assert cfg.model.name == "resnet18"
    assert cfg.model.input_size == _yaml("model", "resnet18")["input_size"] == 224


def test_overrides_beat_group_files():
    cfg = load_config(["space=int_wide", "space.candidates=[int8,fp8_e4m3]", "train.epochs=3",
                       "reward.target_fraction=0.4", "quant.act_range=ema"])
    assert list(cfg.space.candidates) == ["int8", "fp8_e4m3"]
    assert cfg.train.epochs == 3
    assert cfg.reward.target_fraction == 0.4
    assert cfg.quant.act_range.value == "ema"


@pytest.mark.parametrize("override,key,suggestion", [
    ("train.epoch=3", "epoch", "epochs"),
    ("model.nme=x", "nme", "name"),
    ("trian.epochs=3", "trian", "train"),
])
def test_unknown_key(override, key, suggestion):
    with pytest.raises(ConfigError) as info:
        load_config([override])
    msg = str(info.value)
    assert isinstance(info.value, BadInput)
    assert key in msg and "Did you mean" in msg and suggestion in msg
    assert "\n" not in msg


@pytest.mark.parametrize("override,key", [
    ("train.epochs=abc", "train.epochs"),
    ("data.batch_size=1.5", "data.batch_size"),
    ("train.use_gpu=maybe", "train.use_gpu"),
    ("quant.act_range=bogus", "quant.act_range"),
])
def test_wrong_type(override, key):
    with pytest.raises(ConfigError) as info:
        load_config([override])
    assert key in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_space_lists_valid_spaces():
    with pytest.raises(ConfigError) as info:
        load_config(["space=nope"])
    msg = str(info.value)
    assert "nope" in msg
    for name in group_options("space"):
        assert name in msg
    assert {"fp", "int", "int_fp", "int_wide"} <= set(group_options("space"))


@pytest.mark.parametrize("override,key", [
    ("space.candidates=[int8,int9]", "space.candidates"),
    ("quant.pinned.head=fp9", "quant.pinned"),
    ("quant.default_format=float8", "quant.default_format"),
])
def test_unknown_format(override, key):
    with pytest.raises(ConfigError) as info:
        load_config([override])
    msg = str(info.value)
    assert key in msg
    assert "fp8_e4m3" in msg  # the valid formats are listed


@pytest.mark.parametrize("override", [
    "data.name=mnist", "data.batch_size=0", "data.val_fraction=1.5", "train.epochs=0", "train.num_workers=-1",
    "reward.target_gbops=-1", "train.epochs",
])
def test_bad_values(override):
    with pytest.raises(ConfigError):
        load_config([override])


def test_to_flat_dict_flattens():
    cfg = load_config(["quant.pinned.head=int8", "train.epochs=4"])
    flat = to_flat_dict(cfg)
    assert flat["train.epochs"] == 4
    assert flat["quant.pinned.head"] == "int8"
    assert flat["model.name"] == "fliqs_cnn"
    assert flat["quant.act_range"] == "ema" and flat["reward.kind"] == "absolute"  # enums as strings
    assert flat["space.candidates"] == list(cfg.space.candidates)
    for key, value in flat.items():
        assert not isinstance(value, dict)
        node = select(cfg, key)
        node = node.value if isinstance(node, Enum) else node
        assert node == value, key
    # Every leaf of the config appears (here: every top-level section has at least one key).
    sections = {k.split(".")[0] for k in flat}
    expected = {"model", "data", "quant", "space", "controller", "reward", "train", "tracking", "seed",
                "multi_trial", "relaxed", "study"}
    assert expected <= sections


def test_to_flat_dict_keeps_layer_patterns_as_one_json_param():
    """MLflow refuses ``*`` in a param name: a mapping keyed by layer patterns becomes one JSON param."""
    import json

    from mlflow.utils.validation import _validate_param_name

    cfg = load_config(["quant.pinned={'*': fp32, 'features.0': int8}", "method=fliqnas", "model=fliqnas_digits",
                       "model.kwargs.arch=k3e6"])
    flat = to_flat_dict(cfg)
    assert json.loads(flat["quant.pinned"]) == {"*": "fp32", "features.0": "int8"}
    assert flat["model.kwargs.arch"] == "k3e6" and flat["method"] == "fliqnas"
    for key in flat:
        _validate_param_name(key)


def test_methods_come_from_the_registry_with_their_checks():
    from fliqs.searchers.methods import METHODS

    with pytest.raises(ConfigError, match="per sampled architecture"):
        load_config(["method=fliqnas", "reward.cost=size"])
    with pytest.raises(ConfigError, match="cost loss in GBOPs"):
        load_config(["method=edmips", "reward.cost=size"])
    with pytest.raises(ConfigError, match="quant.uniform_format"):
        load_config(["method=uniform"])
    with pytest.raises(ConfigError, match="unknown method 'darts'; valid: " + ", ".join(METHODS)):
        load_config(["method=darts"])
    with pytest.raises(ConfigError, match="quant.uniform_format"):
        load_config(["method=uniform", "quant.uniform_format=int5"])
    for name in METHODS:  # every registered method loads with what it needs
        extra = ["quant.uniform_format=int4"] if METHODS[name].per_format else []
        assert load_config([f"method={name}", *extra]).method == name


def test_a_study_file_sets_any_section_but_only_for_a_study():
    """``conf/study/<name>.yaml`` fixes a whole experiment (its grid, model, space, budgets) for `fliqs study`; a
    plain search with the default study name is not affected by it."""
    study = _yaml("study", "fliqnas_digits")
    cfg = load_config(["study=fliqnas_digits"], study=True)
    assert list(cfg.study.methods) == study["study"]["methods"]
    assert cfg.model.name == study["model"]["name"] == "fliqnas_digits"
    assert cfg.model.kwargs["width_mult"] == _yaml("model", "fliqnas_digits")["kwargs"]["width_mult"]  # its group file
    assert list(cfg.space.candidates) == _yaml("space", "int_fp_4to8")["candidates"]
    assert load_config(["study=fliqnas_digits", "model=fliqs_cnn"], study=True).model.name == "fliqs_cnn"
    digits = load_config([], study=True)
    assert digits.multi_trial.trial_epochs == _yaml("study", "digits")["multi_trial"]["trial_epochs"]
    assert load_config(["study=fliqnas_digits"]).model.name == "fliqs_cnn"  # not a study: no study file
    assert load_config().multi_trial.trial_epochs == 2  # the dataclass default


def test_loading_a_config_imports_no_torch():
    """Plain config errors are found in a fraction of a second: no torch behind `load_config` or the CLI's
    config check."""
    from helpers import run_without_torch

    run_without_torch("from fliqs.run.loading import load_config\nfrom fliqs.cli import run\n"
                      "load_config(['method=tpe', 'space=fp'], study=True)\n"
                      "assert run(['search', 'train.epochz=1']) == 2\n")


def test_field_metadata_names_the_resume_free_and_scoring_free_keys():
    """Whether a resume may change a key, and whether the shared sensitivity scoring depends on it, are flags on the
    dataclass fields (a flag on a section covers its keys), read back as the lists the consumers use."""
    from fliqs.run.config import BOUNDS, RESUME_FREE_KEYS, SCORING_FREE_KEYS, FliqsConfig
    from fliqs.run.options import numeric_keys, under

    resume_free = set(RESUME_FREE_KEYS)
    assert {"output_dir", "ray_address", "allow_resume_changes", "tracking.uri", "tracking.experiment",
            "train.max_failures", "train.log_every", "data.loader_workers", "data.path", "study.methods",
            "study.seeds", "study.target_fractions", "study.uniform_formats"} <= resume_free
    assert not {"study.name", "train.lr", "train.epochs", "space.candidates", "reward.target_fraction"} & resume_free
    assert under("tracking.uri", SCORING_FREE_KEYS) and under("budget.tracking", SCORING_FREE_KEYS)
    assert {"reward.target_fraction", "reward.target_gbops", "sensitivity.qat_epochs", "name", "output_dir"} <= \
        set(SCORING_FREE_KEYS)
    assert not {"train.epochs", "sensitivity.pretrain_epochs", "quant.uniform_format", "seed"} & set(SCORING_FREE_KEYS)
    assert set(numeric_keys(FliqsConfig)) == set(BOUNDS)  # every number has its bound on its field


def test_derive_makes_a_typed_child_and_leaves_the_parent():
    from fliqs.quant.policy import RangeMode
    from fliqs.run.config import derive

    cfg = load_config(["train.epochs=4", "quant.pinned.head=int8"])
    child = derive(cfg, {"train.epochs": 2, "quant.act_range": "ema", "quant.pinned": {"stem": "fp32"},
                         "reward": {"target_fraction": 0.3}})
    assert child.train.epochs == 2 and cfg.train.epochs == 4
    assert child.quant.act_range is RangeMode.ema and f"{child.quant.act_range}" == "ema"  # typed, prints as its value
    assert child.quant.pinned == {"head": "int8", "stem": "fp32"}  # mappings merge
    assert child.reward.target_fraction == 0.3 and child.multi_trial.retrain_epochs == cfg.multi_trial.retrain_epochs
    with pytest.raises(ConfigError, match="train.epochs"):
        derive(cfg, {"train.epochs": "many"})


def test_defaults_that_depend_on_other_keys_are_resolved_at_load():
    cfg = load_config(["train.epochs=16"])
    assert cfg.multi_trial.retrain_epochs == cfg.relaxed.retrain_epochs == 16
    assert (cfg.sensitivity.pretrain_epochs, cfg.sensitivity.qat_epochs) == (8, 8)
    assert cfg.relaxed.arch_warmup_epochs == 8  # half a run shorter than 20 epochs
    assert load_config(["train.epochs=40"]).relaxed.arch_warmup_epochs == 10
    assert load_config(["train.epochs=16", "multi_trial.retrain_epochs=0"]).multi_trial.retrain_epochs == 0
