"""Guardrails against reward hacking: checks of every PPO rollout that need no gold judge.

A policy that exploits its reward model shows it in its own samples before any judge sees them: it drifts far
from π^SFT (KL per response), narrows onto a few outputs (per-token entropy, the fraction of distinct
responses in a batch), writes outputs that never end (the share without EOS), and earns reward-model scores
above anything the reward model was trained to rank. Each check compares one number of the rollout with a
threshold of ``guardrails`` in the PPO config (:class:`~instructrl.stages.ppo_config.GuardrailSettings`); the
relative ones compare with the SFT policy's value, measured on iteration 1's rollout (sampled before the first
update). The checks only observe: they read the rollout and the metrics and draw no random numbers.

What the PPO loop does with them (:func:`instructrl.stages.ppo.run`): :meth:`Guardrails.check` after every
iteration adds ``guardrails/<check>`` flags (1 = failed) to the metrics and prints a warning naming the
check, the value, the iteration and what to change when a check starts failing; ``guardrails.stop`` ends the
run once a check has failed ``patience`` iterations in a row; :class:`BestPolicy` keeps the released weights
that sampled the last rollout before the first failed check, saved as ``policy_best/``. :func:`startup_warnings`
names settings known to collapse small policies, before training starts.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from instructrl.stages.ppo_config import Config, GuardrailSettings

COLLAPSING_KL_COEF = 0.02
"""A fixed β at or below this collapsed small policies: the sandbox's 0.94M-parameter policy lost to SFT at the
paper's 0.02 (``kl_coef`` in src/instructrl/demo.py; benchmarks/RESULTS.md)."""

KL_TREND_WINDOW = 5
"""Iterations over which a KL warning reports the KL's change."""


# --------------------------------------------------------------------------- the measurements


@torch.no_grad()
def distinct_fraction(response: torch.Tensor, response_mask: torch.Tensor) -> float:
    """Distinct responses / batch size. Two responses are the same when their tokens up to and including the
    first EOS are (what follows, PAD, is ignored); a cut response without EOS differs from a finished one."""
    rows = torch.where(response_mask.bool(), response, torch.full_like(response, -1))
    return torch.unique(rows, dim=0).shape[0] / rows.shape[0]


@torch.no_grad()
def share_above(scores: torch.Tensor, has_eos: torch.Tensor, upper: float) -> float | None:
    """The share of the finished responses (with EOS) whose score exceeds ``upper``; None when none finished
    (the reward model's score of an unfinished response means nothing [ppo-details: reward-at-eos])."""
    finished = scores[has_eos.bool()]
    if finished.numel() == 0:
        return None
    return (finished > upper).float().mean().item()


@dataclass(frozen=True)
class ScoreRange:
    """The reward model's scores of the responses it was evaluated on (normalized, as PPO reads them)."""

    low: float
    high: float
    source: str
    """What the reward model scored and where the range was read, for messages."""


