"""Building blocks of the PPO / PPO-ptx stage: rollouts, advantages, gradient accumulation, samplers, EMA.

Tensor vocabulary (cleanrl style): ``query`` (B, Q) left-padded prompt ids, ``response`` (B, R) sampled ids
with PAD after EOS, ``response_mask`` (B, R) True up to and including EOS. Per-token tensors over the
response are (B, R) and 0 where the mask is False; position t holds the quantity of the action y_t:

    logprobs[t]      log π_rollout(y_t | x, y_<t), temperature-scaled (N detail 10)
    ref_logprobs[t]  log π^SFT(y_t | x, y_<t), same temperature
    values[t]        V(x, y_<t): the value of the state in which y_t is chosen
    rewards[t]       −β·(logprobs − ref_logprobs)[t] (+ the RM score at the last valid t)

Logits at input position Q − 1 + t predict response token t, so every model is run on query ⊕ response
and its outputs at positions Q − 1 … Q + R − 2 are kept.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace
from functools import partial
from typing import Any, NamedTuple

import torch
from transformers import PreTrainedModel

from instructrl.models.kernels import gradient_into_grad
from instructrl.models.reward import last_token_scores, position_ids_from_mask, reward_bias, token_values
from instructrl.rl import (
    entropy_from_logits,
    explained_variance,
    gae,
    kl_k3,
    lm_head_logprobs,
    lm_head_logprobs_and_entropy,
    logprobs_from_logits,
    masked_mean,
    masked_whiten,
    policy_loss,
    ptx_loss,
    shaped_rewards,
    value_loss,
)
from instructrl.rollout.sampler import GenerationBackend, truncate_after_eos
from instructrl.stages.common import mixed_precision
from instructrl.utils.distributed import Runtime, call_model_function
from instructrl.utils.overlap import OverlapRunner, SequentialRunner

ScoreFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``score_fn(query, query_mask, response, response_mask) -> (B,)`` scores r(x, y) of finished rollouts."""


# --------------------------------------------------------------------------- sequences


def left_pad(sequences: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists to one width: returns ``(ids, mask)``, both (B, Q); mask is 1 on real tokens."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    return ids, mask


def response_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int) -> torch.Tensor:
    """Logits that predict the last ``response_len`` tokens: (B, Q + R) -> (B, R, V).

    Position ids skip the left padding (N detail 3); only the R + 1 last positions are projected to the
    vocabulary (``logits_to_keep``), the last of which predicts a token after the response and is dropped.
    """
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        logits_to_keep=response_len + 1,
        use_cache=False,
    )
    return out.logits[:, :-1]  # (B, R, V)


FUSED_HEAD_MODEL_TYPES = frozenset({"gpt2", "llama", "mistral", "qwen2", "qwen3"})
"""Architectures whose logits are exactly ``lm_head(hidden_states[-1])`` (no soft-capping or logit scaling), so
:func:`response_logprobs` may apply the head itself. Others take the straightforward path."""


