"""The sequential baseline of FLIQNAS: the architecture first, the formats second, in ``train.epochs`` in all.

Phase 1 (half the epochs): the joint search of the registry entry's first phase method with every layer at full
precision, aiming at the MACs of the supernet's reference architecture (MobileNetV2's own). Phase 2 (the rest):
its second phase method (FLIQS) from scratch on the architecture found, at the run's target. Each phase is a nested
MLflow run with role ``phase``.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from fliqs import schema
from fliqs.config import to_flat_dict
from fliqs.searchers import methods
from fliqs.trainables.fit import RunContext, add_accounting, fit_child
from fliqs.trainables.plan import plan_run


def run_sequential(cfg: DictConfig, ctx: RunContext) -> dict:
    arch_method, format_method = methods.get(cfg.method).phases
    arch_epochs = max(1, cfg.train.epochs // 2)
    arch_cfg = OmegaConf.merge(cfg, {
        "method": arch_method, "quant": {"pinned": {"*": "fp32"}},
        "train": {"epochs": arch_epochs, "finetune_epochs": 0},
        "reward": {"target_gbops": None, "target_fraction": 1.0}})  # fp32 cost of the reference architecture
    found = fit_child(arch_cfg, ctx, "architecture", schema.PHASE, methods.get(arch_method).worker,
                      to_flat_dict(arch_cfg), target=plan_run(arch_cfg).target)
    format_cfg = OmegaConf.merge(cfg, {"method": format_method, "model": {"kwargs": {"arch": found["architecture"]}},
                                       "train": {"epochs": max(1, cfg.train.epochs - arch_epochs)}})
    m = fit_child(format_cfg, ctx, "formats", schema.PHASE, methods.get(format_method).worker,
                  to_flat_dict(format_cfg))
    totals = add_accounting(add_accounting({}, found), m)
    return {**m, **totals, "architecture": found["architecture"]}
