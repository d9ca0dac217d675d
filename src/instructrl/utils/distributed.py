"""Data parallelism through ``accelerate``: one process behaves exactly as before, N processes shard the data.

A stage asks :func:`get_runtime` for its :class:`Runtime`. Without a launcher (``WORLD_SIZE`` unset or 1)
that is a single-process runtime that never touches ``accelerate`` or ``torch.distributed``: every helper
is the identity, so single-process numerics and exact resume are unchanged. Under ``accelerate launch``
or ``torchrun`` with N processes it wraps an :class:`accelerate.Accelerator`, which sets up
``torch.distributed`` (NCCL on GPUs, gloo on CPUs); the trained models are wrapped in DDP. DeepSpeed and FSDP
launch configs are refused with an explanation (:data:`UNSUPPORTED_ENGINE_HELP`): the loops are not wired for
them yet.

The conventions every stage follows under N processes (rank r of N):

- **Data**: every rank computes the same *global* batch (the order depends only on seed and step) and
  trains on its contiguous share :meth:`Runtime.shard` of it.
- **Seeds**: ``seed + r · RANK_SEED_STRIDE`` (a prime) for everything per-rank (sampling, dropout); the
  data order and minibatch shuffles use the shared seed so all ranks agree on the global batch.
- **Losses**: each rank divides its local loss *sum* by ``n_global / N`` (:meth:`Runtime.gradient_normalizer`):
  DDP averages gradients over ranks, so the averaged gradient is Σ_r ∇(sum_r) / n_global, the gradient of the
  global mean, whatever the split. One process: the normalizer is the batch count itself.
- **Metrics** are reduced across ranks (:meth:`Runtime.sum`, :meth:`Runtime.max`); only rank 0 writes logs,
  checkpoints and models (:attr:`Runtime.is_main`), and checkpoints store each rank's RNG states.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from instructrl.errors import UserFacingError
from instructrl.utils.device import resolve_device
from instructrl.utils.seed import seed_everything


def launched_world_size() -> int:
    """Processes in this job as announced by the launcher (``accelerate launch``, ``torchrun``); 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


class ModelFunction(torch.nn.Module):
    """Runs ``fn(model, *args)`` as this module's ``forward``.

    DDP only synchronizes gradients of computations that go through the wrapped module's
    ``forward``. Scalar-head models are read through helpers (``last_token_scores``, ``response_values``) that
    call the backbone and the head directly; wrapping such a helper makes it a forward DDP can see, with the
    same numerics as calling the helper.
    """

    def __init__(self, model: torch.nn.Module, fn: Callable[..., Any]):
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(self.model, *args, **kwargs)


