"""Pieces every stage shares: optimizer construction, LR schedules, threads, progress, data-source log lines."""

from __future__ import annotations

import contextlib
import functools
import math
import sys
import warnings
from collections.abc import Iterable

import torch
from tqdm.auto import tqdm


def make_adam(
    named_params: Iterable[tuple[str, torch.nn.Parameter]],
    lr: float,
    betas: tuple[float, float] = (0.9, 0.95),
    weight_decay: float = 0.0,
    eps: float = 1e-8,
    fused: bool = False,
) -> torch.optim.AdamW:
    """AdamW with InstructGPT's β = (0.9, 0.95); biases, norms and embeddings are not weight-decayed.

    ``fused`` uses torch's fused AdamW kernel (one pass over each parameter instead of a dozen elementwise
    ops: the same update up to float rounding, several times faster on CPU for large models); it needs
    floating-point parameters on CPU or CUDA.
    """
    decay, no_decay = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "embed" in name or "wte" in name or "wpe" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps, fused=fused or None)


def cosine_lr_factor(step: int, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.1) -> float:
    """LR multiplier: linear warmup, then cosine decay from 1 to ``min_ratio`` (InstructGPT: to 10% of peak)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def log_data_source(stage: str, what: str, source: str) -> None:
    """One log line saying where one of a stage's data sources came from, e.g.
    ``sft: data demonstrations <- demos.jsonl`` or ``... <- sandbox world (seed 0)``, so that a run never mixes in
    data its user did not see named."""
    print(f"{stage}: data {what} <- {source}", flush=True)


def set_threads(threads: int) -> None:
    """Use ``threads`` intra-op threads (0 keeps torch's default)."""
    if threads > 0:
        torch.set_num_threads(threads)


def progress(total: int, initial: int = 0, desc: str = "", disable: bool = False) -> tqdm:
    """A progress bar on stderr; when stderr is not a terminal (logs, CI) it updates every 15 s instead.

    ``disable`` hides it (ranks other than 0 of a multi-process run)."""
    interactive = sys.stderr.isatty()
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        dynamic_ncols=True,
        file=sys.stderr,
        mininterval=0.2 if interactive else 15.0,
        disable=disable,
    )


def mixed_precision(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device`` (bf16 mixed precision), or nothing when ``dtype`` is None.

    Matmuls run in ``dtype``; norms, softmaxes, log-sum-exps, losses, optimizer states and the weights
    themselves stay float32 (``torch.autocast``'s lists, plus the float32 log-prob and value reads below).
    """
    if dtype is None:
        return contextlib.nullcontext()
    if device.type == "cpu" and dtype == torch.bfloat16 and not cpu_has_native_bf16():
        _warn_software_bf16()
    return torch.autocast(device.type, dtype=dtype)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX, as oneDNN sees it).

    Without it PyTorch runs bf16 matmuls in a software path, several times slower than float32
    (measurements: benchmarks/RESULTS.md)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


@functools.cache
def _warn_software_bf16() -> None:
    warnings.warn(
        "run.precision=bf16 on a CPU without native bf16 matrix multiplies (no AVX512-BF16 or AMX): PyTorch "
        "multiplies bf16 in software here, several times slower than float32. Use run.precision=fp32 on this "
        "machine.",
        RuntimeWarning,
        stacklevel=3,
    )


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
"""``run.precision`` values (``config.PRECISION_NAMES``) -> autocast dtype (None = the weights' own dtype)."""
