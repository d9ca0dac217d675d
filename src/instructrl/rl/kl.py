"""KL(π ‖ π_ref) estimators, the KL-shaped per-token reward of InstructGPT Eq. 2, and β controllers.

All estimators take per-token log-probs of the *sampled* tokens y_t ~ π (the current or rollout policy)
under π and under the frozen reference π_ref = π^SFT, and return one value per token. Each is an
estimator of KL(π ‖ π_ref) = E_{y~π}[log π(y) − log π_ref(y)] (Schulman, "Approximating KL divergence",
http://joschu.net/blog/kl-approx.html):

    k1 = log π − log π_ref                       unbiased, high variance, can be negative per token
    k2 = ½ (log π − log π_ref)²                  biased, low variance, ≥ 0
    k3 = (r − 1) − log r,  r = π_ref / π         unbiased, low variance, ≥ 0

Where the KL lives: in the *reward* (``shaped_rewards``), per token, as InstructGPT / Ziegler do
[ppo-details: kl-in-reward]. It is not a separate loss term here.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from instructrl.rl.advantages import as_bool_mask


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = log π(y) − log π_ref(y), per token. E_{y~π}[k1] = KL(π ‖ π_ref)."""
    return logprobs - ref_logprobs


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k2 = ½ (log π(y) − log π_ref(y))², per token. Biased (second-order in the log ratio), always ≥ 0."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = (r − 1) − log r with r = π_ref(y) / π(y), per token. Unbiased for KL(π ‖ π_ref) and ≥ 0.

    Written as expm1(log r) − log r: near r = 1 the two terms nearly cancel and ``expm1`` keeps the digits.
    """
    log_r = ref_logprobs - logprobs
    return torch.expm1(log_r) - log_r


def shaped_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    kl_coef: float | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token reward of InstructGPT Eq. 2: R(x, y) = r_θ(x, y) − β · log(π^RL(y|x) / π^SFT(y|x)).

    The sequence-level log ratio is a sum over tokens, so it is spread over the response [ppo-details: kl-in-reward]:

        kl_t         = log π(y_t) − log π_ref(y_t)              (k1, on response tokens; 0 elsewhere)
        non_score_t  = −β · kl_t
        reward_t     = non_score_t + [t = last valid token] · r_θ(x, y)

    The RM score r_θ arrives once, at the last token with ``response_mask`` = 1 (the EOS), which is where
    the RM read it [ppo-details: reward-at-eos]. Rows whose mask is all zero get no score: there is no token
    to carry it.

    Args:
        scores: (B,) RM outputs r_θ(x, y).
        logprobs: (B, T) log π(y_t) of the policy that sampled the responses (rollout log-probs).
        ref_logprobs: (B, T) log π_ref(y_t) under the frozen SFT reference.
        response_mask: (B, T) 1 for real response tokens.
        kl_coef: β.

    Returns:
        ``(rewards, non_score_rewards, kl)``, each (B, T) and 0 where the mask is 0.
    """
    if not logprobs.shape == ref_logprobs.shape == response_mask.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)}, ref_logprobs {tuple(ref_logprobs.shape)} and response_mask "
            f"{tuple(response_mask.shape)} must have the same (B, T) shape"
        )
    if scores.shape != logprobs.shape[:1]:
        raise ValueError(f"scores must be (B,) = {tuple(logprobs.shape[:1])}, got {tuple(scores.shape)}")
    valid = as_bool_mask(response_mask)
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    # where, not multiply: pad positions may hold -inf log-probs
    kl = torch.where(valid, kl_k1(logprobs, ref_logprobs), zero)  # (B, T)
    non_score_rewards = -kl_coef * kl  # (B, T)

    positions = torch.arange(valid.shape[1], device=valid.device).expand_as(valid)  # (B, T)
    last_index = torch.where(valid, positions, -1).amax(dim=1)  # (B,), -1 for an empty row
    score_at_last = torch.where(last_index >= 0, scores.to(non_score_rewards.dtype), zero)  # (B,)
    rewards = non_score_rewards.scatter_add(1, last_index.clamp(min=0).unsqueeze(1), score_at_last.unsqueeze(1))
    return rewards, non_score_rewards, kl


class FixedKLController:
    """Constant β (InstructGPT: 0.02, Stiennon et al.: 0.05). Same interface as the adaptive controller."""

    def __init__(self, kl_coef: float):
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> None:
        """No-op: β is fixed."""

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional controller steering β toward a target KL (Ziegler et al. 2019 §2.2), in its code form
    [ppo-details: adaptive-kl].

        e = clip(KL_current / KL_target − 1, −0.2, 0.2)
        β ← β · (1 + e · n_steps / horizon)

    as in ``lm_human_preferences/train_policy.py`` (the form TRL, trlX and OpenRLHF copied): ``n_steps`` is
    the number of episodes in the PPO batch and ``horizon`` sets the gain (the paper's K_β = n_steps /
    horizon). KL above target raises β (stronger penalty), below lowers it; the clip bounds each step.
    Ziegler's stylistic runs used β₀ = 0.15, target 6 nats, horizon 10,000.
    """

    ERROR_CLIP = 0.2
    """Bound on the proportional error e, so one outlier batch cannot swing β by more than 20% · n_steps/horizon."""

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if init_kl_coef < 0:
            raise ValueError(f"init_kl_coef must be >= 0, got {init_kl_coef}")
        if not target > 0:
            raise ValueError(f"target must be > 0, got {target}")
        if not horizon > 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> None:
        """One controller step after a PPO batch of ``n_steps`` episodes whose mean sequence KL was ``current_kl``."""
        current_kl = float(current_kl)
        if not math.isfinite(current_kl):
            # a NaN would stick in β forever; fail where the cause is visible
            raise ValueError(f"current_kl must be finite, got {current_kl}")
        error = min(max(current_kl / self.target - 1.0, -self.ERROR_CLIP), self.ERROR_CLIP)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore β only: target and horizon are configuration and come from the (possibly edited) config."""
        self.value = float(state["value"])
