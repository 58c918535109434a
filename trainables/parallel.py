"""Where a worker's training runs: its device, data parallelism (DDP through Ray Train), compilation, the memory
layout, gradient clipping, and its peak memory for the equal-budget accounting."""

from __future__ import annotations

import resource
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from fliqs.run.config import FliqsConfig
from fliqs.trainables.worker import WorkerContext


def worker_device(cfg: FliqsConfig) -> torch.device:
    if cfg.train.use_gpu and torch.cuda.is_available():
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


def all_reduce_mean(world: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def reduce(t: torch.Tensor) -> torch.Tensor:
        out = t.detach().clone()
        dist.all_reduce(out)
        return out / world

    return reduce


def use_compile(flag: bool | None, device: torch.device, searches_architecture: bool = False) -> bool:
    """``train.compile``, resolved: ``None`` compiles on GPUs only. On CPUs compiling takes longer than a short
    search saves, and the eager fake quantization is within the CPU target (benchmarks/RESULTS.md, issue 6).
    An architecture search (FLIQNAS) changes the graph's shapes with every sampled architecture: one graph per
    architecture would be compiled, so ``None`` leaves it eager."""
    if flag is None:
        return device.type == "cuda" and not searches_architecture
    return bool(flag)


def memory_format(model: nn.Module, device: torch.device) -> torch.memory_format:
    """channels_last for conv models on GPUs (cuDNN's fast NHWC kernels, bf16 tensor cores; the first conv turns
    NCHW inputs into NHWC activations), the default layout otherwise."""
    if device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return torch.channels_last
    return torch.preserve_format


def training_model(model: nn.Module, worker: WorkerContext, searches_architecture: bool) -> nn.Module:
    """DDP over the workers (the model itself in one process), compiled when ``train.compile`` says so.

    Compile the DDP wrapper, not the module inside it: dynamo's DDPOptimizer then splits the graph at DDP's bucket
    boundaries, so the gradient all-reduce still overlaps the backward pass. The format buffers are data: one
    training and one evaluation graph serve every sampled assignment.
    """
    wrapped = model
    if worker.world > 1:
        import ray.train.torch

        # No buffer sync in forward: each replica keeps its own format buffers (sampled per replica). A supernet's
        # sampled path leaves parameters (skipped blocks) without gradients: DDP must be told to expect that.
        # forward_sync_buffers=False (what broadcast_buffers=False was before torch 2.13 deprecated it) still
        # broadcasts the buffers once at wrapping: they are identical on every rank then (same seed, no step yet).
        kwargs = {"forward_sync_buffers": False, "find_unused_parameters": searches_architecture}
        wrapped = ray.train.torch.prepare_model(model, move_to_device=False, parallel_strategy_kwargs=kwargs)
    return torch.compile(wrapped) if use_compile(worker.cfg.train.compile, worker.device, searches_architecture) \
        else wrapped


def clip_gradients(optimizer: torch.optim.Optimizer, clip: float | None) -> None:
    """Clip the gradient norm of ``optimizer``'s parameters before each of its steps, whatever method steps it: at
    2-3 bits a channel quantized to all zeros meets BatchNorm's 1/sqrt(eps) and the weights explode."""
    if not clip:
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def clip_before_step(*_) -> None:  # a step pre-hook must return None
        torch.nn.utils.clip_grad_norm_(params, clip)

    optimizer.register_step_pre_hook(clip_before_step)


_PROC_STATUS, _PROC_CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def reset_peak_memory(device: torch.device) -> None:
    """Start counting `peak_memory_mb` from now: a process runs several fits (an in-process search's phases, the
    trials a reused Ray Tune actor runs one after another), and each reports the peak during its own run (which
    still counts what the process holds at its start). Linux resets the resident high-water mark on writing "5" to
    clear_refs; elsewhere the process's lifetime peak stays, an upper bound."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif _PROC_CLEAR_REFS.exists():
        try:
            _PROC_CLEAR_REFS.write_text("5")
        except OSError:  # a sandbox may refuse it: the lifetime peak is an upper bound
            pass


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory since `reset_peak_memory` on GPU, else the peak resident set (Linux: VmHWM, KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if _PROC_STATUS.exists():
        for line in _PROC_STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)
