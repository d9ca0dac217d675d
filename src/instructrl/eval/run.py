"""``instructrl eval``: win rates, behaviour, alignment tax, best-of-n and over-optimization for saved policies.

Every policy in ``policies`` answers the same held-out sandbox prompts (one sampled response each), or the
prompts of a file (``prompts=FILE.jsonl``: no world, see below). Each
comparison (policy vs baseline) is judged by every configured judge — the gold judgement, held-out
simulated labelers, the reward model, a user's callable (see :mod:`instructrl.eval.judges`) — giving win
rates with 95% Wilson intervals, overall and by prompt type and category. With a reward model, best-of-n
sampling from ``bon_policy`` is a further policy, and its expected gold and proxy scores for n = 1, 2, 4…
trace the best-of-n over-optimization curve; PPO runs in ``ppo_runs`` contribute their training curves
and, when they saved ``policy-iter-XXXX`` snapshots, the RL curve. The report (HTML, Markdown,
metrics.json) goes to ``output_dir``; the headline table is printed.

Without a world (``prompts`` is a file) the judges are the reward model and the user's callable; the headline
win rates use the callable (else the reward model) in place of the gold judge, and what needs a world (the gold
and labeler judges, the reference ceiling, behaviour flags, the alignment tax, best-of-n and the RL
over-optimization curves, all of which read the world's gold judgement, analysis or held-out text) is skipped,
with the report's rows saying so. Nothing of the sandbox is read then.

Example::

    instructrl eval --set 'policies={sft: runs/sandbox/sft, ppo_ptx: runs/sandbox/ppo_ptx/policy}' \\
        --set reward_model=runs/sandbox/rm --set 'ppo_runs={ppo_ptx: runs/sandbox/ppo_ptx}'
    instructrl eval --set 'policies={sft: runs/sft, ppo: runs/ppo/policy}' --set prompts=test_prompts.jsonl \\
        --set custom_judge=my_judge.py:judge
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from instructrl.config import (
    RunSettings,
    require,
    require_non_negative,
    require_path_exists,
    require_positive,
    save_config,
)
from instructrl.data.loading import load_prompts
from instructrl.errors import UserFacingError
from instructrl.eval.best_of_n import ProxyGoldRow, proxy_gold_agreement, sample_best_of_n
from instructrl.eval.judges import (
    CallableJudge,
    GoldJudge,
    Judge,
    LabelerJudge,
    RewardModelJudge,
    judge_pair,
    load_callable,
)
from instructrl.eval.overopt import OverOptCurve, policy_snapshots, rl_curve
from instructrl.eval.report import (
    PROMPTED_SUFFIX,
    HeadlineRow,
    ReportData,
    RMAccuracy,
    Roles,
    SampleRow,
    WinRateRow,
    build_headline,
    format_headline,
    headline_metrics,
    write_report,
)
from instructrl.eval.sandbox_eval import (
    PolicyEval,
    behaviour_row,
    eval_tasks,
    evaluate_policy,
    reference_policy_eval,
)
from instructrl.eval.tax import TaxRow, measure_tax
from instructrl.sandbox.labelers import DEFAULT_TIE_THRESHOLD
from instructrl.stages.common import log_data_source, set_threads
from instructrl.utils.io import atomic_write_json, read_jsonl_lenient
from instructrl.utils.seed import seed_everything
from instructrl.world import DEFAULT_WORLD, OPTIONAL_EXTRAS, Task, World, describe_world, has_extra, load_world

JUDGES = ("gold", "labelers", "rm", "custom")
REFERENCE = "reference"
"""Name of the pseudo-policy that answers with the world's ideal responses (``reference_ceiling``)."""
WORLD_JUDGES = ("gold", "labelers")
"""Judges that ask a world (its gold judgement, its simulated labelers)."""
NEEDS_A_WORLD = "gold and labeler judges, reference ceiling, behaviour, alignment tax, best-of-n, RL over-optimization"
"""What an evaluation without a world (prompts from a file) cannot compute."""


