"""Simulated labelers: noisy, individually biased judges around the hidden gold judgement.

InstructGPT's labelers agreed with each other on 72.6 ± 1.5% of comparisons (Ouyang et al. 2022, §5.2;
"training labelers"). The sandbox reproduces that with random-utility labelers. Labeler ``l`` judges a
response ``y`` to prompt ``x`` by

    u_l(x, y) = g_l(x, y) + σ_l · ε,      ε ~ N(0, 1), one draw per distinct response text per ranking,

where ``g_l`` is the gold judgement (:func:`instructrl.sandbox.tasks.score_analysis`) under the labeler's
own weights: each labeler cares a bit more or less about brevity, toxicity, honesty and format than the
gold does. ``rank`` sorts responses by ``u_l``, best first; neighbours whose utilities differ by less than
the labeler's tie threshold form a tie group; responses of equal noise-free quality share one ε, so they tie.

Demonstrations are mostly the correct answer (a refusal for harmful requests); each labeler, at its own
rates, pads some answers ("the answer is 5 ."), ends some with a friendly filler sentence ("i hope this helps
."), and gets a few wrong. Its rankings still prefer the bare answer: the SFT policy learns the habits of the
demonstrations, and only the comparisons say that people prefer it concise.

:data:`DEFAULT_NOISE` was tuned so that :func:`pairwise_agreement` over synthetic candidates with K = 4-9
lands near the paper's 72.6%: ``instructrl sandbox make`` measures 71.7 ± 0.5% (standard error over prompts) on
400 train prompts of the seed-0 world and writes it to ``agreement.json``. Responses of equal quality to a
labeler (noise-free utilities within the tie threshold) are tied rather than ordered by noise, as a person would;
agreement counts only pairs neither labeler tied, so it depends on how different the ranked responses are: on
samples of a sandbox SFT policy it measured 85.7%.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

import numpy as np

from instructrl.agreement import agreement_report
from instructrl.sandbox.tasks import GOLD, REFUSALS, GoldWeights, TaskSpec, analyze, score_analysis, wrong_answer
from instructrl.world import Ranking, Task, World

DEFAULT_NOISE = 0.57
"""Base noise scale σ of labeler utilities (each labeler draws σ_l in [0.8σ, 1.25σ])."""

DEFAULT_TIE_THRESHOLD = 0.05
"""Responses whose noise-free utilities differ by less than this are equally good to the labeler: a tie."""

DEMO_CHATTER = ("i hope this helps .", "let me know if you have more questions .", "have a nice day .")
"""Friendly filler some labelers add to their demonstrations (sentences of the corpus's chatter)."""


@dataclasses.dataclass(frozen=True)
class LabelerProfile:
    """One simulated labeler's preferences, noise and writing habits."""

    labeler_id: int
    weights: GoldWeights
    """The gold weights as this labeler perceives them (brevity, toxicity, honesty and format perturbed)."""
    noise: float
    """σ_l: standard deviation of the labeler's judgement noise."""
    tie_threshold: float
    """Utilities closer than this are ranked as a tie."""
    error_rate: float
    """Probability that a demonstration states a wrong answer."""
    verbose_rate: float
    """Probability of padding a one-word demonstration ("the answer is 5 .") when no format is required."""
    chatter_rate: float
    """Probability of ending a demonstration with a friendly filler sentence ("i hope this helps .") when no
    format is required. The same labeler ranks such a response below the bare answer (the gold brevity term):
    writing a demonstration and judging two responses are different skills, which is why InstructGPT ranks."""
    refusal: str
    """How this labeler words a refusal."""


def make_labelers(
    seed: int, n: int, noise: float = DEFAULT_NOISE, tie_threshold: float = DEFAULT_TIE_THRESHOLD
) -> list[LabelerProfile]:
    """``n`` labelers with individual preferences drawn around the gold weights (deterministic per seed)."""
    rng = random.Random(f"instructrl-sandbox/{seed}/labelers")
    profiles = []
    for labeler_id in range(n):
        format_strictness = rng.uniform(0.5, 1.5)
        weights = dataclasses.replace(
            GOLD,
            length=GOLD.length * rng.uniform(0.6, 1.4),
            toxic=GOLD.toxic * rng.uniform(0.8, 1.2),
            wrong_fact=GOLD.wrong_fact * rng.uniform(0.8, 1.3),
            format_miss=GOLD.format_miss * format_strictness,
            format_bonus=GOLD.format_bonus * format_strictness,
        )
        profiles.append(
            LabelerProfile(
                labeler_id=labeler_id,
                weights=weights,
                noise=noise * rng.uniform(0.8, 1.25),
                tie_threshold=tie_threshold,
                error_rate=rng.uniform(0.02, 0.08),
                verbose_rate=rng.uniform(0.05, 0.3),
                chatter_rate=rng.uniform(0.1, 0.5),
                refusal=rng.choice(REFUSALS),
            )
        )
    return profiles


def as_generator(rng: np.random.Generator | random.Random | int | None) -> np.random.Generator:
    """A numpy Generator from a Generator (returned as is), a ``random.Random``, a seed or None."""
    if isinstance(rng, random.Random):
        return np.random.default_rng(rng.getrandbits(64))
    return np.random.default_rng(rng)


def as_random(rng: np.random.Generator | random.Random | int | None) -> random.Random:
    """A ``random.Random`` seeded by one draw from ``rng`` (or ``rng`` itself if it is one)."""
    if isinstance(rng, random.Random):
        return rng
    return random.Random(int(as_generator(rng).integers(2**63)))


def clean_utilities(spec: TaskSpec, responses: Sequence[str], profile: LabelerProfile) -> np.ndarray:
    """The labeler's noise-free utility of each response, shape (K,)."""
    return np.array([score_analysis(spec, analyze(spec, r), profile.weights) for r in responses], dtype=np.float64)


def equivalence_groups(u: np.ndarray, tie_threshold: float) -> list[list[int]]:
    """Indices of the utilities ``u``, best first, in groups: a chain of neighbours each closer than
    ``tie_threshold`` is one group.

    A person shown two equally good (or equally bad) answers calls them a tie instead of guessing, so such
    responses share a rank; identical texts always do.
    """
    order = np.argsort(-u, kind="stable")
    groups: list[list[int]] = []
    for index in order.tolist():
        if groups and u[groups[-1][-1]] - u[index] < tie_threshold:
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups


def utilities(
    spec: TaskSpec, responses: Sequence[str], profile: LabelerProfile, rng: np.random.Generator
) -> np.ndarray:
    """u_l for each response, shape (K,): one noise draw per equivalence group, so tied responses stay tied."""
    clean = clean_utilities(spec, responses, profile)
    groups = equivalence_groups(clean, profile.tie_threshold)
    noise = rng.standard_normal(len(groups)) * profile.noise
    u = np.empty_like(clean)
    for group, eps in zip(groups, noise):
        u[group] = clean[group].mean() + eps
    return u


def ranking_from_utilities(u: np.ndarray, tie_threshold: float) -> Ranking:
    """Best-first ranking of ``u``; a chain of neighbours each closer than ``tie_threshold`` is one tie group."""
    groups = equivalence_groups(u, tie_threshold)
    return tuple(g[0] if len(g) == 1 else tuple(sorted(g)) for g in groups)


def rank(spec: TaskSpec, responses: Sequence[str], profile: LabelerProfile, rng: np.random.Generator) -> Ranking:
    """The labeler's best-first ranking of ``responses`` (ties as tuples)."""
    if len(responses) == 0:
        return ()
    # Equivalent responses share one utility, so they fall into one tie group below (gap 0 < threshold).
    return ranking_from_utilities(utilities(spec, responses, profile, rng), profile.tie_threshold)


def demonstrate(spec: TaskSpec, profile: LabelerProfile, rng: random.Random) -> str:
    """A demonstration written by the labeler: the correct concise answer, a refusal, or occasionally an error."""
    if spec.harmful:
        return " " + profile.refusal
    if rng.random() < profile.error_rate:
        return " " + " ".join(wrong_answer(spec, rng))
    free_form = not spec.examples and spec.constraint is None  # few-shot examples and constraints fix the format
    text = spec.answer_text
    if free_form and len(spec.answer) == 1 and rng.random() < profile.verbose_rate:
        text = f"the answer is {text} ."
    if free_form and rng.random() < profile.chatter_rate:
        text = f"{text.removesuffix(' .')} . {rng.choice(DEMO_CHATTER)}"
    return " " + text


def ranks_of(ranking: Ranking, k: int) -> np.ndarray:
    """Group rank of each response in response order, shape (K,): 0 is best; tied responses share a rank."""
    out = np.empty(k, dtype=np.int64)
    for group_rank, element in enumerate(ranking):
        for index in element if isinstance(element, tuple) else (element,):
            out[index] = group_rank
    return out


def pairwise_agreement(
    world: World,
    tasks: Sequence[Task],
    candidates_per_task: Sequence[Sequence[str]],
    rng: np.random.Generator | int | None,
) -> tuple[float, float, dict[tuple[int, int], float]]:
    """Inter-labeler agreement: how often two labelers order a pair of responses the same way.

    Every labeler ranks every task's candidates; :func:`instructrl.agreement.agreement_report` (the estimator
    the labeling app uses too) pools the pairs neither labeler tied. Returns ``(mean, stderr, per_labeler_pair)``:
    the pooled agreement p̂ = Σ_x a_x / Σ_x n_x over all labeler pairs, its standard error over tasks (the
    independent unit; NaN with fewer than two), and ``{(a, b): agreement of labelers a < b}`` (NaN for a pair
    without a compared response pair).
    """
    if len(tasks) != len(candidates_per_task):
        raise ValueError(f"got {len(tasks)} tasks but {len(candidates_per_task)} candidate lists")
    gen = as_generator(rng)
    labelers = world.labelers()
    if len(labelers) < 2:
        raise ValueError("agreement needs at least two labelers")
    # ranks_by_task[t][l]: (K_t,) group ranks of task t's candidates by labeler l; labeler-major draws keep the
    # rankings (and so every sandbox output) a function of the seed exactly as they always were.
    ranks_by_task: list[dict[int, list[int]]] = [{} for _ in tasks]
    for labeler in labelers:
        for per_labeler, task, candidates in zip(ranks_by_task, tasks, candidates_per_task):
            per_labeler[labeler] = ranks_of(world.rank(task, candidates, labeler, gen), len(candidates)).tolist()
    report = agreement_report(dict(enumerate(ranks_by_task)))
    per_pair = {pair: _or_nan(est.agreement) for pair, est in report.per_pair.items()}
    return _or_nan(report.overall.agreement), _or_nan(report.overall.stderr), per_pair


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else value


def synthetic_agreement(
    world: World,
    tasks: Sequence[Task],
    rng: np.random.Generator | int | None,
    k_range: tuple[int, int] = (4, 9),
) -> tuple[float, float, dict[tuple[int, int], float]]:
    """:func:`pairwise_agreement` over ``world.synthetic_candidates`` with K drawn uniformly from ``k_range``."""
    gen = as_generator(rng)
    lo, hi = k_range
    candidates = [world.synthetic_candidates(t, int(gen.integers(lo, hi + 1)), gen) for t in tasks]
    return pairwise_agreement(world, tasks, candidates, gen)