class FusedHead(NamedTuple):
    """An LM head that :func:`response_logprobs` applies itself (:func:`instructrl.rl.lm_head_logprobs`)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    grad_into_weight: bool
    """Its weight gradient goes straight into ``.grad`` (:func:`instructrl.models.kernels.gradient_into_grad`)."""


def fused_lm_head(model) -> FusedHead | None:
    """The LM head when :func:`response_logprobs` can apply it itself, else None."""
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


def response_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response: torch.Tensor,
    temperature: float,
    with_entropy: bool = False,
):
    """log π(y_t | x, y_<t) at temperature τ for the last R = ``response.shape[1]`` tokens: (B, Q + R) -> (B, R);
    with ``with_entropy`` (no gradients) also the entropy of π_t, ``(logprobs, entropy)``.

    Same numbers as ``logprobs_from_logits(response_logits(...), response, τ)`` (tested), faster: the model
    is asked for its final hidden states and for no logits at all, and the LM head + log-softmax gather runs
    fused over blocks of the vocabulary at the R response positions (:func:`instructrl.rl.lm_head_logprobs`),
    so no (B, R, V) float32 logits tensor, its log-softmax or its gradient is ever formed (see
    :func:`final_hidden_states` for how the model is called). Architectures not in
    :data:`FUSED_HEAD_MODEL_TYPES` take the straightforward path.
    """
    width = response.shape[1]
    head = fused_lm_head(model)
    if head is None:
        logits = response_logits(model, input_ids, attention_mask, width)  # (B, R, V)
        logprobs = logprobs_from_logits(logits, response, temperature)
        return (logprobs, entropy_from_logits(logits, temperature)) if with_entropy else logprobs
    hidden = final_hidden_states(
        model, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask)
    )
    hidden = hidden[:, -width - 1 : -1]  # (B, R, d): positions Q − 1 … Q + R − 2
    if with_entropy:
        return lm_head_logprobs_and_entropy(hidden, head.weight, response, temperature, head.bias)
    return lm_head_logprobs(
        hidden, head.weight, response, temperature, head.bias, weight_grad_into_grad=head.grad_into_weight
    )


def response_values(value_model, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int):
    """V(x, y_<t) for every response token t: (B, Q + R) -> (B, R).

    The value model is a reward model (scalar head at every position); its normalization bias is added so
    that a value model initialized from the RM starts out predicting the RM's normalized score.
    """
    values = token_values(value_model, input_ids, attention_mask)  # (B, Q + R)
    return values[:, -response_len - 1 : -1].float() + reward_bias(value_model)  # float32 even under autocast


def reward_model_scorer(reward_model) -> ScoreFn:
    """r_θ(x, y): the reward model's normalized score read at the last response token (the EOS)."""

    def score(query, query_mask, response, response_mask) -> torch.Tensor:
        input_ids = torch.cat([query, response], dim=1)
        attention_mask = torch.cat([query_mask, response_mask.long()], dim=1)
        return last_token_scores(reward_model, input_ids, attention_mask)

    return score


# --------------------------------------------------------------------------- rollouts


