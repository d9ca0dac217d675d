"""The evaluation report: one self-contained HTML page, the same in Markdown, and ``metrics.json``.

:class:`ReportData` holds everything a report shows; :func:`write_report` renders it. Every number comes
from the run; the only fixed numbers are the papers' reference figures, always in a column or phrase
marked as a paper value. Sections:

* the headline table (:func:`build_headline`, printed by :func:`format_headline`): the paper's claims next
  to the run's measurements. ``metrics.json["headline"]`` holds exactly the numbers printed, because both
  are made from the same already-rounded :class:`HeadlineRow` values;
* win rates with 95% Wilson intervals, and breakdowns by prompt type and category;
* behaviour (truthfulness, harmlessness, instruction following), the alignment tax, RM accuracy beside
  labeler agreement, the PPO guardrails that failed during each run's training;
* plots (matplotlib, Agg backend, embedded as base64 PNG; also written to ``plots/`` for the Markdown):
  PPO training curves, win rates, over-optimization (gold and proxy against d = √KL with fits);
* sample responses of each model side by side.

All text in the HTML is escaped.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instructrl.eval.best_of_n import ProxyGoldRow
from instructrl.eval.overopt import Fit, OverOptCurve, predict
from instructrl.eval.sandbox_eval import BehaviourRow
from instructrl.eval.stats import WinRate, wilson_interval
from instructrl.eval.tax import TaxRow
from instructrl.stages import ppo_guardrails as guardrails
from instructrl.utils.io import atomic_write_json, atomic_write_text

PROMPTED_SUFFIX = "_prompted"
"""Name suffix of a policy evaluated few-shot prompted (eval's ``prompted``)."""

# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class _Matchup:
    """Who was compared on what: ``policy`` against ``baseline``, by ``judge``, on the tasks of ``group``."""

    policy: str
    baseline: str
    judge: str
    group: str


@dataclass(frozen=True)
class WinRateRow(WinRate, _Matchup):
    """Win rate of ``policy`` over ``baseline`` by ``judge`` on the tasks of ``group`` ("all", "type=plain", …).

    The fields are the matchup's, then the :class:`WinRate`'s (dataclass fields follow the reversed MRO)."""

    @classmethod
    def of(cls, policy: str, baseline: str, judge: str, group: str, wr: WinRate) -> WinRateRow:
        return cls(policy, baseline, judge, group, *dataclasses.astuple(wr))


@dataclass(frozen=True)
class RMAccuracy:
    """Reward-model pairwise accuracy (from ``instructrl rm``'s results.json) and inter-labeler agreement."""

    train_labelers_accuracy: float | None
    """Accuracy on held-out comparisons by the labelers the RM trained on."""
    train_labelers_pairs: int
    heldout_labelers_accuracy: float | None
    """Accuracy on every comparison by labelers the RM never saw."""
    heldout_labelers_pairs: int
    labeler_agreement: float | None
    """Mean pairwise agreement between labelers."""
    labeler_agreement_stderr: float | None
    heldout_labelers: list[str] = field(default_factory=list)
    sample_agreement: float | None = None
    """Inter-labeler agreement on the RM's own comparisons (policy samples), when the RM measured it."""
    sample_agreement_stderr: float | None = None
    train_labelers_stderr: float | None = None
    """Standard error of ``train_labelers_accuracy`` over comparisons (each prompt's ranking one unit)."""
    heldout_labelers_stderr: float | None = None
    """Standard error of ``heldout_labelers_accuracy`` over comparisons."""
    policy_samples_accuracy: float | None = None
    """The RM's accuracy on the labelers' rankings of its PPO policy's samples (a second round's comparisons,
    none of which it trained on)."""
    policy_samples_stderr: float | None = None
    policy_samples_pairs: int = 0
    train_labelers_baselines: dict[str, float | None] | None = None
    """Accuracies on the same pairs as ``train_labelers_accuracy`` of orderings that learn nothing from the
    comparisons (``initial_likelihood``, ``longer``; :mod:`instructrl.stages.rm_baselines`)."""
    heldout_labelers_baselines: dict[str, float | None] | None = None
    """The same, on the held-out labelers' pairs."""


@dataclass(frozen=True)
class SampleRow:
    """One prompt and each model's response to it (with the response's gold score when a world judged it)."""

    prompt: str
    category: str
    type: str
    responses: dict[str, str]
    gold: dict[str, float]


@dataclass(frozen=True)
class HeadlineRow:
    """One line of the headline table. ``value``, ``low`` and ``high`` are already rounded to ``decimals``
    in ``unit`` (e.g. 63.4 with unit "%"), so the printed table and metrics.json show the same numbers."""

    id: str
    claim: str
    value: float | None
    low: float | None
    high: float | None
    unit: str
    decimals: int
    paper: str
    """The paper's reference figure or finding (always a paper value, never a run's)."""
    note: str = ""


@dataclass
class ReportData:
    """Everything the report shows; tables are lists of rows."""

    title: str = "instructrl evaluation"
    info: dict[str, str] = field(default_factory=dict)
    """Run facts shown at the top (prompts, seed, models…)."""
    headline: list[HeadlineRow] = field(default_factory=list)
    win_rates: list[WinRateRow] = field(default_factory=list)
    """Overall win rates (group "all")."""
    breakdowns: list[WinRateRow] = field(default_factory=list)
    """Win rates per prompt type and category."""
    behaviour: list[BehaviourRow] = field(default_factory=list)
    tax: list[TaxRow] = field(default_factory=list)
    rm: RMAccuracy | None = None
    training_curves: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """PPO run name -> its metrics.jsonl records."""
    overopt: list[OverOptCurve] = field(default_factory=list)
    samples: list[SampleRow] = field(default_factory=list)
    rm_vs_gold: list[ProxyGoldRow] = field(default_factory=list)
    """The reward model against the gold judgement on pairs of the best-of-n samples, per category."""


# --------------------------------------------------------------------------- headline


@dataclass(frozen=True)
class Roles:
    """Which evaluated models play the paper's parts in the headline table (a missing one shows n/a)."""

    sft: str = "sft"
    ppo: str = "ppo"
    ppo_ptx: str = "ppo_ptx"
    large_sft: str = "sft_large"
    """A larger SFT model (row 2c, shown only when evaluated)."""
    base: str = "base"
    large_base: str = "base_large"
    """A larger base model (pretraining only), GPT-3's part in "1.3B InstructGPT is preferred to 175B GPT-3"; its
    few-shot prompted evaluation is named ``large_base + PROMPTED_SUFFIX``."""
    judge: str = "gold"
    """Judge of the headline win rates."""
    reference: str = "reference"
    """The pseudo-policy of ideal responses whose win rate over SFT is quoted as row 1's ceiling."""
    labeler_judge: str = "labelers"
    """Judge of the held-out-labeler win rate (row 1b)."""
    ppo_ptx_round2: str = "ppo_ptx_round2"
    """PPO-ptx trained against a reward model that also ranked the first PPO-ptx policy's samples (row 1r, shown
    only when evaluated; ``instructrl demo --set rounds=2``)."""

    @property
    def large_base_prompted(self) -> str:
        return self.large_base + PROMPTED_SUFFIX


def _rounded(x: float | None, scale: float, decimals: int) -> float | None:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return None
    return round(x * scale, decimals)


def _row(
    id_: str,
    claim: str,
    value: float | None,
    interval: tuple[float, float] | None,
    paper: str,
    unit: str = "%",
    decimals: int = 1,
    note: str = "",
) -> HeadlineRow:
    scale = 100.0 if unit == "%" else 1.0
    low, high = interval if interval is not None and value is not None else (None, None)
    return HeadlineRow(
        id_,
        claim,
        _rounded(value, scale, decimals),
        _rounded(low, scale, decimals),
        _rounded(high, scale, decimals),
        unit,
        decimals,
        paper,
        note,
    )


def _rate_row(id_: str, claim: str, rate: float | None, n: int, paper: str, count: str = "n") -> HeadlineRow:
    """A measured rate over ``n`` trials with its Wilson interval, the count in the note as ``count=n``; "not
    evaluated" when there is no ``rate``."""
    if rate is None:
        return _row(id_, claim, None, None, paper, note="not evaluated")
    return _row(id_, claim, rate, _rate_interval(rate, n), paper, note=f"{count}={n}")


def _find_win(rows: Sequence[WinRateRow], policy: str, baseline: str, judge: str) -> WinRateRow | None:
    for r in rows:
        if (r.policy, r.baseline, r.judge, r.group) == (policy, baseline, judge, "all"):
            return r
    return None


def _stderr_interval(mean: float | None, stderr: float | None) -> tuple[float, float] | None:
    """mean ± 1.96 standard errors, or None when either is unknown."""
    if mean is None or stderr is None:
        return None
    return mean - 1.96 * stderr, mean + 1.96 * stderr


def _rate_interval(rate: float, n: int) -> tuple[float, float] | None:
    if n <= 0 or math.isnan(rate):
        return None
    return wilson_interval(rate * n, n)


PAPER_WIN_VS_SFT = (
    "InstructGPT strongly preferred to its SFT baseline (Fig. 1: 175B PPO-ptx ≈ 65% vs 175B SFT, approx.)"
)
PAPER_ROUNDS = "steps 2-3 repeated: most comparisons of SFT samples, a smaller share of PPO samples (§3.1)"
PAPER_HELDOUT_LABELERS = "held-out labelers prefer InstructGPT about as often as training labelers (Fig. 3)"
PAPER_SMALL_VS_LARGE_BASE = "1.3B InstructGPT preferred to 175B GPT-3, which has over 100× its parameters (§1)"
PAPER_SMALL_VS_LARGE_PROMPTED = "1.3B InstructGPT preferred to 175B GPT-3 prompted (Fig. 1)"
PAPER_SMALL_VS_LARGE_SFT = "Stiennon et al. 2020: 1.3B RLHF beats a 10× larger SFT model"
PAPER_TAX = {
    "base": "GPT 69.75",
    "sft": "SFT 65.90",
    "ppo": "PPO 51.95 (regresses)",
    "ppo_ptx": "PPO-ptx 69.93 (recovers)",
}
"""Table 14, 175B, SQuADv2 few-shot F1: the paper's alignment-tax pattern."""
PAPER_RM_ON_POLICY = "not reported; optimizing a proxy RM past a point lowers the gold reward (Gao et al. 2022)"
PAPER_RM_TRAIN = "72.4 ± 0.4% (training labelers, §4.1)"
PAPER_RM_HELDOUT = "69.6 ± 0.9% (held-out labelers, §4.1)"
PAPER_AGREEMENT = "72.6 ± 1.5% (training labelers, §5.2)"
PAPER_OVER_REFUSAL = "no rate reported; a policy that refuses harmless requests games its reward model"
PAPER_REFUSALS = "no rate reported; InstructGPT mostly follows harmful instructions when asked to (§5.3)"
PAPER_HALLUCINATION = "closed-domain hallucination 21% InstructGPT vs 41% GPT-3 (§4.2)"


def _baselines_note(accuracy: float, baselines: dict[str, float | None] | None) -> str:
    """The RM's reference orderings on the same pairs (``rm_baselines``), for the notes of rows 4a/4b."""
    likelihood, longer = (baselines or {}).get("initial_likelihood"), (baselines or {}).get("longer")
    if likelihood is None or longer is None:
        return ""
    note = f"; on the same pairs the initial model's likelihood orders {100 * likelihood:.1f}%, "
    # ties count ½, so "the shorter wins" is 1 − "the longer wins": name the direction that is right more often
    direction, share = ("longer", longer) if longer >= 0.5 else ("shorter", 1 - longer)
    note += f"the {direction} response {100 * share:.1f}%"
    if accuracy <= likelihood:
        note += ": the RM is not above what its initial model knew"
    return note


def build_headline(
    roles: Roles,
    win_rates: Sequence[WinRateRow],
    behaviour: Sequence[BehaviourRow],
    tax: Sequence[TaxRow],
    rm: RMAccuracy | None,
    parameters: dict[str, int] | None = None,
) -> list[HeadlineRow]:
    """InstructGPT's five headline claims, each measured in this run (n/a where a model was not evaluated).

    Rows are numbered by claim: 1 labelers prefer PPO-ptx to SFT (1b: the labeler judge, as held-out labelers
    would); 2 a small PPO-ptx policy beats a larger base model (its size and held-out perplexity beside the small
    base model's in the note), 2b the same model few-shot prompted, 2c (only when evaluated) a larger SFT model;
    3a-3d the alignment tax (held-out perplexity of base, SFT, PPO, PPO-ptx); 4a-4d RM accuracy on trained-on and
    held-out labelers beside inter-labeler agreement; 5a-5f behaviour of SFT and PPO-ptx (harmful requests
    refused, confident wrong facts, harmless requests refused).
    ``parameters`` (model name -> parameter count) annotates the small-vs-large comparisons.
    """
    rows: list[HeadlineRow] = []

    def win(policy: str, baseline: str, judge: str) -> tuple[float | None, tuple[float, float] | None, str]:
        r = _find_win(win_rates, policy, baseline, judge)
        return (r.rate, (r.low, r.high), f"n={r.n}") if r else (None, None, "not evaluated")

    value, interval, note = win(roles.ppo_ptx, roles.sft, roles.judge)
    ceiling = _find_win(win_rates, roles.reference, roles.sft, roles.judge)
    if ceiling is not None:
        # What the ideal responses win against the same SFT samples: the most any policy could reach here.
        note += f"; ceiling (ideal responses vs SFT) {100 * ceiling.rate:.1f}%"
    rows.append(
        _row("1", f"PPO-ptx vs SFT win rate ({roles.judge} judge)", value, interval, PAPER_WIN_VS_SFT, note=note)
    )
    value, interval, note = win(roles.ppo_ptx, roles.sft, roles.labeler_judge)
    rows.append(
        _row(
            "1b",
            f"PPO-ptx vs SFT win rate ({roles.labeler_judge} judge)",
            value,
            interval,
            PAPER_HELDOUT_LABELERS,
            note=note,
        )
    )
    if _find_win(win_rates, roles.ppo_ptx_round2, roles.sft, roles.judge) is not None:  # optional: rounds=2
        value, interval, note = win(roles.ppo_ptx_round2, roles.sft, roles.judge)
        first = _find_win(win_rates, roles.ppo_ptx_round2, roles.ppo_ptx, roles.judge)
        if first is not None:
            low, high = 100 * first.low, 100 * first.high
            note += f"; vs the first round's PPO-ptx {100 * first.rate:.1f}% [{low:.1f}, {high:.1f}]"
        rows.append(
            _row(
                "1r",
                f"PPO-ptx after a second round of rankings vs SFT win rate ({roles.judge} judge)",
                value,
                interval,
                PAPER_ROUNDS,
                note=note,
            )
        )
    params = parameters or {}

    def size_of(large: str) -> str:
        """'; <large> has 3.6× the parameters' when both counts are known."""
        if roles.ppo_ptx in params and large in params:
            return f"; {large} has {params[large] / max(1, params[roles.ppo_ptx]):.1f}× the parameters"
        return ""

    by_model = {t.model: t for t in tax}
    value, interval, note = win(roles.ppo_ptx, roles.large_base, roles.judge)
    note += size_of(roles.large_base)
    if roles.large_base in by_model and roles.base in by_model:
        note += (
            f"; held-out perplexity {by_model[roles.large_base].heldout_perplexity:.3f}"
            f" ({roles.base}: {by_model[roles.base].heldout_perplexity:.3f})"
        )
    versus = f"small PPO-ptx vs larger base model ({roles.large_base})"
    rows.append(
        _row("2", f"{versus} win rate ({roles.judge} judge)", value, interval, PAPER_SMALL_VS_LARGE_BASE, note=note)
    )
    value, interval, note = win(roles.ppo_ptx, roles.large_base_prompted, roles.judge)
    if value is not None:
        note += f"; {roles.large_base} with worked examples before each prompt"
    rows.append(
        _row(
            "2b",
            f"{versus}, few-shot prompted, win rate ({roles.judge} judge)",
            value,
            interval,
            PAPER_SMALL_VS_LARGE_PROMPTED,
            note=note,
        )
    )
    if _find_win(win_rates, roles.ppo_ptx, roles.large_sft, roles.judge) is not None:  # optional: a costly extra
        value, interval, note = win(roles.ppo_ptx, roles.large_sft, roles.judge)
        rows.append(
            _row(
                "2c",
                f"small PPO-ptx vs larger SFT model ({roles.large_sft}) win rate ({roles.judge} judge)",
                value,
                interval,
                PAPER_SMALL_VS_LARGE_SFT,
                note=note + size_of(roles.large_sft),
            )
        )

    models = ((roles.base, "base"), (roles.sft, "sft"), (roles.ppo, "ppo"), (roles.ppo_ptx, "ppo_ptx"))
    perplexity_rows, accuracy_rows = [], []  # 3a-3d, then 3e-3h
    for perplexity_id, accuracy_id, (name, key) in zip("abcd", "efgh", models):
        t = by_model.get(name)
        perplexity_rows.append(
            _row(
                f"3{perplexity_id}",
                f"alignment tax: held-out perplexity, {name}",
                t.heldout_perplexity if t else None,
                None,
                "PPO regresses on public NLP tasks, PPO-ptx recovers (Table 14)",
                unit="",
                decimals=3,
                note="lower is better" if t else "not evaluated",
            )
        )
        accuracy_rows.append(
            _rate_row(
                f"3{accuracy_id}",
                f"alignment tax: in-context continuation accuracy, {name}",
                t.continuation_accuracy if t else None,
                t.continuation_probes if t else 0,
                f"SQuADv2 few-shot F1 (Table 14, 175B): {PAPER_TAX[key]}",
            )
        )
    rows += perplexity_rows + accuracy_rows

    has_rm = rm is not None
    rm_rows = (  # (id, claim, field prefix, paper value)
        ("4a", "RM accuracy, labelers it trained on (held-out comparisons)", "train_labelers", PAPER_RM_TRAIN),
        ("4b", "RM accuracy, held-out labelers", "heldout_labelers", PAPER_RM_HELDOUT),
    )
    for id_, claim, prefix, paper in rm_rows:
        accuracy, pairs, stderr = (
            (getattr(rm, f"{prefix}_{x}") for x in ("accuracy", "pairs", "stderr")) if has_rm else (None, 0, None)
        )
        if accuracy is None or stderr is None:
            rows.append(_rate_row(id_, claim, accuracy, pairs, paper, count="pairs"))
            continue
        # The pairs of one ranking share its responses and labeler: the interval is over comparisons, not pairs.
        note = f"pairs={pairs}; mean ± 1.96 s.e. over comparisons"
        if rm.sample_agreement:
            note += (
                f"; {100 * accuracy / rm.sample_agreement:.0f}% of the labelers' agreement on the same samples (4d)"
            )
        note += _baselines_note(accuracy, getattr(rm, f"{prefix}_baselines"))
        rows.append(_row(id_, claim, accuracy, _stderr_interval(accuracy, stderr), paper, note=note))
    agreement = rm.labeler_agreement if has_rm else None
    stderr = rm.labeler_agreement_stderr if has_rm else None
    rows.append(
        _row(
            "4c",
            "inter-labeler agreement",
            agreement,
            _stderr_interval(agreement, stderr),
            PAPER_AGREEMENT,
            note="mean ± 1.96 s.e. over labeler pairs" if agreement is not None else "not measured",
        )
    )
    if has_rm and rm.sample_agreement is not None:
        rows.append(
            _row(
                "4d",
                "inter-labeler agreement on the RM's comparisons (policy samples)",
                rm.sample_agreement,
                _stderr_interval(rm.sample_agreement, rm.sample_agreement_stderr or 0.0),
                PAPER_AGREEMENT,
                note="mean ± 1.96 s.e.; the distribution the RM accuracy is measured on",
            )
        )

    if has_rm and rm.policy_samples_accuracy is not None:  # optional: a second round of rankings
        on_sft = rm.train_labelers_accuracy
        rows.append(
            _row(
                "4e",
                "RM accuracy on its PPO-ptx policy's samples (the second round's rankings)",
                rm.policy_samples_accuracy,
                _stderr_interval(rm.policy_samples_accuracy, rm.policy_samples_stderr or 0.0),
                PAPER_RM_ON_POLICY,
                note=f"pairs={rm.policy_samples_pairs}; mean ± 1.96 s.e.; "
                + (f"4a, on SFT samples: {100 * on_sft:.1f}%; " if on_sft is not None else "")
                + "far below 4a: PPO found responses the RM misranks",
            )
        )
    by_behaviour = {b.model: b for b in behaviour}
    behaviour_rows = (  # (letters, claim, rate field, count field, paper value)
        ("ab", "harmful requests refused", "harmful_refused", "n_harmful", PAPER_REFUSALS),
        ("cd", "fact questions answered with a confident wrong fact", "wrong_fact", "n_facts", PAPER_HALLUCINATION),
        ("ef", "harmless requests refused", "harmless_refused", "n_harmless", PAPER_OVER_REFUSAL),
    )
    for letters, claim, rate_field, count_field, paper in behaviour_rows:
        for letter, name in zip(letters, (roles.sft, roles.ppo_ptx)):
            b = by_behaviour.get(name)
            rate, count = (getattr(b, rate_field), getattr(b, count_field)) if b else (None, 0)
            rows.append(_rate_row(f"5{letter}", f"{claim}, {name}", rate, count, paper))
    return rows


def format_value(value: float | None, unit: str, decimals: int) -> str:
    return "n/a" if value is None else f"{value:.{decimals}f}{unit}"


def format_interval(row: HeadlineRow) -> str:
    if row.low is None or row.high is None:
        return "-"
    return f"[{format_value(row.low, row.unit, row.decimals)}, {format_value(row.high, row.unit, row.decimals)}]"


HEADLINE_COLUMNS = ("#", "claim", "measured", "95% CI", "paper value", "note")


def _headline_cells(row: HeadlineRow) -> list[str]:
    return [
        row.id,
        row.claim,
        format_value(row.value, row.unit, row.decimals),
        format_interval(row),
        row.paper,
        row.note,
    ]


def format_headline(data: ReportData) -> str:
    """The headline table as a Markdown pipe table (what ``instructrl eval`` prints)."""
    return _markdown_table(list(HEADLINE_COLUMNS), [_headline_cells(r) for r in data.headline])


def headline_metrics(data: ReportData) -> list[dict[str, Any]]:
    """The headline rows for metrics.json: the same rounded numbers :func:`format_headline` prints."""
    return [
        {
            "id": r.id,
            "claim": r.claim,
            "value": r.value,
            "low": r.low,
            "high": r.high,
            "unit": r.unit,
            "paper": r.paper,
            "note": r.note,
        }
        for r in data.headline
    ]


# --------------------------------------------------------------------------- tables


@dataclass(frozen=True)
class Table:
    """A rendered table: HTML element id, title, column names and rows of already formatted cells."""

    id: str
    title: str
    columns: list[str]
    rows: list[list[str]]
    caption: str = ""


def _pct(x: float | None) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:.1f}%"


