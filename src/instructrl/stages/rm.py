"""Stage 2 — the reward model r_θ(x, y), trained on K-wise rankings (InstructGPT §3.5, App. C.2).

Model: the SFT model (any causal LM directory) with its unembedding replaced by a projection to one
scalar, head init N(0, 1/√(d_model+1)) [ppo-details: reward-head-init], dropout off
[ppo-details: dropout-off]. The reward is read at the EOS that ends ``prompt ⊕ response ⊕ EOS``
[ppo-details: reward-at-eos]; sequences are right-padded with a PAD ≠ EOS.

Loss, Eq. 1, with the paper's batching (footnote 5): an optimizer batch holds ``batch_size`` *prompts*; the
K completions of each are forwarded **once** (all prompts' completions flattened into one padded tensor),
and the C(K,2) pairs of one prompt form one element of the loss:

    loss(θ) = −(1/G) Σ_g (1/n_g) Σ_{(w,l) of g} log σ(r_θ(x_g, y_w) − r_θ(x_g, y_l))

with n_g = C(K_g,2) minus tied pairs (ties are dropped). K_g counts distinct response texts: copies of one text
are one completion, and a preference its copies contradict is dropped like a tie (``Comparison.distinct_pairs``).
An empty response (a sample that ended at once) is the completion ``prompt ⊕ EOS``, ranked like any other.
Gradient accumulation over micro-batches of prompts divides by the optimizer batch's G, so it reproduces the
one-big-batch gradient exactly.

Schedule: one epoch (more overfits, App. C.2), Adam β = (0.9, 0.95), cosine decay to 10% of the peak LR,
no warmup. After training a bias is stored so that labeler demonstrations score mean 0 (§3.5; bias only,
no scale); it lives in the saved config under ``instructrl_reward_bias`` (see ``models/reward.py``).

Evaluation: pairwise accuracy on held-out comparisons of the training labelers and, separately, on every
comparison of the labelers listed in ``heldout_labelers`` (never trained on), the paper's 72.4 ± 0.4% vs
69.6 ± 0.9% (§4.1). Accuracy is over pairs: the fraction with r(y_w) > r(y_l); its standard error is over
comparisons (the pairs of one ranking are not independent). Beside each, two orderings of the same pairs that learn
nothing from the comparisons (``baselines``, :mod:`instructrl.stages.rm_baselines`): the initial model's
likelihood of each response, and its length.

Without ``comparisons`` the data comes from the world (``run.world``, the sandbox by default): K in [4, 9] samples
per RM-split prompt from ``sandbox_sample_policy`` (default ``model``; or the world's synthetic candidates), ranked
by randomly assigned simulated labelers. ``sandbox_round2_policy`` adds a second round, as InstructGPT repeated
steps 2-3: samples of a later policy (a PPO policy) on further prompts, ranked by the same labelers; with
``sandbox_round2_reward_model`` the reward model that policy was trained against is measured on them. A run given
``demonstrations`` of its own refuses world data (no silent sandbox data); every data source is logged.
"""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from instructrl.agreement import pooled_estimate
from instructrl.config import (
    require,
    require_fraction,
    require_non_negative,
    require_own_data,
    require_path_exists,
    require_positive,
)
from instructrl.data.loading import encode_prompts, load_comparisons, load_demonstrations
from instructrl.data.records import Comparison, Demonstration
from instructrl.errors import UserFacingError
from instructrl.models.causal_lm import count_parameters, disable_dropout, load_causal_lm, load_tokenizer
from instructrl.models.reward import BIAS_KEY, last_token_scores, load_reward_model, reward_model_from_causal_lm
from instructrl.models.scoring import max_positions, pad_right, score_sequences, tokenize_texts
from instructrl.rl.losses import ranking_loss
from instructrl.stages.common import log_data_source
from instructrl.stages.rm_baselines import baseline_accuracies
from instructrl.stages.training_run import TrainingRun, TrainingSettings, TrainingState
from instructrl.utils.device import resolve_device
from instructrl.utils.distributed import Runtime, call_model_function
from instructrl.utils.guards import out_of_memory_advice
from instructrl.utils.io import atomic_write_json, atomic_write_jsonl
from instructrl.world import describe_world, has_extra, load_world, stage_tasks

SANDBOX_COMPARISONS = "sandbox_comparisons.jsonl"
SANDBOX_DEMONSTRATIONS = "sandbox_demonstrations.jsonl"
SANDBOX_AGREEMENT = "sandbox_agreement.json"
UNKNOWN_LABELER = "unknown"
"""Group name for comparisons without a ``labeler_id``."""