@dataclass
class Config:
    """Evaluation of saved policies on held-out sandbox prompts (or a prompts file of yours), and the report."""

    output_dir: str = "runs/sandbox/eval"
    """Where report.html, report.md, metrics.json, plots/ and results.json go."""
    policies: dict = field(default_factory=dict)
    """Policies to evaluate: name -> causal-LM directory, e.g. {sft: runs/sandbox/sft, ppo_ptx:
    runs/sandbox/ppo_ptx/policy}."""
    baseline: str = "sft"
    """The policy every other one is compared with when ``comparisons`` is empty."""
    comparisons: list[str] = field(default_factory=list)
    """'policy:baseline' pairs to judge; empty = every other policy (and best-of-n) against ``baseline``. The
    headline pairs (PPO-ptx vs SFT, vs the larger base model plain and prompted, vs the larger SFT) are added when
    their models are evaluated."""
    prompted: list[str] = field(default_factory=list)
    """Policies also evaluated few-shot prompted, as the paper's "GPT-3 prompted": ``prompt_examples`` worked
    instruction-response examples go before every prompt (meant for base models, which otherwise continue a
    prompt as web text). Each is a further policy named '<name>_prompted'."""
    prompt_examples: int = 4
    """Worked examples in the few-shot prefix of ``prompted`` policies (one per harmless task category, 1-4)."""
    judges: list[str] = field(default_factory=lambda: list(JUDGES))
    """Judges to run: gold, labelers, rm, custom. 'rm' runs only when ``reward_model`` is set and 'custom' only
    when ``custom_judge`` is set."""
    gold_tie_margin: float = DEFAULT_TIE_THRESHOLD
    """Gold scores closer than this are a tie for the 'gold' judge (default: the labelers' tie threshold), so a
    rewording that only moves the gold score's tiny per-character tie-breaker is no win; 0 = any difference."""
    labelers: list[int] = field(default_factory=list)
    """Simulated labelers of the 'labelers' judge; empty = the reward model's held-out labelers (from its
    results.json), or every labeler when it has none."""
    reward_model: str | None = None
    """Reward model (saved by ``instructrl rm``): the 'rm' judge, best-of-n and the proxy score (a PPO run's own
    reward model, when its folder still exists, is the proxy of that run's over-optimization curve)."""
    custom_judge: str | None = None
    """A judge function 'package.module:function' or 'path/to/file.py:function': judge(prompt, response_a,
    response_b) -> float in [0, 1] (1 = A better, 0.5 = tie), or score(prompt, response) -> float."""
    custom_judge_kind: Literal["auto", "pairwise", "scorer"] = "auto"
    """'auto' decides by the number of required arguments (3 = pairwise, 2 = scorer)."""
    sandbox_seed: int = 0
    """Seed of the world (``run.world``, default the sandbox) whose prompts, labelers and gold judgement are used
    (``prompts`` a number)."""
    split: Literal["train", "valid", "test"] = "test"
    """Sandbox prompt split (test = held-out users, as the paper's evaluation); unused with a prompts file."""
    prompts: int | str = 300
    """A number N: the first N distinct prompts of the sandbox's ``split`` (0 = all). Or a prompts JSONL file
    (``{"prompt", "category"?, "type"?}`` records, every distinct prompt): evaluated without a world, judged by
    ``custom_judge`` and ``reward_model`` only; the report marks what needs a world."""
    max_new_tokens: int = 48
    """Response length cap in tokens."""
    temperature: float = 1.0
    """Sampling temperature of the win-rate responses (0 = greedy). Best-of-n samples at 1.0 and the
    over-optimization curve at each PPO run's rollout temperature, so that its KL is the one PPO measured."""
    reference_ceiling: bool = True
    """Also judge the sandbox's ideal responses (the bare correct answer, a short refusal) as a policy named
    'reference': its win rate against the baseline is the most any policy can reach on these prompts with this
    judge (the headline's first row quotes it), so a win rate can be read against what was possible."""
    best_of_n: int = 16
    """n of the best-of-n baseline (argmax of the reward model over n samples); 0 = off. Needs reward_model."""
    bon_policy: str | None = None
    """Policy best-of-n samples from; unset = ``baseline``."""
    missing_eos_score: float | None = -1.0
    """Proxy score of a sample that never emitted EOS (as PPO rewards it); null keeps the RM score."""
    ppo_runs: dict = field(default_factory=dict)
    """PPO output folders, name -> dir: training curves from metrics.jsonl and, from policy-iter-XXXX
    snapshots, the over-optimization curve."""
    overopt_prompts: int = 100
    """Prompts sampled per checkpoint for the over-optimization curve (first of the evaluation prompts)."""
    overopt_reference: str | None = None
    """KL reference of the over-optimization curve; unset = each PPO run's ref_policy (or policy)."""
    base_model: str | None = None
    """The pretrained base model, measured in the alignment-tax table (as ``role_base``)."""
    tax: bool = True
    """Measure the alignment tax (held-out perplexity, next-token accuracy, fact and continuation probes)."""
    heldout_docs: int = 500
    """Held-out non-instruction documents for the alignment tax."""
    tax_seq_len: int = 128
    """Tokens per perplexity window (capped at each model's context)."""
    rm_results: str | None = None
    """The reward model's results.json (accuracies); unset = reward_model/results.json when it exists."""
    agreement: str | None = None
    """agreement.json from ``instructrl sandbox make`` (inter-labeler agreement)."""
    round2_rm_results: str | None = None
    """results.json of a second round's reward model (``rm`` with ``sandbox_round2_reward_model``): row 4e, how
    well the first reward model ranks its PPO policy's samples by the labelers' rankings."""
    role_sft: str = "sft"
    """Name of the SFT policy in the headline table."""
    role_ppo: str = "ppo"
    """Name of the PPO (no ptx) policy in the headline table."""
    role_ppo_ptx: str = "ppo_ptx"
    """Name of the PPO-ptx policy in the headline table."""
    role_large_sft: str = "sft_large"
    """Name of the larger SFT model in the headline table (the optional row 2c)."""
    role_large_base: str = "base_large"
    """Name of the larger base model (pretraining only) in the headline table: row 2 plain, row 2b prompted (as
    '<name>_prompted', when it is in ``prompted``)."""
    role_base: str = "base"
    """Name of the base model in the headline and alignment-tax tables."""
    samples: int = 4
    """Prompts shown with every model's response side by side."""
    title: str = "instructrl evaluation"
    """Report title."""
    run: RunSettings = field(default_factory=RunSettings)
    """Seed (sampling and the labeler judge), threads and device; eval neither trains nor resumes, so it ignores
    resume, force_resume and max_nonfinite_steps and refuses precision=bf16 and trackers (report_to)."""

    def validate(self) -> None:
        require_non_negative(self, "best_of_n", "samples", "temperature", "gold_tie_margin")
        if isinstance(self.prompts, str):
            require_path_exists(self, "prompts")
        else:
            require_non_negative(self, "prompts")
        require_positive(self, "max_new_tokens", "overopt_prompts", "heldout_docs", "tax_seq_len")
        require(1 <= self.prompt_examples <= 4, "prompt_examples", "must be 1-4 (one per harmless task category)")
        unknown_prompted = sorted(set(self.prompted) - set(self.policies))
        require(not unknown_prompted, "prompted", f"{unknown_prompted} are not in policies {sorted(self.policies)}")
        taken = sorted({name + PROMPTED_SUFFIX for name in self.prompted} & set(self.policies))
        require(not taken, "prompted", f"the policy names {taken} are taken by the prompted policies")
        for name in ("policies", "ppo_runs"):
            mapping = getattr(self, name)
            require(
                all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()),
                name,
                "must map names to directory paths",
            )
            require(not any(":" in k for k in mapping), name, "names may not contain ':'")
        # model paths are checked when the run starts (a pipeline may build this config before training them)
        unknown = sorted(set(self.judges) - set(JUDGES))
        require(not unknown, "judges", f"unknown judges {unknown}; known: {list(JUDGES)}")
        for pair in self.comparisons:
            require(
                pair.count(":") == 1 and all(pair.split(":")),
                "comparisons",
                f"expected 'policy:baseline', got {pair!r}",
            )
        require(self.run.precision == "fp32", "run.precision", "eval runs its models in float32 only")
        require(not self.run.tracker_names(), "run.report_to", "eval logs no training metrics (it must be 'none')")


