"""Pure RLHF math: log-probs, masked statistics, GAE, KL estimators and controllers, RM and PPO-ptx losses.

Plain torch functions on (B, T) tensors with a ``response_mask``; nothing here imports distributed code.
"""

from instructrl.rl.advantages import gae, masked_mean, masked_sum, masked_var, masked_whiten
from instructrl.rl.kl import AdaptiveKLController, FixedKLController, kl_k1, kl_k2, kl_k3, shaped_rewards
from instructrl.rl.logprobs import entropy_from_logits, logprobs_from_logits
from instructrl.rl.losses import explained_variance, policy_loss, ptx_loss, ranking_loss, value_loss

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "entropy_from_logits",
    "explained_variance",
    "gae",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "policy_loss",
    "ptx_loss",
    "ranking_loss",
    "shaped_rewards",
    "value_loss",
]