@dataclass
class Config(TrainingSettings):
    """Reward-model training on K-wise comparisons."""

    model: str = "runs/sandbox/sft"
    """Causal LM to initialize from (the SFT model): a Hugging Face directory with its tokenizer."""
    output_dir: str = "runs/sandbox/rm"
    """Where the reward model (HF sequence-classification dir), metrics, checkpoints and results go."""
    comparisons: str | None = None
    """Comparisons JSONL (K-way, pairwise or HH-RLHF); unset = K samples of the SFT policy per prompt ranked by
    the world's labelers (``run.world``, the sandbox by default; then
    ``demonstrations`` must be unset too: a run never mixes the sandbox's data with yours)."""
    valid_comparisons: str | None = None
    """Validation comparisons; unset = hold out ``valid_fraction`` of the prompts of ``comparisons``."""
    valid_fraction: float = 0.1
    """Fraction of prompts (all their comparisons together) held out when ``valid_comparisons`` is unset."""
    demonstrations: str | None = None
    """Demonstrations JSONL whose mean score the bias sets to 0; unset with ``comparisons`` set = the
    best-ranked response of each training comparison (sandbox: the labelers' demonstrations)."""
    heldout_labelers: list[str] = field(default_factory=list)
    """labeler_id values whose comparisons are never trained on and are evaluated separately."""
    skip_bad: bool = False
    """Skip (and count) malformed records instead of stopping at the first one."""
    max_k: int = 9
    """Largest K accepted in a K-way record (paper: 9)."""
    max_prompt_tokens: int = 192
    """Longer prompts keep their last max_prompt_tokens tokens (counted in results)."""
    max_response_tokens: int = 64
    """Responses longer than this, counting the EOS appended to each, are dropped from their comparison (counted)
    rather than cut: the reward is read at the EOS, which a cut response never reached (same rule as ``sft``)."""
    epochs: int = 1
    """Passes over the training comparisons (paper: 1; more overfits quickly)."""
    batch_size: int = 16
    """Prompts per optimizer step, each carrying all its C(K,2) pairs (paper: 64; the sandbox's ~1.2k training
    prompts would give only ~20 steps at 64)."""
    micro_batch_size: int = 8
    """Prompts per forward/backward (gradient accumulation); 0 = batch_size."""
    lr: float = 3e-4
    """Peak learning rate (paper 9e-6 at 6B). Sandbox sweep (1e-4 … 3e-3, batch 16 and 64): accuracy flat within
    ±1 point, validation loss lowest at 3e-4 / batch 16."""
    eval_every: int = 25
    """Optimizer steps between evaluations on the validation and held-out-labeler comparisons."""
    eval_batch_size: int = 64
    """Completions per forward pass when evaluating and normalizing."""
    baselines: bool = True
    """After training, score the validation and held-out-labeler pairs with two orderings that learn nothing from
    the comparisons (``rm_baselines``): the initial model's likelihood of each response and its length. An RM at
    or below them learned little beyond them. Loads ``model`` once more as a causal LM for inference; skipped
    under ``run.sharding=fsdp`` (a model sharded to fit would not fit whole)."""
    save_every: int = 25
    """Optimizer steps between resumable checkpoints."""
    sandbox_seed: int = 0
    """Seed of the world (``run.world``, default the sandbox) used when ``comparisons`` is unset."""
    sandbox_prompts: int = 1500
    """The world's train prompts ranked for the RM, taken from the "rm" pool (``world.stage_tasks``)."""
    sandbox_min_k: int = 4
    """Fewest responses per sandbox prompt (paper: 4)."""
    sandbox_max_k: int = 9
    """Most responses per sandbox prompt (paper: 9)."""
    sandbox_samples_from_policy: bool = True
    """Sample the sandbox responses from a policy (temperature 1); false = the sandbox's synthetic candidates."""
    sandbox_sample_policy: str | None = None
    """Causal LM whose samples are ranked; unset = ``model``. InstructGPT ranked samples of the policies it was
    training (1.3B-175B) with one 6B reward model, so a larger RM ranks the small policy's samples here."""
    sandbox_round2_policy: str | None = None
    """A second round of rankings: K samples of this policy (e.g. the first round's PPO-ptx policy) on
    ``sandbox_round2_prompts`` further prompts, ranked by the same labelers and trained on together with the first
    round's comparisons. InstructGPT repeated its steps 2 and 3: most comparisons were of SFT samples, a smaller
    share of PPO samples, so the RM also sees the responses PPO learned to produce. Unset = one round."""
    sandbox_round2_reward_model: str | None = None
    """The reward model the second round's policy was trained against (e.g. the first round's RM): its accuracy
    on every second-round comparison, the labelers' rankings of that policy's samples, none of which it trained
    on, goes to results.json as ``previous_rm_on_round2``. Far below its validation accuracy means PPO found
    responses the reward model misranks: over-optimization, measured without a gold judge."""
    sandbox_round2_prompts: int = 500
    """Prompts ranked in the second round: the "rm" pool's prompts after the first round's, then the first
    round's again when the pool runs out (a prompt's comparisons of both rounds stay in one split)."""
    sandbox_agreement_prompts: int = 300
    """Sandbox only: prompts whose samples every labeler ranks to measure inter-labeler agreement on the RM's own
    data distribution (reported beside the RM's accuracy); 0 = skip."""
    sandbox_demonstrations: int = 500
    """Sandbox demonstrations written for the normalization."""
    generation_batch_size: int = 64
    """Sequences per generate() call when sampling sandbox responses."""

    def validate(self) -> None:
        require_positive(
            self, "max_k", "max_prompt_tokens", "max_response_tokens", "epochs", "batch_size", "lr", "eval_every"
        )
        require_positive(self, "eval_batch_size", "save_every", "sandbox_min_k", "generation_batch_size")
        require_non_negative(self, "micro_batch_size", "weight_decay", "grad_clip", "sandbox_prompts")
        require_non_negative(self, "sandbox_demonstrations", "sandbox_agreement_prompts")
        require_path_exists(self, "sandbox_sample_policy", "sandbox_round2_policy", "sandbox_round2_reward_model")
        require(
            self.sandbox_round2_reward_model is None or self.sandbox_round2_policy is not None,
            "sandbox_round2_reward_model",
            "needs sandbox_round2_policy (the policy whose samples it is measured on)",
        )
        require_positive(self, "sandbox_round2_prompts")
        require(
            self.sandbox_round2_policy is None or (self.comparisons is None and self.sandbox_samples_from_policy),
            "sandbox_round2_policy",
            "ranks a world's prompts: needs comparisons unset and sandbox_samples_from_policy=true",
        )
        require_fraction(self, "min_lr_ratio")
        require_fraction(self, "valid_fraction", inclusive_high=False)
        require_path_exists(self, "comparisons", "valid_comparisons", "demonstrations")
        require(self.max_k >= 2, "max_k", "must be >= 2")
        require(self.max_response_tokens >= 2, "max_response_tokens", "must be >= 2 (a token and the EOS)")
        require(self.micro_batch_size <= self.batch_size, "micro_batch_size", f"must be <= {self.batch_size}")
        require(
            2 <= self.sandbox_min_k <= self.sandbox_max_k <= self.max_k,
            "sandbox_max_k",
            f"need 2 <= sandbox_min_k <= sandbox_max_k <= max_k={self.max_k}",
        )
        require(
            self.comparisons is not None or self.valid_comparisons is None,
            "valid_comparisons",
            "needs comparisons to be set too",
        )
        require(self.run.precision == "fp32", "run.precision", "the reward model trains in float32 only")
        require_own_data(self, "comparisons", ["demonstrations"])


# --------------------------------------------------------------------------- encoding


@dataclass(frozen=True)
class EncodedComparison:
    """One prompt's K completions as token ids (prompt ⊕ response ⊕ EOS) and its untied (winner, loser) pairs."""

    completions: tuple[tuple[int, ...], ...]
    pairs: tuple[tuple[int, int], ...]
    labeler_id: str
    prompt_length: int
    """Tokens of the (truncated) prompt that begins every completion."""


