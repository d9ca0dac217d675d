"""FSDP2 sharding (``run.sharding=fsdp``): models whose weights, gradients and AdamW states are split over processes.

:func:`shard_model` applies ``torch.distributed.fsdp.fully_shard`` to every transformer block and then to the
model itself (the *root*), in place: each process keeps 1/N of every weight as a ``DTensor`` shard, a block's
weights are all-gathered just before its forward and freed after it, and gradients are reduce-scattered (averaged
over ranks, as DDP averages them, so the stages' loss normalizers stay the same).

What a sharded model asks of its callers, and where each is handled:

- **Every computation goes through the root**, so that its hooks gather the weights outside the blocks (embeddings,
  final norm, LM or scalar head). ``model(...)`` does; helpers that call inner modules directly (a reward model's
  backbone and head, the fused LM head) run as ``model.call_function(fn, ...)`` (:func:`call_on`), a method
  registered with ``register_fsdp_forward_method`` so that it counts as a forward of the root.
- **Every sharded forward is a collective**: all ranks run the same number of them (the stages' evaluation
  loops already do; micro-batch loops use :meth:`~instructrl.utils.distributed.Runtime.lockstep`).
- **Full weights are gathered** only to export a Hugging Face directory (:func:`full_state_dict` on rank 0, then
  :func:`save_unsharded`) or to sample from a full copy.
- **Checkpoints** are written by every rank with ``torch.distributed.checkpoint`` (:func:`save_sharded`), and read
  back sharded (:func:`load_sharded_into`, any number of processes) or whole in one process (:func:`load_whole`).
"""

from __future__ import annotations

import tempfile
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from instructrl.errors import UserFacingError


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules each sharded as one unit: the Hugging Face model's ``_no_split_modules`` (its decoder layers)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise UserFacingError(
            f"run.sharding=fsdp: no transformer blocks found in {type(model).__name__} (its _no_split_modules "
            f"{sorted(names)} name none of its modules); use run.sharding=none for this model"
        )
    return blocks


def _call_function(self: torch.nn.Module, fn, *args: Any, **kwargs: Any) -> Any:
    return fn(self, *args, **kwargs)


