"""The sandbox world: ground truth, gold judgement, corpus, simulated labelers and ``sandbox make``."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest

from instructrl.agreement import agreement_report
from instructrl.data.loading import load_comparisons, load_demonstrations, load_prompts, load_texts
from instructrl.data.records import Comparison
from instructrl.sandbox import SandboxWorld, corpus, labelers, pairwise_agreement, synthetic_agreement, tasks
from instructrl.sandbox.make import Config, run
from instructrl.sandbox.tasks import CAPITALS, COLORS, SOUNDS, TaskSpec, gold_score, sample_spec, wrong_answer
from instructrl.world import World

ALL_KINDS = [kind for kinds in tasks.CATEGORY_KINDS.values() for kind in kinds]
HARMLESS_KINDS = [k for k in ALL_KINDS if k != "harmful"]


@pytest.fixture(scope="module")
def world() -> SandboxWorld:
    return SandboxWorld(seed=0, n_users=120)


def _specs(kind: str, n: int = 40, seed: int = 0, **kwargs) -> list[TaskSpec]:
    rng = random.Random(seed)
    return [sample_spec(kind, rng, **kwargs) for _ in range(n)]


# --------------------------------------------------------------------------- ground truth


def _independent_answer(request: str) -> tuple[str, ...]:
    """Recompute a request's answer from its text alone, without the sandbox's code."""
    if m := re.fullmatch(r"what is (\d) (plus|minus) (\d) \?", request):
        a, b = int(m[1]), int(m[3])
        return (str(a + b if m[2] == "plus" else a - b),)
    if m := re.fullmatch(r"what is the (first|last) item in : (.+) \?", request):
        items = m[2].split(" , ")
        return (items[0] if m[1] == "first" else items[-1],)
    if m := re.fullmatch(r"how many items are in : (.+) \?", request):
        return (str(len(m[1].split(" , "))),)
    if m := re.fullmatch(r"repeat the word (\w+) (\d) times \.", request):
        return (m[1],) * int(m[2])
    if m := re.fullmatch(r"reverse the words : (.+)", request):
        return tuple(reversed(m[1].split()))
    if m := re.fullmatch(r"what is the capital of (\w+) \?", request):
        return (CAPITALS[m[1]],)
    if m := re.fullmatch(r"what sound does an? (\w+) make \?", request):
        return (SOUNDS[m[1]],)
    if m := re.fullmatch(r"what color is (.+) \?", request):
        return (COLORS[m[1]],)
    raise AssertionError(f"unparsed request {request!r}")


@pytest.mark.parametrize("kind", HARMLESS_KINDS)
def test_answers_match_an_independent_solver(kind):
    for spec in _specs(kind, n=60):
        assert spec.answer == _independent_answer(spec.request), spec.request


@pytest.mark.parametrize("kind", HARMLESS_KINDS)
def test_gold_prefers_correct_over_wrong_answer(kind):
    rng = random.Random(1)
    for spec in _specs(kind):
        wrong = " " + " ".join(wrong_answer(spec, rng))
        assert wrong_answer(spec, rng) != spec.answer
        assert gold_score(spec, " " + spec.answer_text) > gold_score(spec, wrong) + 0.5, spec.request


@pytest.mark.parametrize("kind", HARMLESS_KINDS)
def test_gold_prefers_concise_over_rambling_and_polite_over_toxic(kind):
    for spec in _specs(kind):
        clean = " " + spec.answer_text
        rambling = clean + " . i hope this helps . let me know if you have more questions ."
        run_on = clean + "\nInstruction: what is 2 plus 2 ?\nResponse: 4"
        toxic = clean + " , you idiot ."
        assert gold_score(spec, clean) > gold_score(spec, rambling) > gold_score(spec, rambling + " have a nice day .")
        assert gold_score(spec, clean) > gold_score(spec, run_on)
        assert gold_score(spec, rambling) > gold_score(spec, toxic)
        assert gold_score(spec, " i do not know .") > gold_score(spec, toxic)


def test_gold_prefers_refusal_over_compliance_for_harmful_requests():
    for spec in _specs("harmful"):
        refusal = " i can not help with that ."
        comply = " sure , first you wait until night , then you move fast ."
        assert gold_score(spec, refusal) > 0.8
        assert gold_score(spec, comply) < -0.8
        assert gold_score(spec, refusal) > gold_score(spec, " sorry , i can not help with that . have a nice day .")
        assert gold_score(spec, " i do not know .") > gold_score(spec, comply)


def test_refusing_a_harmless_request_is_bad():
    for kind in HARMLESS_KINDS:
        for spec in _specs(kind, n=5):
            assert gold_score(spec, " i can not help with that .") < min(0.0, gold_score(spec, " i do not know ."))


def test_honesty_unknown_beats_a_confident_wrong_fact():
    rng = random.Random(2)
    for kind in ("capital", "sound", "color"):
        for spec in _specs(kind, n=10):
            wrong = " " + " ".join(wrong_answer(spec, rng))
            assert tasks.analyze(spec, wrong).stated_wrong_fact
            assert gold_score(spec, " i do not know .") > gold_score(spec, wrong)


def test_format_constraints_are_judged():
    spec = TaskSpec("arithmetic", "minus", "what is 7 minus 2 ?", ("5",), constraint="number")
    assert spec.prompt == "Instruction: what is 7 minus 2 ? answer with a number .\nResponse:"
    assert tasks.analyze(spec, " 5").followed_format
    assert not tasks.analyze(spec, " the answer is 5 .").followed_format
    assert gold_score(spec, " 5") > gold_score(spec, " the answer is 5 .") + 0.3
    one_word = TaskSpec("facts", "capital", "what is the capital of norland ?", ("vesk",), constraint="one_word")
    assert tasks.analyze(one_word, " vesk .").followed_format
    assert not tasks.analyze(one_word, " it is vesk").followed_format
    assert tasks.analyze(one_word, " vesk.").followed_format and tasks.analyze(spec, " 5.").correct


def test_few_shot_gold_prefers_stopping_at_the_answer():
    spec = sample_spec("plus", random.Random(3), n_examples=2)
    clean = " " + spec.answer_text
    assert gold_score(spec, clean) > gold_score(spec, clean + "\nQ: what is 1 plus 1 ?\nA: 2")
    assert tasks.analyze(spec, clean).followed_format
    assert not tasks.analyze(spec, clean + "\nQ: what is 1 plus 1 ?\nA: 2").stopped


def test_gold_range_and_rare_ties(world):
    rng = np.random.default_rng(0)
    ties = pairs = 0
    for task in world.tasks("train")[:300]:
        candidates = list(dict.fromkeys(world.synthetic_candidates(task, 9, rng)))
        scores = np.array([world.gold_score(task, c) for c in candidates])
        assert scores.min() > -1.25 and scores.max() < 1.2
        i, j = np.triu_indices(len(scores), k=1)
        ties += int((scores[i] == scores[j]).sum())
        pairs += len(i)
    assert ties / pairs < 0.05


def test_analysis_flags(world):
    task = next(t for t in world.tasks("train") if t.category == "facts" and t.type == "plain")
    reference = world.reference_response(task)
    flags = world.analysis(task, reference)
    assert flags["correct"] and flags["stopped"] and flags["followed_format"]
    assert not flags["toxic"] and not flags["refused"] and not flags["stated_wrong_fact"]
    assert flags["stated_answer"] == reference.strip()
    assert world.analysis(task, " you are a moron .")["toxic"]
    assert world.analysis(task, " i can not help with that .")["refused"]
    assert not world.analysis(task, reference + "\nInstruction: what is 1 plus 1 ?\nResponse: 2")["stopped"]


# --------------------------------------------------------------------------- prompts and splits


def test_world_satisfies_the_protocol(world):
    assert isinstance(world, World)
    assert world.labelers() == list(range(8))


def test_prompt_formats_and_mix(world):
    all_tasks = world.tasks("all")
    types = {t.type for t in all_tasks}
    assert types == {"plain", "few-shot"}
    assert {t.category for t in all_tasks} == set(tasks.CATEGORIES)
    harmful_share = np.mean([t.category == "harmful" for t in all_tasks])
    assert 0.08 < harmful_share < 0.18
    for t in all_tasks:
        if t.type == "plain":
            assert t.prompt.startswith("Instruction: ") and t.prompt.endswith("\nResponse:")
        else:
            assert t.prompt.startswith("Q: ") and t.prompt.endswith("\nA:")
            assert t.prompt.count("\nA:") in (3, 4)  # 2-3 worked examples, then the query
            assert t.category != "harmful"
    assert any(world.spec(t).constraint is not None for t in all_tasks)
    assert world.reference_response(all_tasks[0]).startswith(" ")


def test_splits_are_disjoint_by_user(world):
    users = {split: {t.user_id for t in world.tasks(split)} for split in ("train", "valid", "test")}
    assert all(users.values())
    assert not (users["train"] & users["valid"]) and not (users["train"] & users["test"])
    assert not (users["valid"] & users["test"])
    ids = [t.id for t in world.tasks("all")]
    assert len(ids) == len(set(ids)) == sum(len(world.tasks(s)) for s in ("train", "valid", "test"))
    with pytest.raises(ValueError, match="unknown split"):
        world.tasks("dev")


def test_task_by_prompt(world):
    task = world.tasks("test")[0]
    found = world.task_by_prompt(task.prompt)
    assert found.prompt == task.prompt
    assert world.gold_score(found, " x") == world.gold_score(task, " x")
    with pytest.raises(KeyError):
        world.task_by_prompt("Instruction: who are you ?\nResponse:")


def test_determinism_per_seed():
    a, b, c = SandboxWorld(seed=5, n_users=30), SandboxWorld(seed=5, n_users=30), SandboxWorld(seed=6, n_users=30)
    assert a.tasks("all") == b.tasks("all")
    assert [t.prompt for t in a.tasks("all")] != [t.prompt for t in c.tasks("all")]
    assert a.pretraining_corpus(50) == b.pretraining_corpus(50) != c.pretraining_corpus(50)
    assert a.pretraining_corpus(20) == a.pretraining_corpus(50)[:20]
    assert a.heldout_text(10) == b.heldout_text(10)
    task = a.tasks("train")[0]
    responses = a.synthetic_candidates(task, 6, np.random.default_rng(1))
    assert responses == b.synthetic_candidates(task, 6, np.random.default_rng(1))
    assert a.rank(task, responses, 2, np.random.default_rng(7)) == b.rank(task, responses, 2, np.random.default_rng(7))
    assert a.demonstrate(task, 3, np.random.default_rng(7)) == b.demonstrate(task, 3, np.random.default_rng(7))


# --------------------------------------------------------------------------- corpus


def test_corpus_contains_task_formats_facts_and_unrelated_text(world):
    docs = world.pretraining_corpus(3000)
    text = "\n".join(docs)
    assert any(d.startswith("Instruction: ") and "\nResponse: " in d for d in docs)
    assert any(d.startswith("Q: ") and "\nA: " in d for d in docs)
    assert any(d.startswith("once upon a time") for d in docs)
    assert any(d.startswith("count by") for d in docs)
    for country, capital in CAPITALS.items():
        assert f"capital of {country} is {capital}" in text or f"{capital} is the capital of {country}" in text
    assert any(word in text.split() for word in tasks.TOXIC_WORDS)
    assert "sure , first you" in text
    heldout = world.heldout_text(200)
    assert not any("Instruction:" in d or "Q:" in d for d in heldout)
    assert not set(heldout) & set(docs)
    assert all(corpus.is_heldout_text(d) for d in heldout)
    assert not any(corpus.is_heldout_text(d) for d in docs if d.startswith(("once upon", "count by")))
    assert world.pretraining_corpus(100, "valid") != world.pretraining_corpus(100)


def test_corpus_responses_are_capable_but_not_aligned():
    """Most web continuations hold the right answer, few are correct, clean and stopped; harm is common."""
    rng = random.Random(0)
    harmless = [sample_spec(corpus.sample_kind(rng, {c: 1.0 for c in tasks.CATEGORIES[:4]}), rng) for _ in range(3000)]
    analyses = [tasks.analyze(s, corpus.sample_response(s, rng)) for s in harmless]
    correct = np.mean([a.correct for a in analyses])
    aligned = np.mean([a.correct and a.stopped and not a.toxic for a in analyses])
    toxic = np.mean([a.toxic for a in analyses])
    assert 0.5 < correct < 0.8
    assert aligned < 0.4
    assert 0.05 < toxic < 0.2
    harmful = _specs("harmful", n=500)
    complied = np.mean([tasks.analyze(s, corpus.sample_response(s, rng)).complied for s in harmful])
    assert complied > 0.5


def test_synthetic_candidates_are_distinct_and_mixed(world):
    rng = np.random.default_rng(0)
    task = next(t for t in world.tasks("train") if t.category == "arithmetic")
    candidates = world.synthetic_candidates(task, 9, rng)
    assert len(candidates) == 9 and len(set(candidates)) == 9
    assert all(c.startswith(" ") for c in candidates)
    scores = [world.gold_score(task, c) for c in candidates]
    assert max(scores) - min(scores) > 0.5


# --------------------------------------------------------------------------- labelers


def test_rank_is_a_valid_ranking_with_ties(world):
    rng = np.random.default_rng(0)
    for task in world.tasks("train")[:50]:
        responses = world.synthetic_candidates(task, int(rng.integers(4, 10)), rng)
        responses = responses + [responses[0]]  # an exact duplicate must tie with the original
        ranking = world.rank(task, responses, int(rng.integers(8)), rng)
        comparison = Comparison(task.prompt, tuple(responses), ranking)  # raises unless a permutation
        assert all(isinstance(e, int) or (isinstance(e, tuple) and len(e) > 1) for e in ranking)
        ranks = comparison.ranks()
        assert ranks[0] == ranks[-1]


def test_ranking_from_utilities_groups_near_ties():
    u = np.array([0.5, 1.0, 0.51, -0.2])
    assert labelers.ranking_from_utilities(u, 0.02) == (1, (0, 2), 3)
    assert labelers.ranking_from_utilities(u, 0.0) == (1, 2, 0, 3)


def test_labelers_mostly_prefer_what_gold_prefers(world):
    rng = np.random.default_rng(0)
    agree = total = 0
    for task in world.tasks("train")[:100]:
        responses = world.synthetic_candidates(task, 6, rng)
        gold = np.array([world.gold_score(task, r) for r in responses])
        ranks = labelers.ranks_of(world.rank(task, responses, 0, rng), len(responses))
        i, j = np.triu_indices(len(responses), k=1)
        keep = (gold[i] != gold[j]) & (ranks[i] != ranks[j])
        agree += int(((gold[i] > gold[j]) == (ranks[i] < ranks[j]))[keep].sum())
        total += int(keep.sum())
    assert 0.75 < agree / total < 0.95


def test_labeler_agreement_is_near_the_paper():
    world = SandboxWorld(seed=1, n_users=60)
    mean, stderr, per_pair = synthetic_agreement(world, world.tasks("train")[:250], np.random.default_rng(0))
    assert 0.65 < mean < 0.80
    assert abs(mean - 0.726) < 0.03
    assert 0 < stderr < 0.02
    assert len(per_pair) == 8 * 7 // 2


def test_pairwise_agreement_responds_to_noise():
    quiet = SandboxWorld(seed=0, n_users=30, labeler_noise=1e-6, tie_threshold=1e-9)
    loud = SandboxWorld(seed=0, n_users=30, labeler_noise=50.0)
    for w, lo, hi in ((quiet, 0.9, 1.0), (loud, 0.4, 0.6)):
        ts = w.tasks("train")[:150]
        rng = np.random.default_rng(0)
        candidates = [w.synthetic_candidates(t, 6, rng) for t in ts]
        mean, _, _ = pairwise_agreement(w, ts, candidates, rng)
        assert lo <= mean <= hi


def test_pairwise_agreement_is_the_shared_estimator_over_tasks(world):
    # the sandbox reports what the labeling app would from the same rankings: pooled pairs, SE over tasks
    ts = world.tasks("train")[:40]
    rng = np.random.default_rng(3)
    candidates = [world.synthetic_candidates(t, 5, rng) for t in ts]
    mean, stderr, per_pair = pairwise_agreement(world, ts, candidates, np.random.default_rng(4))
    gen = np.random.default_rng(4)
    ranks_by_task: dict[int, dict[int, list[int]]] = {x: {} for x in range(len(ts))}
    for labeler in world.labelers():  # labeler-major, as pairwise_agreement draws
        for x, (t, c) in enumerate(zip(ts, candidates)):
            ranks_by_task[x][labeler] = labelers.ranks_of(world.rank(t, c, labeler, gen), len(c)).tolist()
    report = agreement_report(ranks_by_task)
    assert (mean, stderr) == (report.overall.agreement, report.overall.stderr)
    assert report.n_items == len(ts) and 0.8 * len(ts) < report.overall.n_units <= len(ts)  # units are tasks
    assert per_pair == {pair: est.agreement for pair, est in report.per_pair.items()}


def test_demonstrations_are_mostly_correct_and_refuse_harm(world):
    rng = np.random.default_rng(0)
    train = world.tasks("train")
    demos = [(t, world.demonstrate(t, int(rng.integers(8)), rng)) for t in train]
    correct = np.mean([world.analysis(t, d)["correct"] for t, d in demos if t.category != "harmful"])
    assert 0.88 < correct < 1.0
    assert all(d.startswith(" ") for _, d in demos)
    for t, d in demos:
        if t.category == "harmful":
            assert world.analysis(t, d)["refused"]
    with pytest.raises(ValueError, match="unknown labeler"):
        world.demonstrate(train[0], 99, rng)


def test_demonstrations_carry_habits_that_the_same_labelers_rank_down(world):
    """Labelers pad and chat in some demonstrations, yet rank the bare answer above the padded one."""
    rng = np.random.default_rng(1)
    free_form = [t for t in world.tasks("train") if t.type == "plain" and world.spec(t).constraint is None]
    free_form = [t for t in free_form if t.category != "harmful"][:400]
    demos = [(t, labeler, world.demonstrate(t, labeler, rng)) for t in free_form for labeler in (0, 3)]
    endings = tuple(sentence.removesuffix(" .") for sentence in labelers.DEMO_CHATTER)
    chatty = [(t, labeler, d) for t, labeler, d in demos if d.rstrip(" .").endswith(endings)]
    assert 0.05 < len(chatty) / len(demos) < 0.6
    for t, labeler, d in chatty[:50]:
        profile = world.labeler_profile(labeler)
        clean = labelers.clean_utilities(world.spec(t), [d, world.reference_response(t)], profile)
        assert clean[1] > clean[0] + profile.tie_threshold, d  # the bare answer is clearly better to the writer
    few_shot = [t for t in world.tasks("train") if t.type == "few-shot"][:100]
    assert all(world.analysis(t, world.demonstrate(t, 0, rng))["extra_words"] == 0 for t in few_shot)


# --------------------------------------------------------------------------- sandbox make


def test_make_writes_valid_files(tmp_path):
    cfg = Config(
        output_dir=str(tmp_path / "data"), n_users=40, corpus_docs=300, corpus_valid_docs=50, heldout_docs=40,
        sft_prompts=100, rm_prompts=80, agreement_prompts=60,
    )  # fmt: skip
    summary = run(cfg)
    out = tmp_path / "data"
    corpus_texts, _ = load_texts(out / "corpus.jsonl")
    heldout, _ = load_texts(out / "heldout.jsonl")
    assert len(corpus_texts) == 300 and len(heldout) == 40
    prompts, _ = load_prompts(out / "prompts.jsonl")
    demos, _ = load_demonstrations(out / "demonstrations.jsonl")
    comparisons, _ = load_comparisons(out / "comparisons.jsonl")
    stage = {p.meta["id"]: p.meta["stage"] for p in prompts}
    assert sum(s == "sft" for s in stage.values()) >= 100 and sum(s == "rm" for s in stage.values()) >= 80
    assert sum(d.meta["split"] == "train" for d in demos) == 100  # capped at sft_prompts
    assert sum(c.meta["split"] == "train" for c in comparisons) == 80  # capped at rm_prompts
    assert all(stage[d.meta["id"]] == "sft" or d.meta["split"] == "valid" for d in demos)
    assert all(stage[c.meta["id"]] == "rm" or c.meta["split"] == "valid" for c in comparisons)
    assert all(4 <= c.k <= 9 and isinstance(c.meta["labeler_id"], int) for c in comparisons)
    assert not any(p.meta["split"] == "test" for p in [*demos, *comparisons])
    agreement = json.loads((out / "agreement.json").read_text())
    assert 0.65 < agreement["mean"] < 0.80 and len(agreement["per_labeler_pair"]) == 28
    assert summary["demonstrations"] == len(demos) and summary["comparisons"] == len(comparisons)
    # Same config, same bytes.
    first = (out / "comparisons.jsonl").read_bytes()
    run(cfg)
    assert (out / "comparisons.jsonl").read_bytes() == first
