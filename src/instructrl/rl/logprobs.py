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


def matmul_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype matmuls run in: autocast's dtype when autocast is on for ``device_type``, else ``dtype``."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Log-sum-exp and gradient sums run in at least float32 (bf16 would lose ~3 digits)."""
    return torch.promote_types(dtype, torch.float32)


def _head_chunk(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float):
    """z / τ for one chunk of rows: (n, d) @ (d, V) in the weight's (compute) dtype, upcast to >= float32."""
    with torch.autocast(hidden.device.type, enabled=False):  # the caller chose the compute dtype already
        z = (hidden.to(weight.dtype) @ weight.T).to(_accumulate_dtype(weight.dtype))  # (n, V)
    if bias is not None:
        z += bias.to(z.dtype)
    if temperature != 1.0:
        z /= temperature
    return z


class _LMHeadLogprobs(torch.autograd.Function):
    """log softmax(h Wᵀ + b)/τ gathered at the labels, computed chunk by chunk; see :func:`lm_head_logprobs`."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, chunk_size, compute_dtype, keep):
        w = weight.detach().to(compute_dtype)
        out = hidden.new_empty(labels.shape, dtype=_accumulate_dtype(compute_dtype))  # (N,)
        probs = []
        for start in range(0, labels.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            z = _head_chunk(hidden[rows], w, bias, temperature)  # (n, V)
            lse = torch.logsumexp(z, dim=-1)  # (n,)
            out[rows] = z.gather(-1, labels[rows].unsqueeze(-1)).squeeze(-1) - lse
            if keep:  # softmax, kept for the backward pass (it becomes the gradient of the logits in place)
                probs.append(z.sub_(lse.unsqueeze(-1)).exp_().to(compute_dtype))
        ctx.save_for_backward(hidden, weight, labels)
        ctx.probs, ctx.bias, ctx.temperature, ctx.chunk_size, ctx.compute_dtype = (
            probs,
            bias,
            temperature,
            chunk_size,
            compute_dtype,
        )
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, labels = ctx.saved_tensors
        w = weight.detach().to(ctx.compute_dtype)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        acc = _accumulate_dtype(ctx.compute_dtype)
        # ∂/∂W is accumulated over chunks in >= fp32. When the matmuls already run in that dtype, each chunk's
        # product is written (first chunk) or added (addmm_) straight into it: no zero fill, no temporary.
        in_place = acc == ctx.compute_dtype
        want_weight = ctx.needs_input_grad[1]  # False for a frozen head (LoRA)
        grad_weight = torch.empty(weight.shape, dtype=acc, device=weight.device) if want_weight else None
        if want_weight and labels.shape[0] == 0:
            grad_weight.zero_()
        want_bias = ctx.bias is not None and ctx.needs_input_grad[2]
        grad_bias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if want_bias else None
        for index, start in enumerate(range(0, labels.shape[0], ctx.chunk_size)):
            rows = slice(start, start + ctx.chunk_size)
            g = grad_out[rows].to(acc)  # (n,)
            # ∂ log p_y / ∂ z_v = ([v = y] − p_v) / τ, times the incoming gradient g
            grad_z = ctx.probs[index].to(acc).mul_(-g.unsqueeze(-1))  # (n, V)
            grad_z.scatter_add_(-1, labels[rows].unsqueeze(-1), g.unsqueeze(-1))
            if ctx.temperature != 1.0:
                grad_z /= ctx.temperature
            ctx.probs[index] = None  # free as we go
            if grad_bias is not None:
                grad_bias += grad_z.sum(dim=0)
            grad_z = grad_z.to(ctx.compute_dtype)
            with torch.autocast(hidden.device.type, enabled=False):
                if grad_hidden is not None:
                    grad_hidden[rows] = (grad_z @ w).to(hidden.dtype)
                if grad_weight is not None:
                    _add_weight_grad(grad_weight, grad_z, hidden[rows].to(ctx.compute_dtype), index == 0, in_place)
        grad_bias = grad_bias.to(ctx.bias.dtype) if grad_bias is not None else None
        grad_weight = grad_weight.to(weight.dtype) if grad_weight is not None else None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def _add_weight_grad(grad_weight: torch.Tensor, grad_z: torch.Tensor, h: torch.Tensor, first: bool, in_place: bool):
    """grad_weight (+)= grad_zᵀ h: (V, d) from (n, V) and (n, d); in place when the dtypes allow it."""
    if in_place and first:
        torch.mm(grad_z.T, h, out=grad_weight)
    elif in_place:
        grad_weight.addmm_(grad_z.T, h)
    elif first:
        grad_weight.copy_(grad_z.T @ h)
    else:
        grad_weight += (grad_z.T @ h).to(grad_weight.dtype)


def _flatten_for_head(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, temperature: float, chunk_elements: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Checked inputs of the chunked LM head: (B·T, d) hidden states, (B·T,) labels, positions per chunk."""
    _check_temperature(temperature)
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree on leading dims")
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])  # (B·T, d)
    flat_labels = labels.reshape(-1)  # (B·T,)
    return flat_hidden, flat_labels, _lm_head_rows(flat_labels.shape[0], weight.shape[0], chunk_elements)


