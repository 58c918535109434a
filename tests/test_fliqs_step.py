"""The one-shot FLIQS step (fliqs.searchers.reinforce) on the real fliqs_cnn and the embedded digits data."""

from __future__ import annotations

import pytest
import torch
from helpers import batches

from fliqs.models.registry import create_model
from fliqs.quant.cost import measure_layers
from fliqs.quant.layers import get_assignment, quantize_model
from fliqs.searchers.reinforce import expected_search_cost, fliqs_step, make_search
from fliqs.searchers.rewards import QualityKind
from fliqs.searchers.space import assignment_cost, build_space
from fliqs.training.evaluation import accuracy, batch_shard, split_accuracy

pytestmark = pytest.mark.usefixtures("one_thread")

CANDIDATES = ["int2", "int4", "int8", "fp8_e4m3"]
STEPS = 40
KEYS = {"loss", "quality", "sampled_cost", "reward", "baseline", "entropy"}


@pytest.fixture(scope="module")
def digits(digits_tensors):
    train, (vx, vy) = digits_tensors
    return train, (vx[:128], vy[:128])


def _setup(quality=QualityKind.val_accuracy, pinned=None, dual_scale=None, reward_kind="absolute", **space_kwargs):
    torch.manual_seed(0)
    model = create_model("fliqs_cnn", num_classes=10, in_chans=1)
    layers = quantize_model(model, pinned=pinned)
    shapes = measure_layers(model, 8, 1)
    total_params = sum(p.numel() for p in model.parameters())
    space = build_space([layer.name for layer in layers], CANDIDATES, pinned=pinned, **space_kwargs)
    target = assignment_cost(shapes, space.uniform("int4"), total_params)
    search = make_search(space, layers, shapes, total_params, total_steps=STEPS, target=target, quality=quality,
                         tracking="reward" if dual_scale is None else "dual", dual_scale=dual_scale or 2.0,
                         reward_kind=reward_kind)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return model, layers, shapes, total_params, space, search, optimizer


class Recorder:
    """Wraps the controller's sample() to see what fliqs_step sampled."""

    def __init__(self, controller):
        self.sampled: list[list[int]] = []
        self._sample = controller.sample
        controller.sample = self

    def __call__(self, step, generator=None):
        choices = self._sample(step, generator)
        self.sampled.append(choices.tolist())
        return choices


def test_fliqs_step_trains_and_searches(digits):
    train, val = digits
    model, layers, shapes, total_params, space, search, optimizer = _setup()
    controller = search.controller
    assert controller.warmup_steps == 10
    recorder = Recorder(controller)
    gen = torch.Generator().manual_seed(0)
    it = batches(train)
    losses, logits = [], [controller.policy.logits.detach().clone()]
    for step in range(STEPS):
        stats = fliqs_step(model, search, optimizer, next(it), val, step, generator=gen)
        assert KEYS <= set(stats), set(stats)
        choices = recorder.sampled[-1]
        assignment = space.assignment(choices)
        # The layers now hold exactly the sampled assignment.
        assert get_assignment(layers) == assignment
        assert stats["sampled_cost"] == assignment_cost(shapes, assignment, total_params)
        assert stats["reward"] == pytest.approx(search.reward(stats["quality"], stats["sampled_cost"]), rel=1e-12)
        assert 0.0 <= stats["quality"] <= 1.0
        assert stats["quality"] == pytest.approx(accuracy(model, *val, stateless_bn=True), abs=1e-12)
        losses.append(stats["loss"])
        logits.append(controller.policy.logits.detach().clone())

    # Different assignments were really sampled, and the layers followed them.
    assert len({tuple(c) for c in recorder.sampled}) > 10
    # Warm-up (steps 0..9): the policy is frozen. Afterwards it learns.
    for step in range(controller.warmup_steps):
        assert torch.equal(logits[step + 1], logits[0]), step
    assert not torch.equal(logits[-1], logits[0])
    after = logits[controller.warmup_steps:]
    changed = sum(not torch.equal(a, b) for a, b in zip(after, after[1:], strict=False))
    assert changed >= STEPS - controller.warmup_steps - 2
    # The shared weights learn under the sampled formats.
    assert sum(losses[-10:]) / 10 < 0.7 * sum(losses[:10]) / 10
    assert all(torch.isfinite(torch.tensor(losses)))
    # Expected cost under the policy lies between the cheapest and the most expensive uniform assignment.
    cheap = assignment_cost(shapes, space.uniform("int2"), total_params)
    dear = assignment_cost(shapes, space.uniform("int8"), total_params)
    assert cheap < expected_search_cost(search, shapes, total_params) < dear
    assert len(search.final_choices()) == len(space.decisions)


