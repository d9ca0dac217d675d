"""PPO's experience: sampling responses, scoring them, and the rewards and advantages made from the scores.

Tensor vocabulary (cleanrl style): ``query`` (B, Q) left-padded prompt ids, ``response`` (B, R) sampled ids
with PAD after EOS, ``response_mask`` (B, R) True up to and including EOS. Per-token tensors over the
response are (B, R) and 0 where the mask is False; position t holds the quantity of the action y_t:

    logprobs[t]      log π_rollout(y_t | x, y_<t), temperature-scaled [ppo-details: temperature-scaled-logprobs]
    ref_logprobs[t]  log π^SFT(y_t | x, y_<t), same temperature
    values[t]        V(x, y_<t): the value of the state in which y_t is chosen
    rewards[t]       −β·(logprobs − ref_logprobs)[t] (+ the RM score at the last valid t)

Logits at input position Q − 1 + t predict response token t, so every model is run on query ⊕ response
and its outputs at positions Q − 1 … Q + R − 2 are kept.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields, replace
from functools import partial
from typing import Any

import torch

from instructrl.models.logprobs import FullLogits
from instructrl.models.reward import last_token_scores, reward_bias, token_values
from instructrl.rl import explained_variance, gae, kl_k3, masked_mean, masked_whiten, shaped_rewards
from instructrl.rollout.sampler import GenerationBackend, truncate_after_eos
from instructrl.stages.common import mixed_precision
from instructrl.stages.ppo_guardrails import distinct_fraction
from instructrl.utils.distributed import Runtime, call_on
from instructrl.utils.seed import RANK_SEED_STRIDE

ScoreFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``score_fn(query, query_mask, response, response_mask) -> (B,)`` scores r(x, y) of finished rollouts."""

SideBySide = Callable[..., list[Any]]
"""``side_by_side(policy_task, value_task) -> [policy_result, value_result]``: runs the policy's and the value
model's independent work, one after the other or at once (``overlap_models``); results in the order given."""


def one_after_the_other(*tasks: Callable[[], Any]) -> list[Any]:
    """The plain :data:`SideBySide`: each task in turn on this thread."""
    return [task() for task in tasks]


@dataclass
class PPOModels:
    """The four models of InstructGPT's PPO, and how they are run (the two seams chosen when they are built)."""

    policy: torch.nn.Module
    """π_φ, trained; starts as the SFT model."""
    ref_policy: torch.nn.Module
    """π^SFT, frozen: the KL reference."""
    value_model: torch.nn.Module
    """V, trained; starts as the reward model [ppo-details: value-from-rm]."""
    score: ScoreFn
    """r(x, y) of a finished response: the frozen reward model's normalized score, or any programmatic score."""
    logprobs: FullLogits
    """How log π is computed: from the full logits, or through the fused LM head (``fused_kernels``)."""
    side_by_side: SideBySide = one_after_the_other
    """How the policy's and the value model's independent work runs (``overlap_models``)."""
    autocast_dtype: torch.dtype | None = None
    """bf16 under ``precision=bf16``: the dtype every forward pass runs in (weights stay float32)."""

    def precision(self) -> contextlib.AbstractContextManager:
        """The forward passes' mixed precision: autocast to :attr:`autocast_dtype`, or nothing."""
        return mixed_precision(next(self.policy.parameters()).device, self.autocast_dtype)


