"""Per-token log-probabilities and entropies from logits, without a second full-vocabulary tensor.

A causal LM returns logits of shape (B, T, V). PPO needs only log π(y_t | x, y_<t) at the sampled
token y_t, i.e. one number per position. The naive form

    torch.log_softmax(logits / temperature, dim=-1).gather(-1, labels[..., None])[..., 0]

materialises a (B, T, V) log-prob tensor next to the logits (and a third one for the division by the
temperature). Here we use log softmax(z)_y = z_y − logsumexp(z) and walk over the batch in chunks, so
at most ``chunk_size`` rows of a full-vocabulary temporary exist at a time.

Memory note: under autograd, ``logsumexp`` keeps its input for the backward pass, so training-time calls
still hold one float32 copy of the (temperature-scaled) logits; the chunking bounds the *extra* peak, and
rollout-time calls under ``torch.no_grad`` keep nothing beyond the (B, T) result.
"""

from __future__ import annotations

import torch


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _scaled_chunk(logits_chunk: torch.Tensor, temperature: float) -> torch.Tensor:
    """Upcast to at least float32 (bf16 logsumexp loses ~3 digits) and divide by the temperature."""
    compute_dtype = torch.promote_types(logits_chunk.dtype, torch.float32)
    z = logits_chunk.to(compute_dtype)
    if temperature != 1.0:
        z = z / temperature
    return z


def logprobs_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, chunk_size: int = 1
) -> torch.Tensor:
    """log π(y_t) = log softmax(z_t / τ)[y_t] = z_t[y_t]/τ − logsumexp(z_t / τ), one value per position.

    Dividing by the sampling temperature τ before the softmax (N detail 10) makes these the log-probs of
    the distribution the responses were actually sampled from; without it the KL to π^SFT and the PPO
    ratio describe a different policy.

    Args:
        logits: (B, T, V) unnormalised scores z (any float dtype; computed in at least float32).
        labels: (B, T) integer token ids y to read off.
        temperature: τ > 0.
        chunk_size: rows of the batch processed at once; bounds the size of full-vocabulary temporaries.

    Returns:
        (B, T) log-probs in float32 (float64 if the logits are float64).
    """
    _check_temperature(temperature)
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on leading dims")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    out = []
    for start in range(0, logits.shape[0], chunk_size):
        z = _scaled_chunk(logits[start : start + chunk_size], temperature)  # (b, T, V)
        label_logit = z.gather(-1, labels[start : start + chunk_size].unsqueeze(-1)).squeeze(-1)  # (b, T)
        out.append(label_logit - torch.logsumexp(z, dim=-1))
    if not out:  # empty batch
        return logits.new_zeros(labels.shape, dtype=torch.promote_types(logits.dtype, torch.float32))
    return torch.cat(out, dim=0)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0, chunk_size: int = 1) -> torch.Tensor:
    """H(π_t) = −Σ_v p_v log p_v with p = softmax(z_t / τ), computed as logsumexp(z/τ) − Σ_v p_v z_v/τ.

    The second form needs no log-prob tensor: log p_v = z_v/τ − logsumexp(z/τ) and Σ p_v = 1.

    Args:
        logits: (B, T, V) unnormalised scores z.
        temperature: τ > 0, the sampling temperature.
        chunk_size: rows of the batch processed at once.

    Returns:
        (B, T) entropies in nats.
    """
    _check_temperature(temperature)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    out = []
    for start in range(0, logits.shape[0], chunk_size):
        z = _scaled_chunk(logits[start : start + chunk_size], temperature)  # (b, T, V)
        probs = torch.softmax(z, dim=-1)
        out.append(torch.logsumexp(z, dim=-1) - (probs * z).sum(dim=-1))
    if not out:
        return logits.new_zeros(logits.shape[:-1], dtype=torch.promote_types(logits.dtype, torch.float32))
    return torch.cat(out, dim=0)


# --------------------------------------------------------------------------- fused LM head + log-softmax gather

VOCAB_BLOCK = 1024
"""Rows of the unembedding matrix per matmul in the fused LM head. One block's logits for every position
((block × positions) floats) stay in cache between the matmul and the reductions that follow it, and a
(block, d) × (d, positions) product runs near the machine's matmul peak, where one (positions, d) × (d, V)
product with a large V does not (its output alone is tens of MB). Measured on 2 CPU threads, forward +
backward of 256 positions × width 512 × 32,000 tokens: 200 ms for the earlier position-chunked head, 167 /
178 / 182 ms with blocks of 1024 / 2048 / 4096 rows (130 ms would be the matmul peak)."""


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
    _check_temperature(temperature)
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
) -> torch.Tensor:
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
            each step, whose first writes cost more than the products (a fresh buffer written in 20 ms, an
            existing one in 2). For one process with ``.grad`` kept as a buffer between steps (DDP would miss
            it, and ``torch.autograd.grad`` does not see it).

    Returns:
        (B, T) log-probs in float32 (float64 for float64 weights).
    """
    flat_hidden, flat_labels = _flatten_for_head(hidden, labels, temperature, vocab_block)
    grads_needed = any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if not (torch.is_grad_enabled() and grads_needed):
        logprobs, _ = _head_no_grad(
            flat_hidden, weight, bias, flat_labels, temperature, vocab_block, chunk_elements, with_entropy=False
        )
        return logprobs.view(labels.shape)
    dtype = matmul_dtype(hidden.device.type, weight.dtype)
    out = _LMHeadLogprobs.apply(
        flat_hidden, weight, bias, flat_labels, temperature, vocab_block, dtype, weight_grad_into_grad
    )
    return out.view(labels.shape)  # (B, T)


@torch.no_grad()
def lm_head_logprobs_and_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    chunk_elements: int = 1 << 22,
    vocab_block: int = VOCAB_BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log π(y_t), H(π_t))``, both (B, T) float32, from hidden states, block by block, without gradients.

    For rollout scoring: as :func:`lm_head_logprobs` plus the entropy H = logsumexp(z/τ) − Σ_v p_v z_v/τ
    (:func:`entropy_from_logits`), whose sum is accumulated per vocabulary block alongside the log-sum-exp.
    """
    flat_hidden, flat_labels = _flatten_for_head(hidden, labels, temperature, vocab_block)
    logprobs, entropy = _head_no_grad(
        flat_hidden, weight, bias, flat_labels, temperature, vocab_block, chunk_elements, with_entropy=True
    )
    return logprobs.view(labels.shape), entropy.view(labels.shape)
