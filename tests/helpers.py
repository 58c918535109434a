"""Plain helpers shared by the test modules; import them as ``from helpers import ...``.

pytest's default (prepend) import mode puts tests/ on ``sys.path``, so this module is importable from any test.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import fliqs.models  # noqa: F401  (registers fliqs_cnn with timm)
from fliqs.cost import measure_layers, summarize
from fliqs.layers import quantize_model
from fliqs.models import create_model
from fliqs.searchers.space import build_space


def batches(data, batch_size=64, seed=0):
    """Endless shuffled mini-batches of ``data = (x, y)``: a fresh permutation per pass, partial batches dropped."""
    x, y = data
    gen = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y) - batch_size + 1, batch_size):
            idx = perm[i:i + batch_size]
            yield x[idx], y[idx]


class CountConvs(torch.overrides.TorchFunctionMode):
    """Records the conv2d / linear calls made inside it."""

    def __init__(self, calls):
        super().__init__()
        self.calls = calls

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (F.conv2d, F.linear):
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


def relaxed_setup(search_cls, candidates, shared_wa=True, lam=0.1, target_format="int4", range_mode="dynamic",
                  **search_kwargs):
    """A seeded fliqs_cnn with its QuantLayers and shapes, and a ``search_cls`` relaxed search over ``candidates``
    whose cost target is the uniform ``target_format`` assignment. Returns (model, layers, shapes, space, search)."""
    torch.manual_seed(0)
    model = create_model("fliqs_cnn", num_classes=10, in_chans=1)
    layers = quantize_model(model, range_mode=range_mode)
    shapes = measure_layers(model, 8, 1)
    space = build_space([layer.name for layer in layers], candidates, shared_wa=shared_wa)
    target = summarize(shapes, space.uniform(target_format)).gbops
    search = search_cls(space, layers, shapes, target=target, lam=lam, **search_kwargs)
    return model, layers, shapes, space, search


def bad_search_input(tmp_path, *overrides: str) -> str:
    """Run ``fliqs search`` with bad ``overrides`` in a subprocess; assert exit status 2, exactly one line on stderr
    and nothing written to ``tmp_path`` (its output_dir); return that line."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "fliqs.cli", "search", f"output_dir={tmp_path}", *overrides],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert not any(tmp_path.iterdir()), "nothing may be written for bad input"
    return lines[0]
