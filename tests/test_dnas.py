"""DNAS (fliqs.searchers.dnas): Gumbel sampling and its temperature, exactness with a hard one-hot sample,
one conv per candidate path, gradients, the cost pull and training on digits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import CountConvs, batches, relaxed_setup

from fliqs.quant.cost import summarize
from fliqs.quant.layers import QuantLayer, get_assignment, quant_layers, set_assignment
from fliqs.searchers.dnas import DNASSearch, gumbel_softmax
from fliqs.searchers.relaxed import relaxed_step

pytestmark = pytest.mark.usefixtures("one_thread")

CANDIDATES = ["int2", "int4", "int8", "fp8_e4m3"]
STEPS = 30


def setup(shared_wa=True, lam=0.1, total_steps=STEPS, range_mode="dynamic", **kwargs):
    return relaxed_setup(DNASSearch, CANDIDATES, shared_wa, lam=lam, range_mode=range_mode,
                         total_steps=total_steps, **kwargs)


def test_temperature_follows_the_papers_schedule():
    """DNAS: tau = 5 * exp(-0.065 * epoch), the epoch fractional."""
    search = setup(steps_per_epoch=10)[-1]
    assert search.temperature(0) == pytest.approx(5.0)
    assert search.temperature(10) == pytest.approx(5.0 * math.exp(-0.065))
    assert search.temperature(905) == pytest.approx(5.0 * math.exp(-0.065 * 90.5))
    taus = [search.temperature(s) for s in range(200)]
    assert all(a > b for a, b in zip(taus[:-1], taus[1:], strict=True))
    custom = setup(tau0=2.0, tau_decay=0.5, steps_per_epoch=4)[-1]
    assert custom.temperature(8) == pytest.approx(2.0 * math.exp(-1.0))


@pytest.mark.parametrize("kwargs", [{"steps_per_epoch": 0}, {"tau0": 0.0}, {"tau_decay": -1.0}, {"gamma": 0.0}])
def test_bad_schedule_raises(kwargs):
    with pytest.raises(ValueError, match="steps_per_epoch >= 1"):
        setup(**kwargs)


def test_the_loss_is_multiplicative_in_the_cost_under_the_gumbel_sample():
    """CE * beta * log(e * cost / target)^gamma, the cost under the forward's Gumbel sample (not the softmax)."""
    _, _, _, space, search = setup(beta=0.3, gamma=0.5)
    search.draw(1.0, torch.Generator().manual_seed(0))
    sampled, expected = search.sample_gbops(), search.expected_gbops()
    assert not torch.isclose(sampled, expected)
    assert torch.allclose(sampled, search.expected_gbops(search.sample))
    task = torch.tensor(2.0)
    loss, cost_part = search.objective(task, sampled)
    factor = 0.3 * math.log(math.e * float(sampled) / search.target) ** 0.5
    assert float(loss) == pytest.approx(2.0 * factor) and float(cost_part) == pytest.approx(2.0 * factor - 2.0)
    at_target, _ = search.objective(task, torch.tensor(search.target))
    assert float(at_target) == pytest.approx(2.0 * 0.3)  # log is 1 at the target
    sampled.backward()
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in search.alphas)  # through the sample
    search.end_step()