@dataclass
class Rollout:
    """One PPO batch of episodes; the advantage fields are filled by :func:`compute_advantages`."""

    query: torch.Tensor
    """(B, Q) left-padded prompt ids."""
    query_mask: torch.Tensor
    """(B, Q) 1 on real prompt tokens."""
    response: torch.Tensor
    """(B, R) sampled response ids, PAD after the first EOS."""
    response_mask: torch.Tensor
    """(B, R) bool, True up to and including the first EOS."""
    has_eos: torch.Tensor
    """(B,) bool, whether the response emitted EOS."""
    logprobs: torch.Tensor
    """(B, R) log π_rollout(y_t), temperature-scaled."""
    ref_logprobs: torch.Tensor
    """(B, R) log π^SFT(y_t), temperature-scaled."""
    values: torch.Tensor
    """(B, R) V(x, y_<t) at rollout time."""
    entropy: torch.Tensor
    """(B, R) entropy of π_rollout(· | x, y_<t) at the sampling temperature."""
    raw_scores: torch.Tensor
    """(B,) scores from ``score_fn`` before the missing-EOS rule."""
    scores: torch.Tensor
    """(B,) r(x, y) used as the reward: ``raw_scores``, or ``missing_eos_score`` where there is no EOS."""
    rewards: torch.Tensor | None = None
    """(B, R) shaped per-token rewards (after optional whitening)."""
    kl: torch.Tensor | None = None
    """(B, R) k1 = logprobs − ref_logprobs on response tokens."""
    advantages: torch.Tensor | None = None
    """(B, R) GAE advantages (whitened when configured)."""
    returns: torch.Tensor | None = None
    """(B, R) value targets A + V (before advantage whitening)."""

    @property
    def size(self) -> int:
        return self.query.shape[0]

    def select(self, index: torch.Tensor | slice) -> Rollout:
        """The episodes at ``index`` (rows of every tensor)."""
        return Rollout(**{f.name: _rows(getattr(self, f.name), index) for f in fields(self)})

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)`` of query ⊕ response, both (B, Q + R)."""
        input_ids = torch.cat([self.query, self.response], dim=1)
        attention_mask = torch.cat([self.query_mask, self.response_mask.long()], dim=1)
        return input_ids, attention_mask


def _rows(t: torch.Tensor | None, index: torch.Tensor | slice) -> torch.Tensor | None:
    return None if t is None else t[index]


def gather_rollout(rollout: Rollout, runtime: Runtime, pad_token_id: int) -> Rollout:
    """Every rank's episodes, in rank order: the global batch (each rank rolled out its share of the prompts).

    Queries are left-padded and responses right-padded to the widest rank's; the added columns are masked
    (PAD ids, 0 elsewhere), as in a rollout made in one piece. Every rank then computes the same advantages,
    whitening statistics, metrics and minibatches. Identity in one process.
    """
    if not runtime.distributed:
        return rollout

    def gather(t: torch.Tensor | None, pad_value: int = 0, pad_first: bool = False) -> torch.Tensor | None:
        if t is None:
            return None
        if t.dtype == torch.bool:  # padding adds numbers: gather masks as integers
            return runtime.gather_rows(t.long(), pad_value, pad_first).bool()
        return runtime.gather_rows(t, pad_value, pad_first)

    special = {
        "query": gather(rollout.query, pad_token_id, pad_first=True),
        "query_mask": gather(rollout.query_mask, 0, pad_first=True),
        "response": gather(rollout.response, pad_token_id),
    }
    return Rollout(**{f.name: special.get(f.name, gather(getattr(rollout, f.name))) for f in fields(rollout)})


def apply_missing_eos_score(scores: torch.Tensor, has_eos: torch.Tensor, missing_eos_score: float | None):
    """The EOS trick (N+ detail 23): a response that never ended gets the fixed score ``missing_eos_score``.

    The RM was trained on finished responses only, so its score of an unfinished one is meaningless and
    easy to exploit (N+ detail 13). ``None`` keeps the RM score.
    """
    if missing_eos_score is None:
        return scores
    return torch.where(has_eos, scores, torch.full_like(scores, missing_eos_score))


def _chunks(n: int, size: int) -> Iterator[slice]:
    size = size if size > 0 else n
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


@dataclass(frozen=True)
class RolloutSettings:
    """How rollouts are sampled and scored (taken from the stage config)."""

    max_new_tokens: int
    temperature: float
    eos_token_id: int
    pad_token_id: int
    generation_batch_size: int = 0
    """Prompts per ``generate`` call; 0 = all."""
    forward_batch_size: int = 0
    """Episodes per scoring forward pass; 0 = all."""
    missing_eos_score: float | None = None
    autocast_dtype: torch.dtype | None = None
    """Mixed-precision dtype of every forward (``Config.run.precision``); None = the weights' dtype."""


def make_rollout(
    policy,
    ref_policy,
    value_model,
    backend: GenerationBackend,
    score_fn: ScoreFn,
    query: torch.Tensor,
    query_mask: torch.Tensor,
    settings: RolloutSettings,
    generator: torch.Generator | None = None,
    runner: SequentialRunner | OverlapRunner | None = None,
) -> Rollout:
    """Sample one response per prompt, truncate at EOS, and compute log-probs, values and scores.

    Every forward pass runs under ``torch.inference_mode``. The policy's log-probs come from a separate
    forward pass (not from ``generate``'s scores) so that rollout and training use the same numerics and
    the first PPO ratio is 1. Tensors are copied out of inference mode at the end so the update can use them.
    ``runner`` may run the policy/reference forwards and the value/reward forwards at the same time.
    """
    models = (policy, ref_policy, value_model)
    with _rollout_context(query.device, settings)():
        raw = _sample_and_score(*models, backend, score_fn, query, query_mask, settings, generator, runner)
    return Rollout(**{k: v.clone() for k, v in raw.items()})  # clones outside inference mode: usable by autograd