def read_score_range(reward_model_dir: str | Path) -> ScoreRange | None:
    """The min and max of ``score_distribution`` in the reward model's results.json (written by
    ``instructrl rm``); None when the file or the entry is missing."""
    path = Path(reward_model_dir) / "results.json"
    try:
        distribution = json.loads(path.read_text())["score_distribution"]
        low, high = float(distribution["min"]), float(distribution["max"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return ScoreRange(low, high, f"{distribution.get('source', 'its evaluation comparisons')} ({path})")


# --------------------------------------------------------------------------- the checks


@dataclass(frozen=True)
class Check:
    """One guardrail: the number it watches (``value`` of an iteration's metrics) and what to change."""

    name: str
    what: str
    """The watched number, in words."""
    value: Callable[[Mapping[str, Any]], float | None]
    higher_is_worse: bool
    advice: str
    """What to change when it fails."""


def _metric(key: str, transform: Callable[[float], float] = float) -> Callable[[Mapping[str, Any]], float | None]:
    def read(record: Mapping[str, Any]) -> float | None:
        value = record.get(key)
        return None if value is None else transform(value)

    return read


_STOP = "stop earlier (fewer iterations, or guardrails.stop=true; policy_best/ keeps the last policy that passed)"
_RERANK = (
    "another round of rankings of the policy's own samples to retrain the reward model on "
    "(rm's sandbox_round2_policy for a world; demo: rounds=2)"
)
CHECKS: dict[str, Check] = {
    check.name: check
    for check in (
        Check("kl", "KL(π ‖ π^SFT) per response, nats", _metric("objective/kl"), True,
              f"raise kl.coef (β) or use kl.adaptive=true with a lower kl.target; {_STOP}"),
        Check("entropy", "per-token entropy of the policy", _metric("policy/entropy"), False,
              f"raise kl.coef (β) or lower kl.target; {_STOP}"),
        Check("distinct", "fraction of distinct responses in the batch", _metric("response/distinct_fraction"),
              False, f"the reward model likely pays for one output: raise kl.coef (β); {_RERANK}; {_STOP}"),
        Check("missing_eos", "share of responses without EOS", _metric("response/eos_rate", lambda v: 1.0 - v),
              True, f"keep missing_eos_score below typical scores; raise kl.coef (β); {_STOP}"),
        Check("rm_range", "share of finished responses scored above the reward model's range",
              _metric("guardrails/score_above_rm_max"), True,
              f"the reward model is extrapolating and likely exploited: {_RERANK}; raise kl.coef (β); {_STOP}"),
    )
}  # fmt: skip
"""The checks, in the order they are reported."""


RELATIVE_CHECKS = ("entropy", "distinct", "missing_eos", "rm_range")
"""Checks whose threshold is set from the SFT policy's value (the first measured, normally iteration 1)."""


def flag_key(name: str) -> str:
    """The metrics key of a check's flag: 1.0 on an iteration that failed it, 0.0 on one that passed."""
    return f"guardrails/{name}"


class Guardrails:
    """The checks of one PPO run: thresholds, the SFT policy's values (iteration 1) and the failure streaks."""

    def __init__(self, settings: GuardrailSettings, score_range: ScoreRange | None):
        self.settings = settings
        self.score_range = score_range
        self.baseline: dict[str, float] = {}
        """The SFT policy's value of each relative check, from the first rollout checked."""
        self.streak: dict[str, int] = {name: 0 for name in CHECKS}
        """Iterations in a row each check has failed (up to now)."""
        self.first_message: dict[str, str] = {}
        """The warning each check printed when it first failed (results.json)."""
        self.recent_kl: list[float] = []
        self.notes: list[str] = []
        """Warnings about the setup seen in the first rollouts (results.json)."""

    def check(self, iteration: int, metrics: Mapping[str, Any], rollout) -> dict[str, float]:
        """Check the rollout of ``iteration`` (its ``metrics`` from :func:`~.ppo_rollout.rollout_metrics`);
        print a warning for every check that starts failing and a note for every one that passes again.
        Returns the metrics to add: a flag per active check and the share above the reward model's range."""
        out: dict[str, float] = {}
        if self.score_range is not None:
            share = share_above(rollout.raw_scores, rollout.has_eos, self.score_range.high)
            if share is not None:
                out["guardrails/score_above_rm_max"] = share
        record = {**metrics, **out}
        for name in RELATIVE_CHECKS:  # the SFT policy's value: the first one measured
            value = CHECKS[name].value(record)
            if name not in self.baseline and value is not None:
                self.baseline[name] = value
                if name == "rm_range" and value > (self.settings.max_above_rm_range_rise or 1.0):
                    self.notes.append(
                        f"{value:.0%} of the SFT policy's own finished samples (iteration {iteration}) score above "
                        f"{self.score_range.high:+.3f}, the highest score the reward model gave "
                        f"{self.score_range.source}: the reward model was not trained on samples like the "
                        f"policy's; rank samples of this policy and retrain it"
                    )
                    print(f"WARNING {self.notes[-1]}", flush=True)
        kl = CHECKS["kl"].value(record)
        for name, check in CHECKS.items():
            limit = self.threshold(name)
            value = check.value(record)
            if limit is None or value is None:
                continue
            failed = value > limit if check.higher_is_worse else value < limit
            out[flag_key(name)] = float(failed)
            if failed and self.streak[name] == 0:
                message = f"guardrail '{name}' at iteration {iteration}: {self.describe(name, value, limit)}"
                message += f"; what to change: {check.advice}"
                self.first_message.setdefault(name, message)
                print(f"WARNING {message}", flush=True)
            elif not failed and self.streak[name] > 0:
                print(f"guardrail '{name}' passes again at iteration {iteration} ({value:.4g})", flush=True)
            self.streak[name] = self.streak[name] + 1 if failed else 0
        if kl is not None:
            self.recent_kl = [*self.recent_kl, kl][-KL_TREND_WINDOW:]
        return out

    def threshold(self, name: str) -> float | None:
        """The value at which check ``name`` fails, or None when it is off (or lacks what it needs)."""
        s, base = self.settings, self.baseline
        if name == "kl":
            return s.max_kl
        if name == "entropy" and s.min_entropy_ratio is not None and base.get("entropy") is not None:
            return s.min_entropy_ratio * base["entropy"]
        if name == "distinct" and s.min_distinct_ratio is not None and base.get("distinct") is not None:
            return s.min_distinct_ratio * base["distinct"]
        if name == "missing_eos" and s.max_missing_eos_rise is not None and base.get("missing_eos") is not None:
            return base["missing_eos"] + s.max_missing_eos_rise
        if name == "rm_range" and s.max_above_rm_range_rise is not None and base.get("rm_range") is not None:
            return base["rm_range"] + s.max_above_rm_range_rise
        return None

    def describe(self, name: str, value: float, limit: float) -> str:
        """The failed check in words: the value, the threshold and where the threshold comes from."""
        s, base = self.settings, self.baseline
        if name == "kl":
            trend = ""
            if self.recent_kl:
                change = value - self.recent_kl[0]
                direction = "up" if change >= 0 else "down"
                trend = f", {direction} {abs(change):.1f} over the last {len(self.recent_kl)} iterations"
            return f"KL(π ‖ π^SFT) is {value:.1f} nats per response{trend} (guardrails.max_kl = {limit:g})"
        if name == "entropy":
            return (f"per-token entropy {value:.3f} is {value / base['entropy']:.0%} of the SFT policy's "
                    f"{base['entropy']:.3f} (guardrails.min_entropy_ratio = {s.min_entropy_ratio:g})")  # fmt: skip
        if name == "distinct":
            return (f"{value:.0%} of the batch's responses are distinct, against {base['distinct']:.0%} for the "
                    f"SFT policy (guardrails.min_distinct_ratio = {s.min_distinct_ratio:g})")  # fmt: skip
        if name == "missing_eos":
            return (f"{value:.0%} of the responses never end, against {base['missing_eos']:.0%} for the SFT "
                    f"policy (guardrails.max_missing_eos_rise = {s.max_missing_eos_rise:g})")  # fmt: skip
        assert self.score_range is not None
        high, source = self.score_range.high, self.score_range.source
        return (f"{value:.0%} of the finished responses score above {high:+.3f}, the highest score the reward model "
                f"gave {source}, against {base['rm_range']:.0%} for the SFT policy "
                f"(guardrails.max_above_rm_range_rise = {s.max_above_rm_range_rise:g})")  # fmt: skip

    @property
    def clean(self) -> bool:
        """Whether the last rollout checked passed every check."""
        return not any(self.streak.values())

    def stop_reason(self) -> str | None:
        """Why ``guardrails.stop`` ends the run now, or None."""
        if not self.settings.stop:
            return None
        failing = [name for name, n in self.streak.items() if n >= self.settings.patience]
        if not failing:
            return None
        return f"guardrail(s) {', '.join(failing)} failed {self.settings.patience} iterations in a row"

    def state_dict(self) -> dict[str, Any]:
        return {"baseline": self.baseline, "streak": self.streak, "first_message": self.first_message,
                "recent_kl": self.recent_kl, "notes": self.notes}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.baseline = dict(state["baseline"])
        self.streak = {**self.streak, **state["streak"]}
        self.first_message = dict(state["first_message"])
        self.recent_kl = list(state["recent_kl"])
        self.notes = list(state["notes"])


def summarize(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per check that failed at least once in these metrics.jsonl records: how often, first and last iteration,
    its value when it first failed and its worst value, and what to change (results.json, the eval report)."""
    out = []
    for name, check in CHECKS.items():
        failed = [r for r in records if r.get(flag_key(name))]
        if not failed:
            continue
        values = [v for v in (check.value(r) for r in failed) if v is not None]
        out.append(
            {
                "check": name,
                "what": check.what,
                "iterations_failed": len(failed),
                "first_iteration": failed[0].get("step"),
                "last_iteration": failed[-1].get("step"),
                "value_first": check.value(failed[0]),
                "value_worst": (max if check.higher_is_worse else min)(values) if values else None,
                "advice": check.advice,
            }
        )
    return out


def checked(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The checks that ran in these metrics.jsonl records (an older run has none)."""
    return [name for name in CHECKS if any(flag_key(name) in r for r in records)]


# --------------------------------------------------------------------------- start-up


def startup_warnings(cfg: Config, policy_parameters: int, score_range: ScoreRange | None, rm_scores: bool) -> list:
    """Settings known to make small policies exploit their reward model, and checks that cannot run (strings)."""
    guard, kl = cfg.guardrails, cfg.kl
    warnings = []
    if not kl.adaptive and kl.coef <= COLLAPSING_KL_COEF and policy_parameters < guard.small_policy_parameters:
        warnings.append(
            f"kl.coef = {kl.coef:g} (fixed) on a {policy_parameters / 1e6:.2f}M-parameter policy: the paper's "
            f"β = 0.02 was used on 1.3B-175B policies; on 0.94M-parameter sandbox policies it let the policy "
            "exploit its reward model and lose to SFT by the gold judge (src/instructrl/demo.py kl_coef, "
            "benchmarks/RESULTS.md). Consider kl.coef=0.1 (the demo's) or kl.adaptive=true with kl.target=6 "
            "(silence: guardrails.small_policy_parameters=0)"
        )
    if kl.adaptive and guard.max_kl is not None and kl.target > guard.max_kl:
        warnings.append(f"kl.target = {kl.target:g} exceeds guardrails.max_kl = {guard.max_kl:g}: the controller "
                        "steers toward a KL the KL check warns about")  # fmt: skip
    if rm_scores and score_range is None and guard.max_above_rm_range_rise is not None:
        warnings.append(f"no score_distribution in {Path(cfg.reward_model) / 'results.json'}: the check of the "
                        "reward model's score range (guardrails.max_above_rm_range_rise) is off")  # fmt: skip
    return warnings


# --------------------------------------------------------------------------- the best policy


def released_weights(run) -> dict[str, torch.Tensor]:
    """The weights a PPO run releases: the EMA when ``ema_decay`` is set, else the live policy's."""
    if run.actor.ema is not None:
        return run.actor.ema.shadow
    return dict(run.models.policy.named_parameters())


class BestPolicy:
    """The model selection that needs no gold judge: the released weights that sampled the last rollout before
    the first failed check (the newest of all, when no check fails).

    Iteration k's rollout is sampled by the weights after k − 1 updates, so those weights (kept as the
    ``candidate`` when iteration k − 1 ended) become the best when iteration k passes. Iteration 1's rollout
    comes from the SFT policy itself (``iteration`` 0). The final weights are never checked (no rollout
    follows them), so a run that passes every check keeps the weights of its last rollout, one update before
    the end. The first failure freezes the best: a check that fails and passes again by turns (an entropy
    near its threshold while the policy collapses) would otherwise keep moving it past the collapse. The copies
    live in CPU memory."""

    def __init__(self, run):
        self.candidate = self._copy(released_weights(run), None)
        self.candidate_iteration = run.iteration
        self.best: dict[str, torch.Tensor] | None = None
        self.iteration: int | None = None
        """Updates behind the best weights (0: the SFT policy); None while no rollout passed."""
        self.frozen = False
        """A check has failed: the best no longer moves."""

    @staticmethod
    def _copy(weights: Mapping[str, torch.Tensor], into: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        if into is None:
            return {name: w.detach().to("cpu", copy=True) for name, w in weights.items()}
        for name, w in weights.items():
            into[name].copy_(w.detach())
        return into

    def update(self, run, passed: bool) -> None:
        """After an iteration whose rollout ``passed`` (or not) every check; ``run`` holds the updated weights."""
        if self.frozen or not passed:
            self.frozen = True
            return
        self.best, self.candidate = self.candidate, self.best  # the old best's buffers take the next candidate
        self.iteration = self.candidate_iteration
        self.candidate = self._copy(released_weights(run), self.candidate)
        self.candidate_iteration = run.iteration

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.best, "iteration": self.iteration, "frozen": self.frozen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.iteration = state["weights"], state["iteration"]
        self.frozen = bool(state.get("frozen", False))  # checkpoints before the rule have no entry


# --------------------------------------------------------------------------- what the PPO loop calls


class RunGuard:
    """The guardrails of one PPO run as the loop uses them: start-up warnings, the checks after every iteration,
    the early stop, the best policy, the checkpoint entry and the results.json record."""

    def __init__(self, cfg: Config, run, rm_scores: bool, checkpoint: Mapping[str, Any] | None):
        """``rm_scores``: the reward model scores the rollouts (no ``score_fn``); ``checkpoint``: the one the run
        resumed from, if any."""
        self.settings = cfg.guardrails
        score_range = read_score_range(cfg.reward_model) if rm_scores else None
        self.checks = Guardrails(cfg.guardrails, score_range)
        self.best = BestPolicy(run) if cfg.guardrails.keep_best else None
        parameters = sum(p.numel() for p in run.models.policy.parameters())
        self.startup = startup_warnings(cfg, parameters, score_range, rm_scores)
        for warning in self.startup:
            print(f"WARNING {warning}", flush=True)
        saved = (checkpoint or {}).get("guardrails")
        if saved is not None:
            self.checks.load_state_dict(saved["checks"])
            if self.best is not None and saved["best"] is not None:
                self.best.load_state_dict(saved["best"])
        self.stopped: dict[str, Any] | None = None
        """The iteration and the reason of an early stop (``guardrails.stop``)."""
        self.best_saved: dict[str, Any] | None = None

    def after_iteration(self, run, metrics: Mapping[str, Any], rollout) -> dict[str, float]:
        """Check the iteration's rollout, keep the best policy, decide on the early stop; returns the flags to
        add to the iteration's metrics."""
        flags = self.checks.check(run.iteration, metrics, rollout)
        if self.best is not None:
            self.best.update(run, self.checks.clean)
        reason = self.checks.stop_reason()
        if reason is not None:
            self.stopped = {"iteration": run.iteration, "reason": reason}
            print(f"ppo: stopping early at iteration {run.iteration}: {reason} (guardrails.stop)", flush=True)
        return flags

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's ``guardrails`` entry."""
        return {"checks": self.checks.state_dict(), "best": self.best.state_dict() if self.best else None}

    def save_best(self, run, path: Path) -> None:
        """Save the best policy (:class:`BestPolicy`) to ``path``, when one rollout passed every check."""
        if self.best is not None and self.best.best is not None:
            run.save_policy(path, weights=self.best.best)
            criterion = "the released weights that sampled the last rollout before the first failed guardrail"
            self.best_saved = {"dir": str(path), "updates": self.best.iteration, "criterion": criterion}

    def finish(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Print what the checks found in the run's metrics ``records``; returns the results.json record."""
        best = self.best_saved
        failed = summarize(records)
        for entry in failed:
            print(f"ppo: guardrail '{entry['check']}' failed on {entry['iterations_failed']} iteration(s), "
                  f"{entry['first_iteration']}-{entry['last_iteration']}: {entry['advice']}", flush=True)  # fmt: skip
        if best is not None and failed:
            print(f"ppo: policy_best/ holds the policy after {best['updates']} update(s), the last whose samples "
                  "passed every guardrail before the first failure", flush=True)  # fmt: skip
        score_range = self.checks.score_range
        return {
            "checked": checked(records),
            "failed": [{**entry, "first_warning": self.checks.first_message.get(entry["check"])} for entry in failed],
            "startup_warnings": self.startup + self.checks.notes,
            "stopped_early": self.stopped,
            "best_policy": best,
            "rm_score_range": vars(score_range) if score_range is not None else None,
        }
