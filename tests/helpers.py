"""Plain helpers shared by the test modules; import them as ``from helpers import ...``.

pytest's default (prepend) import mode puts tests/ on ``sys.path``, so this module is importable from any test.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from fliqs.models.registry import create_model
from fliqs.quant.cost import measure_layers, summarize
from fliqs.quant.formats import get_format
from fliqs.quant.layers import quantize_model
from fliqs.quant.rounding import round_to_format
from fliqs.searchers import methods
from fliqs.searchers.relaxed import relaxed_step
from fliqs.searchers.space import build_space


def cast_to_format(x: torch.Tensor, fmt, overflow=None) -> torch.Tensor:
    """Reference path of the tests: round ``x`` (no scaling) to ``fmt``; ``overflow`` defaults to the format's
    own policy. Computed in float32, returned in ``x.dtype``."""
    fmt = get_format(fmt)
    q = round_to_format(x.float(), fmt.max_value, 2.0**fmt.man_bits, 2.0**fmt.emin, overflow or fmt.overflow)
    return q.to(x.dtype)


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


def relaxed_search_in_process(model, search, train_loader, epochs, lr=0.05, arch_lr=0.05, momentum=0.9,
                              seed=0) -> list[dict]:
    """A minimal in-process differentiable search: install ``search`` on ``model``, SGD on the model's
    parameters, Adam on the search's logits, one `relaxed_step` per batch of ``train_loader`` for ``epochs``,
    then ``search.apply_final()``. Returns the per-step stats (each with its ``"step"``)."""
    search.install(model)
    w_opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    arch_opt = torch.optim.Adam(search.parameters(), lr=arch_lr)
    generator = torch.Generator().manual_seed(seed)
    history, step = [], 0
    try:
        for _ in range(epochs):
            for x, y in train_loader:
                stats = relaxed_step(model, search, w_opt, arch_opt, (x, y), step, generator=generator)
                assert math.isfinite(stats["loss"]), (step, stats)
                history.append({"step": step, **stats})
                step += 1
    except BaseException:
        search.remove()
        raise
    search.apply_final()
    return history


def run_cli(*argv: str) -> tuple[int, str, str]:
    """``fliqs ARGV`` in this process (`fliqs.cli.run`): (exit status, stdout, stderr). The process boundary itself
    (exit status, nothing else on stderr) is tested once, in test_cli.py."""
    import contextlib
    import io

    from fliqs.cli import run

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = run(list(argv))
        except SystemExit as exc:  # argparse's own usage errors
            status = exc.code
    return status, out.getvalue(), err.getvalue()


def bad_search_input(tmp_path, *overrides: str) -> str:
    """Run ``fliqs search`` with bad ``overrides``; assert exit status 2, exactly one line on stderr and nothing
    written to ``tmp_path`` (its output_dir); return that line."""
    status, _, err = run_cli("search", f"output_dir={tmp_path}", *overrides)
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert not any(tmp_path.iterdir()), "nothing may be written for bad input"
    return lines[0]


def run_without_torch(code: str) -> str:
    """Run ``code`` in a fresh interpreter, assert it imported no torch, return its stdout (a cold torch import
    costs seconds: configuration and metadata must not pay for it)."""
    import subprocess
    import sys

    check = "\nimport sys\nassert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))\n"
    proc = subprocess.run([sys.executable, "-c", code + check], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def write_tiny_cifar10(root, per_batch: int = 8, seed: int = 0):
    """A CIFAR-10-format folder (``cifar-10-batches-py``: five training batches, a test batch, the meta file) of
    random 32x32 images, ``per_batch`` per batch; returns ``root``."""
    import pickle
    from pathlib import Path

    import numpy as np

    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, per_batch)], b"batch_label": name.encode()}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))
    return Path(root)


def write_tiny_imagefolder(root, classes: int = 3, per_class: int = 2, size: int = 8):
    """An ImageNet-layout folder (train/<class>/*.png, val/<class>/*.png) of small random images; returns root."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = Path(root) / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return Path(root)


def wait_for(predicate, timeout: float, every: float = 0.2):
    """``predicate()``'s first truthy value, polled every ``every`` seconds; TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"condition not reached in {timeout} s")


# The sensitivity method (by its registry family: its name lives in one product module) and a fast configuration
# of it on digits: few epochs, large batches, few scoring batches and Hutchinson samples.
SENSITIVITY_METHOD = next(name for name, m in methods.METHODS.items() if m.family == methods.SENSITIVITY)
SENSITIVITY_FAST = ["space=int_wide", "train.epochs=2", "data.batch_size=128", "train.log_every=5",
                    "train.bn_recalibration_batches=2", "sensitivity.batches=2", "sensitivity.hutchinson_samples=4"]


def write_tiny_fashion_mnist(root, train: int = 200, test: int = 50, seed: int = 0, gz: bool = True):
    """A Fashion-MNIST folder of the four IDX files (``train``/``test`` 28 x 28 uint8 images whose brightness
    follows the label, labels 0..9 in turn), written by hand from the IDX layout; returns ``root``."""
    import gzip
    import struct
    from pathlib import Path

    import numpy as np

    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for part, n in (("train", train), ("t10k", test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = np.clip(rng.normal(labels[:, None, None] * 20 + 30, 20, (n, 28, 28)), 0, 255).astype(np.uint8)
        for stem, header, data in ((f"{part}-images-idx3-ubyte", struct.pack(">BBBBIII", 0, 0, 8, 3, n, 28, 28),
                                    images), (f"{part}-labels-idx1-ubyte", struct.pack(">BBBBI", 0, 0, 8, 1, n),
                                              labels)):
            payload = header + data.tobytes()
            if gz:
                (root / f"{stem}.gz").write_bytes(gzip.compress(payload))
            else:
                (root / stem).write_bytes(payload)
    return root