def left_pad(sequences: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists to one width: returns ``(ids, mask)``, both (B, Q); mask is 1 on real tokens."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    return ids, mask


def row_chunks(n: int, size: int) -> Iterator[slice]:
    """Slices of ``size`` rows covering ``range(n)`` (``size`` 0: one slice of all rows)."""
    size = size if size > 0 else n
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


@dataclass
class Rollout:
    """One PPO batch of episodes (OpenRLHF's "experience"); the reward and advantage fields are filled by
    :func:`compute_advantages`."""

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
    """(B, R) shaped per-token rewards r_t of InstructGPT Eq. 2: −β·kl_t, plus r(x, y) at the last token."""
    non_score_rewards: torch.Tensor | None = None
    """(B, R) the KL part −β·kl_t alone."""
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
        return call_on(reward_model, last_token_scores, input_ids, attention_mask)

    return score


def apply_missing_eos_score(scores: torch.Tensor, has_eos: torch.Tensor, missing_eos_score: float | None):
    """The EOS trick [ppo-details: eos-trick]: a response that never ended gets the fixed score ``missing_eos_score``.

    The RM was trained on finished responses only, so its score of an unfinished one is meaningless and
    easy to exploit [ppo-details: reward-at-eos]. ``None`` keeps the RM score.
    """
    if missing_eos_score is None:
        return scores
    return torch.where(has_eos, scores, torch.full_like(scores, missing_eos_score))


# --------------------------------------------------------------------------- 1. sample


def sample_responses(
    backend: GenerationBackend,
    query: torch.Tensor,
    query_mask: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    eos_token_id: int,
    pad_token_id: int,
    batch_size: int = 0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y ~ π(·|x) for each prompt, ``batch_size`` prompts per ``generate`` call (0: all), cut after the first EOS.

    ``generator`` may be a list, one generator per sampling shard (:class:`SamplingShards`): the rows are then cut
    into that many equal contiguous shards, each sampled on its own, with its own generator and left-padded to its
    own longest prompt, as a process that held only that shard would sample it.

    Returns ``(response, response_mask, has_eos)``: (B, R) ids with PAD after EOS, (B, R) bool, (B,) bool, with
    R the longest response (columns that are PAD in every row are dropped)."""
    generators = list(generator) if isinstance(generator, Sequence) else [generator]
    if query.shape[0] % len(generators):
        raise ValueError(f"{query.shape[0]} prompts cannot be split into {len(generators)} equal sampling shards")
    pieces = []
    for shard, shard_generator in zip(row_chunks(query.shape[0], query.shape[0] // len(generators)), generators):
        ids, mask = without_padding_columns(query[shard], query_mask[shard])
        pieces += [
            backend.generate(ids[rows], mask[rows], max_new_tokens, temperature, shard_generator)
            for rows in row_chunks(ids.shape[0], batch_size)
        ]
    response, response_mask, has_eos = truncate_after_eos(torch.cat(pieces, dim=0), eos_token_id, pad_token_id)
    width = int(response_mask.sum(dim=1).max())
    return response[:, :width], response_mask[:, :width], has_eos


def without_padding_columns(query: torch.Tensor, query_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``(query, query_mask)`` without the leading columns that are padding in every row: the
    tensors :func:`left_pad` makes of these rows alone."""
    first = int(query_mask.any(dim=0).long().argmax())
    return query[:, first:], query_mask[:, first:]


class SamplingShards:
    """The rollout's sampling randomness, cut so that it does not depend on the number of processes.

    The global rollout batch is split into ``count`` contiguous sampling shards, a number fixed when the run
    starts (``generation.sampling_shards``: by default the number of processes then) and kept by its checkpoints.
    Shard s always samples its episodes with its own generator, seeded ``seed + s · RANK_SEED_STRIDE`` (as rank s
    of a run with one shard per process), in its own ``generate`` calls (:func:`sample_responses`). Each process
    samples the contiguous block of count / N shards that covers its share of the batch
    (:meth:`Runtime.shard`), so gathering in rank order keeps the shards' order. A resume with another number of
    processes therefore draws the same tokens as the uninterrupted run; one shard per process (the default, and
    one process with one shard) is plain per-rank sampling.
    """

    def __init__(self, count: int, seed: int, runtime: Runtime):
        runtime.require_divisible(count, "generation.sampling_shards")
        self.runtime = runtime
        self.generators = [self._generator().manual_seed(seed + s * RANK_SEED_STRIDE) for s in range(count)]

    def _generator(self) -> torch.Generator:
        return torch.Generator(device=self.runtime.device)

    def owned(self) -> list[torch.Generator]:
        """The generators of this process's shards, in shard order."""
        start, stop = self.runtime.shard_bounds(len(self.generators))
        return self.generators[start:stop]

    def state_dict(self) -> list[torch.Tensor]:
        """Every shard's generator state, in shard order (each process contributes the shards it sampled)."""
        start, _ = self.runtime.shard_bounds(len(self.generators))
        owned = {start + i: generator.get_state() for i, generator in enumerate(self.owned())}
        return [state for shard in self.runtime.gather_objects(owned) for state in shard.values()]

    def load_state_dict(self, states: list[torch.Tensor]) -> None:
        """Continue the checkpoint's shards, whatever number of processes sampled them; when they cannot be split
        evenly over this run's processes, keep this run's freshly seeded shards (with a warning)."""
        world_size = self.runtime.world_size
        if len(states) % world_size:
            warnings.warn(
                f"the checkpoint samples {len(states)} sampling shard(s), which {world_size} processes cannot share "
                f"evenly: sampling restarts with {len(self.generators)} freshly seeded shards, so the samples "
                "differ from an uninterrupted run",
                stacklevel=2,
            )
            return
        self.generators = [self._generator() for _ in states]
        for generator, state in zip(self.generators, states):
            generator.set_state(state)


# --------------------------------------------------------------------------- 2. score


def score_rollout(
    models: PPOModels,
    query: torch.Tensor,
    query_mask: torch.Tensor,
    response: torch.Tensor,
    response_mask: torch.Tensor,
    has_eos: torch.Tensor,
    temperature: float,
    missing_eos_score: float | None = None,
    batch_size: int = 0,
) -> Rollout:
    """The rollout's forward passes, ``batch_size`` episodes at a time (0: all): log π and log π^SFT at
    temperature τ, the entropy of π, the values V and the score r(x, y) (``missing_eos_score`` where no EOS).

    The policy's log-probs come from their own forward pass (not from the sampler's logits), so rollout and
    training compute them alike and the first PPO ratio is 1. Runs in inference mode (and in the caller's
    autocast); the tensors are copied out of inference mode at the end so the update can use them. The policy
    + reference forwards and the value + score forwards share nothing and run through
    ``models.side_by_side``.
    """
    with torch.inference_mode():
        out = _forward_passes(models, query, query_mask, response, response_mask, temperature, batch_size)
    scores = apply_missing_eos_score(out["raw_scores"], has_eos, missing_eos_score)
    tensors = dict(query=query, query_mask=query_mask, response=response, response_mask=response_mask,
                  has_eos=has_eos, scores=scores, **out)  # fmt: skip
    return Rollout(**{key: value.clone() for key, value in tensors.items()})  # out of inference mode: autograd-usable


def _forward_passes(models: PPOModels, query, query_mask, response, response_mask, temperature, batch_size):
    parts: dict[str, list[torch.Tensor]] = {}
    for rows in row_chunks(query.shape[0], batch_size):
        q, qm, r, rm = query[rows], query_mask[rows], response[rows], response_mask[rows]
        input_ids, attention_mask = torch.cat([q, r], dim=1), torch.cat([qm, rm.long()], dim=1)
        language_model_side, scalar_side = models.side_by_side(
            partial(_policy_and_reference, models, input_ids, attention_mask, r, temperature),
            partial(_values_and_scores, models, input_ids, attention_mask, q, qm, r, rm),
        )
        for key, value in {**language_model_side, **scalar_side}.items():
            parts.setdefault(key, []).append(value)
    out = {key: torch.cat(values, dim=0) for key, values in parts.items()}
    zero = torch.zeros((), device=response.device)
    for key in ("logprobs", "ref_logprobs", "values", "entropy"):  # nothing after EOS carries information
        out[key] = torch.where(response_mask, out[key], zero)
    return out


def _policy_and_reference(models: PPOModels, input_ids, attention_mask, response, temperature) -> dict:
    """The policy's log-probs and entropy and the reference's log-probs, each (b, R)."""
    logprobs, entropy = models.logprobs.responses(
        models.policy, input_ids, attention_mask, response, temperature, True
    )
    ref_logprobs = models.logprobs.responses(models.ref_policy, input_ids, attention_mask, response, temperature)
    return {"logprobs": logprobs, "entropy": entropy, "ref_logprobs": ref_logprobs}


def _values_and_scores(models: PPOModels, input_ids, attention_mask, query, query_mask, response, response_mask):
    """The values (b, R) and the scores (b,): the reward model's, or any score function's."""
    values = call_on(models.value_model, response_values, input_ids, attention_mask, response.shape[1])
    return {"values": values, "raw_scores": models.score(query, query_mask, response, response_mask).float()}


# --------------------------------------------------------------------------- 3. rewards and advantages


def compute_advantages(
    rollout: Rollout,
    kl_coef: float,
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten_rewards: bool = False,
    whiten_advantages: bool = True,
) -> Rollout:
    """Shaped rewards (InstructGPT Eq. 2), GAE, and whitening, over the whole rollout batch.

        r_t = −β·(log π_rollout(y_t) − log π^SFT(y_t)) + [t = last] · r(x, y)     [ppo-details: kl-in-reward]
        (A_t, R_t) = GAE(r, V; γ, λ)                                              (γ = 1, λ = 0.95)

    Optional reward whitening scales r without re-centring it (``shift_mean=False``) before GAE
    [ppo-details: reward-whitening]; advantage whitening centres and scales A
    [ppo-details: advantage-whitening]. Both use statistics of the whole batch, so they do not depend on how
    the batch is later cut into minibatches and micro-batches. Returns are computed from the unwhitened
    advantages: they are the value targets. ``rollout.rewards`` keeps the unwhitened r_t, the objective's.
    """
    mask = rollout.response_mask
    rewards, non_score, kl = shaped_rewards(rollout.scores, rollout.logprobs, rollout.ref_logprobs, mask, kl_coef)
    gae_rewards = masked_whiten(rewards, mask, shift_mean=False) if whiten_rewards else rewards
    advantages, returns = gae(gae_rewards, rollout.values, mask, gamma=gamma, lam=lam)
    if whiten_advantages:
        advantages = masked_whiten(advantages, mask, shift_mean=True)
    return replace(rollout, rewards=rewards, non_score_rewards=non_score, kl=kl, advantages=advantages,
                   returns=returns)  # fmt: skip


@torch.no_grad()
def rollout_metrics(rollout: Rollout, kl_coef: float) -> dict[str, float | None]:
    """Per-iteration statistics of a rollout after :func:`compute_advantages` (sequence sums, then batch means).

    ``value/explained_variance`` is None (JSON null) when the returns do not vary (it is undefined then; e.g.
    every score 0 and no KL penalty), rather than a NaN that strict JSON readers reject."""
    mask = rollout.response_mask
    kl3 = torch.where(mask, kl_k3(rollout.logprobs, rollout.ref_logprobs), torch.zeros((), device=mask.device))
    metrics = {
        "objective/reward": rollout.rewards.sum(dim=1).mean(),
        "objective/score": rollout.scores.mean(),
        "objective/score_raw": rollout.raw_scores.mean(),
        "objective/non_score_reward": rollout.non_score_rewards.sum(dim=1).mean(),
        "objective/kl": rollout.kl.sum(dim=1).mean(),
        "objective/kl_k3": kl3.sum(dim=1).mean(),
        "objective/beta": float(kl_coef),
        "policy/entropy": masked_mean(rollout.entropy, mask),
        "response/length": mask.sum(dim=1).float().mean(),
        "response/eos_rate": rollout.has_eos.float().mean(),
        "response/distinct_fraction": distinct_fraction(rollout.response, mask),
    }
    out: dict[str, float | None] = {k: float(v) for k, v in metrics.items()}
    explained = float(explained_variance(rollout.values, rollout.returns, mask))
    out["value/explained_variance"] = explained if math.isfinite(explained) else None
    return out
