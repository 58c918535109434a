"""How a quantizer finds the range it scales into the format (data of the quantizers, torch-free: the configuration
names these values).

* `RangeMode`: an activation's range from each batch, or calibrated during training and fixed at evaluation.
* `WeightClip` / `ActClip`: the largest magnitude, or a clipped range (the smallest quantization error for weights,
  a percentile for activations), for the formats a `ClipPolicy` names.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from fliqs.choices import Choice
from fliqs.quant.formats import Format


class RangeMode(Choice):
    """How an activation quantizer finds its range."""

    dynamic = "dynamic"  # amax of the current batch, in training and evaluation: outputs depend on the batch
    # Static (deployable): training uses the batch's amax and tracks it as an EMA; the calibration after training
    # (`fliqs.training.evaluation.recalibrate`) replaces it by the average over calibration batches at the final
    # formats; evaluation and export use that fixed range, so a sample's output does not depend on its batch.
    ema = "ema"


class WeightClip(Choice):
    """How a weight quantizer picks its per-channel range (for the formats of ``quant.clip_formats``)."""

    max = "max"  # the channel's largest magnitude
    mse = "mse"  # the clipped range with the smallest quantization error (a grid of ratios of the max)


class ActClip(Choice):
    """How an activation quantizer picks its per-tensor range (for the formats of ``quant.clip_formats``)."""

    max = "max"  # the largest magnitude of the batch
    percentile = "percentile"  # quant.act_percentile of the batch's magnitudes


@dataclass(frozen=True)
class ClipPolicy:
    """How ranges are clipped, and for which formats (fnmatch patterns of their names): data of the quantizers.

    Each quantizer holds a 0/1 flag buffer for its current format, so one compiled graph still serves every
    assignment; the clipped range is computed only when the policy asks for a clip at all."""

    weight: WeightClip = WeightClip.max
    act: ActClip = ActClip.max
    percentile: float = 99.99
    formats: tuple[str, ...] = ("int*",)

    def __post_init__(self) -> None:
        # Settings may arrive as strings (a saved model's configuration, a test): one type inside.
        object.__setattr__(self, "weight", WeightClip(self.weight))
        object.__setattr__(self, "act", ActClip(self.act))
        object.__setattr__(self, "percentile", float(self.percentile))
        object.__setattr__(self, "formats", tuple(self.formats))

    def applies(self, fmt: Format) -> bool:
        """Whether ``fmt`` is clipped: a name the patterns match, and not block-scaled (its block scales are its
        ranges; a clipped tensor range would only move NVFP4's tensor scale, chosen against the wrong error)."""
        return fmt.block is None and any(fnmatch.fnmatchcase(fmt.name, p) for p in self.formats)


NO_CLIP = ClipPolicy()