def _rollout_context(device: torch.device, settings: RolloutSettings) -> Callable[[], contextlib.ExitStack]:
    """Inference mode and autocast: entered by the caller and by every worker thread (both are thread-local)."""

    def context() -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        stack.enter_context(mixed_precision(device, settings.autocast_dtype))
        return stack

    return context


def _language_model_outputs(policy, ref_policy, input_ids, attention_mask, response, temperature) -> dict:
    """The policy's log-probs and entropy and the reference's log-probs, each (b, R)."""
    logprobs, entropy = response_logprobs(policy, input_ids, attention_mask, response, temperature, True)
    ref_logprobs = response_logprobs(ref_policy, input_ids, attention_mask, response, temperature)
    return {"logprobs": logprobs, "entropy": entropy, "ref_logprobs": ref_logprobs}


def _scalar_model_outputs(
    value_model, score_fn, input_ids, attention_mask, query, query_mask, response, response_mask
) -> dict:
    """The values (b, R) and the scores (b,): the reward model's, or any ``score_fn``'s."""
    values = response_values(value_model, input_ids, attention_mask, response.shape[1])
    return {"values": values, "scores": score_fn(query, query_mask, response, response_mask).float()}


def _sample_and_score(
    policy,
    ref_policy,
    value_model,
    backend,
    score_fn,
    query,
    query_mask,
    settings: RolloutSettings,
    generator,
    runner: SequentialRunner | OverlapRunner | None = None,
) -> dict[str, torch.Tensor]:
    runner = runner or SequentialRunner()
    options = {"runner": runner} if getattr(backend, "takes_runner", False) else {}  # e.g. CachedSampler's halves
    responses = [
        backend.generate(
            query[rows], query_mask[rows], settings.max_new_tokens, settings.temperature, generator, **options
        )
        for rows in _chunks(query.shape[0], settings.generation_batch_size)
    ]
    response, response_mask, has_eos = truncate_after_eos(
        torch.cat(responses, dim=0), settings.eos_token_id, settings.pad_token_id
    )
    width = int(response_mask.sum(dim=1).max())  # drop columns that are PAD in every row
    response, response_mask = response[:, :width], response_mask[:, :width]

    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("logprobs", "ref_logprobs", "values", "entropy", "scores")}
    for rows in _chunks(query.shape[0], settings.forward_batch_size):
        q, qm, r, rm = query[rows], query_mask[rows], response[rows], response_mask[rows]
        input_ids = torch.cat([q, r], dim=1)
        attention_mask = torch.cat([qm, rm.long()], dim=1)
        sides = runner.run(
            partial(_language_model_outputs, policy, ref_policy, input_ids, attention_mask, r, settings.temperature),
            partial(_scalar_model_outputs, value_model, score_fn, input_ids, attention_mask, q, qm, r, rm),
            context=_rollout_context(query.device, settings),
        )
        for side in sides:
            for key, value in side.items():
                parts[key].append(value)
    out = {k: torch.cat(v, dim=0) for k, v in parts.items()}
    zero = torch.zeros((), device=response.device)
    for key in ("logprobs", "ref_logprobs", "values", "entropy"):  # nothing after EOS carries information
        out[key] = torch.where(response_mask, out[key], zero)
    raw_scores = out.pop("scores")
    return {
        "query": query,
        "query_mask": query_mask,
        "response": response,
        "response_mask": response_mask,
        "has_eos": has_eos,
        "raw_scores": raw_scores,
        "scores": apply_missing_eos_score(raw_scores, has_eos, settings.missing_eos_score),
        **out,
    }


# --------------------------------------------------------------------------- advantages