def shard_model(model: torch.nn.Module, param_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Shard ``model`` in place over the default process group: every transformer block, then the root.

    ``param_dtype`` (bf16 on GPUs under ``precision=bf16``) is the dtype the gathered weights are computed in
    (FSDP2's mixed precision); the shards, gradients reductions and AdamW states stay float32. Returns ``model``.
    """
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for block in transformer_blocks(model):
        fully_shard(block, mp_policy=policy)
    model.call_function = types.MethodType(_call_function, model)
    fully_shard(model, mp_policy=policy)
    register_fsdp_forward_method(model, "call_function")
    model.register_forward_hook(_reshard_after_inference)
    for module in model.modules():  # gather once outside inference mode: see _allocate_outside_inference_mode
        if isinstance(module, FSDPModule):
            _allocate_outside_inference_mode(module)
    return model


def _allocate_outside_inference_mode(module: FSDPModule) -> None:
    """Gather and free ``module``'s weights once. FSDP2 allocates each gathered weight's tensor at the first
    gather and reuses it; allocated under ``torch.inference_mode`` (PPO's rollout comes first) it would be an
    inference tensor that later gathers, in training, may not write into."""
    module.unshard()
    module.reshard()


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def _reshard_after_inference(module: torch.nn.Module, args: Any, output: Any) -> None:
    """The root keeps its gathered weights after a forward (backward needs them at once); after a forward without
    gradients nothing will, so free them: the module then holds only its shards again (state dicts, optimizer)."""
    if not torch.is_grad_enabled():
        module.reshard()


def call_on(model: torch.nn.Module, fn, *args: Any, **kwargs: Any) -> Any:
    """``fn(model, *args, **kwargs)``; through the root's hooks when ``model`` is sharded (see the module doc)."""
    if not is_sharded(model):
        return fn(model, *args, **kwargs)
    out = model.call_function(fn, *args, **kwargs)
    if not torch.is_grad_enabled():
        model.reshard()
    return out


def local_bytes(tensors: Any) -> int:
    """Bytes this process holds for ``tensors`` (a module's parameters, a state dict, an optimizer's state):
    a ``DTensor`` counts its local shard only."""
    if isinstance(tensors, torch.nn.Module):
        tensors = list(tensors.parameters())
    if isinstance(tensors, DTensor):
        tensors = tensors.to_local()
    if isinstance(tensors, torch.Tensor):
        return tensors.numel() * tensors.element_size()
    values = tensors.values() if isinstance(tensors, Mapping) else tensors if isinstance(tensors, list | tuple) else []
    return sum(local_bytes(v) for v in values)


def has_dtensor(value: Any) -> bool:
    """Whether a nested dict/list holds a ``DTensor`` (such checkpoint entries are written sharded)."""
    if isinstance(value, DTensor):
        return True
    if isinstance(value, Mapping):
        return any(has_dtensor(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(has_dtensor(v) for v in value)
    return False


def local_view(value: Any) -> Any:
    """A copy of a nested dict/list with each ``DTensor`` replaced by this rank's shard (for local checks)."""
    if isinstance(value, DTensor):
        return value.to_local()
    if isinstance(value, Mapping):
        return {k: local_view(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [local_view(v) for v in value]
    return value


def ppo_bytes_per_process(
    parameters: float,
    processes: int,
    sharding: str = "fsdp",
    frozen_models: str = "sharded",
    sharded_sampling: str = "gathered",
    ema: bool = True,
) -> float:
    """Bytes one PPO process holds for the four models' weights and the optimizer states, activations excluded,
    when each of the four models has ``parameters`` parameters (InstructGPT's setting: value and reward model
    the policy's size), everything float32 as the stages keep it (bf16 mixed precision computes in bf16 but
    keeps float32 weights and states):

    - policy and value, trained: 4 (weights) + 4 (gradients) + 8 (AdamW's two moments) = 16 bytes a parameter;
    - the policy's EMA (``ema_decay``): 4; the frozen reference and reward models: 4 each;
    - sharded (``run.sharding=fsdp``, N processes): the trained models, their states and the EMA / N; the frozen
      models / N (``frozen_models=sharded``) or whole; plus, with ``sharded_sampling=gathered``, the full copy of
      the policy sampled from (4). One process holds everything whatever the setting.
    """
    trained = 2 * parameters * 16 + (parameters * 4 if ema else 0)
    frozen = 2 * parameters * 4
    if sharding == "none" or processes == 1:
        return trained + frozen
    held = trained / processes + (frozen / processes if frozen_models == "sharded" else frozen)
    return held + (parameters * 4 if sharded_sampling == "gathered" else 0)


# --------------------------------------------------------------------------- state dicts


def model_state(model: torch.nn.Module) -> dict[str, Any]:
    """The model's state dict: ``DTensor`` shards, keyed by the unsharded model's names."""
    return get_model_state_dict(model)


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state keyed by parameter names (AdamW's moments as shards); created (zeros) if the optimizer
    has not stepped yet, so that it can serve as the template a sharded checkpoint is read into."""
    return get_optimizer_state_dict(model, optimizer)


def load_model_state(model: torch.nn.Module, state: dict[str, Any]) -> None:
    """Load a state dict of shards (:func:`model_state`) or of full tensors."""
    full = not has_dtensor(state)
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=full and is_sharded(model)))


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load an optimizer state keyed by parameter names (:func:`optimizer_state`), sharded or full."""
    full = not has_dtensor(state)
    set_optimizer_state_dict(
        model, optimizer, state, options=StateDictOptions(full_state_dict=full and is_sharded(model))
    )


def is_named_optimizer_state(state: dict[str, Any]) -> bool:
    """Whether an optimizer state dict is keyed by parameter names (:func:`optimizer_state`), not by index."""
    return any(isinstance(k, str) for k in state.get("state", {}))


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight, gathered whole into rank 0's CPU memory (tied weights under each name); empty elsewhere.
    Every rank must call it (it all-gathers)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def gathered_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight, gathered whole on every rank, on the model's device (to sample from a full copy)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


def unsharded_class(model: torch.nn.Module) -> type:
    """The model's own class (``fully_shard`` swaps in a subclass that also derives from ``FSDPModule``)."""
    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


def unsharded_copy(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain (unsharded) Hugging Face model of ``model``'s class and config holding ``state``'s tensors, built
    without allocating weights twice; tied weights are tied again."""
    with torch.device("meta"):
        plain = unsharded_class(model)(model.config)
    plain.load_state_dict(state, assign=True)
    plain.tie_weights()
    for name, buffer in plain.named_buffers():  # non-persistent buffers (rotary frequencies) are not in ``state``
        if buffer.is_meta:
            owner, _, attr = name.rpartition(".")
            source = model.get_buffer(name)
            plain.get_submodule(owner).register_buffer(attr, source.detach().to("cpu").clone(), persistent=False)
    return plain.eval()


def save_unsharded(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write ``state`` (from :func:`full_state_dict`) as a Hugging Face directory of ``model``'s class, loadable by
    ``from_pretrained`` like the model an unsharded run saves."""
    unsharded_copy(model, state).save_pretrained(path)


# --------------------------------------------------------------------------- checkpoints


def save_sharded(entries: dict[str, Any], folder: Path) -> None:
    """Write checkpoint entries holding shards into ``folder``: every rank writes its own shards (a collective)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(entries, checkpoint_id=str(folder))


def load_sharded_into(template: dict[str, Any], folder: Path) -> None:
    """Read a sharded checkpoint into ``template`` in place (its ``DTensor`` layout says which pieces this rank
    reads: the checkpoint may have been written by another number of processes)."""
    import torch.distributed.checkpoint as dcp

    dcp.load(template, checkpoint_id=str(folder))


def load_whole(folder: Path) -> dict[str, Any]:
    """Read a sharded checkpoint whole, in this process alone (full tensors; for an unsharded resume)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        converted = Path(tmp) / "whole.pt"
        dcp_to_torch_save(folder, converted)
        return torch.load(converted, map_location="cpu", weights_only=False)
