"""The fused LM head: log softmax(W h + b)/τ gathered at the labels, over blocks of the vocabulary.

The same numbers as :func:`instructrl.rl.logprobs_from_logits` applied to the model's logits, without ever forming
a (B, T, V) logits tensor, its log-softmax or its gradient. :class:`FusedHeadLogProbs` is the fast side of the
log-prob seam (:class:`instructrl.models.logprobs.FullLogits` is the reference side): it asks the model for its
final hidden states and applies the head itself, for the architectures whose logits are exactly
``lm_head(hidden_states[-1])``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from transformers import PreTrainedModel

from instructrl.fast.kernels import gradient_into_grad
from instructrl.models.logprobs import FullLogits
from instructrl.models.reward import position_ids_from_mask
from instructrl.rl.logprobs import check_temperature
from instructrl.utils.distributed import call_on

VOCAB_BLOCK = 1024
"""Rows of the unembedding matrix per matmul in the fused LM head. One block's logits for every position
((block × positions) floats) stay in cache between the matmul and the reductions that follow it, and a
(block, d) × (d, positions) product runs near the machine's matmul peak, where one (positions, d) × (d, V)
product with a large V does not (its output alone is tens of MB). 1024 was the fastest block size tried, and
faster than chunking by positions (measurements: benchmarks/RESULTS.md)."""


def matmul_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype matmuls run in: autocast's dtype when autocast is on for ``device_type``, else ``dtype``."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype


def _cast_for_matmul(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight`` in the matmul dtype, cast afresh at every call.

    No copy is kept between calls: a kept copy would have to notice every writer of the weight, and some do
    not say that they wrote (a fused AdamW step updates parameters in place without bumping their version
    counter). A fresh cast is correct by construction; its cost is in benchmarks/RESULTS.md."""
    return weight.detach().to(dtype)


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Log-sum-exp and gradient sums run in at least float32 (bf16 would lose ~3 digits)."""
    return torch.promote_types(dtype, torch.float32)


def _vocab_blocks(vocab: int, block: int) -> list[tuple[int, int]]:
    return [(start, min(vocab, start + block)) for start in range(0, vocab, block)]


def _block_logits(w: torch.Tensor, h_t: torch.Tensor, bias, temperature: float, start: int, out: torch.Tensor):
    """out = (W[start:start+n] hᵀ + b) / τ: the logits of n vocabulary rows at every position, (n, N).

    ``w`` (V, d) and ``h_t`` (d, N) are in the matmul dtype; ``out`` is >= float32 and contiguous."""
    rows = w[start : start + out.shape[0]]
    with torch.autocast(h_t.device.type, enabled=False):  # the caller chose the compute dtype already
        if out.dtype == w.dtype:
            torch.mm(rows, h_t, out=out)
        else:
            out.copy_(rows @ h_t)
    if bias is not None:
        out += bias[start : start + out.shape[0], None].to(out.dtype)
    if temperature != 1.0:
        out /= temperature
    return out


def _label_rows(labels: torch.Tensor, start: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row of each position's label inside the block [start, start + rows), clamped; whether it is there)."""
    offset = labels - start
    return offset.clamp(0, rows - 1), (offset >= 0) & (offset < rows)


def _gather_label_logits(z: torch.Tensor, labels: torch.Tensor, start: int, label_logit: torch.Tensor):
    """label_logit[t] ← z[y_t − start, t] where y_t falls in this block (no host sync, unlike nonzero())."""
    row, inside = _label_rows(labels, start, z.shape[0])
    return torch.where(inside, z.gather(0, row.unsqueeze(0)).squeeze(0), label_logit)


def _scratch_block(scratch: torch.Tensor, rows: int, positions: int) -> torch.Tensor:
    """A contiguous (rows, positions) view at the start of a flat scratch buffer."""
    return scratch[: rows * positions].view(rows, positions)


