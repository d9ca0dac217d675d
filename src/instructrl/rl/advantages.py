"""Masked statistics, whitening and generalised advantage estimation (GAE) over (B, T) response tensors.

``response_mask`` is 1 for real response tokens (up to and including EOS) and 0 after EOS / on padding.
Masked reductions read the masked-out entries through ``torch.where``, never ``x * mask``: padding may hold
inf or NaN (e.g. log-probs of pad tokens), and 0 · inf = NaN would otherwise leak into the statistic.
"""

from __future__ import annotations

import torch


def as_bool_mask(mask: torch.Tensor) -> torch.Tensor:
    """A response mask as booleans: bool masks as they are, 0/1 integer or float masks compared with 0."""
    return mask if mask.dtype == torch.bool else mask != 0


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Σ_{t: mask_t = 1} x_t, over all entries (``dim=None``) or along ``dim``."""
    selected = torch.where(as_bool_mask(mask), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return selected.sum() if dim is None else selected.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """mean_{mask=1} x = Σ mask·x / Σ mask, over all entries (``dim=None``) or along ``dim``.

    An empty selection gives 0, not NaN (the count is clamped to 1), so that a row with no response
    tokens does not poison a per-row mean; this avoids a device sync to check for it.
    """
    count = as_bool_mask(mask).to(x.dtype)
    count = count.sum() if dim is None else count.sum(dim=dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries: Σ mask·(x − μ)² / (n − 1) if ``unbiased`` else / n, with n = Σ mask.

    ``torch.var`` is unbiased by default while TF's ``tf.moments`` (used by lm-human-preferences) is biased:
    the original's whitening used the biased one [ppo-details: reward-whitening], hence the explicit flag.
    Counting the entries costs one device sync.

    With fewer entries than the estimator needs (n < 2 unbiased, n = 0 biased) the spread is unknown and 0 is
    returned, the biased estimate of one entry. A valid run reaches this: ``batch_size=1`` with EOS sampled
    first leaves one response token. Whitening then only centres (:func:`masked_whiten`), so that lone token's
    advantage is 0 and the batch gives no policy gradient rather than an error.
    """
    n = int(as_bool_mask(mask).sum().item())
    if n < (2 if unbiased else 1):
        return torch.zeros((), dtype=x.dtype, device=x.device)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return var * (n / (n - 1)) if unbiased else var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, unbiased: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Whiten the masked entries: (x − μ) / sqrt(σ² + eps), plus μ again when ``shift_mean`` is False.

    - ``shift_mean=True`` (advantages) [ppo-details: advantage-whitening]: result has masked mean 0 and std 1.
    - ``shift_mean=False`` (rewards) [ppo-details: reward-whitening]: only the scale changes; the masked
      mean stays μ, so whitening does not turn a uniformly positive reward into a partly negative one.

    μ, σ² are taken over the masked entries only. Masked-out entries of the result are 0.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=unbiased)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(as_bool_mask(mask), whitened, torch.zeros((), dtype=whitened.dtype, device=whitened.device))


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) per response token.

        δ_t = r_t + γ·V_{t+1} − V_t
        A_t = δ_t + γλ·A_{t+1}
        R_t = A_t + V_t                     (the value target, "returns")

    with V_{t+1} = 0 and A_{t+1} = 0 beyond the last valid token of a row: the episode ends at EOS
    (InstructGPT's bandit setting, γ = 1 per App. C.4, λ = 0.95) [ppo-details: no-discount].

    The recursion is a python loop over T, vectorised over the batch. ``response_mask`` must be a prefix
    mask (ones, then zeros); a 0 acts as the end of the episode. Pass detached rollout values: the
    outputs are targets, not something to back-propagate through.

    Args:
        rewards: (B, T) per-token shaped rewards r_t.
        values: (B, T) value estimates V_t from rollout time.
        response_mask: (B, T) 1 for real response tokens.
        gamma: discount γ.
        lam: GAE λ.

    Returns:
        ``(advantages, returns)``, both (B, T), zero where the mask is 0.
    """
    if not rewards.shape == values.shape == response_mask.shape:
        raise ValueError(
            f"rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and response_mask "
            f"{tuple(response_mask.shape)} must have the same (B, T) shape"
        )
    valid = as_bool_mask(response_mask)
    if rewards.shape[1] == 0:
        return torch.zeros_like(values), torch.zeros_like(values)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    rewards = torch.where(valid, rewards, zero)
    values = torch.where(valid, values, zero)  # V beyond the last valid token is 0
    next_value = torch.zeros_like(values[:, 0])  # (B,)
    next_advantage = torch.zeros_like(values[:, 0])  # (B,)
    advantages_reversed = []
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = torch.where(valid[:, t], delta + gamma * lam * next_advantage, zero)
        advantages_reversed.append(advantage)
        next_value, next_advantage = values[:, t], advantage
    advantages = torch.stack(advantages_reversed[::-1], dim=1)  # (B, T)
    returns = advantages + values  # both already 0 where the mask is 0
    return advantages, returns
