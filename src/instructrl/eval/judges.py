"""Judges: who decides which of two responses to the same prompt is better, and the win rates they give.

A judge looks at many comparisons at once, each ``(task, response_a, response_b)``, and returns one
outcome per comparison,

    o_i ∈ [0, 1]:  1 = A preferred,  0 = B preferred,  ½ = tie,

and the win rate of A over B is the mean outcome (ties count as half a win) with a 95% Wilson interval
(:func:`~instructrl.eval.stats.outcome_win_rate`). InstructGPT's headline metric is exactly this: how often
labelers prefer a policy's output to the 175B SFT model's on held-out customers' prompts (§4.1).

Judges
    * :class:`GoldJudge`: the world's hidden gold judgement (the sandbox's stand-in for the paper's human
      evaluators); the higher gold score wins, equal scores tie.
    * :class:`LabelerJudge`: each comparison is ranked by one simulated labeler drawn at random from
      ``labelers`` (``world.rank`` on the two responses); a tie group gives ½. With labelers whose
      rankings never trained the reward model this is the paper's held-out-labeler evaluation (Fig. 3).
    * :class:`RewardModelJudge`: the higher reward-model score r_θ(x, y) wins.
    * :class:`CallableJudge`: a user-supplied Python callable, named in the config as ``module:function``
      (a dotted module path, or a ``path/to/file.py``), of either kind:

      - pairwise: ``judge(prompt, response_a, response_b) -> float`` in [0, 1], how much ``response_a`` is
        preferred (1 = A, 0 = B, 0.5 = tie). Which policy is shown as A is decided by a seeded coin per
        comparison, so a judge that favours the first (or second) position favours neither policy; the
        outcome is mapped back to the policy under evaluation.
      - per-response scorer: ``score(prompt, response) -> float``, higher is better; the two scores of a
        comparison are compared, equal scores tie.

      ``kind="auto"`` picks pairwise for a callable with three required positional parameters and scorer for
      one with two.

Breakdowns: :meth:`Judgement.by` splits a judgement by a task attribute (``"type"``: plain vs few-shot,
``"category"``), giving one win rate per group.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from instructrl.errors import UserFacingError
from instructrl.eval.sandbox_eval import PolicyEval
from instructrl.eval.stats import WinRate, outcome_win_rate
from instructrl.utils.imports import import_callable
from instructrl.world import Task, World

TIE_TOLERANCE = 1e-9
"""Scores closer than this are a tie."""


class Judge(Protocol):
    """Decides comparisons; ``compare`` returns one outcome in [0, 1] per comparison (1 = A preferred)."""

    name: str

    def compare(self, tasks: Sequence[Task], responses_a: Sequence[str], responses_b: Sequence[str]) -> list[float]:
        """Outcomes o_i ∈ [0, 1] for A = ``responses_a[i]`` against B = ``responses_b[i]`` on ``tasks[i]``."""
        ...


def score_outcome(score_a: float, score_b: float, tolerance: float = TIE_TOLERANCE) -> float:
    """1 if A scores higher, 0 if B does, ½ when the scores are within ``tolerance``."""
    if score_a - score_b > tolerance:
        return 1.0
    if score_b - score_a > tolerance:
        return 0.0
    return 0.5


def _check_lengths(tasks: Sequence[Task], responses_a: Sequence[str], responses_b: Sequence[str]) -> None:
    if not len(tasks) == len(responses_a) == len(responses_b):
        raise ValueError(f"{len(tasks)} tasks but {len(responses_a)} and {len(responses_b)} responses")


class GoldJudge:
    """The world's hidden gold judgement: the higher ``world.gold_score`` wins by more than ``tie_margin``.

    The sandbox's gold score carries a tiny per-character tie-breaker so that rankings rarely tie; as a judge of
    "which response is better" a difference that small is no preference (two wordings of the same refusal), so
    scores within ``tie_margin`` are a tie, as they are for the simulated labelers (their tie threshold).
    """

    def __init__(self, world: World, name: str = "gold", tie_margin: float = TIE_TOLERANCE):
        self.world = world
        self.name = name
        self.tie_margin = tie_margin

    def compare(self, tasks: Sequence[Task], responses_a: Sequence[str], responses_b: Sequence[str]) -> list[float]:
        _check_lengths(tasks, responses_a, responses_b)
        gold = self.world.gold_score
        margin = max(self.tie_margin, TIE_TOLERANCE)
        return [score_outcome(gold(t, a), gold(t, b), margin) for t, a, b in zip(tasks, responses_a, responses_b)]


def ranking_outcome(ranking: Sequence[int | tuple[int, ...]]) -> float:
    """Outcome of a two-response ranking from ``world.rank``: 1 if response 0 is ranked first, 0 if response 1
    is, ½ when both are in one tie group."""
    first = ranking[0]
    if isinstance(first, tuple):
        return 0.5 if len(first) > 1 else ranking_outcome((first[0],))
    return 1.0 if first == 0 else 0.0


class LabelerJudge:
    """Simulated labelers: every comparison is ranked by one labeler drawn uniformly from ``labelers``.

    The draws and the labelers' judgement noise come from one generator seeded with ``seed`` at each
    ``compare`` call, so a comparison's outcome does not depend on what was judged before it.
    """

    def __init__(self, world: World, labelers: Sequence[int] | None = None, seed: int = 0, name: str = "labelers"):
        known = world.labelers()
        self.labelers = list(labelers) if labelers else list(known)
        unknown = sorted(set(self.labelers) - set(known))
        if unknown:
            raise UserFacingError(f"labelers {unknown} do not exist; this world has labelers {known}")
        self.world = world
        self.seed = seed
        self.name = name

    def compare(self, tasks: Sequence[Task], responses_a: Sequence[str], responses_b: Sequence[str]) -> list[float]:
        _check_lengths(tasks, responses_a, responses_b)
        rng = np.random.default_rng(self.seed)
        out = []
        for t, a, b in zip(tasks, responses_a, responses_b):
            labeler = self.labelers[int(rng.integers(len(self.labelers)))]
            out.append(ranking_outcome(self.world.rank(t, [a, b], labeler, rng)))
        return out


class RewardModelJudge:
    """The reward model: the higher r_θ(x, y) wins (``scorer`` is a :class:`~instructrl.models.scoring.RewardScorer`
    or anything with its ``score(prompts, responses)`` method)."""

    def __init__(self, scorer, name: str = "rm"):
        self.scorer = scorer
        self.name = name

    def compare(self, tasks: Sequence[Task], responses_a: Sequence[str], responses_b: Sequence[str]) -> list[float]:
        _check_lengths(tasks, responses_a, responses_b)
        prompts = [t.prompt for t in tasks]
        scores = self.scorer.score(prompts + prompts, list(responses_a) + list(responses_b)).tolist()  # (2n,)
        n = len(tasks)
        return [score_outcome(scores[i], scores[n + i]) for i in range(n)]


JudgeKind = Literal["auto", "pairwise", "scorer"]


def callable_kind(fn: Callable) -> Literal["pairwise", "scorer"]:
    """``"pairwise"`` for a callable taking three required positional arguments, ``"scorer"`` for two."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        raise UserFacingError(f"cannot read the signature of judge {fn!r}; set its kind explicitly") from None
    positional = [
        p
        for p in params
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is inspect.Parameter.empty
    ]
    if len(positional) == 3:
        return "pairwise"
    if len(positional) == 2:
        return "scorer"
    raise UserFacingError(
        f"judge {getattr(fn, '__name__', fn)!r} takes {len(positional)} required arguments; expected "
        "judge(prompt, response_a, response_b) or score(prompt, response), or set its kind explicitly"
    )