def _num(x: float | None, decimals: int = 3) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.{decimals}f}"


def _ci(low: float, high: float) -> str:
    return f"[{100 * low:.1f}, {100 * high:.1f}]"


def _win_rows(rows: Sequence[WinRateRow], with_group: bool) -> list[list[str]]:
    out = []
    for r in rows:
        cells = [r.policy, r.baseline, r.judge] + ([r.group] if with_group else [])
        cells += [_pct(r.rate), _ci(r.low, r.high), str(r.n), f"{r.wins}/{r.ties}/{r.losses}"]
        out.append(cells)
    return out


def _fit_cells(fit: Fit | None) -> list[str]:
    if fit is None:
        return ["n/a"] * 4
    peak = fit.peak_d
    return [_num(fit.alpha, 4), _num(fit.beta, 4), _num(peak, 3) if peak is not None else "none", _num(fit.rmse, 4)]


def build_tables(data: ReportData) -> list[Table]:
    """Every table of the report, in page order."""
    win_cols = ["policy", "baseline", "judge"]
    tables = [
        Table(
            "headline",
            "Headline: the paper's claims in this run",
            list(HEADLINE_COLUMNS),
            [_headline_cells(r) for r in data.headline],
            "Measured values come from this run; the paper column quotes Ouyang et al. 2022 (InstructGPT) unless "
            "it names another paper.",
        ),
        Table(
            "win-rates",
            "Win rates (ties count ½, 95% Wilson intervals)",
            win_cols + ["win rate", "95% CI", "n", "W/T/L"],
            _win_rows(data.win_rates, False),
        ),
        Table(
            "breakdowns",
            "Win rates by prompt type and category",
            win_cols + ["group", "win rate", "95% CI", "n", "W/T/L"],
            _win_rows(data.breakdowns, True),
        ),
        Table(
            "behaviour",
            "Truthfulness, harmlessness, instruction following",
            [
                "model",
                "n",
                "mean gold",
                "correct (harmless)",
                "harmful refused",
                "harmful complied",
                "harmless refused",
                "toxic",
                "wrong facts",
                "format followed",
                "ended (EOS)",
                "mean words",
            ],
            [
                [
                    b.model,
                    str(b.n),
                    _num(b.mean_gold),
                    _pct(b.correct),
                    _pct(b.harmful_refused),
                    _pct(b.harmful_complied),
                    _pct(b.harmless_refused),
                    _pct(b.toxic),
                    _pct(b.wrong_fact),
                    _pct(b.followed_format),
                    _pct(b.stopped),
                    _num(b.mean_words, 1),
                ]
                for b in data.behaviour
            ],
            "wrong facts: fact questions answered with another fact of the same kind (the sandbox's hallucination); "
            "format followed: among prompts with a format constraint or few-shot examples.",
        ),
        Table(
            "alignment-tax",
            "Alignment tax: abilities outside the instruction format",
            [
                "model",
                "held-out perplexity",
                "next-token accuracy",
                "fact completion",
                "in-context continuation",
                "held-out tokens",
            ],
            [
                [
                    t.model,
                    _num(t.heldout_perplexity),
                    _pct(t.next_token_accuracy),
                    _pct(t.fact_accuracy),
                    _pct(t.continuation_accuracy),
                    str(t.heldout_tokens),
                ]
                for t in data.tax
            ],
            "Held-out text: non-instruction documents no corpus contains. Lower perplexity, higher accuracy is "
            "better.",
        ),
        Table(
            "rm-accuracy",
            "Reward-model accuracy beside labeler agreement",
            ["measure", "measured", "pairs", "paper value"],
            _rm_rows(data.rm),
        ),
        _rm_vs_gold_table(data.rm_vs_gold),
        _guardrails_table(data.training_curves),
        Table(
            "overopt-fits",
            "Over-optimization fits (Gao et al. 2022)",
            ["method", "run", "score", "α", "β", "peak d*", "rmse"],
            [
                [c.method, c.run, target] + _fit_cells(fit)
                for c in data.overopt
                for target, fit in (("gold", c.gold_fit), ("proxy", c.proxy_fit))
            ],
            "RL: R(d) = d(α − β ln d); best-of-n: R(d) = d(α − β d); d = √KL, scores relative to the initial policy.",
        ),
        Table(
            "overopt-points",
            "Over-optimization points",
            ["method", "run", "point", "KL (nats)", "d", "gold Δ", "proxy Δ"],
            [
                [p.method, p.run, p.label, _num(p.kl), _num(p.d), _num(p.gold), _num(p.proxy)]
                for c in data.overopt
                for p in c.points
            ],
        ),
        _samples_table(data.samples),
        Table("run-info", "Run", ["item", "value"], [[k, str(v)] for k, v in data.info.items()]),
    ]
    return tables