@dataclass
class EncodeCounts:
    """What encoding kept and changed, for the log and results.json."""

    comparisons: int = 0
    """Comparisons kept (at least one untied pair left)."""
    completions: int = 0
    """Completions kept (one forward pass each per epoch)."""
    pairs: int = 0
    """Distinct untied (winner, loser) pairs kept: identical texts of one comparison count once
    (``Comparison.distinct_pairs``)."""
    merged_responses: int = 0
    """Responses that repeated a text of their own comparison, merged into its first copy."""
    truncated_prompts: int = 0
    """Prompts longer than max_prompt_tokens, kept with their last tokens."""
    dropped_responses: int = 0
    """Distinct responses longer than max_response_tokens, removed from their comparison."""
    dropped_comparisons: int = 0
    """Comparisons left with no untied pair (after dropped responses)."""
    all_tied: int = 0
    """Of those, comparisons whose ranking ties every response (no untied pair to begin with)."""


def labeler_of(record: Comparison | Demonstration) -> str:
    value = record.meta.get("labeler_id")
    return UNKNOWN_LABELER if value is None else str(value)


def _truncate_prompt(prompt_ids: list[int], max_prompt_tokens: int) -> tuple[list[int], bool]:
    """Keep the last ``max_prompt_tokens`` tokens: the end of a prompt is what the response answers."""
    if len(prompt_ids) <= max_prompt_tokens:
        return prompt_ids, False
    return prompt_ids[-max_prompt_tokens:], True


def encode_comparisons(
    comparisons: Sequence[Comparison], tokenizer, max_prompt_tokens: int, max_response_tokens: int
) -> tuple[list[EncodedComparison], EncodeCounts]:
    """Tokenize comparisons into completions + pairs; merge repeated texts, truncate long prompts, drop long
    responses. An empty response is kept: its completion is prompt ⊕ EOS, scored at that EOS like any other."""
    counts = EncodeCounts()
    prompt_ids = encode_prompts(tokenizer, [c.prompt for c in comparisons])
    response_ids = tokenize_texts(tokenizer, [r for c in comparisons for r in c.responses])
    eos = tokenizer.eos_token_id
    encoded, offset = [], 0
    for comparison, prompt in zip(comparisons, prompt_ids):
        responses = response_ids[offset : offset + comparison.k]
        offset += comparison.k
        prompt, truncated = _truncate_prompt(prompt, max_prompt_tokens)
        counts.truncated_prompts += truncated
        distinct, distinct_pairs = comparison.distinct_pairs()
        counts.merged_responses += comparison.k - len(distinct)
        kept = [i for i in distinct if len(responses[i]) + 1 <= max_response_tokens]  # + 1: the EOS
        counts.dropped_responses += len(distinct) - len(kept)
        new_index = {old: new for new, old in enumerate(kept)}
        pairs = tuple((new_index[w], new_index[lo]) for w, lo in distinct_pairs if w in new_index and lo in new_index)
        if not pairs:
            counts.dropped_comparisons += 1
            counts.all_tied += not comparison.pairs()
            continue
        completions = tuple(tuple(prompt + responses[i] + [eos]) for i in kept)
        encoded.append(EncodedComparison(completions, pairs, labeler_of(comparison), len(prompt)))
        counts.comparisons += 1
        counts.completions += len(completions)
        counts.pairs += len(pairs)
    return encoded, counts


def encode_demonstrations(
    demonstrations: Sequence[Demonstration], tokenizer, max_prompt_tokens: int, max_response_tokens: int
) -> tuple[list[list[int]], int]:
    """Demonstrations as scored sequences (same encoding as comparisons); returns them and how many were dropped."""
    prompt_ids = encode_prompts(
        tokenizer, [d.prompt for d in demonstrations], [d.prompt_messages for d in demonstrations]
    )
    eos = tokenizer.eos_token_id
    sequences = []
    for prompt, response in zip(prompt_ids, tokenize_texts(tokenizer, [d.response for d in demonstrations])):
        if len(response) + 1 > max_response_tokens:  # + 1: the EOS
            continue
        sequences.append(_truncate_prompt(prompt, max_prompt_tokens)[0] + response + [eos])
    return sequences, len(demonstrations) - len(sequences)


# --------------------------------------------------------------------------- batching and the loss


@dataclass
class RankingBatch:
    """Every completion of G prompts in one right-padded tensor, and the pairs pointing into it."""

    input_ids: torch.Tensor  # (N, T) N = Σ_g K_g
    attention_mask: torch.Tensor  # (N, T)
    winner_idx: torch.Tensor  # (P,) row of y_w
    loser_idx: torch.Tensor  # (P,) row of y_l
    pair_group: torch.Tensor  # (P,) prompt index g in [0, G)
    num_groups: int  # G

    def to(self, device: torch.device) -> RankingBatch:
        return RankingBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.winner_idx.to(device),
            self.loser_idx.to(device),
            self.pair_group.to(device),
            self.num_groups,
        )


def collate_comparisons(batch: Sequence[EncodedComparison], pad_id: int) -> RankingBatch:
    """Flatten the completions of ``batch`` (prompt g's K_g rows are contiguous) and index its pairs."""
    sequences, winners, losers, groups = [], [], [], []
    for g, comparison in enumerate(batch):
        offset = len(sequences)
        sequences.extend(comparison.completions)
        for w, lo in comparison.pairs:
            winners.append(offset + w)
            losers.append(offset + lo)
            groups.append(g)
    input_ids, attention_mask = pad_right(sequences, pad_id)
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return RankingBatch(input_ids, attention_mask, as_long(winners), as_long(losers), as_long(groups), len(batch))


def raw_last_token_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """r_θ at each row's last real token without the normalization bias: (N, T) -> (N,)."""
    return last_token_scores(model, input_ids, attention_mask, normalized=False)


