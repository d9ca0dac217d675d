"""Evaluation: win-rate statistics, judges, breakdowns, alignment tax, best-of-n, over-optimization fits,
the report, and the ``instructrl eval`` command on tiny saved policies."""

from __future__ import annotations

import base64
import dataclasses
import itertools
import json
import math
import random
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from instructrl.errors import UserFacingError
from instructrl.eval import best_of_n, overopt, report, tax
from instructrl.eval.judges import (
    CallableJudge,
    GoldJudge,
    Judgement,
    LabelerJudge,
    RewardModelJudge,
    callable_kind,
    judge_pair,
    load_callable,
    ranking_outcome,
)
from instructrl.eval.sandbox_eval import (
    BehaviourRow,
    behaviour_row,
    eval_tasks,
    format_required,
    policy_eval_from_responses,
)
from instructrl.eval.stats import bootstrap_interval, outcome_win_rate, wilson_interval, win_rate
from instructrl.models.causal_lm import ModelSpec, build_causal_lm, load_causal_lm, load_tokenizer
from instructrl.models.reward import reward_model_from_causal_lm
from instructrl.models.scoring import RewardScorer
from instructrl.rl.logprobs import logprobs_from_logits
from instructrl.sandbox import SandboxWorld
from instructrl.stages.pretrain import stream_perplexity, token_stream
from instructrl.world import Task


@pytest.fixture(scope="module")
def world() -> SandboxWorld:
    return SandboxWorld(seed=0, n_users=150)


@pytest.fixture(scope="module")
def tasks(world) -> list[Task]:
    return eval_tasks(world, "test")


def _save_lm(path: Path, tokenizer, seed: int) -> Path:
    torch.manual_seed(seed)
    model = build_causal_lm(ModelSpec(d_model=32, n_layers=2, n_heads=2, max_seq_len=256), tokenizer)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def two_policies(tmp_path_factory, tiny_tokenizer) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("policies")
    return _save_lm(root / "sft", tiny_tokenizer, 1), _save_lm(root / "ppo_ptx", tiny_tokenizer, 2)


@pytest.fixture(scope="module")
def tiny_rm_dir(tmp_path_factory, two_policies) -> Path:
    sft = two_policies[0]
    tokenizer = load_tokenizer(sft)
    path = tmp_path_factory.mktemp("rm")
    torch.manual_seed(3)
    model = reward_model_from_causal_lm(sft, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "results.json").write_text(
        json.dumps(
            {
                "heldout_labelers": ["6", "7"],
                "valid": {"accuracy": 0.71, "pairs": 400},
                "heldout": {"accuracy": 0.68, "pairs": 300},
            }
        )
    )
    return path


# --------------------------------------------------------------------------- statistics


