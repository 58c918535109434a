"""DNAS (fliqs.searchers.dnas): Gumbel sampling and its temperature, exactness with a hard one-hot sample,
one conv per candidate path, gradients, the cost pull and training on digits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import CountConvs, batches, relaxed_setup

from fliqs.layers import QuantLayer, get_assignment, quant_layers, set_assignment
from fliqs.searchers.dnas import DNASSearch, gumbel_softmax
from fliqs.searchers.relaxed import relaxed_step

pytestmark = pytest.mark.usefixtures("one_thread")

CANDIDATES = ["int2", "int4", "int8", "fp8_e4m3"]
STEPS = 30


def setup(shared_wa=True, lam=0.1, total_steps=STEPS, range_mode="dynamic", **kwargs):
    return relaxed_setup(DNASSearch, CANDIDATES, shared_wa, lam=lam, range_mode=range_mode,
                         total_steps=total_steps, **kwargs)


def test_temperature_anneals_exponentially_from_5_to_half():
    search = setup(total_steps=101)[-1]
    assert search.temperature(0) == pytest.approx(5.0)
    assert search.temperature(100) == pytest.approx(0.5)
    assert search.temperature(50) == pytest.approx(math.sqrt(5.0 * 0.5))
    assert search.temperature(1000) == pytest.approx(0.5)
    taus = [search.temperature(s) for s in range(101)]
    assert all(a > b for a, b in zip(taus[:-1], taus[1:], strict=True))
    # total_steps goes through the shared RelaxedSearch constructor; other schedules follow it.
    assert search.total_steps == 101
    custom = setup(total_steps=11, tau0=2.0, tau_end=0.2)[-1]
    assert (custom.temperature(0), custom.temperature(10)) == pytest.approx((2.0, 0.2))
    assert custom.temperature(5) == pytest.approx(math.sqrt(2.0 * 0.2))


@pytest.mark.parametrize("kwargs", [{"total_steps": 0}, {"tau0": 0.5, "tau_end": 1.0}, {"tau_end": 0.0}])
def test_bad_schedule_raises(kwargs):
    with pytest.raises(ValueError, match="total_steps >= 1"):
        setup(**kwargs)


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


def test_a_strong_cost_weight_drives_every_decision_to_the_cheapest_format(digits_tensors):
    model, layers, _, space, search = setup(lam=1000.0)
    search.install(model)
    w_opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    a_opt = torch.optim.Adam(search.parameters(), lr=0.1)
    it, gen = batches(digits_tensors[0]), torch.Generator().manual_seed(0)
    first = None
    for step in range(25):
        stats = relaxed_step(model, search, w_opt, a_opt, next(it), step, generator=gen)
        first = first or stats["expected_gbops"]
    assert stats["expected_gbops"] < 0.3 * first
    assert search.final_choices() == [0] * len(space.decisions)  # int2
    search.apply_final()
    assert {fmts["w"] for fmts in get_assignment(layers).values()} == {"int2"}
    assert all(type(m) is QuantLayer for m in quant_layers(model))


def test_without_cost_the_loss_decreases_on_digits(digits_tensors):
    model, _, _, _, search = setup(lam=0.0, range_mode="ema")
    search.install(model)
    w_opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    a_opt = torch.optim.Adam(search.parameters(), lr=0.01)
    it, gen = batches(digits_tensors[0]), torch.Generator().manual_seed(0)
    losses = [relaxed_step(model, search, w_opt, a_opt, next(it), step, generator=gen)["loss"] for step in range(32)]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-8:]) / 8 < 0.6 * sum(losses[:8]) / 8
