"""Faster equivalents of five slow spots in Hugging Face decoders, swapped into a loaded model in place.

All keep the model's math and its saved form (no parameter, buffer or saved config changes); they only
change which kernels compute it. Each was measured on a training step or a sampling step on CPU threads;
the figures are in ``benchmarks/RESULTS.md``.

* **GPT-2's activation.** ``gelu_new`` (:class:`transformers.activations.NewGELUActivation`) is the tanh
  approximation of GELU written as six elementwise Python ops, each a pass over the (tokens × 4·d) MLP
  activations forward and more backward. ``torch.nn.functional.gelu(approximate="tanh")`` computes the same
  formula in one kernel each way (float64 difference ≤ 5e-16). Llama's SiLU is already one kernel.
* **A tied embedding's gradient.** With tied input/output embeddings, the input embedding's backward
  builds a (vocab × d) gradient that autograd then adds to the LM head's dense gradient: a zero fill and
  an add (dense rows), or a fresh copy of the LM head's gradient plus the rows (``sparse=True``, which
  autograd sums out of place). :func:`tied_embedding_rows_into_grad` makes the lookup's backward add its
  rows straight into the weight's ``.grad`` instead, so the LM head's gradient becomes ``.grad`` as it is,
  which halves the page faults of a fresh (vocab × d) buffer. The fused LM head then adds its part
  into the same ``.grad`` too (:func:`gradient_into_grad`), which stays a buffer zeroed in place between
  steps, so no (vocab × d) gradient is allocated at all.
* **An untied embedding's gradient (the value model).** Its dense backward allocates and zero-fills a fresh
  (vocab × d) gradient every step, only to add the few hundred looked-up rows; at a large vocabulary that is
  a sizeable share of a value-model step, most of it page faults on the fresh buffer.
  :func:`sparse_untied_embedding_gradient` sends only the rows backward and keeps the ``.grad`` a dense
  buffer that :func:`zero_gradients` zeroes in place, so the rows are added into it (same sums, as AdamW
  needs a dense gradient: its moments move every row).
* **Attention under bf16 autocast on a CPU.** PyTorch's CPU flash-attention kernel is slower in bf16 than in
  float32, even counting the casts, and it dominated a bf16 PPO step's non-matmul time.
  :func:`float32_cpu_attention` registers Hugging Face's SDPA attention with q, k and v upcast to float32
  (output cast back) when the inputs are bf16/fp16 on a CPU; on other devices, or in float32, it is SDPA
  unchanged. Upcasting can only make attention more accurate.

* **The LM head on a few rows, on a CPU in float32.** Sampling calls the head on one position per row: a (rows ×
  d) · (d × V) product whose oneDNN/MKL kernel is slow when rows are few and V is large. The same product
  computed as (W · hᵀ)ᵀ runs the kernel with V as the long dimension; the logits are then made contiguous
  (a transposed view made the softmax after it slower than the saving). The gain shrinks as rows grow, is
  gone at 128 rows and turns into a loss beyond, and a small vocabulary is slower this way. So
  :func:`few_rows_cpu_lm_head` uses it for at most :data:`FEW_ROWS` rows and :data:`LARGE_VOCABULARY`
  outputs, and keeps ``F.linear`` otherwise (and with autograd, autocast, another dtype or device). The
  logits are the same dot products, equal to ``F.linear``'s within float32 rounding (bitwise from 16 rows on,
  on the CPU measured); the sampler draws the same tokens with it (tested).

Both embedding changes (and the head's gradient into ``.grad``) are for one process only: DDP and DeepSpeed
treat an ``nn.Embedding`` with ``sparse=True`` as a sparse-gradient parameter, and gradients written into
``.grad`` outside autograd would miss their all-reduce.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


class _RowsIntoGrad(torch.autograd.Function):
    """``F.embedding`` of a detached weight whose backward adds the looked-up rows' gradient into the
    parameter's ``.grad`` itself (allocating it when missing) and returns nothing to autograd."""

    @staticmethod
    def forward(ctx, ids, embedding, anchor):
        # ``embedding`` (the module, not its weight) keeps the weight out of this node's inputs: were it an
        # input, autograd would hold the LM head's gradient back until this node ran, then add the two.
        ctx.save_for_backward(ids)
        ctx.weight, ctx.padding_idx = embedding.weight, embedding.padding_idx
        return F.embedding(ids, embedding.weight.detach(), embedding.padding_idx)

    @staticmethod
    def backward(ctx, grad_out):
        (ids,) = ctx.saved_tensors
        weight = ctx.weight
        rows = grad_out.reshape(-1, grad_out.shape[-1]).to(weight.dtype)  # (B·T, d)
        flat_ids = ids.reshape(-1)  # (B·T,)
        if ctx.padding_idx is not None:  # as F.embedding: the padding row gets no gradient
            rows = rows * (flat_ids != ctx.padding_idx).unsqueeze(1).to(rows.dtype)
        if weight.grad is None:  # no LM head in this backward: the rows are the whole gradient
            weight.grad = torch.zeros_like(weight)
        weight.grad.index_add_(0, flat_ids, rows)
        return None, None, None