def accumulate_ranking_gradients(
    model, batch: Sequence[EncodedComparison], micro_batch_size: int, pad_id: int, runtime: Runtime | None = None
) -> dict[str, float]:
    """Forward and backward one optimizer batch of prompts, ``micro_batch_size`` prompts per forward pass.

    Each micro-batch loss is divided by the whole batch's prompt count G (``normalizer``), so the summed
    gradients equal those of the full-batch Eq. 1 loss whatever the split. Under N processes ``batch`` is this
    rank's share and G is the global count over N (DDP averages the ranks' gradients); the returned statistics
    are those of the global batch: loss, pairwise accuracy, mean margin r_w − r_l and sizes.
    """
    runtime = runtime or Runtime(next(model.parameters()).device)
    device = next(model.parameters()).device
    num_prompts = len(batch)
    normalizer = runtime.gradient_normalizer(num_prompts)  # G / processes
    micro = micro_batch_size or num_prompts
    starts = range(0, num_prompts, micro)
    loss_sum, correct, margin_sum, num_pairs = 0.0, 0.0, 0.0, 0
    all_rewards = []
    for start, counted in runtime.lockstep(starts):  # counted False: a sharded rank's extra pass, weight 0
        with runtime.no_sync([model] if start != starts[-1] else []):  # all-reduce at the last micro-batch
            inputs = collate_comparisons(batch[start : start + micro], pad_id).to(device)
            rewards = call_model_function(model, raw_last_token_scores, inputs.input_ids, inputs.attention_mask)
            loss, stats = ranking_loss(
                rewards,
                inputs.winner_idx,
                inputs.loser_idx,
                inputs.pair_group,
                inputs.num_groups,
                normalizer=normalizer,
            )
            runtime.backward(loss if counted else 0.0 * loss)
        if not counted:
            continue
        pairs = int(stats["rm/num_pairs"].item())
        loss_sum += loss.item()
        correct += stats["rm/accuracy"].item() * pairs
        margin_sum += stats["rm/margin_mean"].item() * pairs
        num_pairs += pairs
        all_rewards.append(rewards.detach().float().cpu())
    rewards = torch.cat(runtime.gather_objects(torch.cat(all_rewards)))  # (N,) one per completion of the batch
    totals = runtime.sums({"loss": loss_sum, "correct": correct, "margin": margin_sum, "pairs": num_pairs})
    totals["loss"] /= runtime.world_size  # each rank's loss is its sum over G / N
    return {
        "loss": totals["loss"],
        "accuracy": totals["correct"] / max(totals["pairs"], 1),
        "margin_mean": totals["margin"] / max(totals["pairs"], 1),
        "score_mean": rewards.mean().item(),
        "score_std": rewards.std().item() if rewards.numel() > 1 else 0.0,
        "pairs": round(totals["pairs"]),
        "completions": rewards.numel(),
        "prompts": round(normalizer * runtime.world_size),
    }


# --------------------------------------------------------------------------- evaluation


def pairwise_metrics(scores: torch.Tensor, encoded: Sequence[EncodedComparison]) -> dict:
    """Accuracy (fraction of pairs with r_w > r_l), its standard error, Eq. 1 loss, and accuracy per labeler.

    ``scores`` (N,) are the flattened completion scores in ``encoded`` order. The standard error treats the
    comparison (one prompt's ranking) as the independent unit, as :mod:`instructrl.agreement` does for the
    labelers' agreement: the pairs of one ranking share its responses and its labeler, so a pair-level binomial
    interval would be too narrow.
    """
    winners, losers, groups, labelers = [], [], [], []
    offset = 0
    for g, comparison in enumerate(encoded):
        for w, lo in comparison.pairs:
            winners.append(offset + w)
            losers.append(offset + lo)
            groups.append(g)
            labelers.append(comparison.labeler_id)
        offset += len(comparison.completions)
    winner_idx, loser_idx = torch.tensor(winners), torch.tensor(losers)
    loss, _ = ranking_loss(scores.double(), winner_idx, loser_idx, torch.tensor(groups), len(encoded))
    correct = (scores[winner_idx] > scores[loser_idx]).tolist()
    by_labeler: dict[str, list[bool]] = defaultdict(list)
    by_comparison: dict[int, list[bool]] = defaultdict(list)
    for labeler, group, ok in zip(labelers, groups, correct):
        by_labeler[labeler].append(ok)
        by_comparison[group].append(ok)
    return {
        "accuracy": sum(correct) / len(correct),
        "accuracy_stderr": pooled_estimate([(sum(oks), len(oks)) for oks in by_comparison.values()]).stderr,
        "loss": loss.item(),
        "pairs": len(correct),
        "prompts": len(encoded),
        "accuracy_by_labeler": {
            name: {"accuracy": sum(oks) / len(oks), "pairs": len(oks)} for name, oks in sorted(by_labeler.items())
        },
    }


def evaluate(model, encoded: Sequence[EncodedComparison], pad_id: int, batch_size: int) -> tuple[dict, torch.Tensor]:
    """Score every completion once (unnormalized) and compute :func:`pairwise_metrics`; also return the scores."""
    sequences = [s for comparison in encoded for s in comparison.completions]
    scores = score_sequences(model, sequences, pad_id, batch_size, normalized=False)
    return pairwise_metrics(scores, encoded), scores


def score_distribution(scores: torch.Tensor) -> dict[str, float]:
    """Mean, std and percentiles of a score vector (for results.json)."""
    s = scores.double()
    quantiles = torch.quantile(s, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)).tolist()
    return {
        "n": s.numel(),
        "mean": s.mean().item(),
        "std": s.std().item() if s.numel() > 1 else 0.0,
        "min": s.min().item(),
        "p05": quantiles[0],
        "p25": quantiles[1],
        "p50": quantiles[2],
        "p75": quantiles[3],
        "p95": quantiles[4],
        "max": s.max().item(),
    }


def normalize_to_demonstrations(model, sequences: Sequence[Sequence[int]], pad_id: int, batch_size: int) -> dict:
    """Set the stored bias b so that demonstrations score mean 0: b = −mean_i r_θ(x_i, y_i) (§3.5).

    The pairwise loss is invariant to adding a constant to r_θ, so b changes no comparison; it anchors the
    scale PPO sees. Returns the mean before and after and the bias.
    """
    raw = score_sequences(model, sequences, pad_id, batch_size, normalized=False).double()  # (N,)
    bias = -raw.mean().item()
    setattr(model.config, BIAS_KEY, bias)
    after = score_sequences(model, sequences, pad_id, batch_size, normalized=True).double()
    return {"n": len(sequences), "bias": bias, "mean_before": raw.mean().item(), "mean_after": after.mean().item()}