def compute_advantages(
    rollout: Rollout,
    kl_coef: float,
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten_rewards: bool = False,
    whiten_advantages: bool = True,
) -> Rollout:
    """Shaped rewards (InstructGPT Eq. 2), GAE, and whitening, over the whole rollout batch.

        r_t = −β·(log π_rollout(y_t) − log π^SFT(y_t)) + [t = last] · r(x, y)     (N detail 17)
        (A_t, R_t) = GAE(r, V; γ, λ)                                              (γ = 1, λ = 0.95)

    Optional reward whitening scales r without re-centring it (``shift_mean=False``, N detail 18); advantage
    whitening centres and scales A (N detail 18, N+ 25). Both use statistics of the whole batch, so they do
    not depend on how the batch is later cut into minibatches and micro-batches. Returns are computed from
    the unwhitened advantages: they are the value targets.
    """
    mask = rollout.response_mask
    rewards, _, kl = shaped_rewards_for(rollout, kl_coef)
    if whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = gae(rewards, rollout.values, mask, gamma=gamma, lam=lam)
    if whiten_advantages:
        advantages = masked_whiten(advantages, mask, shift_mean=True)
    return replace(rollout, rewards=rewards, kl=kl, advantages=advantages, returns=returns)


def shaped_rewards_for(rollout: Rollout, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rewards, non_score_rewards, kl)`` of :func:`instructrl.rl.shaped_rewards` for a rollout."""
    return shaped_rewards(rollout.scores, rollout.logprobs, rollout.ref_logprobs, rollout.response_mask, kl_coef)


@torch.no_grad()
def rollout_metrics(rollout: Rollout, kl_coef: float) -> dict[str, float | None]:
    """Per-iteration statistics of a scored rollout (sequence sums, then batch means).

    ``value/explained_variance`` is None (JSON null) when the returns do not vary (it is undefined then; e.g.
    every score 0 and no KL penalty), rather than a NaN that strict JSON readers reject."""
    mask = rollout.response_mask
    rewards, non_score, kl = shaped_rewards_for(rollout, kl_coef)  # unwhitened, as the objective defines them
    kl3 = torch.where(mask, kl_k3(rollout.logprobs, rollout.ref_logprobs), torch.zeros((), device=mask.device))
    lengths = mask.sum(dim=1).float()
    metrics = {
        "objective/reward": rewards.sum(dim=1).mean(),
        "objective/score": rollout.scores.mean(),
        "objective/score_raw": rollout.raw_scores.mean(),
        "objective/non_score_reward": non_score.sum(dim=1).mean(),
        "objective/kl": kl.sum(dim=1).mean(),
        "objective/kl_k3": kl3.sum(dim=1).mean(),
        "objective/beta": float(kl_coef),
        "policy/entropy": masked_mean(rollout.entropy, mask),
        "response/length": lengths.mean(),
        "response/eos_rate": rollout.has_eos.float().mean(),
    }
    out: dict[str, float | None] = {k: float(v) for k, v in metrics.items()}
    if rollout.returns is not None:
        explained = float(explained_variance(rollout.values, rollout.returns, mask))
        out["value/explained_variance"] = explained if math.isfinite(explained) else None
    return out


# --------------------------------------------------------------------------- gradient accumulation


@dataclass(frozen=True)
class LossSettings:
    """PPO loss hyperparameters (taken from the stage config)."""

    temperature: float = 1.0
    clip_range: float = 0.2
    value_clip_range: float = 0.2
    vf_coef: float = 0.1
    autocast_dtype: torch.dtype | None = None
    """Mixed-precision dtype of the training forwards (``Config.run.precision``); None = the weights' dtype."""


@dataclass
class SideStats:
    """One model's statistics of a minibatch on this rank, before the reduction over ranks."""

    losses: dict[str, float]
    """Loss sums over micro-batches (each a masked sum / the minibatch normalizer)."""
    means: WeightedMeans
    """Token-weighted means (approx-KL, clip fractions)."""
    maxima: dict[str, float]
    """Maxima over micro-batches (the largest policy ratio)."""