class _RowsIntoGradEmbedding(torch.nn.Embedding):
    """An ``nn.Embedding`` (same parameter, same state dict) whose training-time backward is :class:`_RowsIntoGrad`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        plain = self.max_norm is not None or self.scale_grad_by_freq or self.sparse
        if plain or not (torch.is_grad_enabled() and self.weight.requires_grad):
            return super().forward(input)
        anchor = torch.empty(0, device=self.weight.device, requires_grad=True)  # puts the lookup in the graph
        return _RowsIntoGrad.apply(input, self, anchor)


def tied_embedding_rows_into_grad(model: torch.nn.Module) -> bool:
    """Let a tied input embedding add its looked-up rows' gradient straight into ``.grad``; returns whether it
    applied. The weight's gradient is then the LM head's (kept by autograd as it is) plus these rows: the same
    sum, and ``.grad`` is dense for AdamW. Gradients reach ``.grad`` only (``backward()``), not the results
    of ``torch.autograd.grad``; one process only (see the module docstring)."""
    embedding = tied_embedding(model)
    if embedding is None or not embedding.weight.requires_grad or type(embedding) is not torch.nn.Embedding:
        return False
    embedding.__class__ = _RowsIntoGradEmbedding
    return True


def gradient_into_grad(model: torch.nn.Module) -> bool:
    """Whether ``model``'s tied embedding adds its gradient straight into ``.grad``
    (:func:`tied_embedding_rows_into_grad` applied): then the fused LM head adds its part there too
    (``lm_head_logprobs(..., weight_grad_into_grad=True)``), and the weight's ``.grad`` is a buffer kept
    between steps (:func:`zero_gradients`), so no fresh (vocab × d) gradient is allocated per backward."""
    inner = getattr(model, "module", model)
    get_input = getattr(inner, "get_input_embeddings", None)
    return get_input is not None and type(get_input()) is _RowsIntoGradEmbedding and tied_embedding(inner) is not None


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


FEW_ROWS = 64
"""Most rows for which :class:`_FewRowsLinear` computes (W · hᵀ)ᵀ (from 128 rows on it was no faster)."""
LARGE_VOCABULARY = 8192
"""Fewest output features for which it does (on a 512-token vocabulary it was slower)."""


class _FewRowsLinear(torch.nn.Linear):
    """An ``nn.Linear`` (same parameters, same state dict) that computes x · Wᵀ as (W · xᵀ)ᵀ for at most
    :data:`FEW_ROWS` rows of float32 input and at least :data:`LARGE_VOCABULARY` outputs on a CPU, without
    autograd or autocast (see the module docstring)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        rows = input.numel() // max(input.shape[-1], 1)
        if (
            rows > FEW_ROWS
            or self.out_features < LARGE_VOCABULARY
            or input.device.type != "cpu"
            or input.dtype != torch.float32
            or self.weight.dtype != torch.float32
            or torch.is_grad_enabled()
            or torch.is_autocast_enabled("cpu")
        ):
            return super().forward(input)
        flat = input.reshape(rows, input.shape[-1])  # (N, d)
        logits = torch.mm(self.weight, flat.T).T.contiguous()  # (V, N) -> (N, V)
        if self.bias is not None:
            logits += self.bias
        return logits.reshape(*input.shape[:-1], self.out_features)