# --------------------------------------------------------------------------- pieces


def comparison_pairs(cfg: Config, evaluated: list[str], roles: Roles) -> list[tuple[str, str]]:
    """``(policy, baseline)`` pairs: configured or every policy vs the baseline, plus the headline pairs."""
    if cfg.comparisons:
        pairs = [tuple(p.split(":")) for p in cfg.comparisons]
    else:
        pairs = [(name, cfg.baseline) for name in evaluated if name != cfg.baseline]
    headline_pairs = (
        (roles.ppo_ptx, roles.sft),
        (roles.ppo_ptx, roles.large_base),
        (roles.ppo_ptx, roles.large_base_prompted),
        (roles.ppo_ptx, roles.large_sft),
        (roles.reference, roles.sft),
        (roles.ppo_ptx_round2, roles.ppo_ptx),
    )
    for extra in headline_pairs:
        if all(name in evaluated for name in extra) and extra not in pairs:
            pairs.append(extra)
    missing = sorted({name for pair in pairs for name in pair} - set(evaluated))
    if missing:
        raise UserFacingError(f"comparisons name {missing}, which were not evaluated; evaluated: {evaluated}")
    return pairs  # type: ignore[return-value]


def heldout_labelers_of(rm_results: dict | None) -> list[int]:
    """The reward model's held-out labeler ids that are integers (sandbox labelers), else []."""
    out = []
    for name in (rm_results or {}).get("heldout_labelers") or []:
        try:
            out.append(int(name))
        except (TypeError, ValueError):
            continue
    return out