def accumulate_policy_gradients(
    policy,
    batch: Rollout,
    micro_batch_size: int,
    settings: LossSettings,
    runtime: Runtime,
    n_tokens: float | torch.Tensor,
    steps_after: bool = False,
) -> SideStats:
    """Add ∇ policy loss (clipped surrogate, token mean over the minibatch) to the policy's ``.grad``.

    ``n_tokens`` is the divisor of each micro-batch's masked loss sum (the minibatch's token count, / N under
    N processes); ``steps_after`` says that more policy gradients (ptx) follow, so DDP's all-reduce waits.
    """
    means, loss, ratio_max = WeightedMeans(), 0.0, 0.0
    chunks = list(_chunks(batch.size, micro_batch_size))
    for index, rows in enumerate(chunks):
        synced = index == len(chunks) - 1 and not steps_after
        with runtime.no_sync([] if synced else [policy]):
            micro = batch.select(rows)
            input_ids, attention_mask = micro.inputs()
            with mixed_precision(input_ids.device, settings.autocast_dtype):  # forward only; backward follows
                logprobs = response_logprobs(policy, input_ids, attention_mask, micro.response, settings.temperature)
            pg_loss, pg_stats = policy_loss(
                logprobs, micro.logprobs, micro.advantages, micro.response_mask, settings.clip_range, n_tokens
            )
            runtime.backward(pg_loss)
        loss += pg_loss.item()
        ratio_max = max(ratio_max, pg_stats["policy/ratio_max"].item())
        means.add(
            micro.response_mask.sum().item(),
            {"policy/approx_kl": pg_stats["policy/approxkl_k3"], "policy/clipfrac": pg_stats["policy/clipfrac"]},
        )
    return SideStats({"loss/policy": loss}, means, {"policy/ratio_max": ratio_max})


def accumulate_value_gradients(
    value_model,
    batch: Rollout,
    micro_batch_size: int,
    settings: LossSettings,
    runtime: Runtime,
    n_tokens: float | torch.Tensor,
) -> SideStats:
    """Add ∇ vf_coef · value loss (clipped, token mean over the minibatch) to the value model's ``.grad``."""
    means, loss = WeightedMeans(), 0.0
    chunks = list(_chunks(batch.size, micro_batch_size))
    for index, rows in enumerate(chunks):
        with runtime.no_sync([] if index == len(chunks) - 1 else [value_model]):
            micro = batch.select(rows)
            input_ids, attention_mask = micro.inputs()
            width = micro.response.shape[1]
            with mixed_precision(input_ids.device, settings.autocast_dtype):
                values = call_model_function(value_model, response_values, input_ids, attention_mask, width)
            vf_loss, vf_stats = value_loss(
                values, micro.values, micro.returns, micro.response_mask, settings.value_clip_range, n_tokens
            )
            runtime.backward(settings.vf_coef * vf_loss)
        loss += vf_loss.item()
        means.add(micro.response_mask.sum().item(), {"value/clipfrac": vf_stats["val/clipfrac"]})
    return SideStats({"loss/value": loss}, means, {})


def reduce_side_stats(sides: list[SideStats], runtime: Runtime) -> dict[str, float]:
    """The minibatch's statistics over every rank: losses averaged (each rank's loss is its sum over the global
    count / N), token-weighted means, maxima. One collective per kind whatever the number of sides."""
    losses = {k: v for side in sides for k, v in side.losses.items()}
    means = WeightedMeans()
    means.weight = sides[0].means.weight  # every side weighs the same micro-batches by the same token counts
    means.sums = {k: v for side in sides for k, v in side.means.sums.items()}
    maxima = {k: runtime.max(v) for side in sides for k, v in side.maxima.items()}
    return {**_mean_over_ranks(losses, runtime), **means.reduced(runtime), **maxima}


