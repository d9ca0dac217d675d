"""Losses of InstructGPT's RM and PPO-ptx stages as pure functions returning ``(loss, stats)``.

Conventions:
- Every objective is *maximised* in the papers; each loss here is −objective, to be minimised.
- Token-level losses reduce with an explicit token mean over ``response_mask``. Passing ``normalizer``
  (a token count) divides the masked *sum* by it instead: give every micro-batch the token count of the
  whole mini-batch and the micro-batch losses (and gradients) add up to exactly the full-batch mean.
  ``ranking_loss`` does the same with a prompt count.
- ``stats`` are detached 0-dim tensors computed under ``torch.no_grad`` (no device sync; call ``.item()``
  when logging). They describe the tensors passed in (one micro-batch), unscaled by ``normalizer``.
- Names: ``rollout_logprobs`` / ``rollout_values`` are from the policy / value network at sampling time
  (PPO's "old" policy); the frozen SFT model is the *reference* and never appears here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from instructrl.rl.advantages import as_bool_mask, masked_mean, masked_sum
from instructrl.rl.kl import kl_k2, kl_k3

Stats = dict[str, torch.Tensor]


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError("shape mismatch: " + ", ".join(f"{name} {shape}" for name, shape in shapes.items()))


def _token_reduce(
    per_token: torch.Tensor, mask: torch.Tensor, normalizer: float | torch.Tensor | None
) -> torch.Tensor:
    """Masked token mean, or masked sum / ``normalizer`` when a token count is given."""
    if normalizer is None:
        return masked_mean(per_token, mask)
    if not isinstance(normalizer, torch.Tensor) and not normalizer > 0:
        raise ValueError(f"normalizer must be > 0, got {normalizer}")
    return masked_sum(per_token, mask) / normalizer


def ranking_loss(
    rewards: torch.Tensor,
    winner_idx: torch.Tensor,
    loser_idx: torch.Tensor,
    pair_group: torch.Tensor,
    num_groups: int,
    normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, Stats]:
    """K-wise reward-model loss, InstructGPT Eq. 1, with all C(K,2) pairs of a prompt in one batch element
    [ppo-details: rm-ranking-loss].

        loss(θ) = −(1 / C(K,2)) · E_{(x, y_w, y_l) ~ D} [ log σ(r_θ(x, y_w) − r_θ(x, y_l)) ]

    Each completion is forwarded once and its scalar r_θ sits in ``rewards``; pairs point into it by flat
    index, so a completion ranked against K − 1 others still gets one forward pass (§3.5, footnote 5).
    For a batch of G prompts:

        loss = (1/G) Σ_g (1/n_g) Σ_{pairs p of g} −log σ(r_{w(p)} − r_{l(p)})

    n_g is the number of pairs of prompt g: C(K_g, 2) when the ranking has no ties. The paper does not say
    what to do with ties; we choose to drop tied pairs upstream (a tie states no preference) and to divide by
    the prompt's *remaining* pair count rather than by C(K_g, 2), so every prompt still weighs exactly 1
    whatever its K and its ties (dividing by C(K_g, 2) would make a prompt with ties weigh less). Prompts
    with no pairs at all contribute nothing and are not counted in G. −log σ is computed with
    ``F.logsigmoid``, finite for any margin.

    Args:
        rewards: (N,) RM outputs, one per completion.
        winner_idx: (P,) index into ``rewards`` of the preferred completion y_w of each pair.
        loser_idx: (P,) index of the other completion y_l.
        pair_group: (P,) prompt index in [0, num_groups) of each pair.
        num_groups: number of prompts in this batch.
        normalizer: prompt count to divide by instead of G (micro-batching: pass the mini-batch's G).

    Returns:
        ``(loss, stats)`` with stats ``loss/ranking``, ``rm/accuracy`` (fraction of pairs with
        r_w > r_l), ``rm/margin_mean`` (mean r_w − r_l over pairs) and ``rm/num_pairs``.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be a flat (N,) vector, got shape {tuple(rewards.shape)}")
    _check_same_shape(winner_idx=winner_idx, loser_idx=loser_idx, pair_group=pair_group)
    pairs_per_group = torch.bincount(pair_group, minlength=num_groups)  # (G,) n_g
    if pairs_per_group.numel() > num_groups:
        raise ValueError(f"pair_group holds a prompt index >= num_groups ({num_groups})")

    margins = rewards[winner_idx] - rewards[loser_idx]  # (P,) r_w − r_l
    pair_losses = -F.logsigmoid(margins)  # (P,)
    pair_weights = 1.0 / pairs_per_group[pair_group].to(rewards.dtype)  # (P,) 1 / n_g
    if normalizer is None:
        normalizer = (pairs_per_group > 0).sum().clamp(min=1).to(rewards.dtype)  # G
    loss = (pair_weights * pair_losses).sum() / normalizer

    with torch.no_grad():
        num_pairs = torch.tensor(float(margins.numel()), device=rewards.device)
        stats = {
            "loss/ranking": loss.detach(),
            "rm/accuracy": (margins > 0).float().sum() / num_pairs.clamp(min=1),
            "rm/margin_mean": margins.detach().float().sum() / num_pairs.clamp(min=1),
            "rm/num_pairs": num_pairs,
        }
    return loss, stats


def policy_loss(
    logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_range: float = 0.2,
    normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, Stats]:
    """PPO clipped surrogate (Schulman et al. 2017, Eq. 7), per response token, as a loss:

        ρ_t    = π_θ(y_t) / π_rollout(y_t) = exp(logprobs − rollout_logprobs)
        L_t    = −min(ρ_t A_t, clip(ρ_t, 1 − ε, 1 + ε) A_t) = max(−ρ_t A_t, −clip(ρ_t, 1 ± ε) A_t)
        loss   = token mean of L_t over ``response_mask`` (or masked sum / ``normalizer``)

    Where the clipped term is the larger loss the gradient is zero: the update stops pushing ρ further
    outside [1 − ε, 1 + ε] in the direction the advantage favours. At ρ = 1 the loss is −mean(A).

    Args:
        logprobs: (B, T) log π_θ(y_t) of the policy being trained (carries the gradient).
        rollout_logprobs: (B, T) log-probs of the same tokens when they were sampled.
        advantages: (B, T) A_t (detached, usually whitened).
        response_mask: (B, T) 1 for real response tokens.
        clip_range: ε (InstructGPT 0.2).
        normalizer: token count to divide the masked sum by (see module docstring).

    Returns:
        ``(loss, stats)`` with stats ``loss/policy``; ``policy/clipfrac`` (fraction of tokens where the
        clipped term is active, as lm-human-preferences counts it); ``policy/approxkl_k3`` and
        ``policy/approxkl_k2`` (k3 and ½(log ρ)² estimates of KL(π_rollout ‖ π_θ), token means);
        ``policy/ratio_mean`` and ``policy/ratio_max``.
    """
    _check_same_shape(
        logprobs=logprobs, rollout_logprobs=rollout_logprobs, advantages=advantages, response_mask=response_mask
    )
    valid = as_bool_mask(response_mask)
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    # Zero the log ratio on padding *before* exp: a where() after it would still send NaN gradients
    # back through exp(inf) at pad positions that hold -inf log-probs.
    log_ratio = torch.where(valid, logprobs - rollout_logprobs, zero)  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T) ρ
    advantages = torch.where(valid, advantages, zero)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_token = torch.maximum(unclipped, clipped)  # (B, T)
    loss = _token_reduce(per_token, valid, normalizer)

    with torch.no_grad():
        stats = {
            "loss/policy": loss.detach(),
            "policy/clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), valid),
            "policy/approxkl_k3": masked_mean(kl_k3(rollout_logprobs, logprobs.detach()), valid),
            "policy/approxkl_k2": masked_mean(kl_k2(logprobs.detach(), rollout_logprobs), valid),
            "policy/ratio_mean": masked_mean(ratio.detach(), valid),
            # ρ > 0, so filling padding with 0 leaves the max of the valid entries (0 for an empty mask)
            "policy/ratio_max": torch.where(valid, ratio.detach(), zero).amax(),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    rollout_values: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    clip_range: float = 0.2,
    normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, Stats]:
    """Clipped value loss (openai/baselines ppo2) [ppo-details: value-clipping], per response token:

        V_clip = V_rollout + clip(V − V_rollout, −ε, ε)
        L_t    = ½ · max((V_t − R_t)², (V_clip,t − R_t)²)
        loss   = token mean of L_t over ``response_mask`` (or masked sum / ``normalizer``)

    The max makes the clip pessimistic: a value prediction may not move more than ε from its rollout
    value in one update *to reduce* the loss. The caller scales by the value coefficient.

    Args:
        values: (B, T) V_θ of the value network being trained.
        rollout_values: (B, T) values at sampling time.
        returns: (B, T) targets R = A + V_rollout from ``gae``.
        response_mask: (B, T) 1 for real response tokens.
        clip_range: ε.
        normalizer: token count to divide the masked sum by.

    Returns:
        ``(loss, stats)`` with stats ``loss/value``, ``val/clipfrac`` (fraction of tokens where the clipped
        error is the larger) and ``val/explained_variance``.
    """
    _check_same_shape(values=values, rollout_values=rollout_values, returns=returns, response_mask=response_mask)
    valid = as_bool_mask(response_mask)
    values_clipped = rollout_values + torch.clamp(values - rollout_values, -clip_range, clip_range)
    unclipped_error = (values - returns) ** 2
    clipped_error = (values_clipped - returns) ** 2
    per_token = 0.5 * torch.maximum(unclipped_error, clipped_error)  # (B, T)
    loss = _token_reduce(per_token, valid, normalizer)

    with torch.no_grad():
        stats = {
            "loss/value": loss.detach(),
            "val/clipfrac": masked_mean((clipped_error > unclipped_error).to(values.dtype), valid),
            "val/explained_variance": explained_variance(values, returns, valid),
        }
    return loss, stats