def build_judges(cfg: Config, world: World | None, scorer, labelers: list[int]) -> list[Judge]:
    """The configured judges that can run: 'gold' and 'labelers' need a world, 'rm' a reward model, 'custom' a
    callable."""
    judges: list[Judge] = []
    for name in cfg.judges:
        if name in WORLD_JUDGES and world is None:
            continue
        if name == "gold":
            judges.append(GoldJudge(world, tie_margin=cfg.gold_tie_margin))
        elif name == "labelers":
            judges.append(LabelerJudge(world, labelers, seed=cfg.run.seed))
        elif name == "rm" and scorer is not None:
            judges.append(RewardModelJudge(scorer))
        elif name == "custom" and cfg.custom_judge:
            judges.append(CallableJudge(load_callable(cfg.custom_judge), cfg.custom_judge_kind, seed=cfg.run.seed))
    return judges


def load_rm_accuracy(
    rm_results: dict | None, agreement_path: str | None, round2_rm_results: str | None = None
) -> RMAccuracy | None:
    """RM accuracies from the RM's results.json, agreement from ``sandbox make``'s agreement.json and, from a
    second round's RM results, the first RM's accuracy on its PPO policy's samples."""
    agreement = json.loads(Path(agreement_path).read_text()) if agreement_path else None
    round2 = json.loads(Path(round2_rm_results).read_text()) if round2_rm_results else {}
    on_policy = round2.get("previous_rm_on_round2") or {}
    if rm_results is None and agreement is None:
        return None
    valid = (rm_results or {}).get("valid") or {}
    heldout = (rm_results or {}).get("heldout") or {}
    on_samples = (rm_results or {}).get("labeler_agreement_on_samples") or {}
    return RMAccuracy(
        train_labelers_accuracy=valid.get("accuracy"),
        train_labelers_pairs=int(valid.get("pairs") or 0),
        heldout_labelers_accuracy=heldout.get("accuracy"),
        heldout_labelers_pairs=int(heldout.get("pairs") or 0),
        labeler_agreement=agreement.get("mean") if agreement else None,
        labeler_agreement_stderr=agreement.get("stderr") if agreement else None,
        heldout_labelers=[str(x) for x in (rm_results or {}).get("heldout_labelers") or []],
        sample_agreement=on_samples.get("mean"),
        sample_agreement_stderr=on_samples.get("stderr"),
        train_labelers_stderr=valid.get("accuracy_stderr"),
        heldout_labelers_stderr=heldout.get("accuracy_stderr"),
        policy_samples_accuracy=on_policy.get("accuracy"),
        policy_samples_stderr=on_policy.get("accuracy_stderr"),
        policy_samples_pairs=int(on_policy.get("pairs") or 0),
        train_labelers_baselines=valid.get("baselines"),
        heldout_labelers_baselines=heldout.get("baselines"),
    )