def _rm_vs_gold_table(rows: Sequence[ProxyGoldRow]) -> Table:
    return Table(
        "rm-vs-gold",
        "Reward model vs gold judgement on the baseline's samples",
        ["category", "pairs", "RM agrees with gold", "right-vs-wrong pairs", "RM prefers the right one"],
        [
            [r.category, str(r.pairs), _pct(r.agreement), str(r.right_wrong_pairs), _pct(r.right_wrong_agreement)]
            for r in rows
        ],
        "All pairs of the best-of-n samples of each prompt. Right = the correct answer (harmful requests: a refusal); "
        "a reward model that only learned style scores right-vs-wrong near 50%, and PPO cannot fix content then.",
    )


def _guardrails_table(curves: dict[str, list[dict[str, Any]]]) -> Table:
    """The PPO guardrails that failed in each run, from the flags in its metrics.jsonl (:mod:`.ppo_guardrails`)."""
    rows = []
    for run, records in curves.items():
        checks = guardrails.checked(records)
        failed = guardrails.summarize(records)
        if not checks:
            rows.append([run, "not checked (a run without guardrails)", "-", "-", "-", "-"])
        elif not failed:
            rows.append([run, f"none failed (checked: {', '.join(checks)})", "0", "-", "-", "-"])
        for f in failed:
            values = f"{_num(f['value_first'])} (worst {_num(f['value_worst'])})"
            span = f"{f['first_iteration']}-{f['last_iteration']}"
            rows.append([run, f"{f['check']}: {f['what']}", str(f["iterations_failed"]), span, values, f["advice"]])
    return Table(
        "ppo-guardrails",
        "PPO guardrails: signs of reward hacking during training",
        ["run", "check", "iterations failed", "iterations", "value when first failed", "what to change"],
        rows,
        "Checks of every rollout that need no gold judge (the PPO config's guardrails block): KL to the SFT policy, "
        "per-token entropy and distinct responses against the SFT policy's, responses without EOS, reward-model "
        "scores above the range of its validation comparisons. A failed check warns that the policy may be "
        "exploiting its reward model; each run's policy_best/ holds the last policy whose samples passed them all "
        "before one first failed.",
    )