# --------------------------------------------------------------------------- data


def split_comparisons(
    comparisons: Sequence[Comparison],
    valid: Sequence[Comparison] | None,
    heldout_labelers: Sequence[str],
    valid_fraction: float,
    seed: int,
) -> tuple[list[Comparison], list[Comparison], list[Comparison]]:
    """(train, valid, heldout-labeler) comparisons.

    Comparisons by a held-out labeler go to the third set only (from both files). Without a validation
    file, ``valid_fraction`` of the distinct *prompts* are held out with all their comparisons, so one
    prompt ranked by several labelers never straddles train and valid.
    """
    heldout_set = set(heldout_labelers)
    is_heldout = lambda c: labeler_of(c) in heldout_set  # noqa: E731
    heldout = [c for c in comparisons if is_heldout(c)]
    rest = [c for c in comparisons if not is_heldout(c)]
    if valid is not None:
        heldout += [c for c in valid if is_heldout(c)]
        return rest, [c for c in valid if not is_heldout(c)], heldout
    prompts = sorted({c.prompt for c in rest})
    random.Random(seed).shuffle(prompts)
    valid_prompts = set(prompts[: int(len(prompts) * valid_fraction)])
    train = [c for c in rest if c.prompt not in valid_prompts]
    return train, [c for c in rest if c.prompt in valid_prompts], heldout


def _load_comparison_file(path: str, cfg: Config, label: str, skipped: dict[str, int]) -> list[Comparison]:
    records, stats = load_comparisons(path, skip_bad=cfg.skip_bad, max_k=cfg.max_k)
    if stats.n_skipped:
        print(f"{label}: {stats.summary()}", flush=True)
        skipped[label] = stats.n_skipped
    return records


def sandbox_data(cfg: Config, tokenizer, out: Path) -> tuple[Path, Path]:
    """Generate and write the sandbox comparisons and demonstrations; returns the two file paths.

    Prompts: the "rm" pool of the world's train prompts (``world.stage_tasks``; InstructGPT's SFT,
    RM and PPO prompt sets are distinct). For each: K ~ U[sandbox_min_k, sandbox_max_k]
    responses (policy samples at temperature 1, or synthetic candidates), ranked by a labeler drawn at
    random. Demonstrations: labelers' responses to prompts of the "sft" share. With ``sandbox_round2_policy``,
    a second round of its samples follows, with randomness of its own: the first round's data is the same with or
    without it.
    """
    import numpy as np

    world = load_world(cfg.run.world, cfg.sandbox_seed)
    pool = stage_tasks(world, "rm")
    rm_tasks = pool[: cfg.sandbox_prompts]
    sft_tasks = stage_tasks(world, "sft")
    rng = np.random.default_rng(cfg.run.seed)
    ks = [int(k) for k in rng.integers(cfg.sandbox_min_k, cfg.sandbox_max_k + 1, size=len(rm_tasks))]
    if cfg.sandbox_samples_from_policy:
        policy = cfg.sandbox_sample_policy or cfg.model
        candidates = _policy_samples(cfg, tokenizer, policy, [t.prompt for t in rm_tasks], ks, cfg.run.seed)
    elif has_extra(world, "synthetic_candidates"):
        candidates = [world.synthetic_candidates(t, k, rng) for t, k in zip(rm_tasks, ks)]
    else:
        raise UserFacingError(
            f"sandbox_samples_from_policy=false needs a world with synthetic_candidates; {cfg.run.world} has none"
        )
    labelers = world.labelers()
    records = _ranked_records(world, rm_tasks, candidates, labelers, rng)
    demos = []
    for index in rng.permutation(len(sft_tasks))[: cfg.sandbox_demonstrations].tolist():
        task = sft_tasks[index]
        labeler = labelers[int(rng.integers(len(labelers)))]
        response = world.demonstrate(task, labeler, rng)
        demos.append({"prompt": task.prompt, "response": response, "labeler_id": str(labeler), "id": task.id})
    if cfg.sandbox_agreement_prompts:
        agreement = agreement_on_samples(world, rm_tasks, candidates, cfg.sandbox_agreement_prompts, cfg.run.seed + 1)
        atomic_write_json(out / SANDBOX_AGREEMENT, agreement)
    if cfg.sandbox_round2_policy is not None and pool:
        round2_rng = np.random.default_rng([cfg.run.seed, 2])
        start = len(rm_tasks) % len(pool)
        round2_tasks = [pool[(start + i) % len(pool)] for i in range(cfg.sandbox_round2_prompts)]
        ks = [int(k) for k in round2_rng.integers(cfg.sandbox_min_k, cfg.sandbox_max_k + 1, size=len(round2_tasks))]
        prompts = [t.prompt for t in round2_tasks]
        candidates = _policy_samples(cfg, tokenizer, cfg.sandbox_round2_policy, prompts, ks, cfg.run.seed + 2)
        round2 = _ranked_records(world, round2_tasks, candidates, labelers, round2_rng)
        records += [r | {"round": 2} for r in round2]
        print(f"sandbox: second round, {len(round2)} comparisons of {cfg.sandbox_round2_policy}'s samples", flush=True)
    comparisons_path, demos_path = out / SANDBOX_COMPARISONS, out / SANDBOX_DEMONSTRATIONS
    atomic_write_jsonl(comparisons_path, records)
    atomic_write_jsonl(demos_path, demos)
    print(f"sandbox: wrote {len(records)} comparisons and {len(demos)} demonstrations to {out}", flush=True)
    return comparisons_path, demos_path


def _ranked_records(world, tasks: Sequence, candidates: Sequence[Sequence[str]], labelers: list, rng) -> list[dict]:
    """One comparison record per task: its non-empty candidates ranked by a labeler drawn at random (a task with
    fewer than two is skipped)."""
    records = []
    for task, responses in zip(tasks, candidates):
        responses = [r for r in responses if r.strip()]  # an immediately-stopped sample has nothing to rank
        if len(responses) < 2:
            continue
        labeler = labelers[int(rng.integers(len(labelers)))]
        ranking = [list(e) if isinstance(e, tuple) else e for e in world.rank(task, responses, labeler, rng)]
        record = {"prompt": task.prompt, "responses": responses, "ranking": ranking, "labeler_id": str(labeler)}
        records.append(record | {"id": task.id, "category": task.category})
    return records


