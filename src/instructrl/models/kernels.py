"""Faster equivalents of two slow spots in Hugging Face decoders, swapped into a loaded model in place.

Both keep the model's math and its saved form (no parameter, buffer or config changes); they only change
which kernels compute it. Measured on 2 CPU threads, one training step (forward, backward, fused AdamW):

* **GPT-2's activation.** ``gelu_new`` (:class:`transformers.activations.NewGELUActivation`) is the tanh
  approximation of GELU written as six elementwise Python ops, each a pass over the (tokens × 4·d) MLP
  activations forward and more backward. ``torch.nn.functional.gelu(approximate="tanh")`` computes the same
  formula in one kernel each way (float64 difference ≤ 5e-16). A GPT-2 with 4 layers, width 256, 16 × 64
  tokens: 163 → 146 ms per step (0.85-0.90×). Llama's SiLU is already one kernel.
* **A tied embedding's gradient.** With tied input/output embeddings, the input embedding's backward
  builds a dense (vocab × d) gradient (zero fill, then add the looked-up rows) that autograd then adds to
  the LM head's dense gradient: two extra passes over vocab × d floats per backward. With ``sparse=True``
  the embedding contributes only the rows it looked up, added into the LM head's dense gradient, and the
  parameter's ``.grad`` stays dense for AdamW. A Llama with a 32k vocabulary, width 512, 6 layers, 8 × 48
  tokens: 528-549 → 505-521 ms per step (0.95×) in one measurement, but 533-535 → 535-543 ms in a later one:
  within this VM's run-to-run drift. It saves two passes over 16M floats per backward.

* **Attention under bf16 autocast on a CPU.** PyTorch's CPU flash-attention kernel is about twice as slow in
  bf16 as in float32 (forward + backward of 8 × 8 heads × 48 positions × 64: 5.5 ms vs 2.4 ms with the
  casts; GPT-2 at 16 × 4 × 64 × 64: 7.7 vs 5.2 ms), and it dominated a bf16 PPO step's non-matmul time.
  :func:`float32_cpu_attention` registers Hugging Face's SDPA attention with q, k and v upcast to float32
  (output cast back) when the inputs are bf16/fp16 on a CPU; on other devices, or in float32, it is SDPA
  unchanged. Upcasting can only make attention more accurate.

The sparse-gradient embedding is only for one process: DDP and DeepSpeed treat an ``nn.Embedding`` with
``sparse=True`` as a sparse-gradient parameter, which a tied weight is not.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.activations import GELUTanh, NewGELUActivation
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

FLOAT32_CPU_ATTENTION = "instructrl_sdpa_float32_cpu"
"""Name under which :func:`sdpa_float32_on_cpu` is registered with ``transformers.AttentionInterface``."""


def fuse_activations(model: torch.nn.Module) -> int:
    """Replace every ``gelu_new`` module with the one-kernel tanh GELU; returns how many were replaced."""
    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is NewGELUActivation:  # exactly this class: a subclass may compute something else
                setattr(module, name, GELUTanh())
                replaced += 1
    return replaced


def tied_embedding(model: torch.nn.Module) -> torch.nn.Embedding | None:
    """The input embedding when it shares its weight with the output embedding (the LM head), else None."""
    get_input = getattr(model, "get_input_embeddings", None)
    get_output = getattr(model, "get_output_embeddings", None)
    if get_input is None or get_output is None:
        return None
    embedding, head = get_input(), get_output()
    if not isinstance(embedding, torch.nn.Embedding) or head is None:
        return None
    return embedding if embedding.weight is getattr(head, "weight", None) else None


def sparse_tied_embedding_gradient(model: torch.nn.Module) -> bool:
    """Let a tied input embedding send only its looked-up rows backward; returns whether it applied.

    The LM head's gradient is dense and covers the same weight, so the accumulated ``.grad`` is dense as
    before, as long as the LM head is in every backward (it is in PPO's policy loss and the ptx loss).
    """
    embedding = tied_embedding(model)
    if embedding is None or not embedding.weight.requires_grad:
        return False
    embedding.sparse = True
    return True


def sdpa_float32_on_cpu(module, query, key, value, attention_mask, **kwargs):
    """Hugging Face's SDPA attention, run in float32 when q/k/v are a lower precision on a CPU (see above)."""
    if query.device.type != "cpu" or query.dtype not in (torch.bfloat16, torch.float16):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    dtype = query.dtype
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()  # an additive mask must match the query's dtype
    with torch.autocast("cpu", enabled=False):
        out, weights = sdpa_attention_forward(
            module, query.float(), key.float(), value.float(), attention_mask, **kwargs
        )
    return out.to(dtype), weights


AttentionInterface.register(FLOAT32_CPU_ATTENTION, sdpa_float32_on_cpu)
AttentionMaskInterface.register(FLOAT32_CPU_ATTENTION, sdpa_mask)  # the same masks as "sdpa"


def float32_cpu_attention(model: torch.nn.Module) -> bool:
    """Switch a model that uses SDPA attention to :func:`sdpa_float32_on_cpu`; returns whether it applied.

    Only the attention kernel changes (weights, config fields that are saved, and outputs in float32 are the
    same); models on other attention implementations (eager, flash-attention) are left alone."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return False
    model.set_attn_implementation(FLOAT32_CPU_ATTENTION)
    return model.config._attn_implementation == FLOAT32_CPU_ATTENTION
