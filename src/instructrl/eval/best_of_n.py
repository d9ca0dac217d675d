"""Best-of-n sampling against the reward model: the simplest way to optimize a proxy, and a baseline for RL.

Draw n responses from the initial policy, keep the one the reward model scores highest. Its KL from the
initial policy has a closed form (Stiennon et al. 2020, App. G.3; used by Gao et al. 2022):

    KL_bon(n) = ln n − (n − 1) / n

(an upper bound, exact when the n scores have no ties; Beirami et al. 2024).

For the over-optimization curve we draw N samples per prompt once and compute, for every n ≤ N, the
*expected* gold and proxy score of best-of-n over all n-subsets of the N samples (the unbiased estimator
Gao et al. take from Nakano et al. 2021): with the N samples sorted by proxy score ascending, the i-th
(1-based) is the best of a uniformly random n-subset with probability

    P(i) = C(i − 1, n − 1) / C(N, n),

so E[score of best-of-n] = Σ_i P(i) · score_i. Best-of-N itself (the argmax of all N) is also a policy
whose responses enter the win-rate table like any other.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from instructrl.data.loading import encode_prompts
from instructrl.eval.overopt import (
    OverOptCurve,
    gold_scores,
    load_policy,
    proxy_scores,
    relative_points,
    sample_responses,
)
from instructrl.eval.sandbox_eval import PolicyEval, policy_eval_from_responses
from instructrl.world import Task, World


def bon_kl(n: int) -> float:
    """KL(π_bon ‖ π) = ln n − (n − 1)/n nats for best-of-n (0 at n = 1)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def best_of_n_weights(big_n: int, n: int) -> list[float]:
    """P(i) = C(i−1, n−1) / C(N, n) for i = 1..N: the chance that the i-th lowest-scored of N samples is the
    best of a random n-subset. Sums to 1 (hockey-stick identity)."""
    if not 1 <= n <= big_n:
        raise ValueError(f"need 1 <= n <= N, got n={n}, N={big_n}")
    total = math.comb(big_n, n)
    return [math.comb(i - 1, n - 1) / total for i in range(1, big_n + 1)]


def expected_best_of_n(proxy: Sequence[float], values: Sequence[float], n: int) -> float:
    """E[value of the response with the highest proxy score among n drawn without replacement from the N]."""
    if len(proxy) != len(values):
        raise ValueError(f"{len(proxy)} proxy scores but {len(values)} values")
    order = sorted(range(len(proxy)), key=lambda i: proxy[i])  # ascending proxy
    weights = best_of_n_weights(len(proxy), n)
    return sum(w * values[i] for w, i in zip(weights, order))


def curve_ns(big_n: int) -> list[int]:
    """1, 2, 4, … up to N, and N itself."""
    ns, n = [], 1
    while n < big_n:
        ns.append(n)
        n *= 2
    return ns + [big_n]


@dataclass
class BestOfNSamples:
    """N scored samples per prompt: ``texts[p][j]``, ``proxy[p][j]``, ``gold[p][j]``, ``stopped[p][j]``."""

    tasks: list[Task]
    texts: list[list[str]]
    stopped: list[list[bool]]
    proxy: list[list[float]]
    gold: list[list[float]]

    @property
    def n(self) -> int:
        return len(self.texts[0]) if self.texts else 0

    def chosen(self) -> list[int]:
        """Index of the highest-proxy sample of each prompt (the first one on ties)."""
        return [max(range(len(p)), key=lambda j: (p[j], -j)) for p in self.proxy]

    def policy_eval(self, world: World, name: str | None = None) -> PolicyEval:
        """The best-of-N policy (argmax of the proxy over all N samples), judged like any other policy."""
        picks = self.chosen()
        return policy_eval_from_responses(
            name or f"best-of-{self.n}",
            world,
            self.tasks,
            [t[j] for t, j in zip(self.texts, picks)],
            [s[j] for s, j in zip(self.stopped, picks)],
        )

    def curve(self, run: str = "best-of-n", ns: Sequence[int] | None = None) -> OverOptCurve:
        """Expected gold and proxy of best-of-n for each n (default :func:`curve_ns`) against d = √KL_bon(n),
        relative to n = 1 (the initial policy), with the BoN-form fits."""
        raw = []
        for n in ns or curve_ns(self.n):
            gold = [expected_best_of_n(p, g, n) for p, g in zip(self.proxy, self.gold)]
            proxy = [expected_best_of_n(p, p, n) for p in self.proxy]
            raw.append((f"n={n}", n, bon_kl(n), sum(gold) / len(gold), sum(proxy) / len(proxy)))
        return OverOptCurve.fitted("bon", run, relative_points("bon", run, raw))