def pick_samples(tasks: list[Task], evals: dict[str, PolicyEval], n: int) -> list[SampleRow]:
    """``n`` prompts, one per category first (in the order categories appear), with every model's response."""
    chosen: list[int] = []
    seen: set[str] = set()
    for i, t in enumerate(tasks):
        if len(chosen) < n and t.category not in seen:
            chosen.append(i)
            seen.add(t.category)
    chosen += [i for i in range(len(tasks)) if i not in chosen][: n - len(chosen)]
    return [
        SampleRow(
            tasks[i].prompt,
            tasks[i].category,
            tasks[i].type,
            {name: pe.responses[i] for name, pe in evals.items()},
            {name: pe.gold[i] for name, pe in evals.items() if pe.gold},
        )
        for i in sorted(chosen)
    ]


def ppo_saved_config(ppo_dir: str | Path) -> dict:
    path = Path(ppo_dir) / "instructrl_ppo.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def parameter_counts(cfg: Config, names: list[str]) -> dict[str, int]:
    from instructrl.models.causal_lm import count_parameters, load_causal_lm

    return {name: count_parameters(load_causal_lm(cfg.policies[name])) for name in names if name in cfg.policies}


def file_tasks(path: str) -> list[Task]:
    """The distinct prompts of a prompts JSONL file as tasks of no world; a record's ``category`` and ``type``
    fields, when present, group the breakdowns."""
    records, _ = load_prompts(path)
    seen: set[str] = set()
    tasks = []
    for i, record in enumerate(records):
        if record.prompt in seen:
            continue
        seen.add(record.prompt)
        category, type_ = record.meta.get("category", "all"), record.meta.get("type", "plain")
        tasks.append(Task(str(i), record.prompt, str(category), str(type_), record.user_id or "", "file"))
    return tasks


ROW_NEEDS = {
    "1b": (None, "the labeler judge"),
    "3": ("heldout_text", "the world's held-out text"),
    "2b": ("reference_response", "the few-shot prefix's worked examples"),
    "5": ("analysis", "the world's analysis of responses"),
}
"""Headline rows that need a world (1b) or one of its optional extras (2b, 3, 5): row id -> (extra, what it
reads)."""


def mark_rows_needing_a_world(rows: list[HeadlineRow], world: World | None = None) -> list[HeadlineRow]:
    """Headline rows left empty because there was no world (1b: the labeler judge; 3: held-out text; 5: the
    world's analysis of responses), or because the world lacks the optional extra the row reads (3:
    ``heldout_text``, 5: ``analysis``), say so instead of "not evaluated"."""
    marked = []
    for row in rows:
        extra, what = ROW_NEEDS.get(row.id) or ROW_NEEDS.get(row.id[0]) or (None, None)
        if row.value is None and what and world is None:
            row = dataclasses.replace(row, note=f"needs a world ({what})")
        elif row.value is None and extra and not has_extra(world, extra):
            row = dataclasses.replace(row, note=f"needs a world with {extra}() ({what}); see instructrl.world")
        marked.append(row)
    return marked


def lacking_extras(world: World) -> str:
    """``"; without heldout_text, analysis"``: the optional extras (``instructrl.world.OPTIONAL_EXTRAS``) that the
    world lacks, for the report's info table ("" when it has all)."""
    missing = [name for name in OPTIONAL_EXTRAS if not has_extra(world, name)]
    return f"; without {', '.join(missing)} (rows needing them are not computed)" if missing else ""