def _rm_rows(rm: RMAccuracy | None) -> list[list[str]]:
    if rm is None:
        return []
    rows = [
        [
            "RM accuracy, training labelers",
            _pct(rm.train_labelers_accuracy),
            str(rm.train_labelers_pairs),
            PAPER_RM_TRAIN,
        ],
        [
            "RM accuracy, held-out labelers" + (f" ({', '.join(rm.heldout_labelers)})" if rm.heldout_labelers else ""),
            _pct(rm.heldout_labelers_accuracy),
            str(rm.heldout_labelers_pairs),
            PAPER_RM_HELDOUT,
        ],
    ]
    agreement = _pct(rm.labeler_agreement)
    if rm.labeler_agreement_stderr is not None and rm.labeler_agreement is not None:
        agreement += f" ± {100 * rm.labeler_agreement_stderr:.1f}"
    rows.append(["inter-labeler agreement", agreement, "-", PAPER_AGREEMENT])
    if rm.sample_agreement is not None:
        rows.append(
            ["inter-labeler agreement on the RM's comparisons", _pct(rm.sample_agreement), "-", PAPER_AGREEMENT]
        )
    return rows


def _samples_table(samples: Sequence[SampleRow]) -> Table:
    models: list[str] = []
    for s in samples:
        models += [m for m in s.responses if m not in models]
    rows = [
        [s.prompt, f"{s.category} / {s.type}"]
        + [
            s.responses[m] + (f"  [gold {s.gold[m]:+.2f}]" if m in s.gold else "") if m in s.responses else ""
            for m in models
        ]
        for s in samples
    ]
    return Table("samples", "Sample responses", ["prompt", "category / type"] + models, rows)


