"""Memory of one search step as the number of candidate formats K grows: FLIQS against DNAS and EdMIPS.

One training step (forward + backward + update) of timm's ``test_resnet`` (batch 32, 32x32, 10 classes) on the
CPU, for K = 2 ({int4, int8}), 4 ({int2, int3, int4, int8}) and 9 (conf/space/int_fp.yaml), one decision per
layer setting weights and activations:

* uniform QAT: every layer int8, plain forward/backward/SGD step (the baseline, measured in every column);
* FLIQS: `fliqs.searchers.reinforce.fliqs_step` (one sampled assignment, one copy of the weights);
* EdMIPS: `fliqs.searchers.relaxed.relaxed_step` on an `EdMIPSSearch` (mixed weight and mixed activation, one
  conv per layer);
* DNAS: `fliqs.searchers.relaxed.relaxed_step` on a `DNASSearch` (a Gumbel-weighted conv per candidate).

Memory is measured deterministically, not from the allocator: the bytes of the tensors autograd saves for the
backward pass (``torch.autograd.graph.saved_tensors_hooks``; unique storages, parameters excluded since they are
counted next), plus parameters and gradients (model, and architecture logits or controller policy). Transient
buffers freed inside the forward are not counted. Each figure is a ratio to uniform QAT in the same run.
Usage: python benchmarks/memory_vs_candidates.py
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from fliqs.models.registry import create_model
from fliqs.quant.cost import measure_layers, summarize
from fliqs.quant.layers import quantize_model, set_assignment
from fliqs.searchers.dnas import DNASSearch
from fliqs.searchers.edmips import EdMIPSSearch
from fliqs.searchers.reinforce import fliqs_step, make_search
from fliqs.searchers.relaxed import relaxed_step
from fliqs.searchers.space import build_space

ROOT = Path(__file__).resolve().parents[1]
SPACES = {
    2: ["int4", "int8"],
    4: ["int2", "int3", "int4", "int8"],
    9: list(OmegaConf.load(ROOT / "conf" / "space" / "int_fp.yaml").candidates),
}
METHODS = ("uniform", "fliqs", "edmips", "dnas")
LABELS = {"uniform": "uniform QAT (int8)", "fliqs": "FLIQS (one sampled assignment)",
          "edmips": "EdMIPS (mixed weight and activation)", "dnas": "DNAS (one path per candidate)"}
BATCH, SIZE, CLASSES = 32, 32, 10


class SavedBytes:
    """Counts the unique storages autograd saves for backward inside the context (parameters excluded)."""

    def __init__(self, exclude: set[int]):
        self.exclude = exclude
        self.storages: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr and ptr not in self.exclude:
            self.storages[ptr] = max(self.storages.get(ptr, 0), storage.nbytes())
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def _bytes(params) -> tuple[int, int]:
    params = list(params)
    weights = sum(p.numel() * p.element_size() for p in params)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    return weights, grads


def measure(method: str, candidates: list[str]) -> dict:
    torch.manual_seed(0)
    model = create_model("test_resnet", num_classes=CLASSES, in_chans=3)
    layers = quantize_model(model)
    shapes = measure_layers(model, SIZE, 3)
    space = build_space([layer.name for layer in layers], candidates)
    target = summarize(shapes, space.uniform("int4")).gbops
    gen = torch.Generator().manual_seed(0)
    batch = torch.randn(BATCH, 3, SIZE, SIZE, generator=gen), torch.randint(0, CLASSES, (BATCH,), generator=gen)
    w_opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    extra: list[nn.Parameter] = []
    if method == "uniform":
        set_assignment(layers, space.uniform("int8"))

        def step():
            loss = F.cross_entropy(model(batch[0]), batch[1])
            w_opt.zero_grad(set_to_none=True)
            loss.backward()
            w_opt.step()
    elif method == "fliqs":
        total_params = sum(p.numel() for p in model.parameters())
        search = make_search(space, layers, shapes, total_params, total_steps=4, target=target,
                             controller_kwargs={"warmup_fraction": 0.0})
        extra = list(search.controller.policy.parameters())
        random.seed(0)

        def step():
            fliqs_step(model, search, w_opt, batch, batch, 0, torch.Generator().manual_seed(0))
    else:
        cls = EdMIPSSearch if method == "edmips" else DNASSearch
        search = cls(space, layers, shapes, target=target, lam=0.1, total_steps=4).install(model)
        a_opt = torch.optim.Adam(search.parameters(), lr=0.01)
        extra = list(search.parameters())

        def step():
            relaxed_step(model, search, w_opt, a_opt, batch, 0, generator=torch.Generator().manual_seed(0))
    params = list(model.parameters()) + extra
    with SavedBytes({p.untyped_storage().data_ptr() for p in params}) as saved:
        step()
    weights, grads = _bytes(params)
    return {"saved": saved.total, "params": weights, "grads": grads, "total": saved.total + weights + grads}


def main() -> None:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    results = {k: {m: measure(m, cands) for m in METHODS} for k, cands in SPACES.items()}
    base = results[2]["uniform"]
    print(f"test_resnet, batch {BATCH}, {SIZE}x{SIZE}, {CLASSES} classes, CPU; one step, forward + backward + update. "
          f"Uniform QAT: {base['saved'] / 2**20:.1f} MiB saved for backward + "
          f"{(base['params'] + base['grads']) / 2**20:.1f} MiB parameters and gradients.\n")
    heads = " | ".join(f"K={k}" for k in SPACES)
    print("(a) saved-for-backward bytes + parameters + gradients, ratio to uniform QAT\n")
    print(f"| method | {heads} |\n|---|{'---|' * len(SPACES)}")
    for m in METHODS:
        print(f"| {LABELS[m]} | " + " | ".join(
            f"{results[k][m]['total'] / results[k]['uniform']['total']:.2f}" for k in SPACES) + " |")
    print("\n(b) saved-for-backward bytes only (activations and quantized copies), ratio to uniform QAT\n")
    print(f"| method | {heads} |\n|---|{'---|' * len(SPACES)}")
    for m in METHODS:
        print(f"| {LABELS[m]} | " + " | ".join(
            f"{results[k][m]['saved'] / results[k]['uniform']['saved']:.2f}" for k in SPACES) + " |")
    print("\nspaces: " + "; ".join(f"K={k}: {', '.join(c)}" for k, c in SPACES.items()))


if __name__ == "__main__":
    main()
