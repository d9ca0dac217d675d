"""Data parallelism through ``accelerate``: one process behaves exactly as before, N processes shard the data.

A stage asks :func:`get_runtime` for its :class:`Runtime`. Without a launcher (``WORLD_SIZE`` unset or 1)
that is a single-process runtime that never touches ``accelerate`` or ``torch.distributed``: every helper
is the identity, so single-process numerics and exact resume are unchanged. Under ``accelerate launch``
or ``torchrun`` with N processes it wraps an :class:`accelerate.Accelerator`, which sets up
``torch.distributed`` (NCCL on GPUs, gloo on CPUs); the trained models are wrapped in DDP, or, with
``run.sharding=fsdp``, sharded with FSDP2 by :class:`ShardedRuntime` (:mod:`instructrl.utils.sharding`). accelerate's
own DeepSpeed and FSDP engines are refused with an explanation (:data:`UNSUPPORTED_ENGINE_HELP`): the loops
accumulate, clip and step themselves, and shard through ``run.sharding``.

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
from instructrl.utils.checkpoint import SHARDED_ENTRIES, SHARDED_FOLDER
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
        return call_on(self.model, self.fn, *args, **kwargs)


def call_on(model: torch.nn.Module, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(model, *args)``; through the root's hooks when ``model`` is sharded (``run.sharding=fsdp``), whose
    inner modules cannot be called on their own (:func:`instructrl.utils.sharding.call_on`)."""
    if getattr(model, "call_function", None) is None:
        return fn(model, *args, **kwargs)
    from instructrl.utils.sharding import call_on as call_sharded

    return call_sharded(model, fn, *args, **kwargs)


def call_model_function(model: torch.nn.Module, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(model, *args)``, or ``model(*args)`` when ``model`` is already a (wrapped) :class:`ModelFunction`."""
    inner = getattr(model, "module", model)  # DDP keeps the wrapped module in .module
    if isinstance(inner, ModelFunction):
        return model(*args)
    return call_on(model, fn, *args)


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

    sharded = False
    """Whether the models are sharded over the processes (``run.sharding=fsdp`` under N processes)."""

    def all_finished(self, unfinished: torch.Tensor) -> bool:
        """A sampler's stop condition: no row of ``unfinished`` is left (under sharding: on any rank, so that the
        ranks, whose every decoding step is a collective, stop together)."""
        return not bool(unfinished.any())

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
        written by a different number of processes: the rank then keeps its freshly seeded state (PPO's rollout
        sampling does not use it: it keeps a generator per sampling shard)."""
        per_rank = saved.get("per_rank") if isinstance(saved, dict) else None
        if per_rank is None and self.world_size == 1:
            return saved  # written by one process
        if per_rank is None or len(per_rank) != self.world_size:
            written_by = 1 if per_rank is None else len(per_rank)
            warnings.warn(
                f"the checkpoint was written by {written_by} process(es), this run has {self.world_size}: rank "
                f"{self.rank} keeps its freshly seeded per-process random state (dropout, when on) and sums add in "
                "another order, so results match an uninterrupted run up to float rounding at best",
                stacklevel=2,
            )
            return None
        return per_rank[self.rank]

    # ---- models and optimization
    def distribute(self, model: torch.nn.Module, precision: str = "fp32") -> torch.nn.Module:
        """Place a model before its optimizer is made: split its weights over the processes under
        ``run.sharding=fsdp`` (in place; :class:`ShardedRuntime`), nothing here. Returns ``model``."""
        return model

    def model_state(self, model: torch.nn.Module) -> dict[str, Any]:
        """What a checkpoint stores of a model's weights (a sharded runtime stores shards)."""
        return model.state_dict()

    def optimizer_state(self, model: torch.nn.Module, optimizer) -> dict[str, Any]:
        """What a checkpoint stores of an optimizer (a sharded runtime keys it by parameter name)."""
        return optimizer.state_dict()

    def load_model_state(self, model: torch.nn.Module, state: dict[str, Any]) -> None:
        model.load_state_dict(state)

    def load_optimizer_state(self, model: torch.nn.Module, optimizer, state: dict[str, Any]) -> None:
        """Load :meth:`optimizer_state`; one written by a sharded run (keyed by name) loads here as well."""
        from instructrl.utils.sharding import is_named_optimizer_state, load_optimizer_state

        if is_named_optimizer_state(state):
            load_optimizer_state(model, getattr(optimizer, "optimizer", optimizer), state)
        else:
            optimizer.load_state_dict(state)

    def read_sharded_entries(self, saved: dict[str, Any], state: Any, templates: dict[str, Any]) -> dict[str, Any]:
        """``saved`` with the entries a sharded run wrote with ``torch.distributed.checkpoint`` read in; here (one
        process, or DDP) whole: the sharded run's 2 → 1 resume (:func:`instructrl.utils.sharding.load_whole`)."""
        if SHARDED_FOLDER not in saved:
            return saved
        from instructrl.utils.sharding import load_whole

        return {**saved, **load_whole(saved[SHARDED_FOLDER])}

    def lockstep(self, chunks: Sequence[Any]) -> list[tuple[Any, bool]]:
        """``(chunk, counted)`` for each micro-batch of this rank. Sharded forwards are collectives, so under
        ``run.sharding=fsdp`` every rank runs as many as the busiest one: a rank with fewer repeats its last
        micro-batch with ``counted`` False, whose loss the caller multiplies by 0 and whose statistics it skips."""
        return [(chunk, True) for chunk in chunks]

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

    def save_pretrained(self, model: torch.nn.Module, tokenizer, path, what: str) -> None:
        """Write ``model`` and ``tokenizer`` as a Hugging Face directory (rank 0; every rank holds the same weights),
        refusing NaN/inf weights; every rank waits until it is written."""
        from instructrl.utils.guards import require_finite_weights

        require_finite_weights(model, what)  # every rank: same weights, same verdict
        if self.is_main:
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
        self.barrier()