# --------------------------------------------------------------------------- the command


def check_paths(cfg: Config) -> None:
    """Every configured model and file exists (checked at run time, not when the config is built)."""
    named = [(f"policies.{k}", v) for k, v in cfg.policies.items()] + [
        (f"ppo_runs.{k}", v) for k, v in cfg.ppo_runs.items()
    ]
    for key in ("reward_model", "rm_results", "agreement", "round2_rm_results", "base_model", "overopt_reference"):
        if getattr(cfg, key):
            named.append((key, getattr(cfg, key)))
    if isinstance(cfg.prompts, str):
        named.append(("prompts", cfg.prompts))
    missing = [f"{key}: {path}" for key, path in named if not Path(path).exists()]
    if missing:
        raise UserFacingError("paths not found: " + "; ".join(missing))
    if not cfg.policies:
        raise UserFacingError("no policies to evaluate; set policies={name: model_dir, ...}")


def _rm_results(cfg: Config) -> dict | None:
    path = cfg.rm_results
    if path is None and cfg.reward_model and (Path(cfg.reward_model) / "results.json").is_file():
        path = str(Path(cfg.reward_model) / "results.json")
    return json.loads(Path(path).read_text()) if path else None


def judge_all(
    judges: list[Judge], evals: dict[str, PolicyEval], pairs: list[tuple[str, str]]
) -> tuple[list[WinRateRow], list[WinRateRow]]:
    """Overall win rates and their breakdowns by prompt type and category, for every pair and judge."""
    win_rates, breakdowns = [], []
    for policy, baseline in pairs:
        for judge in judges:
            judgement = judge_pair(judge, evals[policy], evals[baseline])
            win_rates.append(WinRateRow.of(policy, baseline, judge.name, "all", judgement.overall()))
            for attribute in ("type", "category"):
                for group, wr in judgement.by(attribute).items():
                    breakdowns.append(WinRateRow.of(policy, baseline, judge.name, f"{attribute}={group}", wr))
            print(f"[eval] {policy} vs {baseline} ({judge.name}): {judgement.overall()}", flush=True)
    return win_rates, breakdowns


def ppo_run_curve(cfg: Config, name: str, ppo_dir: str, world: World, tasks: list[Task], scorer, device):
    """The RL over-optimization curve of one PPO run, sampled as its rollouts were (temperature, length)."""
    from instructrl.models.scoring import RewardScorer

    saved = ppo_saved_config(ppo_dir)
    generation = saved.get("generation") or {}
    reference = cfg.overopt_reference or saved.get("ref_policy") or saved.get("policy")
    # The proxy is the reward the run optimized (a second round's PPO has its own RM); reward_model if it is gone.
    own = saved.get("reward_model")
    proxy_path = own if own and Path(own).exists() else cfg.reward_model
    if not reference or not Path(reference).exists() or not proxy_path or not Path(proxy_path).exists():
        raise UserFacingError(
            f"over-optimization of {ppo_dir}: cannot find its reference policy ({reference}) or reward model "
            f"({proxy_path}); set overopt_reference and reward_model"
        )
    same = cfg.reward_model and Path(proxy_path).resolve() == Path(cfg.reward_model).resolve()
    proxy = scorer if same else RewardScorer(proxy_path, device=device)
    print(f"[eval] over-optimization: {name} (reference {reference})", flush=True)
    return rl_curve(
        name,
        ppo_dir,
        reference,
        world,
        tasks[: cfg.overopt_prompts],
        proxy,
        max_new_tokens=int(generation.get("max_new_tokens", cfg.max_new_tokens)),
        temperature=float(generation.get("temperature", 1.0)),
        missing_eos_score=saved.get("missing_eos_score", cfg.missing_eos_score),
        seed=cfg.run.seed,
        device=device,
    )