def accumulate_ppo_gradients(
    policy,
    value_model,
    batch: Rollout,
    micro_batch_size: int,
    settings: LossSettings,
    runtime: Runtime | None = None,
    normalizer: float | torch.Tensor | None = None,
    policy_steps_after: bool = False,
    runner: SequentialRunner | OverlapRunner | None = None,
) -> dict[str, float]:
    """Add ∇(policy loss + vf_coef · value loss) of one minibatch to ``.grad``, micro-batch by micro-batch.

    Each micro-batch's losses are masked *sums* divided by the minibatch's token count, so the micro-batch
    gradients add up to exactly the gradient of the minibatch token means: 1 × N and N × 1 micro-batches
    give the same update. The two models share no parameter, so the policy's and the value model's
    gradients are accumulated separately, at the same time when ``runner`` overlaps them
    (``instructrl.utils.overlap``). The caller zeroes gradients before and steps the optimizers after.

    Under N processes ``batch`` is this rank's share of the minibatch and ``normalizer`` is the minibatch's
    token count / N (DDP averages gradients over ranks); ``policy_steps_after`` says that more policy
    gradients (ptx) follow, so the policy's gradient all-reduce waits for them.

    Returns minibatch statistics, reduced over ranks: the losses, and token-weighted means of approx-KL and
    clip fractions.
    """
    runtime = runtime or Runtime(batch.query.device)
    runner = runner or SequentialRunner()
    n_tokens = batch.response_mask.sum().float() if normalizer is None else normalizer  # of the token mean
    sides = runner.run(
        lambda: accumulate_policy_gradients(
            policy, batch, micro_batch_size, settings, runtime, n_tokens, policy_steps_after
        ),
        lambda: accumulate_value_gradients(value_model, batch, micro_batch_size, settings, runtime, n_tokens),
    )
    return reduce_side_stats(sides, runtime)


def _mean_over_ranks(losses: dict[str, float], runtime: Runtime) -> dict[str, float]:
    """Each rank's loss is its sum over (global count / N): the global loss is the mean over ranks."""
    return {k: v / runtime.world_size for k, v in runtime.sums(losses).items()}


def ptx_logprobs(policy, windows: torch.Tensor) -> torch.Tensor:
    """log π(x_t | x_<t) of pretraining windows (B, L) -> (B, L − 1), at temperature 1 (the LM itself).

    Through the fused LM head when the architecture allows it (as :func:`response_logprobs`): no (B, L, V)
    logits, log-softmax or gradient of either, which at a 32k-150k vocabulary is most of the ptx memory."""
    head = fused_lm_head(policy)
    if head is None:
        logits = policy(input_ids=windows, use_cache=False).logits[:, :-1]
        return logprobs_from_logits(logits, windows[:, 1:], 1.0)
    hidden = final_hidden_states(policy, input_ids=windows)[:, :-1]  # (B, L − 1, d): predicting x_1 … x_{L−1}
    return lm_head_logprobs(
        hidden, head.weight, windows[:, 1:], 1.0, head.bias, weight_grad_into_grad=head.grad_into_weight
    )