def call_model_function(model: torch.nn.Module, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(model, *args)``, or ``model(*args)`` when ``model`` is already a (wrapped) :class:`ModelFunction`."""
    inner = getattr(model, "module", model)  # DDP keeps the wrapped module in .module
    if isinstance(inner, ModelFunction):
        return model(*args)
    return fn(model, *args)


class NullWriter:
    """Stands in for a :class:`~instructrl.utils.io.MetricsWriter` on ranks that do not write."""

    def log(self, step: int, **metrics: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> NullWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class Runtime:
    """The single-process runtime; :class:`AcceleratedRuntime` overrides the collective parts."""

    rank = 0
    world_size = 1

    def __init__(self, device: torch.device):
        self.device = device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    # ---- seeds and data
    def seed(self, seed: int) -> int:
        """Seed python, numpy and torch with this rank's seed ``seed + rank · RANK_SEED_STRIDE``."""
        return seed_everything(seed, self.rank)

    def rank_seed(self, seed: int) -> int:
        from instructrl.utils.seed import RANK_SEED_STRIDE

        return seed + self.rank * RANK_SEED_STRIDE

    def shard_bounds(self, n: int) -> tuple[int, int]:
        """``[start, stop)`` of this rank's contiguous share of ``n`` items; the first n mod N ranks get one more."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (1 if self.rank < extra else 0)

    def shard(self, items: Sequence[Any]) -> list[Any]:
        start, stop = self.shard_bounds(len(items))
        return list(items[start:stop])

    def require_divisible(self, value: int, name: str) -> None:
        """Fail early when a global batch size cannot be split evenly over the processes."""
        if value % self.world_size:
            raise UserFacingError(f"{name}={value} must be divisible by the number of processes ({self.world_size})")

    # ---- reductions (identity in one process)
    def sum(self, value: float | torch.Tensor) -> float:
        return float(value)

    def sums(self, values: dict[str, float]) -> dict[str, float]:
        """Sum every value over ranks with one collective."""
        return {k: float(v) for k, v in values.items()}

    def max(self, value: float) -> float:
        return float(value)

    def gradient_normalizer(self, local_count: float) -> float:
        """The divisor of a local loss sum that makes DDP's rank-averaged gradient the global mean's gradient.

        With n_r items on rank r and n = Σ_r n_r, dividing by n / N gives (1/N) Σ_r ∇sum_r / (n/N) = ∇(Σ_r sum_r / n).
        """
        return self.sum(local_count) / self.world_size

    def gather_rows(self, tensor: torch.Tensor, pad_value: float = 0, pad_first: bool = False) -> torch.Tensor:
        """Concatenate every rank's (B_r, T_r, ...) tensor along dim 0, padding dim 1 to the widest T_r."""
        return tensor

    def gather_objects(self, obj: Any) -> list[Any]:
        return [obj]

    def barrier(self) -> None:
        pass

    # ---- per-rank state in checkpoints
    def rank_states(self, state: Any) -> Any:
        """What a checkpoint stores for per-rank state: the state itself in one process, every rank's list in N."""
        return state

    def own_rank_state(self, saved: Any) -> Any | None:
        """This rank's entry of what :meth:`rank_states` stored; None (with a warning) when the checkpoint was
        written by a different number of processes: the rank then keeps its freshly seeded state."""
        per_rank = saved.get("per_rank") if isinstance(saved, dict) else None
        if per_rank is None and self.world_size == 1:
            return saved  # written by one process
        if per_rank is None or len(per_rank) != self.world_size:
            written_by = 1 if per_rank is None else len(per_rank)
            warnings.warn(
                f"the checkpoint was written by {written_by} process(es), this run has {self.world_size}: rank "
                f"{self.rank} keeps its fresh random state, so sampling differs from an uninterrupted run",
                stacklevel=2,
            )
            return None
        return per_rank[self.rank]

    # ---- models and optimization
    def prepare(self, model: torch.nn.Module, optimizer=None, forward: Callable[..., Any] | None = None):
        """``(training_model, optimizer)``: the model to call in training steps (``ModelFunction`` when
        ``forward`` is given, DDP-wrapped under N processes) and the optimizer to step.
        ``model`` itself stays the plain module whose weights are read and saved."""
        training_model = ModelFunction(model, forward) if forward is not None else model
        return training_model, optimizer

    def no_sync(self, models: Sequence[torch.nn.Module]) -> contextlib.AbstractContextManager:
        """Wrap a micro-batch's forward *and* backward: ``models`` skip their gradient all-reduce. Used for every
        micro-batch of an optimizer step but a model's last, which all-reduces the accumulated gradient once
        (so ranks may even differ in their number of micro-batches)."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm_(self, model: torch.nn.Module, max_norm: float) -> torch.Tensor:
        """Clip the gradients' global 2-norm to ``max_norm`` and return the norm before clipping. With an
        infinite ``max_norm`` (no clipping) only the norm is computed: ``clip_grad_norm_`` would still
        multiply every gradient by 1."""
        if math.isinf(max_norm):
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            if not grads:
                return torch.zeros(())
            return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    # ---- writing
    def metrics_writer(self, *args: Any, **kwargs: Any):
        from instructrl.utils.io import MetricsWriter

        return MetricsWriter(*args, **kwargs) if self.is_main else NullWriter()

    def save_checkpoint(self, run_dir, step: int, state: dict[str, Any]) -> None:
        """Rank 0 writes; every rank waits until the checkpoint is complete (a resume reads it on every rank)."""
        from instructrl.utils.checkpoint import save_checkpoint

        if self.is_main:
            save_checkpoint(run_dir, step, state)
        self.barrier()


SUPPORTED_ENGINES = ("MULTI_GPU", "MULTI_CPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_HPU")
"""accelerate distributed types the stage loops are verified with: DDP over NCCL (GPUs) or gloo (CPUs)."""

UNSUPPORTED_ENGINE_HELP = (
    "the sft/rm/ppo loops run data-parallel with DDP only (configs/accelerate/multi_gpu_ddp.yaml or "
    "multi_node.yaml). {engine} is not wired in yet: the loops accumulate micro-batches themselves (DeepSpeed "
    "steps its engine inside every backward), read and save the plain module's weights (FSDP and ZeRO-3 shard "
    "them) and sample on the unwrapped policy. See README 'Scaling up'."
)


class AcceleratedRuntime(Runtime):
    """N processes through an :class:`accelerate.Accelerator`; DDP is the engine the loops support."""

    def __init__(self, accelerator):
        engine = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type))
        if engine not in SUPPORTED_ENGINES:
            raise UserFacingError(UNSUPPORTED_ENGINE_HELP.format(engine=engine))
        self.accelerator = accelerator
        self.rank = accelerator.process_index
        self.world_size = accelerator.num_processes
        super().__init__(accelerator.device)

    def _reduce(self, values: list[float], op) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor, op=op)
        return tensor.tolist()

    def sum(self, value: float | torch.Tensor) -> float:
        return self._reduce([float(value)], torch.distributed.ReduceOp.SUM)[0]

    def sums(self, values: dict[str, float]) -> dict[str, float]:
        reduced = self._reduce([float(v) for v in values.values()], torch.distributed.ReduceOp.SUM)
        return dict(zip(values, reduced))

    def max(self, value: float) -> float:
        return self._reduce([float(value)], torch.distributed.ReduceOp.MAX)[0]

    def gather_rows(self, tensor: torch.Tensor, pad_value: float = 0, pad_first: bool = False) -> torch.Tensor:
        original_device = tensor.device
        tensor = tensor.to(self.device)
        if tensor.dim() > 1:
            tensor = self.accelerator.pad_across_processes(tensor, dim=1, pad_index=pad_value, pad_first=pad_first)
        return self.accelerator.gather(tensor).to(original_device)

    def gather_objects(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def rank_states(self, state: Any) -> Any:
        return {"per_rank": self.gather_objects(state)}

    def prepare(self, model: torch.nn.Module, optimizer=None, forward: Callable[..., Any] | None = None):
        training_model = ModelFunction(model, forward) if forward is not None else model
        if optimizer is None:
            return self.accelerator.prepare_model(training_model), None
        return self.accelerator.prepare(training_model, optimizer)

    def no_sync(self, models: Sequence[torch.nn.Module]) -> contextlib.AbstractContextManager:
        stack = contextlib.ExitStack()
        for model in models:
            stack.enter_context(self.accelerator.no_sync(model))
        return stack

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)  # applies the launch config's loss scaling (fp16 mixed precision)

    def clip_grad_norm_(self, model: torch.nn.Module, max_norm: float) -> torch.Tensor:
        return self.accelerator.clip_grad_norm_(model.parameters(), max_norm)


_RUNTIME: Runtime | None = None


def get_runtime(device: str | torch.device | None = "auto") -> Runtime:
    """The runtime of this process: single-process unless a launcher started several.

    Under a launcher the device is the accelerator's (one GPU per process, or the CPU); ``device='cpu'``
    forces CPU processes with gloo. An explicit ``cuda:N`` is refused there: the launcher assigns GPUs.
    """
    global _RUNTIME
    if launched_world_size() <= 1:
        return Runtime(resolve_device(device))
    if isinstance(device, str) and device.startswith("cuda:"):
        raise UserFacingError(
            f"device={device!r} under a multi-process launch: use 'auto' or 'cuda' (one GPU per rank)"
        )
    if _RUNTIME is None:
        from accelerate import Accelerator

        _RUNTIME = AcceleratedRuntime(Accelerator(cpu=str(device) == "cpu"))
    return _RUNTIME