NONFINITE_HELP = (
    "not saving {what}: NaN/inf values in its weights. The previous checkpoint (if any) is kept; lower the "
    "learning rate and resume from it."
)

SUPPORTED_ENGINES = ("MULTI_GPU", "MULTI_CPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_HPU")
"""accelerate distributed types the stage loops are verified with: DDP over NCCL (GPUs) or gloo (CPUs)."""

UNSUPPORTED_ENGINE_HELP = (
    "the sft/rm/ppo loops run under plain multi-process launches only (configs/accelerate/multi_gpu_ddp.yaml, "
    "multi_node.yaml or fsdp.yaml) and shard models themselves with --set run.sharding=fsdp (FSDP2). accelerate's "
    "{engine} engine is not used: the loops accumulate micro-batches, clip and step themselves (DeepSpeed steps "
    "its engine inside every backward). See README 'Scaling up'."
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


class ShardedRuntime(AcceleratedRuntime):
    """N processes with ``run.sharding=fsdp``: the trained (and, where asked, the frozen) models are sharded with
    FSDP2 (:mod:`instructrl.utils.sharding`) instead of wrapped in DDP. The loops are the same: FSDP2 averages
    gradients over ranks as DDP does, so the loss normalizers, clipping and statistics need no change."""

    sharded = True

    def all_finished(self, unfinished: torch.Tensor) -> bool:
        return self.max(float(bool(unfinished.any()))) == 0

    def distribute(self, model: torch.nn.Module, precision: str = "fp32") -> torch.nn.Module:
        from instructrl.utils.sharding import is_sharded, shard_model

        if is_sharded(model):
            return model
        param_dtype = torch.bfloat16 if precision == "bf16" and self.device.type == "cuda" else None
        return shard_model(model, param_dtype)

    def prepare(self, model: torch.nn.Module, optimizer=None, forward: Callable[..., Any] | None = None):
        self.distribute(model)  # in place, so a model sharded before its optimizer was made stays as it is
        return (ModelFunction(model, forward) if forward is not None else model), optimizer

    def no_sync(self, models: Sequence[torch.nn.Module]) -> contextlib.AbstractContextManager:
        # Every backward reduce-scatters its gradients into the shards, which accumulate there: skipping the
        # reduction would accumulate full unsharded gradients, the memory sharding saves.
        return contextlib.nullcontext()

    def clip_grad_norm_(self, model: torch.nn.Module, max_norm: float) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        parameters = [p for p in model.parameters() if p.grad is not None]
        if not parameters:
            return torch.zeros(())
        norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])  # over the shards: a global norm
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        if not math.isinf(max_norm):
            torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
        return norm

    def lockstep(self, chunks: Sequence[Any]) -> list[tuple[Any, bool]]:
        steps = round(self.max(len(chunks)))
        return [(chunk, True) for chunk in chunks] + [(chunks[-1], False)] * (steps - len(chunks))

    def model_state(self, model: torch.nn.Module) -> dict[str, Any]:
        from instructrl.utils.sharding import model_state

        return model_state(model)

    def optimizer_state(self, model: torch.nn.Module, optimizer) -> dict[str, Any]:
        from instructrl.utils.sharding import optimizer_state

        return optimizer_state(model, optimizer)

    def load_model_state(self, model: torch.nn.Module, state: dict[str, Any]) -> None:
        from instructrl.utils.sharding import load_model_state

        load_model_state(model, state)

    def load_optimizer_state(self, model: torch.nn.Module, optimizer, state: dict[str, Any]) -> None:
        from instructrl.utils.sharding import load_optimizer_state

        load_optimizer_state(model, optimizer, state)

    def save_checkpoint(self, run_dir, step: int, state: dict[str, Any]) -> None:
        """Entries holding shards (models, optimizers, EMA, a selected epoch's weights) are written by every rank
        with ``torch.distributed.checkpoint``; rank 0 then writes the rest (RNGs, data positions, schedules) and
        moves the shards into the same checkpoint folder, covered by its manifest."""
        import shutil

        from instructrl.utils.checkpoint import checkpoint_dir, save_checkpoint
        from instructrl.utils.guards import nonfinite_tensors
        from instructrl.utils.sharding import has_dtensor, local_view, save_sharded

        sharded = {k: v for k, v in state.items() if has_dtensor(v)}
        if self.sum(len(nonfinite_tensors(local_view(sharded)))):  # every rank raises alike
            raise UserFacingError(NONFINITE_HELP.format(what=f"checkpoint {step}"))
        staging = checkpoint_dir(run_dir) / f".sharded-step-{step:08d}"
        if self.is_main:
            shutil.rmtree(staging, ignore_errors=True)
        self.barrier()
        save_sharded(sharded, staging)
        self.barrier()
        if self.is_main:
            rest = {k: v for k, v in state.items() if k not in sharded}
            save_checkpoint(run_dir, step, {**rest, SHARDED_ENTRIES: sorted(sharded)}, attach=staging)
        self.barrier()

    def read_sharded_entries(self, saved: dict[str, Any], state: Any, templates: dict[str, Any]) -> dict[str, Any]:
        """Read the sharded entries into this run's own (sharded) state as the template: each rank reads the
        pieces of its shards, whatever number of processes wrote them."""
        if SHARDED_FOLDER not in saved:
            raise UserFacingError(
                "the checkpoint was written with run.sharding=none: resume it with run.sharding=none"
            )
        from instructrl.utils.sharding import load_sharded_into

        made = {k: make() for k, make in templates.items() if k in saved[SHARDED_ENTRIES]}
        template = {k: v for k, v in {**state.state_dict(), **made}.items() if k in saved[SHARDED_ENTRIES]}
        load_sharded_into(template, saved[SHARDED_FOLDER])
        return {**saved, **template}

    def save_pretrained(self, model: torch.nn.Module, tokenizer, path, what: str) -> None:
        """Gather the full weights into rank 0 and write them as the model's own (unsharded) class."""
        from instructrl.utils.guards import nonfinite_tensors
        from instructrl.utils.sharding import full_state_dict, is_sharded, save_unsharded

        if not is_sharded(model):
            return super().save_pretrained(model, tokenizer, path, what)
        full = full_state_dict(model)  # rank 0 only
        if self.sum(len(nonfinite_tensors(full))):  # rank 0's verdict, on every rank
            raise UserFacingError(NONFINITE_HELP.format(what=what))
        if self.is_main:
            save_unsharded(model, full, path)
            tokenizer.save_pretrained(path)
        self.barrier()


_RUNTIME: Runtime | None = None


def get_runtime(device: str | torch.device | None = "auto", sharding: str = "none") -> Runtime:
    """The runtime of this process: single-process unless a launcher started several.

    Under a launcher the device is the accelerator's (one GPU per process, or the CPU); ``device='cpu'``
    forces CPU processes with gloo. An explicit ``cuda:N`` is refused there: the launcher assigns GPUs.
    ``sharding='fsdp'`` (``run.sharding``) shards the models over the processes (:class:`ShardedRuntime`);
    so does a launch with accelerate's FSDP config (configs/accelerate/fsdp.yaml).
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

        sharded = sharding == "fsdp" or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
        if sharded:  # accelerate's own FSDP engine stays off: it does not shard on CPUs, and the loops shard
            os.environ["ACCELERATE_USE_FSDP"] = "false"
        accelerator = Accelerator(cpu=str(device) == "cpu")
        _RUNTIME = ShardedRuntime(accelerator) if sharded else AcceleratedRuntime(accelerator)
    return _RUNTIME