@pytest.mark.parametrize("reward_kind", ["absolute", "one_sided"])
def test_the_budget_multiplier_ascends_on_the_expected_cost_after_the_warmup(digits, reward_kind):
    """The sampled reward stays the method's own; lambda moves by rate x (E[C]/T - 1), E[C] the policy's exact
    expected cost before each RL update, never in the warm-up, and never below 0 for a one-sided reward."""
    train, val = digits
    model, _, shapes, total_params, _, search, optimizer = _setup(dual_scale=3.0, reward_kind=reward_kind)
    controller = search.controller
    multiplier = controller.multiplier
    assert multiplier.rate == pytest.approx(3.0 / (STEPS - controller.warmup_steps))
    assert multiplier.nonnegative == (reward_kind == "one_sided")
    gen = torch.Generator().manual_seed(4)
    it = batches(train, seed=4)
    lam, target, seen = 0.0, controller.constraint.target, []
    for step in range(STEPS):
        before = expected_search_cost(search, shapes, total_params)
        stats = fliqs_step(model, search, optimizer, next(it), val, step, generator=gen)
        assert stats["reward"] == pytest.approx(search.reward(stats["quality"], stats["sampled_cost"]), rel=1e-12)
        if not controller.in_warmup(step):
            lam += multiplier.rate * (before / target - 1)
            lam = max(0.0, lam) if reward_kind == "one_sided" else lam
        assert stats["cost_multiplier"] == pytest.approx(lam, rel=1e-9, abs=1e-12)
        seen.append(lam)
    assert max(seen) > 0.1  # the uniform start expects 2.3 x the target: lambda rose

def test_quality_neg_train_loss(digits):
    train, val = digits
    model, _, _, _, _, search, optimizer = _setup(quality=QualityKind.neg_train_loss)
    gen = torch.Generator().manual_seed(1)
    it = batches(train, seed=1)
    for step in range(5):
        stats = fliqs_step(model, search, optimizer, next(it), val, step, generator=gen)
        assert stats["quality"] == -stats["loss"]
        assert stats["reward"] == pytest.approx(search.reward(-stats["loss"], stats["sampled_cost"]), rel=1e-12)


def test_pinned_layer_keeps_its_format(digits):
    train, val = digits
    pinned = {"head": "int8"}
    model, layers, _, _, space, search, optimizer = _setup(pinned=pinned, shared_wa=False)
    assert "head:w" not in [d.name for d in space.decisions]
    gen = torch.Generator().manual_seed(2)
    it = batches(train, seed=2)
    for step in range(6):
        fliqs_step(model, search, optimizer, next(it), val, step, generator=gen)
        assert get_assignment(layers)["head"] == {"w": "int8", "a": "int8"}


def test_fliqs_step_is_deterministic(digits):
    train, val = digits
    runs = []
    for _ in range(2):
        model, _, _, _, _, search, optimizer = _setup()
        search.controller.warmup_steps = 2  # let the controller learn within the few steps
        gen = torch.Generator().manual_seed(3)
        it = batches(train, seed=3)
        runs.append([fliqs_step(model, search, optimizer, next(it), val, step, generator=gen)
                     for step in range(6)])
        runs[-1].append(search.controller.policy.logits.detach().clone())
    assert runs[0][:-1] == runs[1][:-1]
    assert torch.equal(runs[0][-1], runs[1][-1])


class Fixed(torch.nn.Module):
    """Predicts the class stored in feature 0 of each sample; records the mode of each call."""

    def __init__(self):
        super().__init__()
        self.modes: list[bool] = []

    def forward(self, x):
        self.modes.append(self.training)
        return torch.nn.functional.one_hot(x[:, 0].long(), 10).float()


def test_accuracy_and_split_accuracy_count_by_hand():
    from torch.utils.data import TensorDataset

    pred = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5])
    y = torch.tensor([3, 1, 0, 1, 5, 0, 2, 0, 5, 3, 0])  # 7 of 11 right
    x = torch.stack([pred.float(), torch.zeros(11)], 1)
    model = Fixed().train()
    assert accuracy(model, x, y) == pytest.approx(7 / 11)
    assert model.modes == [False] and model.training  # evaluated in eval mode, the mode restored
    model.eval()
    assert accuracy(model, x, y) == pytest.approx(7 / 11) and not model.training
    model.train()
    model.modes.clear()
    # Exact over the whole split, whatever the batch size (a last partial batch included).
    for batch_size in (1, 4, 11, 64):
        assert split_accuracy(model, TensorDataset(x, y), batch_size) == 7 / 11
    assert not any(model.modes) and model.training
    # Sharded by whole batches of the single-process batching (rank r: batches r, r+3, ...; batch size 2 cuts the
    # 11 samples into [0,1] [2,3] [4,5] [6,7] [8,9] [10]); summing the counts gives the exact total.
    counts = []
    for rank, samples in enumerate(([0, 1, 6, 7], [2, 3, 8, 9], [4, 5, 10])):
        assert batch_shard(11, 2, rank, 3) == samples
        part = split_accuracy(model, TensorDataset(x, y), 2, rank=rank, world=3, all_reduce=counts.append)
        assert part == pytest.approx(float((pred[samples] == y[samples]).float().mean()))
    total = sum(counts)
    assert total.tolist() == [7.0, 11.0]