def agreement_on_samples(
    world, tasks: Sequence, candidates: Sequence[Sequence[str]], n_prompts: int, seed: int
) -> dict:
    """Inter-labeler agreement on the RM's own samples (the first ``n_prompts`` prompts with two distinct
    non-empty responses, every labeler ranking each): the number the RM's accuracy is read against (§5.2 measured
    agreement on the comparisons themselves, not on a separate candidate set). Over distinct texts, as the RM's
    accuracy is (``Comparison.distinct_pairs``): a repeated sample would otherwise count its pairs once per copy.
    """
    from instructrl.sandbox.labelers import pairwise_agreement  # any World: only labelers() and rank()

    shown = [(t, list(dict.fromkeys(r for r in c if r.strip()))) for t, c in zip(tasks, candidates)]
    shown = [(t, c) for t, c in shown if len(c) >= 2][:n_prompts]
    mean, stderr, _ = pairwise_agreement(world, [t for t, _ in shown], [c for _, c in shown], seed)
    return {"mean": mean, "stderr": stderr, "prompts": len(shown)}


def _policy_samples(
    cfg: Config, tokenizer, policy_path: str, prompts: list[str], ks: list[int], seed: int
) -> list[list[str]]:
    """K_i samples of the policy at ``policy_path`` for each prompt (pure sampling, T = 1, cut at EOS)."""
    from instructrl.eval.generate import generate_responses
    from instructrl.models.causal_lm import load_causal_lm

    policy = load_causal_lm(policy_path, tokenizer).to(resolve_device(cfg.run.device))
    repeated = [p for p, k in zip(prompts, ks) for _ in range(k)]
    with out_of_memory_advice("sandbox sampling", "generation_batch_size", "max_response_tokens"):
        generated = generate_responses(
            policy,
            tokenizer,
            repeated,
            max_new_tokens=cfg.max_response_tokens - 1,  # room for the EOS appended to a sample that never stopped
            temperature=1.0,
            batch_size=cfg.generation_batch_size,
            seed=seed,
        )
    limit = cfg.max_response_tokens - 1
    texts = []
    for g in generated:
        # Decoded text can re-tokenize longer than the sampled ids (e.g. partial UTF-8 bytes become U+FFFD);
        # cut such samples back to the budget so the length filter does not silently drop them.
        ids = tokenizer(g.text, add_special_tokens=False)["input_ids"]
        texts.append(g.text if len(ids) <= limit else tokenizer.decode(ids[:limit]))
    out, offset = [], 0
    for k in ks:
        out.append(texts[offset : offset + k])
        offset += k
    return out


# --------------------------------------------------------------------------- build


@dataclass
class RankingData:
    """Encoded comparisons of the three sets, the normalization's demonstrations and what loading dropped."""

    train: list[EncodedComparison]
    valid: list[EncodedComparison]
    heldout: list[EncodedComparison]
    """Comparisons by the ``heldout_labelers`` (never trained on)."""
    counts: dict[str, EncodeCounts]
    """What encoding kept of each set: "train", "valid", "heldout"."""
    demo_sequences: list[list[int]]
    """Demonstrations whose mean score the bias sets to 0."""
    demos_dropped: int
    """Demonstrations over max_response_tokens."""
    normalization_source: str
    """Where the demonstrations came from (results.json)."""
    source: str
    """The comparisons file."""
    skipped_records: dict[str, int]
    """Malformed records skipped per file (with ``skip_bad``)."""


def build_data(cfg: Config, tokenizer, stage: TrainingRun) -> RankingData:
    """Load (or, without ``comparisons``, generate from the sandbox), split and encode the comparisons."""
    runtime = stage.runtime
    comparisons_path, demos_path = cfg.comparisons, cfg.demonstrations
    if comparisons_path is None:
        sandbox_files = (stage.out / SANDBOX_COMPARISONS, stage.out / SANDBOX_DEMONSTRATIONS)
        if not (stage.resumed and all(p.exists() for p in sandbox_files)) and runtime.is_main:
            sandbox_data(cfg, tokenizer, stage.out)  # a resumed run keeps exactly the data it started with
        runtime.barrier()  # the other ranks read what rank 0 wrote
        comparisons_path, demos_path = sandbox_files
        sampled = "synthetic candidates" if not cfg.sandbox_samples_from_policy else "samples of "
        sampled += (cfg.sandbox_sample_policy or cfg.model) if cfg.sandbox_samples_from_policy else ""
        if cfg.sandbox_round2_policy is not None:
            sampled += f", then ({cfg.sandbox_round2_prompts} prompts) of {cfg.sandbox_round2_policy}"
        world = describe_world(cfg.run.world, cfg.sandbox_seed)
        log_data_source(
            "rm", "comparisons", f"{world}: {sampled} ranked by its labelers, written to {comparisons_path}"
        )
    else:
        log_data_source("rm", "comparisons", str(comparisons_path))
    log_data_source("rm", "validation comparisons", cfg.valid_comparisons or f"{cfg.valid_fraction:g} of the prompts")
    skipped_records: dict[str, int] = {}
    all_comparisons = _load_comparison_file(str(comparisons_path), cfg, "comparisons", skipped_records)
    valid_file = (
        _load_comparison_file(cfg.valid_comparisons, cfg, "valid", skipped_records) if cfg.valid_comparisons else None
    )
    train_c, valid_c, heldout_c = split_comparisons(
        all_comparisons, valid_file, cfg.heldout_labelers, cfg.valid_fraction, cfg.run.seed
    )
    encode = lambda cs: encode_comparisons(cs, tokenizer, cfg.max_prompt_tokens, cfg.max_response_tokens)  # noqa: E731
    train, train_counts = encode(train_c)
    valid, valid_counts = encode(valid_c)
    heldout, heldout_counts = encode(heldout_c)
    if not train:
        raise UserFacingError(
            "no training comparison left (after held-out labelers, the validation split and the length limits)"
        )
    if demos_path is not None:
        demos, demo_stats = load_demonstrations(demos_path, skip_bad=cfg.skip_bad)
        if demo_stats.n_skipped:
            print(f"demonstrations: {demo_stats.summary()}", flush=True)
            skipped_records["demonstrations"] = demo_stats.n_skipped
        normalization_source = str(demos_path)
    else:  # no demonstrations given: anchor on the labelers' favourite response of each training comparison
        demos = [Demonstration(c.prompt, c.responses[_best(c)], meta=c.meta) for c in train_c]
        normalization_source = "best-ranked response of each training comparison"
    world = describe_world(cfg.run.world, cfg.sandbox_seed)
    sandbox_demos = f"{world}: its labelers' demonstrations, written to {demos_path}"
    log_data_source(
        "rm", "demonstrations (the bias)", sandbox_demos if cfg.comparisons is None else normalization_source
    )
    demo_sequences, demos_dropped = encode_demonstrations(
        demos, tokenizer, cfg.max_prompt_tokens, cfg.max_response_tokens
    )
    if not demo_sequences:
        raise UserFacingError(f"no demonstration fits max_response_tokens={cfg.max_response_tokens}")
    print(
        f"rm: {train_counts.comparisons} training prompts ({train_counts.pairs} distinct pairs, "
        f"{train_counts.completions} completions, {train_counts.merged_responses} repeated responses merged), "
        f"{valid_counts.comparisons} validation, {heldout_counts.comparisons} from held-out labelers; "
        f"{train_counts.truncated_prompts} prompts truncated, {train_counts.dropped_responses} responses over "
        f"{cfg.max_response_tokens} tokens dropped; "
        f"{sum(c.all_tied for c in (train_counts, valid_counts, heldout_counts))} comparisons dropped with every "
        "response tied",
        flush=True,
    )
    counts = {"train": train_counts, "valid": valid_counts, "heldout": heldout_counts}
    return RankingData(
        train,
        valid,
        heldout,
        counts,
        demo_sequences,
        demos_dropped,
        normalization_source,
        str(comparisons_path),
        skipped_records,
    )


