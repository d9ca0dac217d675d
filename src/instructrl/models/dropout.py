"""Residual dropout for any decoder: dropout on each attention / MLP block output before the residual add.

InstructGPT's SFT used residual dropout 0.2. GPT-2 has it built in (``resid_pdrop``) but Llama-family
models do not, so it is added with forward hooks on each block's attention and MLP submodules. Hooks are
not saved with the model, so the exported model is unchanged; dropout is active only in ``train()`` mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_SUBLAYER_SUFFIXES = (".self_attn", ".mlp", ".attn")


def _is_sublayer(name: str) -> bool:
    # e.g. "model.layers.3.self_attn", "transformer.h.2.mlp" (skip the inner "attn.c_attn" style names)
    return name.endswith(_SUBLAYER_SUFFIXES) and name.rsplit(".", 2)[-2].isdigit()


def add_residual_dropout(model: torch.nn.Module, p: float) -> list[torch.utils.hooks.RemovableHandle]:
    """Register dropout(p) on the output of every attention and MLP block; returns the hook handles."""
    if p <= 0:
        return []

    def hook(module: torch.nn.Module, args: object, output: object) -> object:
        if not module.training:
            return output
        if isinstance(output, tuple):
            return (F.dropout(output[0], p, training=True), *output[1:])
        return F.dropout(output, p, training=True)

    handles = [m.register_forward_hook(hook) for name, m in model.named_modules() if _is_sublayer(name)]
    if not handles:
        raise ValueError("residual dropout: found no attention/MLP blocks to hook in this architecture")
    return handles
