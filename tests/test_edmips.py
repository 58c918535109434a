"""EdMIPS (fliqs.searchers.edmips): exactness at one-hot logits, gradients, the cost pull, training on digits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import CountConvs, batches, relaxed_search_in_process, relaxed_setup

from fliqs.quant.layers import QuantLayer, get_assignment, quant_layers, set_assignment
from fliqs.searchers.edmips import EdMIPSSearch
from fliqs.searchers.relaxed import relaxed_step
from fliqs.training.evaluation import accuracy, split_accuracy

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
    stats = relaxed_step(model, search, w_opt, a_opt, (x, y), 0)
    assert set(stats) == {"loss", "task_loss", "cost_loss", "expected_gbops", "entropy"}
    assert stats["loss"] == pytest.approx(stats["task_loss"] + stats["cost_loss"], rel=1e-6)
    assert stats["cost_loss"] == pytest.approx(0.1 * stats["expected_gbops"] / search.target, rel=1e-6)
    for layer in layers:
        assert layer.layer.weight.grad is not None and layer.layer.weight.grad.abs().sum() > 0
    for alpha in search.alphas:
        assert alpha.grad is not None and alpha.grad.abs().sum() > 0
    # Without the cost term the logits still move: the task loss alone reaches them through the mixture.
    search.lam = 0.0
    relaxed_step(model, search, w_opt, a_opt, (x, y), 1)
    assert all(alpha.grad.abs().sum() > 0 for alpha in search.alphas)


def test_a_strong_cost_weight_drives_every_decision_to_the_cheapest_format(digits_tensors):
    model, layers, _, space, search = setup(lam=1000.0)  # the head (640 MACs) needs a strong pull too
    search.install(model)
    w_opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    a_opt = torch.optim.Adam(search.parameters(), lr=0.1)
    it = batches(digits_tensors[0])
    first = None
    for step in range(25):
        stats = relaxed_step(model, search, w_opt, a_opt, next(it), step)
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
    losses = [relaxed_step(model, search, w_opt, a_opt, next(it), step)["loss"] for step in range(40)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-8:]) / 8 < 0.6 * sum(losses[:8]) / 8


def test_search_in_process_ends_with_plain_layers_at_the_argmax_assignment(digits_tensors):
    from torch.utils.data import DataLoader, TensorDataset

    model, layers, _, space, search = setup(lam=0.5)
    train = DataLoader(TensorDataset(*(t[:512] for t in digits_tensors[0])), batch_size=64, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    history = relaxed_search_in_process(model, search, train, epochs=2, lr=0.05, arch_lr=0.05)
    assert [h["step"] for h in history] == list(range(16))
    assert all(set(h) == {"step", "loss", "task_loss", "cost_loss", "expected_gbops", "entropy"} for h in history)
    for h in history:
        assert h["cost_loss"] == pytest.approx(0.5 * h["expected_gbops"] / search.target, rel=1e-6)
        assert h["loss"] == pytest.approx(h["task_loss"] + h["cost_loss"], rel=1e-6)
    # The logits moved, and the final assignment is their argmax, set on plain QuantLayers.
    assert not search.installed
    assert any(float(alpha.detach().abs().max()) > 0 for alpha in search.alphas)
    choices = search.final_choices()
    assert choices == [int(alpha.detach().argmax()) for alpha in search.alphas]
    assignment = space.assignment(choices)
    assert all(type(m) is QuantLayer for m in quant_layers(model))
    assert get_assignment(layers) == assignment
    # The report names each decision's argmax with its probability.
    report = search.decisions_report()
    assert [row["decision"] for row in report] == [d.name for d in space.decisions]
    for row, alpha, c in zip(report, search.alphas, choices, strict=True):
        p = torch.softmax(alpha.detach(), -1)
        assert row["choice"] == CANDIDATES[c]
        assert row["probability"] == pytest.approx(float(p[c]))
        assert list(row["probs"].values()) == pytest.approx(p.tolist())
    # The discrete model evaluates; the split accuracy counts every validation sample, batch by batch (dynamic
    # activation ranges depend on the batch), and a hand count in the same batches agrees.
    vx, vy = digits_tensors[1]
    acc = split_accuracy(model, TensorDataset(vx, vy), batch_size=100)
    assert model.training  # the mode is restored
    model.eval()
    with torch.no_grad():
        hits = sum(int((model(vx[i:i + 100]).argmax(-1) == vy[i:i + 100]).sum()) for i in range(0, len(vy), 100))
        whole = int((model(vx).argmax(-1) == vy).sum())
    assert acc == hits / len(vy)
    assert accuracy(model, vx, vy) == pytest.approx(whole / len(vy), abs=1e-6)
    assert 0.0 < acc <= 1.0
