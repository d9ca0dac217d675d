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


def check_temperature(temperature: float) -> None:
    """Log-probs at temperature τ divide by τ: it must be > 0."""
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

    Dividing by the sampling temperature τ before the softmax [ppo-details: temperature-scaled-logprobs]
    makes these the log-probs of the distribution the responses were actually sampled from; without it the KL
    to π^SFT and the PPO ratio describe a different policy.

    Args:
        logits: (B, T, V) unnormalised scores z (any float dtype; computed in at least float32).
        labels: (B, T) integer token ids y to read off.
        temperature: τ > 0.
        chunk_size: rows of the batch processed at once; bounds the size of full-vocabulary temporaries.

    Returns:
        (B, T) log-probs in float32 (float64 if the logits are float64).
    """
    check_temperature(temperature)
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
    check_temperature(temperature)
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