def _exp_block(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """In place z ← exp(z − m) with m the block's maximum per position; returns (m, Σ exp(z − m)), each (N,)."""
    block_max = z.amax(dim=0)
    z.sub_(block_max).exp_()
    return block_max, z.sum(dim=0)


def _combine_blocks(maxima: list[torch.Tensor], sums: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """logsumexp over all blocks from each block's (m_j, s_j = Σ exp(z − m_j)), and each block's factor
    c_j = exp(m_j − m) / Σ_k s_k exp(m_k − m), which turns exp(z − m_j) into the softmax. Shapes (N,), (blocks, N)."""
    block_max = torch.stack(maxima)  # (blocks, N)
    top = block_max.amax(dim=0)  # (N,)
    rescale = (block_max - top).exp_()  # (blocks, N)
    total = (torch.stack(sums) * rescale).sum(dim=0)  # (N,)
    return top + total.log(), rescale.div_(total)


class _LMHeadLogprobs(torch.autograd.Function):
    """log softmax(h Wᵀ + b)/τ gathered at the labels, one vocabulary block at a time; see :func:`lm_head_logprobs`.

    Forward keeps, for every block j, e_j = exp(z_j − m_j) as a (block, N) slice of one (V, N) buffer in the
    matmul dtype, plus the factors c_j (N,) with softmax = e_j · c_j. Backward turns that buffer into
    ∂/∂z = (onehot(y) − p)·g/τ in place, block by block, writing each block's rows of ∂/∂W straight into the
    gradient, and ends with one (N, V) × (V, d) product for ∂/∂h.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, vocab_block, compute_dtype, weight_grad_into_grad):
        acc = _accumulate_dtype(compute_dtype)
        w = _cast_for_matmul(weight, compute_dtype)  # (V, d)
        h = hidden.detach().to(compute_dtype)  # (N, d)
        positions, blocks = labels.shape[0], _vocab_blocks(w.shape[0], vocab_block)
        kept = torch.empty(w.shape[0], positions, dtype=compute_dtype, device=w.device)  # (V, N)
        # blocks are computed in >= float32; in place when that is the matmul dtype, else in a scratch block
        scratch = None if acc == compute_dtype else torch.empty(vocab_block * positions, dtype=acc, device=w.device)
        label_logit = torch.zeros(positions, dtype=acc, device=w.device)
        maxima, sums = [], []
        for start, end in blocks:
            z = (
                kept[start:end]
                if scratch is None
                else scratch[: (end - start) * positions].view(end - start, positions)
            )
            _block_logits(w, h.T, bias, temperature, start, z)
            label_logit = _gather_label_logits(z, labels, start, label_logit)
            block_max, block_sum = _exp_block(z)
            maxima.append(block_max)
            sums.append(block_sum)
            if scratch is not None:
                kept[start:end].copy_(z)
        lse, factors = _combine_blocks(maxima, sums)
        ctx.save_for_backward(hidden, weight, labels)
        ctx.kept, ctx.factors, ctx.w = kept, factors, w
        ctx.bias, ctx.temperature, ctx.blocks, ctx.compute_dtype = bias, temperature, blocks, compute_dtype
        ctx.weight_grad_into_grad = weight_grad_into_grad
        return label_logit - lse

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, labels = ctx.saved_tensors[:3]
        kept, factors, w = ctx.kept, ctx.factors, ctx.w
        ctx.kept = ctx.factors = ctx.w = None  # free with the graph even if backward is retained
        compute, acc = ctx.compute_dtype, _accumulate_dtype(ctx.compute_dtype)
        h = hidden.detach().to(compute)  # (N, d)
        g = grad_out.to(acc)  # (N,)
        want_weight = ctx.needs_input_grad[1]  # False for a frozen head (LoRA)
        into_grad = want_weight and ctx.weight_grad_into_grad
        if into_grad:  # add each block's rows into the parameter's own gradient buffer (see lm_head_logprobs)
            if weight.grad is None:
                weight.grad = torch.zeros_like(weight)
            grad_weight = weight.grad
        else:
            grad_weight = torch.empty(weight.shape, dtype=acc, device=weight.device) if want_weight else None
        want_bias = ctx.bias is not None and ctx.needs_input_grad[2]
        grad_bias = torch.empty(weight.shape[0], dtype=acc, device=weight.device) if want_bias else None
        for index, (start, end) in enumerate(ctx.blocks):
            # ∂ log p_y / ∂ z_v = ([v = y] − p_v) / τ times the incoming g, with p_v = e_v · c (the kept block)
            gz = kept[start:end] if kept.dtype == acc else kept[start:end].to(acc)  # (n, N)
            gz.mul_(factors[index] * -g)
            row, inside = _label_rows(labels, start, end - start)
            gz.scatter_add_(0, row.unsqueeze(0), torch.where(inside, g, 0.0).unsqueeze(0))
            if ctx.temperature != 1.0:
                gz /= ctx.temperature
            if grad_bias is not None:
                grad_bias[start:end] = gz.sum(dim=1)
            if kept.dtype != acc:
                kept[start:end].copy_(gz)  # the matmuls below run in the compute dtype
            if grad_weight is not None:
                with torch.autocast(h.device.type, enabled=False):
                    rows = grad_weight[start:end]  # ∂/∂W rows = (∂/∂z)ᵀ h
                    if into_grad and kept.dtype == rows.dtype:
                        rows.addmm_(kept[start:end], h)
                    elif into_grad:
                        rows.add_(kept[start:end] @ h)
                    elif kept.dtype == acc:
                        torch.mm(kept[start:end], h, out=rows)
                    else:
                        rows.copy_(kept[start:end] @ h)
        grad_hidden = None
        if ctx.needs_input_grad[0]:
            with torch.autocast(h.device.type, enabled=False):
                grad_hidden = (kept.T @ w).to(hidden.dtype)  # (N, V) @ (V, d): ∂/∂h = Σ_v ∂/∂z_v W_v
        grad_bias = grad_bias.to(ctx.bias.dtype) if grad_bias is not None else None
        if into_grad:
            grad_weight = None  # already in weight.grad
        elif grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def _head_no_grad(hidden, weight, bias, labels, temperature, vocab_block, chunk_elements, with_entropy):
    """log π(y_t) (and H(π_t)) without autograd: positions in blocks of ``chunk_elements // vocab_block``, each
    swept over the vocabulary blocks with an online log-sum-exp; only one (block, positions) scratch exists."""
    compute = matmul_dtype(hidden.device.type, weight.dtype)
    acc = _accumulate_dtype(compute)
    w, h = _cast_for_matmul(weight, compute), hidden.to(compute)  # (V, d), (N, d)
    vocab, n = w.shape[0], labels.shape[0]
    blocks = _vocab_blocks(vocab, vocab_block)
    span = max(1, chunk_elements // max(1, min(vocab_block, vocab)))  # positions per sweep
    logprobs = torch.empty(n, dtype=acc, device=w.device)
    entropy = torch.empty(n, dtype=acc, device=w.device) if with_entropy else None
    scratch = torch.empty(min(vocab_block, vocab) * min(span, n), dtype=acc, device=w.device)
    for first in range(0, n, span):
        cols = slice(first, first + span)
        h_t, y = h[cols].T, labels[cols]  # (d, m), (m,)
        label_logit = torch.zeros(y.shape[0], dtype=acc, device=w.device)
        maxima, sums, weighted = [], [], []
        for start, end in blocks:
            z = _scratch_block(scratch, end - start, y.shape[0])
            _block_logits(w, h_t, bias, temperature, start, z)
            label_logit = _gather_label_logits(z, y, start, label_logit)
            if with_entropy:  # Σ_v exp(z_v − m_j) z_v, for Σ_v p_v z_v = Σ_j c_j · that
                block_max = z.amax(dim=0)
                e = (z - block_max).exp_()
                maxima.append(block_max)
                sums.append(e.sum(dim=0))
                weighted.append(e.mul_(z).sum(dim=0))
            else:
                block_max, block_sum = _exp_block(z)
                maxima.append(block_max)
                sums.append(block_sum)
        lse, factors = _combine_blocks(maxima, sums)
        logprobs[cols] = label_logit - lse
        if with_entropy:
            entropy[cols] = lse - (torch.stack(weighted) * factors).sum(dim=0)
    return logprobs, entropy


def _flatten_for_head(hidden: torch.Tensor, labels: torch.Tensor, temperature: float, vocab_block: int):
    """Checked inputs of the fused LM head: (B·T, d) hidden states and (B·T,) labels."""
    check_temperature(temperature)
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree on leading dims")
    if vocab_block < 1:
        raise ValueError(f"vocab_block must be >= 1, got {vocab_block}")
    return hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)  # (B·T, d), (B·T,)


def lm_head_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    chunk_elements: int = 1 << 22,
    vocab_block: int = VOCAB_BLOCK,
    weight_grad_into_grad: bool = False,
    with_entropy: bool = False,
):
    """log π(y_t) = z_t[y_t]/τ − logsumexp(z_t/τ) with z_t = W h_t + b, without a (B, T, V) logits tensor.

    The same numbers as ``logprobs_from_logits(hidden @ weight.T + bias, labels, temperature)``, computed
    over blocks of ``vocab_block`` vocabulary rows: each block's logits (block × positions) are formed,
    reduced with an online log-sum-exp (per block j its maximum m_j and Σ exp(z − m_j), combined at the end)
    and, under autograd, kept as exp(z − m_j), which with one factor per block and position is the softmax p,
    all the backward pass needs:

        ∂ log π(y_t) / ∂ z_t = (onehot(y_t) − p_t) / τ,   ∂/∂h_t = (∂/∂z_t) W,   ∂/∂W = Σ_t (∂/∂z_t)ᵀ h_t

    That kept (V × positions) buffer, in the matmul dtype, becomes the gradient of the logits in place, so
    under autograd it is the only full-vocabulary tensor (no logits, scaled copy, log-probs or gradient of
    each). Without autograd (rollout scoring) positions go in groups of ``chunk_elements // vocab_block`` and
    only one block's scratch exists.

    Matmuls run in autocast's dtype when autocast is on (bf16 mixed precision), else in the weight's dtype;
    the log-sum-exp is always float32 and the weight gradient is accumulated in float32.

    Args:
        hidden: (B, T, d) final hidden states (after the final norm) at the positions that predict ``labels``.
        weight: (V, d) unembedding matrix (the LM head's weight; tied or not).
        labels: (B, T) token ids y.
        temperature: τ > 0.
        bias: (V,) LM-head bias, if the model has one.
        chunk_elements: without autograd, bounds the scratch block (vocab_block × positions) in elements.
        vocab_block: vocabulary rows per matmul (:data:`VOCAB_BLOCK`).
        weight_grad_into_grad: add ∂/∂W block by block into ``weight.grad`` (allocated as zeros when missing)
            and give autograd no gradient for the weight. The same sum reaches ``.grad``, but no fresh
            (V, d) gradient is allocated per backward: at V = 32,000 and d = 512 that is 64 MiB of new pages
            each step, whose first writes cost more than the products. For one process with ``.grad`` kept as
            a buffer between steps (DDP would miss it, and ``torch.autograd.grad`` does not see it).
        with_entropy: also return the entropy H(π_t) = logsumexp(z/τ) − Σ_v p_v z_v/τ
            (:func:`~instructrl.rl.entropy_from_logits`), accumulated per vocabulary block beside the
            log-sum-exp; both without gradients (rollout scoring).

    Returns:
        (B, T) log-probs in float32 (float64 for float64 weights); with ``with_entropy``, ``(logprobs, entropy)``.
    """
    flat_hidden, flat_labels = _flatten_for_head(hidden, labels, temperature, vocab_block)
    grads_needed = any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if with_entropy or not (torch.is_grad_enabled() and grads_needed):
        with torch.no_grad():
            logprobs, entropy = _head_no_grad(
                flat_hidden, weight, bias, flat_labels, temperature, vocab_block, chunk_elements, with_entropy
            )
        if with_entropy:
            return logprobs.view(labels.shape), entropy.view(labels.shape)
        return logprobs.view(labels.shape)
    dtype = matmul_dtype(hidden.device.type, weight.dtype)
    out = _LMHeadLogprobs.apply(
        flat_hidden, weight, bias, flat_labels, temperature, vocab_block, dtype, weight_grad_into_grad
    )
    return out.view(labels.shape)  # (B, T)


# --------------------------------------------------------------------------- the seam's fast side

FUSED_HEAD_MODEL_TYPES = frozenset({"gpt2", "llama", "mistral", "qwen2", "qwen3"})
"""Architectures whose logits are exactly ``lm_head(hidden_states[-1])`` (no soft-capping or logit scaling), so
:class:`FusedHeadLogProbs` may apply the head itself. Others take the reference path."""


class FusedHead(NamedTuple):
    """An LM head that :class:`FusedHeadLogProbs` applies itself (:func:`lm_head_logprobs`)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    grad_into_weight: bool
    """Its weight gradient goes straight into ``.grad`` (:func:`instructrl.fast.kernels.gradient_into_grad`)."""


def fused_lm_head(model) -> FusedHead | None:
    """The LM head when :class:`FusedHeadLogProbs` can apply it itself, else None."""
    inner = getattr(model, "module", model)  # DDP keeps the wrapped module in .module
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if getattr(inner.config, "model_type", None) not in FUSED_HEAD_MODEL_TYPES or not isinstance(
        head, torch.nn.Linear
    ):
        return None
    return FusedHead(head.weight, head.bias, gradient_into_grad(inner))


def final_hidden_states(model, **inputs) -> torch.Tensor:
    """The last layer's hidden states after the final norm, (B, T, d), without the model's own LM head.

    A plain Hugging Face causal LM is asked through its base model (``model.base_model``: the same modules
    but the head), so the head's weight is not even cast under autocast. A wrapped one (DDP's ``.module``,
    PEFT) is called whole, so that its wrapper sees the forward, with ``logits_to_keep`` selecting no
    position."""
    inputs["use_cache"] = False
    base = getattr(model, "base_model", None)
    if isinstance(model, PreTrainedModel) and base is not None and base is not model:
        return base(**inputs).last_hidden_state
    no_positions = torch.empty(0, dtype=torch.long, device=inputs["input_ids"].device)
    return model(**inputs, logits_to_keep=no_positions, output_hidden_states=True).hidden_states[-1]


class FusedHeadLogProbs(FullLogits):
    """The log-prob seam's fast side: the same numbers as :class:`FullLogits` (tested), through the fused head.

    The model is asked for its final hidden states and for no logits at all; the LM head and the log-softmax
    gather run fused over blocks of the vocabulary at the positions needed, so no (B, R, V) float32 logits
    tensor, its log-softmax or its gradient is ever formed. Architectures not in
    :data:`FUSED_HEAD_MODEL_TYPES` take the reference path."""

    def responses(self, model, input_ids, attention_mask, response, temperature, with_entropy=False):
        if fused_lm_head(model) is None:
            return super().responses(model, input_ids, attention_mask, response, temperature, with_entropy)
        # a sharded model's head weight is gathered by its root's hooks: the whole computation runs through it
        return call_on(model, self._responses, input_ids, attention_mask, response, temperature, with_entropy)

    def texts(self, model, windows):
        if fused_lm_head(model) is None:
            return super().texts(model, windows)
        return call_on(model, self._texts, windows)

    def _responses(self, model, input_ids, attention_mask, response, temperature, with_entropy):
        head = fused_lm_head(model)
        width = response.shape[1]
        hidden = final_hidden_states(
            model,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
        )
        hidden = hidden[:, -width - 1 : -1]  # (B, R, d): positions Q − 1 … Q + R − 2
        return lm_head_logprobs(
            hidden, head.weight, response, temperature, head.bias, weight_grad_into_grad=head.grad_into_weight,
            with_entropy=with_entropy,
        )  # fmt: skip

    def _texts(self, model, windows):
        head = fused_lm_head(model)
        hidden = final_hidden_states(model, input_ids=windows)[:, :-1]  # (B, L − 1, d): predicting x_1 … x_{L−1}
        return lm_head_logprobs(
            hidden, head.weight, windows[:, 1:], 1.0, head.bias, weight_grad_into_grad=head.grad_into_weight
        )
