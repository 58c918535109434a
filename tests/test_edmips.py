"""EdMIPS (fliqs.searchers.edmips): exactness at one-hot logits, gradients, the cost pull, training on digits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import CountConvs, batches, relaxed_setup

from fliqs.cost import summarize
from fliqs.layers import QuantLayer, get_assignment, quant_layers, set_assignment
from fliqs.searchers.edmips import EdMIPSSearch, edmips_step
from fliqs.searchers.relaxed import run_differentiable

pytestmark = pytest.mark.usefixtures("one_thread")

CANDIDATES = ["int2", "int4", "int8", "fp8_e4m3"]


def setup(shared_wa=True, lam=0.1, target_format="int4", range_mode="dynamic"):
    return relaxed_setup(EdMIPSSearch, CANDIDATES, shared_wa, lam=lam, target_format=target_format,
                         range_mode=range_mode)


@pytest.mark.parametrize("shared_wa", [True, False])
@pytest.mark.parametrize("train", [True, False])
def test_one_hot_logits_give_exactly_the_plain_quantized_model(shared_wa, train):
    model, layers, _, space, search = setup(shared_wa)
    gen = torch.Generator().manual_seed(1)
    choices = torch.randint(0, len(CANDIDATES), (len(space.decisions),), generator=gen).tolist()
    x = torch.randn(16, 1, 8, 8, generator=gen)
    model.train(train)
    set_assignment(layers, space.assignment(choices))
    plain = model(x)
    search.install(model)
    with torch.no_grad():
        for alpha, c in zip(search.alphas, choices, strict=True):
            alpha.fill_(0.0)
            alpha[c] = 1e4  # softmax is exactly one-hot in float32
    assert all(torch.equal(p, F.one_hot(torch.tensor(c), len(CANDIDATES)).float())
               for p, c in zip(search.probs(), choices, strict=True))
    relaxed = model(x)
    assert torch.equal(relaxed, plain)
    search.remove()
    assert torch.equal(model(x), plain)


def test_one_conv_per_layer():
    model, _, _, _, search = setup()
    search.install(model)
    calls = []
    with CountConvs(calls):
        model(torch.randn(4, 1, 8, 8))
    assert calls.count("conv2d") == 3 and calls.count("linear") == 1


def test_gradients_reach_weights_and_logits(digits_tensors):
    model, layers, _, _, search = setup(shared_wa=False)
    with torch.no_grad():
        for i, alpha in enumerate(search.alphas):
            alpha.copy_(torch.randn(len(CANDIDATES), generator=torch.Generator().manual_seed(i)))
    w_opt = torch.optim.SGD(model.parameters(), lr=0.0)
    a_opt = torch.optim.Adam(search.parameters(), lr=0.0)
    search.install(model)
    x, y = next(batches(digits_tensors[0]))
    stats = edmips_step(model, search, w_opt, a_opt, (x, y), 0)
    assert set(stats) == {"loss", "task_loss", "cost_loss", "expected_gbops", "entropy"}
    assert stats["loss"] == pytest.approx(stats["task_loss"] + stats["cost_loss"], rel=1e-6)
    assert stats["cost_loss"] == pytest.approx(0.1 * stats["expected_gbops"] / search.target, rel=1e-6)
    for layer in layers:
        assert layer.layer.weight.grad is not None and layer.layer.weight.grad.abs().sum() > 0
    for alpha in search.alphas:
        assert alpha.grad is not None and alpha.grad.abs().sum() > 0
    # Without the cost term the logits still move: the task loss alone reaches them through the mixture.
    search.lam = 0.0
    edmips_step(model, search, w_opt, a_opt, (x, y), 1)
    assert all(alpha.grad.abs().sum() > 0 for alpha in search.alphas)


def test_a_strong_cost_weight_drives_every_decision_to_the_cheapest_format(digits_tensors):
    model, layers, _, space, search = setup(lam=1000.0)  # the head (640 MACs) needs a strong pull too
    search.install(model)
    w_opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    a_opt = torch.optim.Adam(search.parameters(), lr=0.1)
    it = batches(digits_tensors[0])
    first = None
    for step in range(25):
        stats = edmips_step(model, search, w_opt, a_opt, next(it), step)
        first = first or stats["expected_gbops"]
    assert stats["expected_gbops"] < 0.3 * first
    assert search.final_choices() == [0] * len(space.decisions)  # int2
    search.apply_final()
    assert {fmts["w"] for fmts in get_assignment(layers).values()} == {"int2"}


def test_without_cost_the_loss_decreases_on_digits(digits_tensors):
    model, _, _, _, search = setup(lam=0.0, range_mode="ema")
    search.install(model)
    w_opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    a_opt = torch.optim.Adam(search.parameters(), lr=0.01)
    it = batches(digits_tensors[0])
    losses = [edmips_step(model, search, w_opt, a_opt, next(it), step)["loss"] for step in range(40)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-8:]) / 8 < 0.6 * sum(losses[:8]) / 8


def test_run_differentiable_in_process(digits_tensors):
    from torch.utils.data import DataLoader, TensorDataset

    model, layers, shapes, space, _ = setup()
    train = DataLoader(TensorDataset(*(t[:512] for t in digits_tensors[0])), batch_size=64, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    val = DataLoader(TensorDataset(*digits_tensors[1]), batch_size=256)
    target = summarize(shapes, space.uniform("int4")).gbops
    out = run_differentiable("edmips", model, layers, shapes, space, train, val, epochs=2, target=target, lam=0.5,
                             lr=0.05, arch_lr=0.05, device="cpu")
    assert set(out) >= {"choices", "assignment", "history", "gbops", "val_accuracy", "decisions"}
    assert len(out["history"]) == 2 and out["history"][-1]["step"] == 16
    assert out["assignment"] == space.assignment(out["choices"])
    assert out["gbops"] == pytest.approx(summarize(shapes, out["assignment"]).gbops)
    assert all(type(m) is QuantLayer for m in quant_layers(model))
    assert get_assignment(layers) == {k: dict(v) for k, v in out["assignment"].items()}
    assert 0.0 <= out["val_accuracy"] <= 1.0