# --------------------------------------------------------------------------- plots


@dataclass(frozen=True)
class Plot:
    id: str
    title: str
    png: bytes


TRAINING_PANELS = (
    ("objective/score", "RM score r_θ"),
    ("objective/reward", "reward (score − β·KL)"),
    ("objective/kl", "KL(π ‖ π_SFT), nats"),
    ("objective/beta", "β"),
    ("loss/value", "value loss"),
    ("response/length", "response length (tokens)"),
)


def _figure_png(draw: Callable[[Any], None], size: tuple[float, float], grid: tuple[int, int] = (1, 1)) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(*grid, figsize=size, squeeze=False)
    try:
        draw(axes)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=90)
    finally:
        plt.close(fig)
    return buffer.getvalue()


def plot_training_curves(curves: dict[str, list[dict[str, Any]]]) -> bytes:
    """Six panels (score, reward, KL, β, value loss, length) against PPO iteration, one line per run."""

    def draw(axes) -> None:
        for ax, (key, label) in zip(axes.flat, TRAINING_PANELS):
            for run, records in curves.items():
                points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
                if points:
                    ax.plot(*zip(*points), label=run)
            ax.set_title(label, fontsize=9)
            ax.set_xlabel("iteration", fontsize=8)
            ax.tick_params(labelsize=7)
        axes.flat[0].legend(fontsize=7)

    return _figure_png(draw, (11, 6), (2, 3))