def build_model(cfg: Config, tokenizer, data: RankingData, device: torch.device):
    """The causal LM with a scalar head (dropout off) on ``device``; refuses sequences beyond its context."""
    model = reward_model_from_causal_lm(cfg.model, pad_token_id=tokenizer.pad_token_id)
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):  # load_tokenizer added a PAD token
        model.resize_token_embeddings(len(tokenizer))
    disable_dropout(model)
    context = max_positions(model)
    longest = max(len(s) for c in data.train + data.valid + data.heldout for s in c.completions)
    if context is not None and longest > context:
        raise UserFacingError(
            f"sequences of up to {longest} tokens exceed the model's context of {context}; lower "
            "max_prompt_tokens / max_response_tokens"
        )
    model.to(device)
    print(f"model: {count_parameters(model) / 1e6:.2f}M parameters on {device}", flush=True)
    return model


def training_steps(cfg: Config, n_train: int, world_size: int) -> int:
    """Optimizer steps over ``epochs`` passes of ``n_train`` prompts; a last partial batch smaller than the number
    of processes is skipped (every rank needs at least one prompt)."""
    total_steps = math.ceil(n_train * cfg.epochs / cfg.batch_size)
    tail = n_train * cfg.epochs % cfg.batch_size
    if 0 < tail < world_size:
        total_steps -= 1
        print(f"rm: the last {tail} prompt(s) are skipped: fewer than the {world_size} processes", flush=True)
    return total_steps


# --------------------------------------------------------------------------- the loop


def train_step(
    cfg: Config, state: TrainingState, training_model, batch: list[EncodedComparison], pad_id: int, step: int
) -> dict:
    """Optimizer step ``step + 1`` on this rank's share of the global ``batch`` of prompts; returns its metrics."""
    runtime = state.runtime
    state.optimizer.zero_grad(set_to_none=True)
    with out_of_memory_advice("training", "micro_batch_size", "max_prompt_tokens", "max_response_tokens"):
        micro = cfg.micro_batch_size or cfg.batch_size
        stats = accumulate_ranking_gradients(training_model, runtime.shard(batch), micro, pad_id, runtime)
    grad_norm = runtime.clip_grad_norm_(state.model, cfg.grad_clip or float("inf"))
    if state.guard.step_is_finite(step + 1, loss=stats["loss"], grad_norm=grad_norm):  # same verdict on every rank
        state.optimizer.step()
    state.scheduler.step()
    return {**stats, "lr": state.scheduler.get_last_lr()[0], "grad_norm": grad_norm.item(), **state.guard.metrics()}


def evaluate_sets(model, data: RankingData, pad_id: int, batch_size: int) -> dict[str, float]:
    """Accuracy, loss and score distribution on the validation and held-out-labeler comparisons (those present)."""
    record = {}
    for name, encoded in (("valid", data.valid), ("heldout", data.heldout)):
        if encoded:
            with out_of_memory_advice("evaluation", "eval_batch_size"):
                result, scores = evaluate(model, encoded, pad_id, batch_size)
            record[f"{name}_accuracy"], record[f"{name}_loss"] = result["accuracy"], result["loss"]
            distribution = score_distribution(scores)
            record.update({f"{name}_score_{k}": distribution[k] for k in ("mean", "std", "p05", "p50", "p95")})
    return record


def run(cfg: Config) -> dict:
    stage = TrainingRun.start(cfg, "rm")
    runtime = stage.runtime

    # ---- build: data, model, optimizer
    tokenizer = load_tokenizer(cfg.model)
    data = build_data(cfg, tokenizer, stage)
    model = build_model(cfg, tokenizer, data, runtime.device)
    total_steps = training_steps(cfg, len(data.train), runtime.world_size)
    order = training_order(len(data.train), cfg.epochs, cfg.run.seed)
    state = TrainingState.adam_cosine(model, cfg, total_steps, 0, runtime)  # no warmup (App. C.2)
    stage.restore(state)

    # ---- loop: one optimizer step per batch of prompts; evaluate every eval_every steps and at the end
    pad_id = tokenizer.pad_token_id
    training_model = state.prepare(forward=raw_last_token_scores)
    model.train()
    with stage.metrics_writer() as metrics, stage.progress(total_steps) as bar:
        for step in range(stage.start_step, total_steps):
            batch = [data.train[i] for i in order[step * cfg.batch_size : (step + 1) * cfg.batch_size]]
            record = train_step(cfg, state, training_model, batch, pad_id, step)
            done = step + 1
            if done % cfg.eval_every == 0 or done == total_steps:
                record.update(evaluate_sets(model, data, pad_id, cfg.eval_batch_size))
                model.train()
                if "valid_accuracy" in record:
                    bar.set_postfix(loss=f"{record['loss']:.3f}", valid_acc=f"{record['valid_accuracy']:.3f}")
            metrics.log(done, **record)
            bar.update(1)
            if stage.checkpoint_due(done, total_steps):
                stage.save_checkpoint(done, state)

    # ---- save: the bias that centres the demonstrations, the final evaluation, the model
    return save(cfg, stage, model, tokenizer, data, total_steps)