def accumulate_ptx_gradients(
    policy,
    windows: torch.Tensor,
    micro_batch_size: int,
    ptx_coef: float,
    runtime: Runtime | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> float:
    """Add γ · ∇(−mean log π(x)) over pretraining ``windows`` (B, L) to ``.grad``; returns the ptx loss.

    This is the γ·E_{x~D_pretrain}[log π(x)] term of InstructGPT Eq. 2 as a loss, accumulated into the same
    gradient as the PPO minibatch before the optimizer step (App. C.4). Token mean over the whole ptx batch.
    Under N processes ``windows`` is the global ptx batch; this rank trains on its share of the rows.
    """
    runtime = runtime or Runtime(windows.device)
    n_tokens = windows.shape[0] * (windows.shape[1] - 1) / runtime.world_size
    start, stop = runtime.shard_bounds(windows.shape[0])
    local = windows[start:stop]
    chunks = list(_chunks(local.shape[0], micro_batch_size))
    total = 0.0
    for index, rows in enumerate(chunks):
        with runtime.no_sync([policy] if index < len(chunks) - 1 else []):  # one all-reduce, at the last
            with mixed_precision(windows.device, autocast_dtype):
                logprobs = ptx_logprobs(policy, local[rows])
            mask = torch.ones_like(logprobs, dtype=torch.bool)
            loss, _ = ptx_loss(logprobs, mask, normalizer=n_tokens)
            runtime.backward(ptx_coef * loss)
        total += loss.item()
    return _mean_over_ranks({"loss/ptx": total}, runtime)["loss/ptx"]


class WeightedMeans:
    """Weighted running means of named scalars (weights: token counts)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.weight = 0.0

    def add(self, weight: float, values: dict[str, torch.Tensor | float]) -> None:
        self.weight += weight
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + weight * float(value)

    def means(self) -> dict[str, float]:
        return {k: v / self.weight if self.weight else 0.0 for k, v in self.sums.items()}

    def reduced(self, runtime: Runtime) -> dict[str, float]:
        """The means over every rank's values (weights and weighted sums added up across ranks)."""
        if not runtime.distributed:
            return self.means()
        totals = runtime.sums({**self.sums, "__weight__": self.weight})
        weight = totals.pop("__weight__")
        return {k: v / weight if weight else 0.0 for k, v in totals.items()}


# --------------------------------------------------------------------------- samplers and EMA


class PromptSampler:
    """Cycles through ``n`` prompts in a random order, reshuffling after each pass (N+ detail 21)."""

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError("PromptSampler needs at least one prompt")
        self.n = n
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(n, generator=self.generator)
        self.position = 0
        self.passes = 0

    def next(self, k: int) -> list[int]:
        """The next ``k`` prompt indices; a batch may straddle two passes."""
        out: list[int] = []
        while len(out) < k:
            if self.position == self.n:
                self.order = torch.randperm(self.n, generator=self.generator)
                self.position = 0
                self.passes += 1
            take = min(k - len(out), self.n - self.position)
            out.extend(self.order[self.position : self.position + take].tolist())
            self.position += take
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator.get_state(),
            "order": self.order.clone(),
            "position": self.position,
            "passes": self.passes,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["order"]) != self.n:
            raise ValueError(f"checkpoint was made with {len(state['order'])} prompts, this run has {self.n}")
        self.generator.set_state(state["generator"])
        self.order = state["order"].clone()
        self.position = int(state["position"])
        self.passes = int(state["passes"])


class WindowSampler:
    """Random fixed-length windows of a token stream (documents joined by EOS): the ptx batches."""

    def __init__(self, stream: torch.Tensor, seq_len: int, seed: int):
        if len(stream) <= seq_len:
            raise ValueError(f"the pretraining stream has {len(stream)} tokens, fewer than one window of {seq_len}")
        self.stream = stream
        self.seq_len = seq_len
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self, n: int) -> torch.Tensor:
        """(n, seq_len) windows starting at uniform random offsets."""
        starts = torch.randint(0, len(self.stream) - self.seq_len + 1, (n,), generator=self.generator)
        return torch.stack([self.stream[s : s + self.seq_len] for s in starts.tolist()])

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


class PolicyEMA:
    """Exponential moving average of the policy weights, θ_ema ← d·θ_ema + (1 − d)·θ after every optimizer
    step (InstructGPT App. C.4: d = 0.992). Kept in float32; the released model is the EMA."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        self.decay = decay
        self.shadow = {name: p.detach().float().clone() for name, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for name, p in model.named_parameters():
            self.shadow[name].lerp_(p.detach().float(), 1.0 - self.decay)

    @contextlib.contextmanager
    def swapped_into(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """Temporarily load the EMA weights into ``model`` (e.g. to save it); the live weights come back after."""
        backup = {name: p.detach().clone() for name, p in model.named_parameters()}
        try:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(self.shadow[name])
            yield model
        finally:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(backup[name])

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.shadow = {k: v.clone() for k, v in state["shadow"].items()}