@torch.no_grad()
def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 − Var[R − V] / Var[R] over the masked entries (population variances).

    1 means V predicts R perfectly, 0 means no better than the constant mean(R), < 0 worse than that.
    NaN when Var[R] = 0 (undefined).
    """
    returns_centered = returns - masked_mean(returns, mask)
    var_returns = masked_mean(returns_centered**2, mask)
    residual = returns - values
    var_residual = masked_mean((residual - masked_mean(residual, mask)) ** 2, mask)
    nan = torch.full((), float("nan"), dtype=var_returns.dtype, device=var_returns.device)
    return torch.where(var_returns > 0, 1.0 - var_residual / var_returns, nan)


def ptx_loss(
    logprobs: torch.Tensor, mask: torch.Tensor, normalizer: float | torch.Tensor | None = None
) -> tuple[torch.Tensor, Stats]:
    """Pretraining term of InstructGPT Eq. 2 as a loss [ppo-details: ppo-ptx].

    The objective adds γ · E_{x ~ D_pretrain}[log π_φ^RL(x)]; as a loss that is

        loss = −token mean of log π(x_t) over ``mask``      (or masked sum / ``normalizer``)

    i.e. the usual language-modelling cross-entropy per token. γ (``ptx_coef``, 27.8 in InstructGPT) is
    *not* applied here: the caller multiplies, so ``loss/ptx`` stays comparable across γ.

    Args:
        logprobs: (B, T) log π(x_t) of pretraining tokens under the policy (from ``logprobs_from_logits``).
        mask: (B, T) 1 for tokens that count (not padding, not the first token).
        normalizer: token count to divide the masked sum by.
    """
    _check_same_shape(logprobs=logprobs, mask=mask)
    loss = -_token_reduce(logprobs, mask, normalizer)
    with torch.no_grad():
        stats = {"loss/ptx": loss.detach()}
    return loss, stats