def test_wilson_interval_matches_published_values():
    # Wilson (1927) score intervals at 95%, as tabulated by Newcombe (1998, Table I) and any stats package.
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(15, 148) == pytest.approx((0.0624, 0.1605), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_wilson_interval_contains_the_rate_at_its_extremes():
    # In exact arithmetic the bound at p = 1 (or 0) is p itself; rounding once gave 0.9999999999999999 at n = 4
    # and 10, a negative error bar that made the report's win-rate plot fail.
    for n in range(1, 200):
        assert wilson_interval(n, n)[1] == 1.0 and wilson_interval(0, n)[0] == 0.0


def test_ties_count_half_in_both_win_rate_forms():
    wr = win_rate([1.0, 0.3, 0.5, 0.5], [0.0, 0.9, 0.5, 0.5])
    assert (wr.wins, wr.ties, wr.losses, wr.rate) == (1, 2, 1, 0.5)
    assert (wr.low, wr.high) == wilson_interval(2.0, 4)
    from_outcomes = outcome_win_rate([1.0, 0.0, 0.5, 0.5])
    assert from_outcomes == wr
    assert outcome_win_rate([0.5] * 7).rate == 0.5
    with pytest.raises(ValueError):
        outcome_win_rate([1.2])


def test_bootstrap_interval_is_close_to_wilson_for_a_large_sample():
    outcomes = [1.0] * 260 + [0.0] * 140
    low, high = bootstrap_interval(outcomes, n_resamples=4000, seed=1)
    w_low, w_high = wilson_interval(260, 400)
    assert low == pytest.approx(w_low, abs=0.01) and high == pytest.approx(w_high, abs=0.01)
    assert bootstrap_interval([1.0] * 5) == (1.0, 1.0)


# --------------------------------------------------------------------------- judges


def _wrong_but_same_type(world: SandboxWorld, task: Task) -> str:
    """A confident wrong answer of the right type (another capital, another number...)."""
    from instructrl.sandbox.tasks import wrong_answer

    return " " + " ".join(wrong_answer(world.spec(task), random.Random(0)))


def test_gold_judge_prefers_the_reference_and_ties_identical_responses(world, tasks):
    picked = [t for t in tasks if t.category != "harmful"][:10]
    good = [world.reference_response(t) for t in picked]
    bad = [_wrong_but_same_type(world, t) for t in picked]
    judge = GoldJudge(world)
    assert judge.compare(picked, good, bad) == [1.0] * 10
    assert judge.compare(picked, bad, good) == [0.0] * 10
    assert judge.compare(picked, good, good) == [0.5] * 10


def test_gold_judge_ties_rewordings_within_its_margin(world, tasks):
    harmful = [t for t in tasks if t.category == "harmful"][:5]
    short = [" i can not help with that ."] * len(harmful)
    long = [" sorry , i can not help with that ."] * len(harmful)
    # The per-character tie-breaker separates the two wordings by 0.008: a win with no margin, a tie with one.
    assert GoldJudge(world).compare(harmful, short, long) == [1.0] * len(harmful)
    assert GoldJudge(world, tie_margin=0.05).compare(harmful, short, long) == [0.5] * len(harmful)
    picked = [t for t in tasks if t.category != "harmful"][:5]
    good = [world.reference_response(t) for t in picked]
    bad = [_wrong_but_same_type(world, t) for t in picked]
    assert GoldJudge(world, tie_margin=0.05).compare(picked, good, bad) == [1.0] * len(picked)


def test_ranking_outcome_reads_tie_groups():
    assert ranking_outcome((0, 1)) == 1.0
    assert ranking_outcome((1, 0)) == 0.0
    assert ranking_outcome(((0, 1),)) == 0.5


def test_labeler_judge_uses_world_rank_and_is_reproducible(world, tasks):
    picked = [t for t in tasks if t.category != "harmful"][:40]
    good = [world.reference_response(t) for t in picked]
    insult = [" you are a stupid idiot ."] * len(picked)
    judge = LabelerJudge(world, labelers=[6, 7], seed=3)
    outcomes = judge.compare(picked, good, insult)
    assert np.mean(outcomes) > 0.9  # noisy labelers still see a correct answer beats an insult
    assert judge.compare(picked, good, insult) == outcomes
    assert judge.compare(picked, good, good) == [0.5] * len(picked)  # identical texts share the noise: a tie

    # each comparison is exactly one labeler's pairwise ranking, labelers drawn uniformly with the judge's rng
    rng = np.random.default_rng(3)
    expected = []
    for t, a, b in zip(picked[:5], good[:5], insult[:5]):
        labeler = [6, 7][int(rng.integers(2))]
        expected.append(ranking_outcome(world.rank(t, [a, b], labeler, rng)))
    assert judge.compare(picked[:5], good[:5], insult[:5]) == expected
    with pytest.raises(UserFacingError, match="do not exist"):
        LabelerJudge(world, labelers=[99])


class _TableScorer:
    """A stand-in reward model: the score is looked up from the response text."""

    def __init__(self, table: dict[str, float]):
        self.table = table
        self.calls = 0

    def score(self, prompts, responses):
        self.calls += 1
        return torch.tensor([self.table[r] for r in responses])


def test_reward_model_judge_compares_scores_in_one_batch(world, tasks):
    picked = tasks[:3]
    judge = RewardModelJudge(_TableScorer({" a": 1.0, " b": 0.0, " c": 1.0}))
    assert judge.compare(picked, [" a", " b", " a"], [" b", " a", " c"]) == [1.0, 0.0, 0.5]
    assert judge.scorer.calls == 1


def test_reward_model_judge_with_a_saved_reward_model(world, tasks, tiny_rm_dir):
    scorer = RewardScorer(tiny_rm_dir, device="cpu")
    picked = tasks[:6]
    a = [world.reference_response(t) for t in picked]
    b = [" you are a fool ."] * len(picked)
    outcomes = RewardModelJudge(scorer).compare(picked, a, b)
    prompts = [t.prompt for t in picked]
    score_a, score_b = scorer.score(prompts, a), scorer.score(prompts, b)
    assert outcomes == [1.0 if x > y else 0.0 if x < y else 0.5 for x, y in zip(score_a.tolist(), score_b.tolist())]
    assert RewardModelJudge(scorer).compare(picked, a, a) == [0.5] * len(picked)


def longer_is_better(prompt: str, response_a: str, response_b: str) -> float:
    if len(response_a) == len(response_b):
        return 0.5
    return 1.0 if len(response_a) > len(response_b) else 0.0


def word_count(prompt: str, response: str) -> float:
    return len(response.split())


def always_first(prompt, first, second):
    return 1.0


def test_custom_callable_judges_pairwise_and_scorer(world, tasks, tmp_path, monkeypatch):
    picked = tasks[:20]
    a = [" one two three"] * 20
    b = [" one"] * 18 + [" uno dos tres!", " uno dos tres quattro"]  # the 19th: equal length, equal word count
    assert callable_kind(longer_is_better) == "pairwise" and callable_kind(word_count) == "scorer"
    pairwise = CallableJudge(longer_is_better, seed=5).compare(picked, a, b)
    assert pairwise == [1.0] * 18 + [0.5, 0.0]  # random presentation order is mapped back to the policy
    assert CallableJudge(word_count).compare(picked, a, b) == [1.0] * 18 + [0.5, 0.0]

    # a judge that always prefers whatever it sees first favours neither policy: order is a seeded coin
    biased = CallableJudge(always_first, seed=5).compare(picked, a, b)
    swaps = np.random.default_rng(5).random(20) < 0.5
    assert biased == [0.0 if s else 1.0 for s in swaps]

    path = tmp_path / "my_judge.py"
    path.write_text("def judge(prompt, a, b):\n    return 2.0\n")
    bad = CallableJudge(load_callable(f"{path}:judge"))
    with pytest.raises(UserFacingError, match=r"\[0, 1\]"):
        bad.compare(picked[:1], a[:1], b[:1])
    (tmp_path / "judge_module_for_test.py").write_text("def score(prompt, response):\n    return -len(response)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    shortest = CallableJudge(load_callable("judge_module_for_test:score"))
    assert shortest.kind == "scorer" and shortest.compare(picked[:2], a[:2], b[:2]) == [0.0, 0.0]
    with pytest.raises(UserFacingError, match="expected"):
        load_callable("no_colon_here")


def test_judge_pair_refuses_responses_to_different_tasks(world, tasks):
    a = policy_eval_from_responses("a", world, tasks[:3], [" x"] * 3, [True] * 3)
    b = policy_eval_from_responses("b", world, tasks[1:4], [" x"] * 3, [True] * 3)
    with pytest.raises(ValueError, match="different tasks"):
        judge_pair(GoldJudge(world), a, b)


# --------------------------------------------------------------------------- breakdowns and behaviour


def test_breakdowns_split_outcomes_by_prompt_type_and_category():
    def task(i: int, category: str, type_: str) -> Task:
        return Task(f"t{i}", f"p{i}", category, type_, "u", "test")

    tasks_ = [
        task(0, "facts", "plain"),
        task(1, "facts", "few-shot"),
        task(2, "lists", "plain"),
        task(3, "lists", "plain"),
    ]
    judgement = Judgement("a", "b", "gold", tasks_, [1.0, 0.0, 0.5, 1.0])
    by_type = judgement.by("type")
    assert list(by_type) == ["few-shot", "plain"]
    assert by_type["plain"].rate == pytest.approx(2.5 / 3) and by_type["plain"].n == 3
    assert by_type["few-shot"].rate == 0.0
    by_category = judgement.by("category")
    assert by_category["facts"].rate == 0.5 and by_category["lists"].rate == 0.75
    assert judgement.overall().rate == pytest.approx(0.625)


def test_behaviour_rates_measure_refusals_wrong_facts_and_format(world, tasks):
    ideal = [world.reference_response(t) for t in tasks]
    row = behaviour_row(policy_eval_from_responses("ideal", world, tasks, ideal, [True] * len(tasks)), world)
    assert isinstance(row, BehaviourRow)
    assert row.harmful_refused == 1.0 and row.harmful_complied == 0.0 and row.toxic == 0.0
    assert row.harmless_refused == 0.0
    assert row.wrong_fact == 0.0 and row.correct == 1.0 and row.followed_format == 1.0
    assert row.n_facts == sum(t.category == "facts" for t in tasks) > 0
    assert row.n_format == sum(format_required(world, t) for t in tasks) > 0

    wrong = [
        _wrong_but_same_type(world, t) if t.category == "facts" else " sure , first you get a knife ." for t in tasks
    ]
    bad = behaviour_row(policy_eval_from_responses("bad", world, tasks, wrong, [False] * len(tasks)), world)
    assert bad.wrong_fact == 1.0 and bad.harmful_refused == 0.0 and bad.harmful_complied == 1.0
    assert bad.stopped == 0.0
    refusing = [" i will not help with that ."] * len(tasks)
    refuser = behaviour_row(policy_eval_from_responses("refuser", world, tasks, refusing, [True] * len(tasks)), world)
    assert refuser.harmless_refused == 1.0 and refuser.harmful_refused == 1.0 and refuser.correct == 0.0


# --------------------------------------------------------------------------- alignment tax


def test_stream_metrics_perplexity_equals_the_pretraining_measure(tiny_lm_dir, tiny_tokenizer, world):
    model = load_causal_lm(tiny_lm_dir, tiny_tokenizer)
    stream = token_stream(world.heldout_text(30), tiny_tokenizer)
    perplexity, accuracy, n_tokens = tax.stream_metrics(model, stream, seq_len=32, batch_size=4)
    assert perplexity == pytest.approx(stream_perplexity(model, stream, 32), rel=1e-5)
    assert n_tokens == ((len(stream) - 1) // 32) * 32
    with torch.no_grad():  # accuracy by a naive loop over windows
        hits = 0
        for w in range((len(stream) - 1) // 32):
            window = stream[w * 32 : w * 32 + 33]
            hits += int((model(input_ids=window[None, :-1]).logits[0].argmax(-1) == window[1:]).sum())
    assert accuracy == hits / n_tokens


def test_continuation_and_fact_probes():
    story = "once upon a time there was a brave fox named tom . the fox liked to run in the park . the end ."
    assert tax.continuation_probe(story) == tax.Probe(
        "once upon a time there was a brave fox named tom . the", "fox", "story"
    )
    description = "the park is big . there are four cats in the park . tom likes to run there ."
    assert tax.continuation_probe(description).expected == "park"
    counting = "count by 3 from 4 : 4 7 10 13 16"
    assert tax.continuation_probe(counting) == tax.Probe("count by 3 from 4 : 4 7 10", "13", "counting")
    assert tax.continuation_probe("mia counts the cats : five four three two .").expected == "two"
    assert tax.continuation_probe("nothing to see") is None
    facts = tax.fact_probes()
    assert tax.Probe("the capital of norland is", "vesk", "capital") in facts
    assert tax.Probe("a cow says", "moo", "sound") in facts


def test_probe_accuracy_scores_the_first_generated_word(tiny_lm_dir, tiny_tokenizer, monkeypatch):
    from instructrl.eval.generate import Generated

    def fake_generate(model, tokenizer, prompts, **kwargs):
        return [Generated(" vesk .", True, 3), Generated(" bellmar", True, 2), Generated("", False, 4)]

    monkeypatch.setattr(tax, "generate_responses", fake_generate)
    probes = [tax.Probe("a", "vesk", "capital"), tax.Probe("b", "vesk", "capital"), tax.Probe("c", "x", "capital")]
    assert tax.probe_accuracy(None, None, probes) == pytest.approx(1 / 3)
    assert math.isnan(tax.probe_accuracy(None, None, []))


def test_measure_tax_on_a_tiny_model(tiny_lm_dir, world):
    row = tax.measure_tax("tiny", tiny_lm_dir, world.heldout_text(20), seq_len=32)
    assert row.model == "tiny" and math.isfinite(row.heldout_perplexity) and row.heldout_perplexity > 1
    assert 0 <= row.next_token_accuracy <= 1 and 0 <= row.fact_accuracy <= 1 and 0 <= row.continuation_accuracy <= 1
    assert row.fact_probes == len(tax.fact_probes()) and row.continuation_probes == 20


# --------------------------------------------------------------------------- best-of-n


def test_reference_ceiling_answers_ideally_and_never_loses_to_a_policy(world, tasks):
    from instructrl.eval.sandbox_eval import compare, policy_eval_from_responses, reference_policy_eval

    ideal = reference_policy_eval(world, tasks)
    assert ideal.responses == [world.reference_response(t) for t in tasks] and all(ideal.stopped)
    harmless = [f for t, f in zip(tasks, ideal.flags) if t.category != "harmful"]
    assert harmless and all(f["correct"] for f in harmless)
    padded = policy_eval_from_responses("padded", world, tasks, [r + " i hope this helps ." for r in ideal.responses],
                                        [True] * len(tasks))  # fmt: skip
    outcome = compare(ideal, padded)
    assert outcome.losses == 0 and outcome.wins == len(tasks)


def test_instruction_prefix_shows_ideal_answers_to_harmless_train_prompts(world):
    from instructrl.eval.sandbox_eval import instruction_prefix

    prefix = instruction_prefix(world, 4, "|")
    shots = prefix.split("|")
    assert len(shots) == 5 and shots[-1] == ""  # four examples, each ended by the separator
    by_prompt = {t.prompt: t for t in world.tasks("train")}
    categories = []
    for shot in shots[:-1]:
        prompt, response = shot.split("\nResponse:")
        task = by_prompt[prompt + "\nResponse:"]
        assert task.type == "plain" and world.reference_response(task) == response
        categories.append(task.category)
    plain = [t.category for t in world.tasks("train") if t.type == "plain" and t.category != "harmful"]
    assert categories == list(dict.fromkeys(plain))  # one per category, in the order they first appear
    assert sorted(categories) == ["arithmetic", "facts", "lists", "string"]
    # by default one example per line: one document, as the corpus's chained instruction documents
    assert instruction_prefix(world, 4) == prefix.replace("|", "\n")
    assert instruction_prefix(world, 2, "|") == "|".join(shots[:2]) + "|"
    with pytest.raises(UserFacingError, match="one per category"):
        instruction_prefix(world, 5)


def test_prompted_evaluation_puts_the_prefix_before_each_prompt_and_judges_the_bare_task(
    world, tasks, two_policies, monkeypatch
):
    from instructrl.eval import sandbox_eval
    from instructrl.eval.generate import Generated

    seen: list[str] = []

    def fake_generate(model, tokenizer, prompts, **kwargs):
        seen.extend(prompts)
        return [Generated(" " + world.spec(t).answer_text, True, 2) for t in tasks[:3]]

    monkeypatch.setattr(sandbox_eval, "generate_responses", fake_generate)
    prompted = sandbox_eval.evaluate_policy("p", two_policies[0], world, tasks[:3], prefix_examples=2)
    prefix = sandbox_eval.instruction_prefix(world, 2)
    assert seen == [prefix + t.prompt for t in tasks[:3]] and prefix.count("Instruction: ") == 2
    assert prompted.tasks == tasks[:3]  # judged as answers to the prompts themselves
    plain = sandbox_eval.policy_eval_from_responses("q", world, tasks[:3], prompted.responses, prompted.stopped)
    assert prompted.gold == plain.gold


def test_best_of_n_kl_formula():
    assert best_of_n.bon_kl(1) == 0.0
    assert best_of_n.bon_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert best_of_n.bon_kl(16) == pytest.approx(math.log(16) - 15 / 16)
    assert best_of_n.bon_kl(10**6) == pytest.approx(math.log(10**6) - 1, abs=1e-5)
    with pytest.raises(ValueError):
        best_of_n.bon_kl(0)


def test_expected_best_of_n_equals_the_average_over_all_subsets():
    rng = random.Random(0)
    proxy = [rng.random() for _ in range(7)]
    gold = [rng.gauss(0, 1) for _ in range(7)]
    for n in range(1, 8):
        subsets = list(itertools.combinations(range(7), n))
        brute = sum(gold[max(s, key=lambda i: proxy[i])] for s in subsets) / len(subsets)
        assert best_of_n.expected_best_of_n(proxy, gold, n) == pytest.approx(brute)
        assert sum(best_of_n.best_of_n_weights(7, n)) == pytest.approx(1.0)
    assert best_of_n.expected_best_of_n(proxy, gold, 1) == pytest.approx(sum(gold) / 7)
    assert best_of_n.curve_ns(16) == [1, 2, 4, 8, 16] and best_of_n.curve_ns(6) == [1, 2, 4, 6]


def test_best_of_n_samples_pick_the_argmax_and_trace_a_curve(world, tasks):
    picked = tasks[:2]
    samples = best_of_n.BestOfNSamples(
        picked,
        texts=[[" a", " b", " c", " d"], [" e", " f", " g", " h"]],
        stopped=[[True] * 4, [True, False, True, True]],
        proxy=[[0.1, 0.9, 0.3, 0.2], [0.5, 0.7, 0.1, 0.0]],
        gold=[[0.0, 1.0, 0.0, 0.0], [0.0, -1.0, 0.0, 0.0]],
    )
    assert samples.chosen() == [1, 1]
    pe = samples.policy_eval(world)
    assert pe.name == "best-of-4" and pe.responses == [" b", " f"] and pe.stopped == [True, False]
    curve = samples.curve()
    assert [p.step for p in curve.points] == [1, 2, 4]
    assert curve.points[0].d == 0 and curve.points[0].gold == 0 and curve.points[0].proxy == 0
    assert curve.points[-1].kl == pytest.approx(best_of_n.bon_kl(4))
    assert curve.points[-1].gold_raw == pytest.approx(0.0)  # best of 4: +1 on the first prompt, −1 on the second
    assert curve.points[-1].proxy_raw == pytest.approx(0.8)


def test_proxy_gold_agreement_matches_a_naive_count(world, tasks):
    import itertools
    import random

    rng = random.Random(0)
    picked = tasks[:12]
    texts = [
        [world.reference_response(t), " 7", " i do not know .", world.reference_response(t) + " ok ."] for t in picked
    ]
    gold = [[world.gold_score(t, x) for x in row] for t, row in zip(picked, texts)]
    proxy = [[rng.choice([0.0, 0.5, 1.0]) for _ in row] for row in texts]  # ties included
    samples = best_of_n.BestOfNSamples(picked, texts, [[True] * 4 for _ in picked], proxy, gold)
    rows = {r.category: r for r in best_of_n.proxy_gold_agreement(samples, world, margin=0.05)}

    naive = {}  # category -> (pairs, agreed, right-wrong pairs, agreed), one pair at a time
    for t, row, p, g in zip(picked, texts, proxy, gold):
        flag = "refused" if t.category == "harmful" else "correct"
        for i, j in itertools.combinations(range(4), 2):
            for cat in (t.category, "all"):
                n = naive.setdefault(cat, [0, 0.0, 0, 0.0])
                if abs(g[i] - g[j]) > 0.05:
                    n[0] += 1
                    n[1] += 0.5 if p[i] == p[j] else float((p[i] > p[j]) == (g[i] > g[j]))
                ri, rj = world.analysis(t, row[i])[flag], world.analysis(t, row[j])[flag]
                if ri != rj:
                    n[2] += 1
                    n[3] += 0.5 if p[i] == p[j] else float((p[i] > p[j]) == ri)
    assert set(rows) == set(naive) and list(rows)[-1] == "all"
    for cat, (pairs, agreed, rw_pairs, rw_agreed) in naive.items():
        r = rows[cat]
        assert r.pairs == pairs and r.right_wrong_pairs == rw_pairs
        assert r.agreement == pytest.approx(agreed / pairs if pairs else None)
        assert r.right_wrong_agreement == pytest.approx(rw_agreed / rw_pairs if rw_pairs else None)

    perfect = best_of_n.BestOfNSamples(picked, texts, samples.stopped, gold, gold)
    assert all(r.agreement in (1.0, None) for r in best_of_n.proxy_gold_agreement(perfect, world, margin=0.05))


def test_sample_best_of_n_with_tiny_models(world, tasks, two_policies, tiny_rm_dir):
    scorer = RewardScorer(tiny_rm_dir, device="cpu")
    picked = [t for t in tasks if t.type == "plain"][:3]
    samples = best_of_n.sample_best_of_n(two_policies[0], world, picked, scorer, 3, max_new_tokens=6, seed=1)
    assert samples.n == 3 and len(samples.texts) == 3
    for task, texts, stopped, proxy, gold in zip(picked, samples.texts, samples.stopped, samples.proxy, samples.gold):
        assert gold == [world.gold_score(task, t) for t in texts]
        raw = scorer.score([task.prompt] * 3, texts).tolist()
        assert proxy == pytest.approx([r if s else -1.0 for r, s in zip(raw, stopped)], abs=1e-4)


# --------------------------------------------------------------------------- over-optimization


@pytest.mark.parametrize("form", ["rl", "bon"])
def test_fits_recover_known_coefficients(form):
    alpha, beta = 0.62, 0.11
    ds = [0.0] + [0.25 * i for i in range(1, 30)]
    rs = [overopt.predict(form, d, alpha, beta) for d in ds]
    fit = overopt.fit_form(form, ds, rs)
    assert fit.alpha == pytest.approx(alpha, abs=1e-9) and fit.beta == pytest.approx(beta, abs=1e-9)
    assert fit.rmse == pytest.approx(0.0, abs=1e-9) and fit.n_points == len(ds)

    noisy = [r + n for r, n in zip(rs, np.random.default_rng(0).normal(0, 0.01, len(rs)))]
    fit = overopt.fit_form(form, ds, noisy)
    assert fit.alpha == pytest.approx(alpha, abs=0.03) and fit.beta == pytest.approx(beta, abs=0.03)


def test_fit_peaks_and_degenerate_inputs():
    bon = overopt.Fit("bon", 0.6, 0.1, 0.0, 5)
    assert bon.peak_d == pytest.approx(3.0) and bon(3.0) == pytest.approx(0.9)  # α²/(4β)
    rl = overopt.Fit("rl", 0.5, 0.25, 0.0, 5)
    assert rl.peak_d == pytest.approx(math.exp(1.0)) and rl(rl.peak_d) == pytest.approx(0.25 * math.e)  # β·d*
    assert overopt.Fit("rl", 0.5, -0.1, 0.0, 5).peak_d is None
    assert overopt.fit_rl([0.0, 1.0], [0.0, 0.3]) is None  # one informative point
    assert overopt.fit_bon([2.0, 2.0, 2.0], [1.0, 1.0, 1.0]) is None  # all at one d: singular
    with pytest.raises(ValueError):
        overopt.fit_form("linear", [1.0], [1.0])


def test_relative_points_recentre_on_the_initial_policy():
    points = overopt.relative_points("rl", "run", [("reference", 0, 0.0, 0.2, -0.1), ("iter-0002", 2, 4.0, 0.5, 0.7)])
    assert [(p.d, p.gold, p.proxy) for p in points] == [(0.0, 0.0, 0.0), (2.0, pytest.approx(0.3), pytest.approx(0.8))]


def test_sampled_kl_matches_an_unbatched_computation(two_policies, tiny_tokenizer, tasks):
    policy = load_causal_lm(two_policies[1], tiny_tokenizer).eval()
    reference = load_causal_lm(two_policies[0], tiny_tokenizer).eval()
    prompts = [t.prompt for t in tasks if t.type == "plain"][:4]
    prompt_ids = [tiny_tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    samples = overopt.sample_responses(
        policy, tiny_tokenizer, prompt_ids, 2, max_new_tokens=6, seed=0, batch_size=3, ref_model=reference
    )
    assert samples.prompt_index == [0, 0, 1, 1, 2, 2, 3, 3]
    eos = tiny_tokenizer.eos_token_id
    with torch.no_grad():
        for i, ids, stopped, kl in zip(samples.prompt_index, samples.response_ids, samples.stopped, samples.kl):
            response = ids + ([eos] if stopped else [])
            sequence = torch.tensor([prompt_ids[i] + response])  # no padding at all
            start = len(prompt_ids[i]) - 1
            target = torch.tensor([response])
            lp = logprobs_from_logits(policy(sequence).logits[:, start:-1], target)
            ref = logprobs_from_logits(reference(sequence).logits[:, start:-1], target)
            assert kl == pytest.approx(float((lp - ref).sum()), abs=1e-4)
    assert samples.texts == [tiny_tokenizer.decode(ids, skip_special_tokens=True) for ids in samples.response_ids]


def _fake_ppo_run(root: Path, reference: Path, other: Path, reward_model: Path) -> Path:
    """A PPO output folder: metrics.jsonl, the saved config and two policy snapshots."""
    import shutil

    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(reference, root / "policy-iter-0002")
    shutil.copytree(other, root / "policy-iter-0004")
    records = [
        {"step": s, "objective/score": 0.1 * s, "objective/reward": 0.1 * s - 0.01, "objective/kl": 0.5 * s,
         "objective/beta": 0.02, "loss/value": 1.0 / s, "response/length": 10 + s}
        for s in range(1, 5)
    ]  # fmt: skip
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "instructrl_ppo.yaml").write_text(
        yaml.safe_dump({"policy": str(reference), "ref_policy": None, "reward_model": str(reward_model)})
    )
    return root


def test_rl_curve_over_snapshots(tmp_path, two_policies, tiny_rm_dir, world, tasks):
    sft, other = two_policies
    run_dir = _fake_ppo_run(tmp_path / "ppo", sft, other, tiny_rm_dir)
    assert [i for i, _ in overopt.policy_snapshots(run_dir)] == [2, 4]
    picked = [t for t in tasks if t.type == "plain"][:4]
    curve = overopt.rl_curve(
        "ppo", run_dir, sft, world, picked, RewardScorer(tiny_rm_dir, device="cpu"), max_new_tokens=6
    )
    labels = [p.label for p in curve.points]
    assert labels == ["reference", "iter-0002", "iter-0004"]
    reference, same, different = curve.points
    assert reference.kl == 0.0 and same.kl == 0.0  # the snapshot equal to the reference samples the same
    assert same.gold == 0.0 and same.proxy == 0.0
    assert different.kl > 0 and different.d == pytest.approx(math.sqrt(different.kl))
    with pytest.raises(UserFacingError, match="save_policy_every"):
        overopt.rl_curve("x", tmp_path, sft, world, picked, None)


# --------------------------------------------------------------------------- report


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: dict[str, str] = {}
        self.tables: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images[attrs["id"]] = attrs["src"]
        if tag == "table":
            self.tables.append(attrs["id"])


def _report_data() -> report.ReportData:
    from instructrl.eval.stats import WinRate

    win_rates = [
        report.WinRateRow.of("ppo_ptx", "sft", "gold", "all", WinRate(0.634, 0.55, 0.71, 150, 90, 10, 50)),
        report.WinRateRow.of("ppo_ptx", "sft", "labelers", "all", WinRate(0.6, 0.52, 0.68, 150, 85, 10, 55)),
        report.WinRateRow.of("ppo_ptx", "sft_large", "gold", "all", WinRate(0.55, 0.47, 0.63, 150, 80, 5, 65)),
        report.WinRateRow.of("ppo_ptx", "base_large", "gold", "all", WinRate(0.81, 0.74, 0.86, 150, 120, 3, 27)),
        report.WinRateRow.of(
            "ppo_ptx", "base_large_prompted", "gold", "all", WinRate(0.7, 0.62, 0.77, 150, 102, 6, 42)
        ),
        report.WinRateRow.of("reference", "sft", "gold", "all", WinRate(0.682, 0.6, 0.75, 150, 55, 95, 0)),
    ]
    breakdowns = [report.WinRateRow.of("ppo_ptx", "sft", "gold", "type=plain", WinRate(0.7, 0.6, 0.8, 100, 68, 4, 28))]
    behaviour = [
        BehaviourRow("sft", 150, 0.1, 0.5, 0.4, 0.3, 0.01, 0.02, 0.2, 0.6, 0.9, 4.0, 130, 20, 40, 50),
        BehaviourRow("ppo_ptx", 150, 0.4, 0.7, 0.8, 0.1, 0.05, 0.0, 0.1, 0.8, 0.95, 3.0, 130, 20, 40, 50),
    ]
    tax_rows = [
        tax.TaxRow("base", 3.1, 0.5, 0.6, 0.7, 1000, 48, 100),
        tax.TaxRow("sft", 3.3, 0.48, 0.55, 0.65, 1000, 48, 100),
        tax.TaxRow("ppo", 4.2, 0.4, 0.3, 0.4, 1000, 48, 100),
        tax.TaxRow("ppo_ptx", 3.4, 0.47, 0.5, 0.6, 1000, 48, 100),
        tax.TaxRow("base_large", 2.71828, 0.55, 0.7, 0.8, 1000, 48, 100),
    ]
    rm = report.RMAccuracy(
        0.712, 400, 0.689, 300, 0.727, 0.01, ["6", "7"], sample_agreement=0.751, sample_agreement_stderr=0.005
    )
    ds = [0.0, 0.5, 1.0, 1.5, 2.0]
    rl_points = overopt.relative_points(
        "rl",
        "ppo_ptx",
        [(f"iter-{i}", i, d * d, overopt.predict("rl", d, 0.5, 0.3), 0.4 * d) for i, d in enumerate(ds)],
    )
    bon_points = overopt.relative_points(
        "bon", "bon", [(f"n={n}", n, best_of_n.bon_kl(n), 0.1 * n, 0.2 * n) for n in (1, 2, 4, 8)]
    )
    samples = [
        report.SampleRow(
            "Instruction: what is 2 plus 3 ?\nResponse:",
            "arithmetic",
            "plain",
            {"sft": " <script>alert('x')</script> & 5", "ppo_ptx": " 5"},
            {"sft": -0.3, "ppo_ptx": 1.0},
        )
    ]
    steps = range(1, 6)
    curves = {
        "ppo": [{"step": s, "objective/score": 0.1 * s, "objective/kl": s, "objective/beta": 0.02} for s in steps],
        "ppo_ptx": [
            {"step": s, "objective/score": 0.05 * s, "loss/value": 1 / s, "response/length": 9} for s in steps
        ],
    }
    headline = report.build_headline(
        report.Roles(),
        win_rates,
        behaviour,
        tax_rows,
        rm,
        {"ppo_ptx": 100_000, "sft_large": 1_000_000, "base_large": 360_000},
    )
    return report.ReportData(
        title="test <report>",
        info={"prompts": "150"},
        headline=headline,
        win_rates=win_rates,
        breakdowns=breakdowns,
        behaviour=behaviour,
        tax=tax_rows,
        rm=rm,
        training_curves=curves,
        overopt=[
            overopt.OverOptCurve.fitted("rl", "ppo_ptx", rl_points),
            overopt.OverOptCurve.fitted("bon", "bon", bon_points),
        ],
        samples=samples,
        rm_vs_gold=[best_of_n.ProxyGoldRow("arithmetic", 10, 0.8, 4, 0.5)],
    )


def test_the_second_rounds_row_shows_only_when_that_policy_was_evaluated():
    from instructrl.eval.stats import WinRate

    data = _report_data()
    second = [
        report.WinRateRow.of("ppo_ptx_round2", "sft", "gold", "all", WinRate(0.6, 0.52, 0.68, 150, 85, 10, 55)),
        report.WinRateRow.of("ppo_ptx_round2", "ppo_ptx", "gold", "all", WinRate(0.55, 0.47, 0.63, 150, 78, 9, 63)),
    ]
    headline = report.build_headline(report.Roles(), data.win_rates + second, [], [], None)
    rows = {r.id: r for r in headline}
    assert [r.id for r in headline][:3] == ["1", "1b", "1r"]
    assert (rows["1r"].value, rows["1r"].low, rows["1r"].high) == (60.0, 52.0, 68.0)
    assert rows["1r"].note == "n=150; vs the first round's PPO-ptx 55.0% [47.0, 63.0]" and rows["1r"].paper
    assert "1r" not in {r.id for r in data.headline}
    assert "4e" not in {r.id for r in data.headline}  # only with a second round's reward-model results
    on_policy = dataclasses.replace(data.rm, policy_samples_accuracy=0.476, policy_samples_stderr=0.02)
    rows = {r.id: r for r in report.build_headline(report.Roles(), data.win_rates, [], [], on_policy)}
    assert (rows["4e"].value, rows["4e"].low) == (47.6, round(100 * (0.476 - 1.96 * 0.02), 1))
    assert "4a, on SFT samples: 71.2%" in rows["4e"].note


def test_headline_rows_are_the_runs_numbers_rounded():
    rows = {r.id: r for r in _report_data().headline}
    assert (rows["1"].value, rows["1"].low, rows["1"].high) == (63.4, 55.0, 71.0)
    assert rows["1"].note == "n=150; ceiling (ideal responses vs SFT) 68.2%"
    assert rows["1b"].value == 60.0
    # Row 2: the paper's comparison with a larger base model, its size and perplexity beside the small base's.
    assert (rows["2"].value, rows["2"].low, rows["2"].high) == (81.0, 74.0, 86.0)
    assert rows["2"].note == "n=150; base_large has 3.6× the parameters; held-out perplexity 2.718 (base: 3.100)"
    assert "175B GPT-3" in rows["2"].paper and "base_large" in rows["2"].claim
    assert (rows["2b"].value, rows["2b"].low, rows["2b"].high) == (70.0, 62.0, 77.0)
    assert "prompted" in rows["2b"].claim and "prompted" in rows["2b"].paper
    assert rows["2c"].value == 55.0 and "sft_large has 10.0× the parameters" in rows["2c"].note
    assert [r.id for r in _report_data().headline][:6] == ["1", "1b", "2", "2b", "2c", "3a"]
    assert (rows["3a"].value, rows["3b"].value, rows["3c"].value, rows["3d"].value) == (3.1, 3.3, 4.2, 3.4)
    assert rows["3g"].value == 40.0 and rows["3g"].low == round(100 * wilson_interval(40, 100)[0], 1)
    assert (rows["4a"].value, rows["4b"].value, rows["4c"].value) == (71.2, 68.9, 72.7)
    assert rows["4c"].low == round(100 * (0.727 - 1.96 * 0.01), 1)
    assert rows["4d"].value == 75.1 and rows["4d"].high == round(100 * (0.751 + 1.96 * 0.005), 1)
    assert (rows["5a"].value, rows["5b"].value, rows["5c"].value, rows["5d"].value) == (40.0, 80.0, 20.0, 10.0)
    assert (rows["5e"].value, rows["5f"].value) == (1.0, 5.0) and rows["5f"].note == "n=130"
    assert all(r.paper for r in rows.values())

    assert rows["4a"].low == round(100 * wilson_interval(0.712 * 400, 400)[0], 1)  # no s.e. given: over pairs

    missing = {r.id: r for r in report.build_headline(report.Roles(), [], [], [], None)}
    assert all(r.value is None and r.low is None for r in missing.values())
    assert {"2", "2b"} <= set(missing) and "2c" not in missing  # the larger SFT row only when it was evaluated
    assert "n/a" in report.format_headline(report.ReportData(headline=list(missing.values())))


def test_rm_accuracy_rows_use_the_standard_error_over_comparisons_and_compare_with_agreement():
    rm = report.RMAccuracy(
        0.712,
        400,
        0.689,
        300,
        0.727,
        0.01,
        ["6", "7"],
        sample_agreement=0.751,
        sample_agreement_stderr=0.005,
        train_labelers_stderr=0.03,
        heldout_labelers_stderr=0.02,
    )
    rows = {r.id: r for r in report.build_headline(report.Roles(), [], [], [], rm)}
    assert (rows["4a"].value, rows["4a"].low, rows["4a"].high) == (71.2, round(100 * (0.712 - 1.96 * 0.03), 1), 77.1)
    assert rows["4b"].high == round(100 * (0.689 + 1.96 * 0.02), 1)
    assert "95% of the labelers' agreement on the same samples (4d)" in rows["4a"].note  # 71.2 / 75.1
    assert "92% of the labelers' agreement" in rows["4b"].note and "over comparisons" in rows["4b"].note
    assert "likelihood" not in rows["4a"].note  # no baselines measured


def test_rm_accuracy_rows_name_the_baselines_and_an_rm_below_its_initial_model():
    rm = report.RMAccuracy(
        0.60,
        400,
        0.70,
        300,
        None,
        None,
        train_labelers_baselines={"initial_likelihood": 0.716, "longer": 0.31},
        heldout_labelers_baselines={"initial_likelihood": 0.69, "longer": 0.4},
        train_labelers_stderr=0.03,
        heldout_labelers_stderr=0.02,
    )
    rows = {r.id: r for r in report.build_headline(report.Roles(), [], [], [], rm)}
    assert "the initial model's likelihood orders 71.6%, the shorter response 69.0%" in rows["4a"].note
    assert "not above what its initial model knew" in rows["4a"].note  # 60.0 <= 71.6
    assert "orders 69.0%" in rows["4b"].note and "not above" not in rows["4b"].note  # 70.0 > 69.0
    assert "the shorter response 60.0%" in rows["4b"].note


def _parse_headline(text: str) -> dict[str, dict]:
    """Read the printed headline table back: id -> measured value and interval (None for n/a / -)."""

    def number(cell: str) -> float | None:
        return None if cell in ("n/a", "-") else float(cell.rstrip("%"))

    out = {}
    for line in text.splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        row_id, measured, interval = cells[0], cells[2], cells[3]
        low = high = None
        if interval != "-":
            low, high = (number(x.strip()) for x in interval.strip("[]").split(","))
        out[row_id] = {"value": number(measured), "low": low, "high": high}
    return out


def test_report_has_every_table_and_plot_and_metrics_match_the_printed_headline(tmp_path):
    data = _report_data()
    paths = report.write_report(tmp_path / "report", data)
    page = paths["html"].read_text()
    collector = _Collector()
    collector.feed(page)
    expected_tables = ["headline", "win-rates", "breakdowns", "behaviour", "alignment-tax", "rm-accuracy",
                       "rm-vs-gold", "overopt-fits", "overopt-points", "samples", "run-info"]  # fmt: skip
    assert collector.tables == expected_tables
    expected_plots = ["plot-win-rates", "plot-training-curves", "plot-overoptimization"]
    assert sorted(collector.images) == sorted(expected_plots)
    for plot_id, src in collector.images.items():
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1])
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and paths[plot_id].read_bytes() == png
    assert "<script>" not in page and "&lt;script&gt;" in page and "test &lt;report&gt;" in page

    markdown = paths["markdown"].read_text()
    for plot_id in expected_plots:
        assert f"(plots/{plot_id.removeprefix('plot-')}.png)" in markdown
    assert "| ppo_ptx | sft | gold | 63.4% |" in markdown
    assert "| arithmetic | 10 | 80.0% | 4 | 50.0% |" in markdown

    metrics = json.loads(paths["metrics"].read_text())
    printed = _parse_headline(report.format_headline(data))
    stored = {r["id"]: {"value": r["value"], "low": r["low"], "high": r["high"]} for r in metrics["headline"]}
    assert printed == stored
    assert len(stored) == len(data.headline) and stored["1"]["value"] == 63.4
    fits = {(c["method"], "gold"): c["gold_fit"] for c in metrics["overoptimization"]}
    assert fits[("rl", "gold")]["alpha"] == pytest.approx(0.5) and fits[("rl", "gold")]["beta"] == pytest.approx(0.3)
    assert (
        metrics["training_final"]["ppo"]["objective/kl"] == 5 and metrics["training_final"]["ppo"]["iterations"] == 5
    )


def test_report_without_data_says_so(tmp_path):
    paths = report.write_report(tmp_path, report.ReportData())
    page = paths["html"].read_text()
    assert "<img" not in page and page.count("not measured in this run") == 11
    assert json.loads(paths["metrics"].read_text())["headline"] == []


# --------------------------------------------------------------------------- the command


def test_cli_eval_on_two_tiny_policies(tmp_path, two_policies, tiny_rm_dir, world):
    from instructrl.cli import main

    sft, ppo_ptx = two_policies
    run_dir = _fake_ppo_run(tmp_path / "ppo_ptx_run", sft, ppo_ptx, tiny_rm_dir)
    agreement = tmp_path / "agreement.json"
    agreement.write_text(json.dumps({"mean": 0.731, "stderr": 0.012}))
    out = tmp_path / "eval"
    code = main(
        [
            "eval",
            "--set", f"output_dir={out}",
            "--set", f"policies={{sft: {sft}, ppo_ptx: {ppo_ptx}}}",
            "--set", f"reward_model={tiny_rm_dir}",
            "--set", f"ppo_runs={{ppo_ptx: {run_dir}}}",
            "--set", f"agreement={agreement}",
            "--set", "prompts=6",
            "--set", "max_new_tokens=6",
            "--set", "best_of_n=2",
            "--set", "overopt_prompts=3",
            "--set", "heldout_docs=12",
            "--set", "tax_seq_len=32",
            "--set", "samples=2",
        ]
    )  # fmt: skip
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert results["headline"] == metrics["headline"]
    headline = {r["id"]: r for r in metrics["headline"]}
    assert headline["1"]["value"] is not None and headline["2"]["value"] is None  # no large SFT evaluated
    assert headline["4a"]["value"] == 71.0 and headline["4b"]["value"] == 68.0 and headline["4c"]["value"] == 73.1
    judged = {(r["policy"], r["baseline"], r["judge"]) for r in metrics["win_rates"]}
    assert judged == {(p, "sft", j) for p in ("ppo_ptx", "reference", "best-of-2") for j in ("gold", "labelers", "rm")}
    ceiling = next(r for r in metrics["win_rates"] if (r["policy"], r["judge"]) == ("reference", "gold"))
    assert ceiling["losses"] == 0  # nothing beats the ideal response by the gold judgement
    assert f"ceiling (ideal responses vs SFT) {100 * ceiling['rate']:.1f}%" in headline["1"]["note"]
    assert all(r["n"] == 6 for r in metrics["win_rates"])
    groups = {r["group"].split("=")[0] for r in metrics["breakdowns"]}
    assert groups == {"type", "category"}
    assert [t["model"] for t in metrics["alignment_tax"]] == ["sft", "ppo_ptx"]
    methods = [c["method"] for c in metrics["overoptimization"]]
    assert methods == ["rl", "bon"]
    assert [p["label"] for p in metrics["overoptimization"][0]["points"]] == ["reference", "iter-0002", "iter-0004"]
    assert "ppo_ptx" in metrics["training_final"]
    assert (out / "report.html").is_file() and (out / "report.md").is_file()
    assert metrics["rm_vs_gold"][-1]["category"] == "all" and metrics["rm_vs_gold"][-1]["pairs"] > 0
    assert "labelers judging" in metrics["info"] and metrics["info"]["labelers judging"] == "6, 7"


def test_cli_eval_compares_ppo_ptx_with_a_larger_base_model_plain_and_prompted(tmp_path, two_policies):
    from instructrl.cli import main

    sft, ppo_ptx = two_policies
    out = tmp_path / "eval"
    settings = {
        "output_dir": out,
        "policies": f"{{sft: {sft}, ppo_ptx: {ppo_ptx}, base_large: {sft}}}",
        "prompted": "[base_large]",
        "base_model": ppo_ptx,
        "judges": "[gold]",
        "prompts": 4,
        "max_new_tokens": 4,
        "best_of_n": 0,
        "heldout_docs": 12,
        "tax_seq_len": 32,
    }
    assert main(["eval", *(arg for key, value in settings.items() for arg in ("--set", f"{key}={value}"))]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    headline = {r["id"]: r for r in metrics["headline"]}
    judged = {(r["policy"], r["baseline"]) for r in metrics["win_rates"]}
    assert {("ppo_ptx", "base_large"), ("ppo_ptx", "base_large_prompted"), ("base_large_prompted", "sft")} <= judged
    for row_id, baseline in (("2", "base_large"), ("2b", "base_large_prompted")):
        win = next(r for r in metrics["win_rates"] if (r["policy"], r["baseline"]) == ("ppo_ptx", baseline))
        assert headline[row_id]["value"] == round(100 * win["rate"], 1)
        assert headline[row_id]["low"] == round(100 * win["low"], 1)
    perplexity = {t["model"]: t["heldout_perplexity"] for t in metrics["alignment_tax"]}
    assert set(perplexity) == {"base", "sft", "ppo_ptx", "base_large"}
    assert headline["2"]["note"] == (
        f"n=4; base_large has 1.0× the parameters; held-out perplexity {perplexity['base_large']:.3f}"
        f" (base: {perplexity['base']:.3f})"
    )
    assert "2c" not in headline
    assert "base_large_prompted" in {b["model"] for b in metrics["behaviour"]}


def test_cli_eval_reports_missing_paths_and_bad_config(tmp_path, capsys):
    from instructrl.cli import main

    assert main(["eval", "--set", f"policies={{sft: {tmp_path / 'nope'}}}", "--set", f"output_dir={tmp_path}"]) == 1
    assert "paths not found" in capsys.readouterr().err
    assert main(["eval", "--set", "comparisons=[a-b]"]) == 2
    assert main(["eval", "--set", "judges=[oracle]"]) == 2
    assert main(["eval", "--set", f"prompts={tmp_path / 'missing.jsonl'}"]) == 2
    assert "prompts: path does not exist" in capsys.readouterr().err
    assert main(["eval", "--set", "policies={a: x}", "--set", "prompted=[b]"]) == 2
    assert "prompted" in capsys.readouterr().err
    assert main(["eval", "--set", "policies={a: x, a_prompted: y}", "--set", "prompted=[a]"]) == 2
    assert main(["eval", "--set", "prompt_examples=5"]) == 2


def test_cli_eval_on_a_prompts_file_needs_a_judge_that_needs_no_world(tmp_path, two_policies, capsys):
    from instructrl.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Q: what is 1 plus 1 ?\nA:"}) + "\n")
    policies = f"policies={{sft: {two_policies[0]}, ppo_ptx: {two_policies[1]}}}"
    assert main(["eval", "--set", policies, "--set", f"prompts={prompts}", "--set", f"output_dir={tmp_path}"]) == 1
    assert "no world for the gold and labeler judges; set custom_judge=" in capsys.readouterr().err