def _lm_head_rows(n_rows: int, vocab: int, chunk_elements: int) -> int:
    return max(1, min(n_rows, chunk_elements // max(1, vocab)))


def lm_head_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    chunk_elements: int = 1 << 22,
) -> torch.Tensor:
    """log π(y_t) = z_t[y_t]/τ − logsumexp(z_t/τ) with z_t = W h_t + b, without a (B, T, V) logits tensor.

    The same numbers as ``logprobs_from_logits(hidden @ weight.T + bias, labels, temperature)``, computed in
    chunks of ``chunk_elements // V`` positions: each chunk's logits are formed, reduced to a log-prob and
    turned into the softmax p, which is all the backward pass needs:

        ∂ log π(y_t) / ∂ z_t = (onehot(y_t) − p_t) / τ,   ∂/∂h_t = (∂/∂z_t) W,   ∂/∂W = Σ_t (∂/∂z_t)ᵀ h_t

    The softmax is turned into that gradient in place, so under autograd one (positions × V) buffer is held
    (in the matmul dtype) instead of the logits, their temperature-scaled copy, the log-probs and the
    gradient of each. Without autograd (rollout scoring) only one chunk exists at a time.

    Matmuls run in autocast's dtype when autocast is on (bf16 mixed precision), else in the weight's dtype;
    the log-sum-exp is always float32 and the weight gradient is accumulated in float32.

    Args:
        hidden: (B, T, d) final hidden states (after the final norm) at the positions that predict ``labels``.
        weight: (V, d) unembedding matrix (the LM head's weight; tied or not).
        labels: (B, T) token ids y.
        temperature: τ > 0.
        bias: (V,) LM-head bias, if the model has one.
        chunk_elements: positions × V per chunk (bounds the temporaries).

    Returns:
        (B, T) log-probs in float32 (float64 for float64 weights).
    """
    flat_hidden, flat_labels, rows = _flatten_for_head(hidden, weight, labels, temperature, chunk_elements)
    dtype = matmul_dtype(hidden.device.type, weight.dtype)
    grads_needed = any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    keep = torch.is_grad_enabled() and grads_needed  # else nothing is kept for a backward pass
    out = _LMHeadLogprobs.apply(flat_hidden, weight, bias, flat_labels, temperature, rows, dtype, keep)
    return out.view(labels.shape)  # (B, T)


@torch.no_grad()
def lm_head_logprobs_and_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    chunk_elements: int = 1 << 22,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log π(y_t), H(π_t))``, both (B, T) float32, from hidden states, chunk by chunk, without gradients.

    For rollout scoring: as :func:`lm_head_logprobs` plus the entropy H = logsumexp(z/τ) − Σ_v p_v z_v/τ
    (:func:`entropy_from_logits`), while each chunk's logits exist anyway.
    """
    flat_hidden, flat_labels, rows = _flatten_for_head(hidden, weight, labels, temperature, chunk_elements)
    w = weight.to(matmul_dtype(hidden.device.type, weight.dtype))
    logprobs = torch.empty(flat_labels.shape, dtype=_accumulate_dtype(w.dtype), device=hidden.device)
    entropy = torch.empty_like(logprobs)
    for start in range(0, flat_labels.shape[0], rows):
        chunk = slice(start, start + rows)
        z = _head_chunk(flat_hidden[chunk], w, bias, temperature)  # (n, V)
        lse = torch.logsumexp(z, dim=-1)  # (n,)
        logprobs[chunk] = z.gather(-1, flat_labels[chunk].unsqueeze(-1)).squeeze(-1) - lse
        entropy[chunk] = lse - (torch.softmax(z, dim=-1) * z).sum(dim=-1)
    return logprobs.view(labels.shape), entropy.view(labels.shape)