def collect(cfg: Config) -> ReportData:
    """Run every evaluation of ``cfg`` and return the report's data (nothing is written)."""
    from instructrl.models.scoring import RewardScorer, resolve_device

    check_paths(cfg)
    t0 = time.time()
    device = resolve_device(cfg.run.device)
    world = load_world(cfg.run.world, cfg.sandbox_seed) if isinstance(cfg.prompts, int) else None
    if world is not None:
        tasks = eval_tasks(world, cfg.split, cfg.prompts)
        log_data_source("eval", "prompts", f"{describe_world(cfg.run.world, cfg.sandbox_seed)}, {cfg.split} split")
    else:
        tasks = file_tasks(str(cfg.prompts))
        log_data_source("eval", "prompts", f"{cfg.prompts} (no world: {NEEDS_A_WORLD} are not computed)")
    if not tasks:
        raise UserFacingError(f"the {cfg.split} split has no prompts" if world else f"prompts: {cfg.prompts} is empty")
    # Without a world the user's judge (else the reward model) stands in for the gold judge in the headline.
    headline_judge = "gold" if world else "custom" if cfg.custom_judge and "custom" in cfg.judges else "rm"
    if world is None and not (headline_judge == "custom" or (cfg.reward_model and "rm" in cfg.judges)):
        raise UserFacingError(
            f"prompts: {cfg.prompts} is a file, so there is no world for the gold and labeler judges; set "
            "custom_judge=file.py:function or reward_model=DIR (with 'custom' or 'rm' in judges)"
        )
    roles = Roles(
        cfg.role_sft,
        cfg.role_ppo,
        cfg.role_ppo_ptx,
        cfg.role_large_sft,
        cfg.role_base,
        cfg.role_large_base,
        judge=headline_judge,
    )
    if cfg.baseline not in cfg.policies and not cfg.comparisons:
        raise UserFacingError(f"baseline {cfg.baseline!r} is not one of the policies {list(cfg.policies)}")

    evals: dict[str, PolicyEval] = {}
    runs = [(name, path, 0) for name, path in cfg.policies.items()]
    # The few-shot prefix is made of the world's ideal answers: without them row 2b says what it needs.
    prompted = cfg.prompted if has_extra(world, "reference_response") else []
    runs += [(name + PROMPTED_SUFFIX, cfg.policies[name], cfg.prompt_examples) for name in prompted]
    for name, path, examples in runs:
        shots = f", {examples}-shot prompted" if examples else ""
        print(f"[eval] {name}: {len(tasks)} responses from {path}{shots}", flush=True)
        evals[name] = evaluate_policy(
            name, path, world, tasks, cfg.max_new_tokens, cfg.temperature, cfg.run.seed, device, examples
        )
    if cfg.reference_ceiling and has_extra(world, "reference_response"):
        if REFERENCE in evals:
            raise UserFacingError(f"policies: the name {REFERENCE!r} is reserved for the reference ceiling")
        evals[REFERENCE] = reference_policy_eval(world, tasks)
    rm_results = _rm_results(cfg)
    scorer = RewardScorer(cfg.reward_model, device=device) if cfg.reward_model else None

    bon_curves: list[OverOptCurve] = []
    rm_vs_gold: list[ProxyGoldRow] = []
    if cfg.best_of_n and scorer is not None and world is not None:  # the gold judge scores the best-of-n curve
        source = cfg.bon_policy or cfg.baseline
        if source not in cfg.policies:
            raise UserFacingError(f"bon_policy {source!r} is not one of the policies {list(cfg.policies)}")
        print(f"[eval] best-of-{cfg.best_of_n} from {source}", flush=True)
        bon = sample_best_of_n(
            cfg.policies[source], world, tasks, scorer, cfg.best_of_n, cfg.max_new_tokens,
            missing_eos_score=cfg.missing_eos_score, seed=cfg.run.seed, device=device,
        )  # fmt: skip
        evals[f"best-of-{cfg.best_of_n}"] = bon.policy_eval(world)
        bon_curves.append(bon.curve(run=f"best-of-n from {source}"))
        rm_vs_gold = proxy_gold_agreement(bon, world, cfg.gold_tie_margin) if has_extra(world, "analysis") else []

    labelers = cfg.labelers or heldout_labelers_of(rm_results)
    judges = build_judges(cfg, world, scorer, labelers)
    win_rates, breakdowns = judge_all(judges, evals, comparison_pairs(cfg, list(evals), roles))

    tax: list[TaxRow] = []
    if cfg.tax and has_extra(world, "heldout_text"):
        heldout = world.heldout_text(cfg.heldout_docs)
        tax_models = ({roles.base: cfg.base_model} if cfg.base_model else {}) | dict(cfg.policies)
        for name, path in tax_models.items():
            print(f"[eval] alignment tax: {name}", flush=True)
            facts = None if cfg.run.world == DEFAULT_WORLD else []  # the closed-book probes are the sandbox's facts
            tax.append(measure_tax(name, path, heldout, cfg.tax_seq_len, fact_probe_list=facts, device=device))

    training_curves, rl_curves = {}, []
    for name, ppo_dir in cfg.ppo_runs.items():
        if (Path(ppo_dir) / "metrics.jsonl").is_file():
            training_curves[name] = read_jsonl_lenient(Path(ppo_dir) / "metrics.jsonl")
        if not policy_snapshots(ppo_dir):
            print(f"[eval] {name}: no policy-iter-XXXX snapshots, no over-optimization curve", flush=True)
        elif world is None:
            print(f"[eval] {name}: no over-optimization curve without a world (it reads the gold judge)", flush=True)
        else:
            rl_curves.append(ppo_run_curve(cfg, name, ppo_dir, world, tasks, scorer, device))

    behaviour = [behaviour_row(pe, world) for pe in evals.values()] if has_extra(world, "analysis") else []
    rm = load_rm_accuracy(rm_results, cfg.agreement, cfg.round2_rm_results)
    parameters = parameter_counts(cfg, [roles.ppo_ptx, roles.large_sft, roles.large_base])
    world_info = (
        f"{describe_world(cfg.run.world, cfg.sandbox_seed)}{lacking_extras(world)}"
        if world
        else f"none; not computed without one: {NEEDS_A_WORLD}"
    )
    info = {
        "world": world_info,
        "prompts": f"{len(tasks)} ({cfg.split} split)" if world else f"{len(tasks)} from {cfg.prompts}",
        "judges": ", ".join(j.name for j in judges),
        "gold ties": f"gold scores within {cfg.gold_tie_margin:g} of each other tie",
        "labelers judging": (", ".join(map(str, labelers)) or "all") if world else "-",
        "sampling": f"temperature {cfg.temperature}, up to {cfg.max_new_tokens} tokens",
        "policies": ", ".join(f"{k} = {v}" for k, v in cfg.policies.items()),
        "few-shot prompted": ", ".join(f"{k}{PROMPTED_SUFFIX}" for k in cfg.prompted) or "-",
        "few-shot prefix": f"{cfg.prompt_examples} worked examples, one per line" if cfg.prompted else "-",
        "reward model": str(cfg.reward_model),
        "parameters": ", ".join(f"{k} = {v:,}" for k, v in parameters.items()) or "-",
        "seconds": f"{time.time() - t0:.0f}",
    }
    headline = build_headline(roles, win_rates, behaviour, tax, rm, parameters)
    return ReportData(
        title=cfg.title,
        info=info,
        headline=mark_rows_needing_a_world(headline, world),
        win_rates=win_rates,
        breakdowns=breakdowns,
        behaviour=behaviour,
        tax=tax,
        rm=rm,
        training_curves=training_curves,
        overopt=rl_curves + bon_curves,
        samples=pick_samples(tasks, evals, cfg.samples),
        rm_vs_gold=rm_vs_gold,
    )


def run(cfg: Config) -> dict:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "instructrl_eval.yaml")
    set_threads(cfg.run.threads)
    seed_everything(cfg.run.seed)
    data = collect(cfg)
    paths = write_report(out, data)
    print("\n" + format_headline(data), flush=True)
    print(f"\n[eval] report: {paths['html']}", flush=True)
    results = {
        "headline": headline_metrics(data),
        "paths": {key: str(path) for key, path in paths.items()},
    }
    atomic_write_json(out / "results.json", results)
    return results