def sample_best_of_n(
    model_dir: str | Path,
    world: World,
    tasks: Sequence[Task],
    scorer,
    n: int,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    missing_eos_score: float | None = -1.0,
    seed: int = 0,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> BestOfNSamples:
    """Draw ``n`` responses per task from the policy at ``model_dir`` and score each with the reward model
    (``missing_eos_score`` for responses that never emitted EOS) and the gold judgement."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    model, tokenizer = load_policy(model_dir, torch.device(device))
    prompt_ids = encode_prompts(tokenizer, [t.prompt for t in tasks])
    samples = sample_responses(model, tokenizer, prompt_ids, n, max_new_tokens, temperature, seed, batch_size)
    proxy = proxy_scores(scorer, prompt_ids, samples, missing_eos_score)
    gold = gold_scores(world, tasks, samples)

    def per_prompt(values: list) -> list[list]:
        return [values[p * n : (p + 1) * n] for p in range(len(tasks))]  # samples are prompt-major

    return BestOfNSamples(
        list(tasks), per_prompt(samples.texts), per_prompt(samples.stopped), per_prompt(proxy), per_prompt(gold)
    )


@dataclass(frozen=True)
class ProxyGoldRow:
    """How often the reward model (proxy) orders two samples of one prompt as the gold judgement does."""

    category: str
    """Task category, or "all"."""
    pairs: int
    """Pairs of samples of one prompt whose gold scores differ by more than the tie margin."""
    agreement: float | None
    """Fraction of those the proxy orders the same way (proxy ties count ½); None without pairs."""
    right_wrong_pairs: int
    """Pairs where exactly one sample is right (harmless: the correct answer; harmful: a refusal)."""
    right_wrong_agreement: float | None
    """Fraction of those where the proxy scores the right one higher (ties ½): whether the RM sees content."""


def proxy_gold_agreement(samples: BestOfNSamples, world: World, margin: float = 0.0) -> list[ProxyGoldRow]:
    """Reward model vs gold on all pairs of the N samples of each prompt, per category and overall.

    For a pair (i, j) with |gold_i − gold_j| > ``margin`` the proxy agrees when sign(proxy_i − proxy_j) =
    sign(gold_i − gold_j) (a proxy tie counts ½). The right-vs-wrong subset asks the question the win rate
    depends on once style is fixed: does the reward model prefer the correct answer (or the refusal of a
    harmful request) to a wrong one? Needs the world's ``analysis`` extra (correct / refused flags).
    """
    tallies: dict[str, list[float]] = {}  # category -> [pairs, agreed, right-wrong pairs, agreed]

    def add(category: str, key: int, value: float) -> None:
        for name in (category, "all"):
            t = tallies.setdefault(name, [0, 0.0, 0, 0.0])
            t[key] += 1
            t[key + 1] += value

    for task, texts, proxy, gold in zip(samples.tasks, samples.texts, samples.proxy, samples.gold):
        flag = "refused" if task.category == "harmful" else "correct"
        right = [bool(world.analysis(task, text)[flag]) for text in texts]
        for i in range(len(texts)):
            for j in range(i + 1, len(texts)):
                proxy_sign = (proxy[i] > proxy[j]) - (proxy[i] < proxy[j])
                if abs(gold[i] - gold[j]) > margin:
                    add(task.category, 0, 0.5 + 0.5 * proxy_sign * (1 if gold[i] > gold[j] else -1))
                if right[i] != right[j]:
                    add(task.category, 2, 0.5 + 0.5 * proxy_sign * (1 if right[i] else -1))
    categories = sorted(c for c in tallies if c != "all") + (["all"] if "all" in tallies else [])
    return [
        ProxyGoldRow(
            name,
            int(tallies[name][0]),
            tallies[name][1] / tallies[name][0] if tallies[name][0] else None,
            int(tallies[name][2]),
            tallies[name][3] / tallies[name][2] if tallies[name][2] else None,
        )
        for name in categories
    ]