def few_rows_cpu_lm_head(model: torch.nn.Module) -> bool:
    """Let the LM head (``get_output_embeddings()``, a plain ``nn.Linear``) compute few rows as (W · hᵀ)ᵀ on a
    CPU (see the module docstring); returns whether it applied. Only the no-autograd float32 path changes: the
    sampler and ``generate``; training and the fused head are untouched."""
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if get_output is not None else None
    if head is None or type(head) is not torch.nn.Linear:
        return False
    head.__class__ = _FewRowsLinear
    return True


def sparse_untied_embedding_gradient(model: torch.nn.Module) -> torch.nn.Parameter | None:
    """Let a trainable input embedding that is *not* tied to an LM head send only its looked-up rows backward.

    Returns its weight, whose ``.grad`` must stay a dense buffer: pass it to :func:`zero_gradients`. A hook
    makes a sparse ``.grad`` dense should one ever be accumulated into a missing gradient (the first backward
    after ``zero_grad(set_to_none=True)``), so AdamW always sees a dense gradient."""
    get_input = getattr(model, "get_input_embeddings", None)
    embedding = get_input() if get_input is not None else None
    if not isinstance(embedding, torch.nn.Embedding) or tied_embedding(model) is not None:
        return None
    if not embedding.weight.requires_grad or embedding.sparse:
        return None
    embedding.sparse = True
    embedding.weight.register_post_accumulate_grad_hook(_densify_grad)
    return embedding.weight


def _densify_grad(param: torch.Tensor) -> None:
    if param.grad is not None and param.grad.is_sparse:
        param.grad = param.grad.to_dense()


def zero_gradients(optimizer: torch.optim.Optimizer, kept: frozenset[torch.Tensor] = frozenset()) -> None:
    """``optimizer.zero_grad(set_to_none=True)``, except that the ``kept`` parameters' gradients are dense
    buffers zeroed in place (allocated on first use): sparse embedding rows then accumulate into them."""
    kept_ids = {id(param) for param in kept}  # identity: ``in`` on tensors could compare values
    for group in optimizer.param_groups:
        for param in group["params"]:
            if id(param) not in kept_ids:
                param.grad = None
            elif param.grad is None or param.grad.is_sparse:
                param.grad = torch.zeros_like(param)
            else:
                param.grad.zero_()


def keep_dense_gradients(optimizer: torch.optim.Optimizer, kept: frozenset[torch.Tensor]) -> None:
    """Make ``optimizer.zero_grad()`` keep the ``kept`` weights' gradients as dense buffers zeroed in place
    (:func:`zero_gradients`), so the loop that calls it need not know which weights those are."""
    if kept:
        optimizer.zero_grad = lambda set_to_none=True: zero_gradients(optimizer, kept)


def speed_up_ppo_models(policy: torch.nn.Module, others: tuple[torch.nn.Module, ...], world_size: int):
    """``fused_kernels`` for PPO's four models: one-kernel activations and float32 attention under bf16 on a CPU in
    all of them, the policy's LM head on few rows as (W · hᵀ)ᵀ when sampling on a CPU in float32; in one process
    only (DDP would miss or misread these gradients), the policy's tied embedding rows added straight into
    ``.grad`` and sparse rows for trainable untied embeddings (the value model). Returns the weights whose
    dense gradient buffers the optimizers must keep (:func:`keep_dense_gradients`)."""
    for model in (policy, *others):
        fuse_activations(model)
        float32_cpu_attention(model)
    few_rows_cpu_lm_head(policy)  # no-autograd calls only: the sampler's, never training's
    if world_size > 1:
        return frozenset()
    kept = [sparse_untied_embedding_gradient(model) for model in (policy, *others)]
    if tied_embedding_rows_into_grad(policy):  # the LM head's gradient then goes into the same kept buffer
        kept.append(policy.get_input_embeddings().weight)
    return frozenset(weight for weight in kept if weight is not None)