def _bn_state(model) -> list[torch.Tensor]:
    return [b.clone() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)
            for b in (m.running_mean, m.running_var)]


def test_the_quality_of_a_sample_does_not_depend_on_earlier_samples(digits):
    """Two replicas of the same weights whose BatchNorm running statistics come from different past assignments
    (int2 everywhere against fp8 everywhere) must give one sample the same quality: the reward measures the sampled
    network with the batch's own statistics (TuNAS), and leaves the running statistics as they were."""
    import copy

    from fliqs.quant.layers import quant_layers, set_assignment

    (x, y), val = digits
    model, layers, shapes, total_params, space, search, _ = _setup()
    histories = {}
    for past in ("int2", "fp8_e4m3"):
        twin = copy.deepcopy(model)
        set_assignment(quant_layers(twin), space.uniform(past))
        twin.train()
        with torch.no_grad():
            for i in range(0, 512, 64):  # forwards in training mode: the running statistics follow `past`
                twin(x[i:i + 64])
        histories[past] = twin
    a, b = histories.values()
    assert not all(torch.equal(u, v) for u, v in zip(_bn_state(a), _bn_state(b), strict=True))
    qualities, eval_mode = [], []
    for twin in (a, b):
        twin_search = make_search(space, quant_layers(twin), shapes, total_params, total_steps=STEPS, target=1.0)
        frozen = torch.optim.SGD(twin.parameters(), lr=0.0)  # no weight change: only the statistics differ
        # The same policy and generator on both: the same sample, at a step past the warm-up.
        stats = fliqs_step(twin, twin_search, frozen, (x[:64], y[:64]), val, STEPS - 1,
                           torch.Generator().manual_seed(5))
        qualities.append(stats["quality"])
        eval_mode.append(accuracy(twin, *val))  # the same sample measured through the running statistics
    assert qualities[0] == qualities[1]
    assert eval_mode[0] != eval_mode[1], "control: running statistics do depend on the past samples"


def test_stateless_accuracy_leaves_every_statistic_as_it_was(digits):
    from fliqs.quant.layers import FormatQuantizer
    from fliqs.quant.policy import RangeMode

    _, (vx, vy) = digits
    torch.manual_seed(0)
    model = create_model("fliqs_cnn", num_classes=10, in_chans=1)
    quantize_model(model, default="int4", range_mode=RangeMode.ema)
    model.train()
    with torch.no_grad():
        model(vx)  # some running statistics and calibrated ranges
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {name: m.training for name, m in model.named_modules()}
    value = accuracy(model, vx, vy, stateless_bn=True)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in snapshot.items())
    assert modes == {name: m.training for name, m in model.named_modules()}
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert all(q.track_range for q in model.modules() if isinstance(q, FormatQuantizer))
    # It is the batch-statistics forward: equal to a training-mode forward of a copy (which would update them).
    import copy

    twin = copy.deepcopy(model).train()
    with torch.no_grad():
        expected = (twin(vx).argmax(-1) == vy).float().mean().item()
    assert value == expected


def test_fliqnas_step_leaves_a_skipped_blocks_decisions_alone(digits):
    """The REINFORCE update of a sample that skips a block does not touch that block's kernel decision or the
    formats of its layers (hierarchical masking, TuNAS)."""
    from functools import partial

    from fliqs.models.supernet import block_options, measure_architectures, set_architecture

    (x, y), val = digits
    torch.manual_seed(0)
    model = create_model("fliqnas_digits", num_classes=10, in_chans=1)
    layers = quantize_model(model)
    shapes = measure_architectures(model, 8, 1)
    space = build_space([q.name for q in layers], ["int4", "int8"], blocks=block_options(model))
    search = make_search(space, layers, shapes, sum(p.numel() for p in model.parameters()), total_steps=STEPS,
                         target=1.0, set_architecture=partial(set_architecture, model))
    names = [d.name for d in space.decisions]
    skippable = next(d.name.split(":")[0] for d in space.decisions if d.kind == "expansion" and "skip" in d.candidates)
    choices = [d.candidates.index("skip") if d.name == f"{skippable}:expansion" else
               len(d.candidates) - 1 if d.kind == "expansion" else 0 for d in space.decisions]  # only one skipped
    search.controller.sample = lambda step, generator=None: torch.tensor(choices)
    search.controller.baseline = 0.0  # a positive advantage: every active decision moves
    before = search.controller.policy.logits.detach().clone()
    fliqs_step(model, search, torch.optim.SGD(model.parameters(), lr=0.0), (x[:64], y[:64]), val, STEPS - 1)
    moved = (search.controller.policy.logits.detach() != before).any(-1).tolist()
    inactive = [n == f"{skippable}:kernel" or n.startswith(f"{skippable}.") for n in names]
    assert any(inactive) and sum(inactive) > 1
    assert moved == [not i for i in inactive]
