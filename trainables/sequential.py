"""The sequential baseline of FLIQNAS: the architecture first, the formats second, in ``train.epochs`` in all.

Phase 1 (half the epochs): the joint search of the registry entry's first phase method with every layer at full
precision, aiming at the MACs of the supernet's reference architecture (MobileNetV2's own). Phase 2 (the rest):
its second phase method (FLIQS) from scratch on the architecture found, at the run's target. Each phase is a nested
MLflow run with role ``phase``.
"""

from __future__ import annotations

from fliqs.run import schema
from fliqs.run.config import derive
from fliqs.searchers import methods
from fliqs.trainables.fit import RunContext, fit_child
from fliqs.trainables.result import RunResult, total_accounting


def run_sequential(run: RunContext) -> RunResult:
    cfg = run.cfg
    arch_method, format_method = methods.get(cfg.method).phases
    arch_epochs = max(1, cfg.train.epochs // 2)
    arch_cfg = derive(cfg, {"method": arch_method, "quant.pinned": {"*": "fp32"},
                            "train.epochs": arch_epochs, "train.finetune_epochs": 0,
                            "reward.target_gbops": None, "reward.target_fraction": 1.0})  # fp32 cost of the reference
    found = fit_child(run, "architecture", schema.PHASE, methods.get(arch_method).worker, arch_cfg, params=True)
    # The run's own target, in GBOPs: a fraction would be of the found architecture's cost, not the reference's.
    format_cfg = derive(cfg, {"method": format_method, "model.kwargs": {"arch": found.extras["architecture"]},
                              "train.epochs": max(1, cfg.train.epochs - arch_epochs),
                              "reward.target_gbops": run.target})
    result = fit_child(run, "formats", schema.PHASE, methods.get(format_method).worker, format_cfg, params=True)
    return result.with_accounting(total_accounting(found, result)).with_extras(
        architecture=found.extras["architecture"])