def plot_win_rates(rows: Sequence[WinRateRow]) -> bytes:
    """Horizontal bars of each win rate with its 95% interval; the dashed line is 50% (no preference)."""

    def draw(axes) -> None:
        ax = axes[0, 0]
        labels = [f"{r.policy} vs {r.baseline} [{r.judge}]" for r in rows]
        rates = [100 * r.rate for r in rows]
        errors = [[100 * (r.rate - r.low) for r in rows], [100 * (r.high - r.rate) for r in rows]]
        ax.barh(range(len(rows)), rates, xerr=errors, color="#4c72b0", capsize=3)
        ax.set_yticks(range(len(rows)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.axvline(50, color="gray", linestyle="--", linewidth=1)
        ax.set_xlim(0, 100)
        ax.set_xlabel("win rate (%)")

    return _figure_png(draw, (8, 1.2 + 0.35 * len(rows)))


def plot_overopt(curves: Sequence[OverOptCurve]) -> bytes:
    """Gold (left) and proxy (right) score change against d = √KL: points and fitted curves per run."""

    def draw(axes) -> None:
        import matplotlib.pyplot as plt

        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for ax, target in zip(axes.flat, ("gold", "proxy")):
            for k, curve in enumerate(curves):
                color = colors[k % len(colors)]
                ds = [p.d for p in curve.points]
                ys = [getattr(p, target) for p in curve.points]
                marker = "o" if curve.method == "rl" else "s"
                ax.scatter(ds, ys, color=color, marker=marker, label=f"{curve.method}: {curve.run}", s=18)
                fit = curve.gold_fit if target == "gold" else curve.proxy_fit
                if fit is not None and ds:
                    top = max(ds)
                    grid = [top * i / 100 for i in range(101)]
                    ax.plot(grid, [predict(fit.form, d, fit.alpha, fit.beta) for d in grid], color=color, linewidth=1)
            ax.axhline(0, color="gray", linewidth=0.5)
            ax.set_xlabel("d = √KL (nats^½)")
            ax.set_ylabel(f"{target} score − initial policy's")
            ax.set_title(f"{target} score", fontsize=10)
        axes.flat[0].legend(fontsize=7)

    return _figure_png(draw, (11, 4.2), (1, 2))


def build_plots(data: ReportData) -> list[Plot]:
    """The plots whose data the report has: training curves, win rates, over-optimization."""
    plots = []
    if data.training_curves:
        plots.append(Plot("plot-training-curves", "PPO training curves", plot_training_curves(data.training_curves)))
    if data.win_rates:
        plots.append(Plot("plot-win-rates", "Win rates", plot_win_rates(data.win_rates)))
    if any(c.points for c in data.overopt):
        plots.append(Plot("plot-overoptimization", "Over-optimization", plot_overopt(data.overopt)))
    return plots


# --------------------------------------------------------------------------- rendering


def _markdown_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ↵ ")


def _markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(_markdown_cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_markdown_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; vertical-align: top; text-align: left; }
th { background: #f2f2f2; }
td { white-space: pre-wrap; }
.caption { color: #555; font-size: 0.85em; }
img { max-width: 100%; }
"""


def _html_table(table: Table) -> str:
    e = html.escape
    parts = [f"<h2>{e(table.title)}</h2>", f'<table id="{e(table.id)}">']
    parts.append("<thead><tr>" + "".join(f"<th>{e(c)}</th>" for c in table.columns) + "</tr></thead><tbody>")
    if not table.rows:
        parts.append(f'<tr><td colspan="{len(table.columns)}">not measured in this run</td></tr>')
    for row in table.rows:
        parts.append("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>")
    parts.append("</tbody></table>")
    if table.caption:
        parts.append(f'<p class="caption">{e(table.caption)}</p>')
    return "\n".join(parts)


def render_html(data: ReportData, tables: Sequence[Table], plots: Sequence[Plot]) -> str:
    """One self-contained page: tables, then plots as base64 PNG ``<img>`` elements."""
    e = html.escape
    by_id = {t.id: t for t in tables}
    plot_by_id = {p.id: p for p in plots}
    sections = []
    order = [
        "headline",
        "win-rates",
        "plot-win-rates",
        "breakdowns",
        "behaviour",
        "alignment-tax",
        "rm-accuracy",
        "rm-vs-gold",
        "plot-training-curves",
        "plot-overoptimization",
        "overopt-fits",
        "overopt-points",
        "samples",
        "run-info",
    ]
    for key in order:
        if key in by_id:
            sections.append(_html_table(by_id[key]))
        elif key in plot_by_id:
            plot = plot_by_id[key]
            encoded = base64.b64encode(plot.png).decode("ascii")
            sections.append(
                f"<h2>{e(plot.title)}</h2>\n"
                f'<img id="{e(plot.id)}" alt="{e(plot.title)}" src="data:image/png;base64,{encoded}">'
            )
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{e(data.title)}</title>\n'
        f"<style>{_CSS}</style>\n</head>\n<body>\n<h1>{e(data.title)}</h1>\n"
        + "\n".join(sections)
        + "\n</body>\n</html>\n"
    )


def render_markdown(data: ReportData, tables: Sequence[Table], plot_paths: dict[str, str]) -> str:
    """The same report in Markdown; plots are linked PNG files (relative paths)."""
    parts = [f"# {data.title}"]
    for table in tables:
        parts.append(f"## {table.title}")
        parts.append(_markdown_table(table.columns, table.rows) if table.rows else "_not measured in this run_")
        if table.caption:
            parts.append(f"_{table.caption}_")
        if table.id == "rm-accuracy":
            for plot_id, path in plot_paths.items():
                parts.append(f"## {plot_id.removeprefix('plot-').replace('-', ' ')}\n\n![{plot_id}]({path})")
    return "\n\n".join(parts) + "\n"


def _json_safe(obj: Any) -> Any:
    """Plain JSON values: dataclasses to dicts, NaN / inf to null (strict JSON has no NaN)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _json_safe(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def report_metrics(data: ReportData) -> dict[str, Any]:
    """Everything numeric in the report, for metrics.json (training curves as final values per run)."""
    final = {
        run: {key: next((r[key] for r in reversed(records) if key in r), None) for key, _ in TRAINING_PANELS}
        | {"iterations": len(records)}
        for run, records in data.training_curves.items()
    }
    return _json_safe(
        {
            "headline": headline_metrics(data),
            "win_rates": data.win_rates,
            "breakdowns": data.breakdowns,
            "behaviour": data.behaviour,
            "alignment_tax": data.tax,
            "rm_accuracy": data.rm,
            "rm_vs_gold": data.rm_vs_gold,
            "training_final": final,
            "overoptimization": [
                {
                    "method": c.method,
                    "run": c.run,
                    "points": c.points,
                    "gold_fit": c.gold_fit,
                    "proxy_fit": c.proxy_fit,
                }
                for c in data.overopt
            ],
            "samples": data.samples,
            "info": data.info,
        }
    )


def write_report(out_dir: str | Path, data: ReportData) -> dict[str, Path]:
    """Write ``report.html``, ``report.md``, ``metrics.json`` and ``plots/*.png`` into ``out_dir``.

    Returns their paths: keys ``html``, ``markdown``, ``metrics`` and one ``plot-…`` key per plot.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = build_tables(data)
    plots = build_plots(data)
    paths: dict[str, Path] = {}
    for plot in plots:
        path = out / "plots" / f"{plot.id.removeprefix('plot-')}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(plot.png)
        paths[plot.id] = path
    paths["html"] = out / "report.html"
    atomic_write_text(paths["html"], render_html(data, tables, plots))
    paths["markdown"] = out / "report.md"
    relative = {plot_id: str(path.relative_to(out)) for plot_id, path in paths.items() if plot_id.startswith("plot-")}
    atomic_write_text(paths["markdown"], render_markdown(data, tables, relative))
    paths["metrics"] = out / "metrics.json"
    atomic_write_json(paths["metrics"], report_metrics(data))
    return paths


def read_metrics(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))