def test_gumbel_softmax_is_reproducible_and_hard_is_exactly_one_hot():
    logits = torch.tensor([0.5, -1.0, 2.0, 0.0], requires_grad=True)
    a = gumbel_softmax(logits, 1.0, torch.Generator().manual_seed(7))
    b = gumbel_softmax(logits, 1.0, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and float(a.detach().sum()) == pytest.approx(1.0)
    hard = gumbel_softmax(logits, 1.0, torch.Generator().manual_seed(7), hard=True)
    assert torch.equal(hard.detach(), F.one_hot(a.argmax(), 4).float())
    (hard * torch.arange(4.0)).sum().backward()
    assert logits.grad.abs().sum() > 0  # straight-through: the soft sample's gradient
    # Lower temperature, sharper samples (same noise).
    sharp = gumbel_softmax(logits.detach(), 0.1, torch.Generator().manual_seed(7))
    assert float(sharp.max()) > float(a.detach().max())


@pytest.mark.parametrize("shared_wa", [True, False])
def test_a_hard_one_hot_sample_gives_exactly_the_plain_quantized_model(shared_wa):
    model, layers, _, space, search = setup(shared_wa)
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    search.install(model)
    sample = search.draw(1.0, torch.Generator().manual_seed(3), hard=True)
    choices = [int(g.argmax()) for g in sample]
    assert len(set(choices)) > 1
    relaxed = model(x)
    search.remove()
    set_assignment(layers, space.assignment(choices))
    assert torch.equal(relaxed, model(x))


@pytest.mark.parametrize(("shared_wa", "paths"), [(True, 4), (False, 16)])
def test_one_conv_per_candidate_path(shared_wa, paths):
    model, _, _, _, search = setup(shared_wa)
    search.install(model)
    calls = []
    with CountConvs(calls):
        model(torch.randn(4, 1, 8, 8))
    assert calls.count("conv2d") == 3 * paths and calls.count("linear") == paths


def test_step_samples_gradients_reach_weights_and_logits(digits_tensors):
    model, layers, _, _, search = setup()
    search.install(model)
    w_opt = torch.optim.SGD(model.parameters(), lr=0.0)
    a_opt = torch.optim.Adam(search.parameters(), lr=0.0)
    x, y = next(batches(digits_tensors[0]))
    stats = relaxed_step(model, search, w_opt, a_opt, (x, y), 0, generator=torch.Generator().manual_seed(0))
    assert set(stats) == {"loss", "task_loss", "cost_loss", "expected_gbops", "entropy", "temperature"}
    assert stats["temperature"] == pytest.approx(5.0)
    assert search.sample is None  # the sample lives for one training forward
    # The cost is expected under softmax(alpha): uniform at zero logits.
    assert stats["expected_gbops"] == pytest.approx(float(search.expected_gbops().detach()))
    for layer in layers:
        assert layer.layer.weight.grad is not None and layer.layer.weight.grad.abs().sum() > 0
    for alpha in search.alphas:
        assert alpha.grad is not None and alpha.grad.abs().sum() > 0
    # The same generator state gives the same step; the alternating variant runs too.
    again = setup()[-1]
    assert again.draw(5.0, torch.Generator().manual_seed(0))[0].tolist() == \
        search.draw(5.0, torch.Generator().manual_seed(0))[0].tolist()
    search.end_step()
    stats = relaxed_step(model, search, w_opt, a_opt, (x, y), 1, arch_batch=(x, y))
    assert "arch_task_loss" in stats


def test_a_steep_cost_term_drives_the_cost_below_the_target(digits_tensors):
    model, layers, shapes, space, search = setup(gamma=8.0)  # a steep cost term
    search.install(model)
    w_opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    a_opt = torch.optim.Adam(search.parameters(), lr=0.1)
    it, gen = batches(digits_tensors[0]), torch.Generator().manual_seed(0)
    first = None
    for step in range(25):
        stats = relaxed_step(model, search, w_opt, a_opt, next(it), step, generator=gen)
        first = first or stats["expected_gbops"]
    # Uniform over the candidates costs about 2x the target; the loss pulls below it (not below target / e, where
    # log(e * cost / target) is clamped and nothing pushes further).
    assert stats["expected_gbops"] < search.target < 0.5 * first
    search.apply_final()
    assert summarize(shapes, get_assignment(layers)).gbops < search.target
    assert all(type(m) is QuantLayer for m in quant_layers(model))


def test_without_cost_the_loss_decreases_on_digits(digits_tensors):
    model, _, _, _, search = setup(range_mode="ema")
    search.install(model)
    w_opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    a_opt = torch.optim.Adam(search.parameters(), lr=0.01)
    it, gen = batches(digits_tensors[0]), torch.Generator().manual_seed(0)
    losses = [relaxed_step(model, search, w_opt, a_opt, next(it), step, generator=gen,
                           train_arch=False)["task_loss"] for step in range(32)]  # a weights-only warm-up
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-8:]) / 8 < 0.6 * sum(losses[:8]) / 8