class CallableJudge:
    """A user-supplied judge function: pairwise ``judge(prompt, a, b) -> [0, 1]`` or scorer ``score(prompt, y)``.

    Pairwise judges see the two responses in a seeded random order per comparison (see the module docstring).
    """

    def __init__(self, fn: Callable, kind: JudgeKind = "auto", seed: int = 0, name: str = "custom"):
        self.fn = fn
        self.kind = callable_kind(fn) if kind == "auto" else kind
        self.seed = seed
        self.name = name

    def compare(self, tasks: Sequence[Task], responses_a: Sequence[str], responses_b: Sequence[str]) -> list[float]:
        _check_lengths(tasks, responses_a, responses_b)
        if self.kind == "scorer":
            return [
                score_outcome(self._score(t.prompt, a), self._score(t.prompt, b))
                for t, a, b in zip(tasks, responses_a, responses_b)
            ]
        swaps = np.random.default_rng(self.seed).random(len(tasks)) < 0.5  # (n,) True: B is shown first
        out = []
        for t, a, b, swap in zip(tasks, responses_a, responses_b, swaps):
            shown_first = self._preference(t.prompt, b, a) if swap else self._preference(t.prompt, a, b)
            out.append(1.0 - shown_first if swap else shown_first)
        return out

    def _score(self, prompt: str, response: str) -> float:
        value = self.fn(prompt, response)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UserFacingError(f"judge {self.name}: scorer returned {value!r}, expected a number") from None

    def _preference(self, prompt: str, first: str, second: str) -> float:
        value = self.fn(prompt, first, second)
        try:
            p = float(value)
        except (TypeError, ValueError):
            p = float("nan")
        if not 0.0 <= p <= 1.0:
            raise UserFacingError(
                f"judge {self.name}: returned {value!r}; a pairwise judge must return a number in [0, 1]"
            )
        return p


def load_callable(spec: str) -> Callable:
    """The callable named by ``"package.module:function"`` or ``"path/to/file.py:function"``."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise UserFacingError(f"judge {spec!r}: expected 'module:function' or 'path/to/file.py:function'")
    return import_callable(module_name, attr, f"judge {spec!r}")


# --------------------------------------------------------------------------- judgements and breakdowns


@dataclass
class Judgement:
    """One judge's outcomes for ``policy`` (A) against ``baseline`` (B) on the same tasks."""

    policy: str
    baseline: str
    judge: str
    tasks: list[Task]
    outcomes: list[float]

    def overall(self) -> WinRate:
        """Win rate of the policy over the baseline, ties ½, with a Wilson 95% interval."""
        return outcome_win_rate(self.outcomes)

    def by(self, attribute: str) -> dict[str, WinRate]:
        """Win rate per value of a task attribute (``"type"``, ``"category"``), groups in sorted order."""
        groups: dict[str, list[float]] = {}
        for task, outcome in zip(self.tasks, self.outcomes):
            groups.setdefault(str(getattr(task, attribute)), []).append(outcome)
        return {key: outcome_win_rate(groups[key]) for key in sorted(groups)}


def judge_pair(judge: Judge, policy: PolicyEval, baseline: PolicyEval) -> Judgement:
    """Judge ``policy``'s responses against ``baseline``'s, task by task (both must answer the same tasks)."""
    if [t.id for t in policy.tasks] != [t.id for t in baseline.tasks]:
        raise ValueError(f"{policy.name} and {baseline.name} were evaluated on different tasks")
    outcomes = judge.compare(policy.tasks, policy.responses, baseline.responses)
    return Judgement(policy.name, baseline.name, judge.name, list(policy.tasks), outcomes)