def save(cfg: Config, stage: TrainingRun, model, tokenizer, data: RankingData, total_steps: int) -> dict:
    """Normalize to the demonstrations, evaluate, save the reward model and results.json; returns the results."""
    runtime, pad_id = stage.runtime, tokenizer.pad_token_id
    model.eval()
    normalization = normalize_to_demonstrations(model, data.demo_sequences, pad_id, cfg.eval_batch_size)
    normalization.update(source=data.normalization_source, dropped_over_length=data.demos_dropped)
    results: dict = {"heldout_labelers": list(cfg.heldout_labelers)}
    distribution_scores, distribution_source = None, "the demonstrations"
    for name, encoded in (("valid", data.valid), ("heldout", data.heldout)):
        if not encoded:
            results[name] = None
            continue
        result, scores = evaluate(model, encoded, pad_id, cfg.eval_batch_size)
        results[name] = result
        if distribution_scores is None:
            distribution_scores = scores + normalization["bias"]
            distribution_source = f"the responses of the {name} comparisons"  # PPO's guardrails read the range
    if distribution_scores is None:
        distribution_scores = score_sequences(model, data.demo_sequences, pad_id, cfg.eval_batch_size)
    runtime.save_pretrained(model, tokenizer, stage.out, "the reward model")  # every rank holds the same bias
    if cfg.baselines and not runtime.sharded:
        add_baselines(cfg, tokenizer, data, results, runtime.device)
    results.update(
        {
            "valid_accuracy": results["valid"]["accuracy"] if results["valid"] else None,
            "heldout_accuracy": results["heldout"]["accuracy"] if results["heldout"] else None,
            "normalization": normalization,
            "score_distribution": {**score_distribution(distribution_scores), "source": distribution_source},
            "data": {
                "source": data.source,
                "skipped_records": data.skipped_records,
                **{name: vars(counts) for name, counts in data.counts.items()},
            },
            "steps": total_steps,
            "seconds": stage.seconds(),
        }
    )
    if cfg.sandbox_round2_reward_model is not None:
        results["previous_rm_on_round2"] = previous_rm_on_round2(cfg, tokenizer, stage.out / SANDBOX_COMPARISONS)
    agreement_path = stage.out / SANDBOX_AGREEMENT
    if cfg.comparisons is None and agreement_path.exists():
        results["labeler_agreement_on_samples"] = json.loads(agreement_path.read_text())
    valid_text = f"{results['valid_accuracy']:.3f}" if results["valid_accuracy"] is not None else "n/a"
    heldout_text = f"{results['heldout_accuracy']:.3f}" if results["heldout_accuracy"] is not None else "n/a"
    return stage.finish(
        results,
        f"rm: pairwise accuracy valid {valid_text}, held-out labelers {heldout_text}; demonstrations mean "
        f"{normalization['mean_before']:+.4f} -> {normalization['mean_after']:+.2e}; saved to {stage.out}",
    )


def add_baselines(cfg: Config, tokenizer, data: RankingData, results: dict, device: torch.device) -> None:
    """``results[set]["baselines"]``: the initial model's likelihood and the length orderings of each held-out set's
    pairs (:mod:`instructrl.stages.rm_baselines`), beside the RM's accuracy on them."""
    initial = load_causal_lm(cfg.model, tokenizer).to(device)
    for name, encoded in (("valid", data.valid), ("heldout", data.heldout)):
        if results[name] is not None:
            results[name]["baselines"] = baseline_accuracies(
                initial, encoded, tokenizer.pad_token_id, cfg.eval_batch_size
            )
            print(f"rm: {name} baselines {results[name]['baselines']}", flush=True)
    del initial


def previous_rm_on_round2(cfg: Config, tokenizer, comparisons_path: Path) -> dict:
    """:func:`pairwise_metrics` of ``cfg.sandbox_round2_reward_model`` on every second-round comparison of
    ``comparisons_path``: how well the reward model a policy was trained against ranks that policy's samples, by
    the labelers' rankings."""
    skipped: dict[str, int] = {}
    round2 = [
        c
        for c in _load_comparison_file(str(comparisons_path), cfg, "comparisons", skipped)
        if c.meta.get("round") == 2
    ]
    encoded, _ = encode_comparisons(round2, tokenizer, cfg.max_prompt_tokens, cfg.max_response_tokens)
    if not encoded:
        return {"reward_model": cfg.sandbox_round2_reward_model, "accuracy": None, "pairs": 0}
    previous = load_reward_model(cfg.sandbox_round2_reward_model).eval()
    metrics, _ = evaluate(previous, encoded, tokenizer.pad_token_id, cfg.eval_batch_size)
    metrics.pop("accuracy_by_labeler")
    print(
        f"rm: {cfg.sandbox_round2_reward_model} ranks the second round's samples at {metrics['accuracy']:.3f} "
        f"± {metrics['accuracy_stderr']:.3f} against the labelers ({metrics['pairs']} pairs)",
        flush=True,
    )
    return {"reward_model": cfg.sandbox_round2_reward_model, **metrics}


def _best(comparison: Comparison) -> int:
    first = comparison.ranking[0]
    return first[0] if isinstance(first, tuple) else first


def training_order(n: int, epochs: int, seed: int) -> list[int]:
    """Indices of the training prompts in visiting order: one fresh permutation per epoch, fixed by the seed.

    The order depends only on (n, epochs, seed), so a resumed run finds its data position from the step alone.
    """
    order = []
    for epoch in range(epochs):
        permutation = list(range(n))
        random.Random(seed * 1000 + epoch).shuffle(permutation)
        order.extend(permutation)
    return order
