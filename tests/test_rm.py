"""Reward-model stage: K-wise batching (one forward per completion), ties, gradient accumulation,
normalization, saving/loading, learning a toy preference, resume, the scoring API and both CLIs."""

from __future__ import annotations

import gzip
import itertools
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from instructrl.cli import main
from instructrl.config import ConfigError, load_config
from instructrl.data.loading import load_comparisons
from instructrl.data.records import Comparison
from instructrl.models import causal_lm
from instructrl.models.causal_lm import disable_dropout, load_tokenizer
from instructrl.models.reward import BIAS_KEY, backbone, load_reward_model, reward_model_from_causal_lm
from instructrl.models.scoring import RewardScorer, pad_right, score_sequences
from instructrl.stages import rm

WORDS = ["red", "blue", "green", "mat", "sang", "cat"]
GOOD_WORD = "cat"
"""In the toy task a response is better the more times it says 'cat'."""


def toy_comparison(rng: random.Random, k: int, labeler: str) -> dict:
    """A K-way record ranked by the number of GOOD_WORD occurrences (equal counts are ties)."""
    prompt = f"Q: {rng.randint(0, 999)} say {rng.choice(WORDS)} words\nA:"
    responses, counts = [], []
    while len(responses) < k:
        words = [rng.choice(WORDS) for _ in range(4)]
        text = " " + " ".join(words)
        if text not in responses:
            responses.append(text)
            counts.append(words.count(GOOD_WORD))
    ranking = [
        group if len(group) > 1 else group[0]
        for _, group in ((c, [i for i in range(k) if counts[i] == c]) for c in sorted(set(counts), reverse=True))
    ]
    return {"prompt": prompt, "responses": responses, "ranking": ranking, "labeler_id": labeler}


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def toy_files(tmp_path: Path, n: int, seed: int = 0) -> tuple[Path, Path]:
    rng = random.Random(seed)
    records = [toy_comparison(rng, rng.randint(2, 5), f"L{i % 3}") for i in range(n)]
    demos = [{"prompt": r["prompt"], "response": r["responses"][0]} for r in records[:20]]
    return write_jsonl(tmp_path / "comparisons.jsonl", records), write_jsonl(tmp_path / "demos.jsonl", demos)


def encoded_toy(tokenizer, n: int, seed: int = 0) -> list[rm.EncodedComparison]:
    """``n`` toy comparisons with at least one untied pair each, encoded."""
    rng = random.Random(seed)
    encoded: list[rm.EncodedComparison] = []
    while len(encoded) < n:
        comparison = Comparison(**_as_comparison(toy_comparison(rng, rng.randint(2, 6), "L0")))
        encoded += rm.encode_comparisons([comparison], tokenizer, 64, 32)[0]
    return encoded


def _as_comparison(record: dict) -> dict:
    meta = {"labeler_id": record["labeler_id"]}
    return {"prompt": record["prompt"], "responses": record["responses"], "ranking": record["ranking"], "meta": meta}


@pytest.fixture
def fresh_rm(tiny_lm_dir):
    torch.manual_seed(0)
    model = reward_model_from_causal_lm(tiny_lm_dir, pad_token_id=load_tokenizer(tiny_lm_dir).pad_token_id)
    disable_dropout(model)
    return model


def rm_config(tmp_path: Path, model_dir: Path, comparisons: Path, demos: Path | None, **overrides) -> rm.Config:
    settings = {
        "model": str(model_dir),
        "output_dir": str(tmp_path / "rm"),
        "comparisons": str(comparisons),
        "demonstrations": str(demos) if demos else None,
        "batch_size": 8,
        "micro_batch_size": 4,
        "lr": 3e-3,
        "eval_every": 1000,
        "device": "cpu",
        **overrides,
    }
    return load_config(rm.Config, overrides=[f"{k}={json.dumps(v)}" for k, v in settings.items()])


# --------------------------------------------------------------------------- batching


def test_each_completion_is_forwarded_exactly_once_per_step(tiny_tokenizer, fresh_rm):
    batch = encoded_toy(tiny_tokenizer, 5)
    calls, rows = [], []

    def count_rows(module, args, kwargs, output) -> None:
        calls.append(1)
        rows.append(kwargs["input_ids"].shape[0])

    hook = backbone(fresh_rm).register_forward_hook(count_rows, with_kwargs=True)
    try:
        stats = rm.accumulate_ranking_gradients(
            fresh_rm, batch, micro_batch_size=2, pad_id=tiny_tokenizer.pad_token_id
        )
    finally:
        hook.remove()
    total_k = sum(len(c.completions) for c in batch)
    assert len(calls) == 3  # ceil(5 prompts / 2 per micro-batch) forward passes, no more
    assert sum(rows) == total_k == stats["completions"]
    assert stats["pairs"] == sum(len(c.pairs) for c in batch)


def test_collate_points_pairs_at_their_prompts_rows(tiny_tokenizer):
    batch = encoded_toy(tiny_tokenizer, 3)
    inputs = rm.collate_comparisons(batch, tiny_tokenizer.pad_token_id)
    offsets = list(itertools.accumulate([0] + [len(c.completions) for c in batch[:-1]]))
    for w, lo, g in zip(inputs.winner_idx.tolist(), inputs.loser_idx.tolist(), inputs.pair_group.tolist()):
        assert offsets[g] <= min(w, lo) and max(w, lo) < offsets[g] + len(batch[g].completions)
    # every row ends with EOS at its last real position (right padding), where the reward is read
    last = inputs.attention_mask.sum(-1) - 1
    assert (inputs.input_ids[torch.arange(len(last)), last] == tiny_tokenizer.eos_token_id).all()


def test_accuracy_stderr_takes_each_comparison_as_one_unit(tiny_tokenizer):
    encoded = encoded_toy(tiny_tokenizer, 12)
    scores = torch.randn(sum(len(c.completions) for c in encoded), generator=torch.Generator().manual_seed(0))
    metrics = rm.pairwise_metrics(scores, encoded)
    # Naive reference: per comparison g, a_g correct pairs of n_g; p = Σa/Σn; SE = sqrt(G/(G-1) Σ(a_g - p n_g)²)/Σn.
    units, offset = [], 0
    for c in encoded:
        s = scores[offset : offset + len(c.completions)].tolist()
        units.append((sum(s[w] > s[lo] for w, lo in c.pairs), len(c.pairs)))
        offset += len(c.completions)
    total = sum(n for _, n in units)
    p = sum(a for a, _ in units) / total
    g = len(units)
    stderr = (g / (g - 1) * sum((a - p * n) ** 2 for a, n in units)) ** 0.5 / total
    assert metrics["accuracy"] == pytest.approx(p) and metrics["accuracy_stderr"] == pytest.approx(stderr)
    # Not the pair-level binomial SE: pairs of one ranking are not independent.
    assert metrics["accuracy_stderr"] != pytest.approx((p * (1 - p) / total) ** 0.5, rel=1e-3)


def test_agreement_on_samples_counts_each_distinct_text_once():
    from instructrl.sandbox.labelers import pairwise_agreement
    from instructrl.world import load_world, stage_tasks

    world = load_world("sandbox", 0)
    tasks = stage_tasks(world, "rm")[:40]
    gen = np.random.default_rng(0)
    distinct = [world.synthetic_candidates(t, 4, gen) for t in tasks]
    distinct = [list(dict.fromkeys(c)) for c in distinct]
    # A policy repeating itself: its first sample three times, and an empty sample.
    repeated = [[c[0], *c, c[0], ""] for c in distinct]
    kept = [i for i, c in enumerate(distinct) if len(c) >= 2]
    expected = pairwise_agreement(world, [tasks[i] for i in kept], [distinct[i] for i in kept], 5)[0]
    result = rm.agreement_on_samples(world, tasks, repeated, 1000, 5)
    assert result["mean"] == expected and result["prompts"] == len(kept)
    counting_copies = pairwise_agreement(world, [tasks[i] for i in kept], [repeated[i][:-1] for i in kept], 5)[0]
    assert counting_copies != expected


def test_ties_are_dropped_and_pairwise_records_are_k2(tiny_tokenizer, tmp_path):
    comparisons = [
        Comparison("p", ["a", "b", "c", "d"], [0, [1, 2], 3]),  # C(4,2)=6 pairs minus the tied (1,2)
        Comparison("q", ["a", "b", "c"], [[0, 1, 2]]),  # everything tied: no pair, dropped
    ]
    encoded, counts = rm.encode_comparisons(comparisons, tiny_tokenizer, 64, 32)
    assert [len(c.pairs) for c in encoded] == [5]
    assert (1, 2) not in encoded[0].pairs and (2, 1) not in encoded[0].pairs
    assert counts.dropped_comparisons == 1 and counts.pairs == 5

    pairwise = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": " good", "rejected": " bad"}])
    loaded, _ = load_comparisons(pairwise)
    encoded, _ = rm.encode_comparisons(loaded, tiny_tokenizer, 64, 32)
    assert len(encoded[0].completions) == 2 and encoded[0].pairs == ((0, 1),)


def test_empty_and_repeated_responses_are_encoded_once_each(tiny_tokenizer):
    # A policy's K samples: " cat" twice (tied at the top), " red", and a sample that ended at once (ranked last).
    comparison = Comparison("Q: say cat\nA:", [" cat", "", " red", " cat"], [[0, 3], 2, 1])
    assert comparison.n_pairs == 5  # counting copies: cat>red, cat>"" twice each, red>""
    encoded, counts = rm.encode_comparisons([comparison], tiny_tokenizer, 64, 32)
    prompt = tiny_tokenizer("Q: say cat\nA:", add_special_tokens=False)["input_ids"]
    eos = tiny_tokenizer.eos_token_id
    assert len(encoded[0].completions) == 3 and encoded[0].completions[1] == tuple(prompt + [eos])
    assert encoded[0].pairs == ((0, 1), (0, 2), (2, 1))  # cat > "", cat > red, red > ""
    assert (counts.pairs, counts.merged_responses, counts.completions) == (3, 1, 3)


def test_long_prompts_are_left_truncated_and_long_responses_dropped(tiny_tokenizer):
    long_prompt = " ".join(["red blue"] * 40) + " END"
    comparison = Comparison(long_prompt, [" cat", " " + " ".join(["mat"] * 50), " red"], [0, 1, 2])
    encoded, counts = rm.encode_comparisons([comparison], tiny_tokenizer, 8, 10)
    assert counts.truncated_prompts == 1 and counts.dropped_responses == 1
    assert len(encoded[0].completions) == 2 and encoded[0].pairs == ((0, 1),)  # old (0, 2) re-indexed
    prompt_end = tiny_tokenizer(long_prompt, add_special_tokens=False)["input_ids"][-8:]
    assert list(encoded[0].completions[0][:8]) == prompt_end


def test_gradient_accumulation_matches_one_big_batch(tiny_tokenizer, fresh_rm):
    batch = encoded_toy(tiny_tokenizer, 8, seed=3)
    pad = tiny_tokenizer.pad_token_id
    grads, losses = [], []
    for micro in (8, 1):
        fresh_rm.zero_grad(set_to_none=True)
        losses.append(rm.accumulate_ranking_gradients(fresh_rm, batch, micro, pad)["loss"])
        grads.append({n: p.grad.clone() for n, p in fresh_rm.named_parameters() if p.grad is not None})
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


# --------------------------------------------------------------------------- whole runs


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_lm_dir):
    """A short toy run shared by the save / normalization / learning tests."""
    tmp_path = tmp_path_factory.mktemp("rm_run")
    comparisons, demos = toy_files(tmp_path, 200)
    cfg = rm_config(tmp_path, tiny_lm_dir, comparisons, demos, epochs=2, heldout_labelers=["L2"])
    results = rm.run(cfg)
    return cfg, results, demos


def test_run_learns_the_toy_preference_and_changes_every_weight(trained_run, tiny_lm_dir):
    cfg, results, _ = trained_run
    print("toy accuracies:", results["valid_accuracy"], results["heldout_accuracy"])
    assert results["valid_accuracy"] > 0.7  # chance is 0.5
    assert results["heldout_accuracy"] > 0.7  # labeler L2 was never trained on
    assert set(results["valid"]["accuracy_by_labeler"]) == {"L0", "L1"}
    assert set(results["heldout"]["accuracy_by_labeler"]) == {"L2"}
    for name in ("valid", "heldout"):  # the reference orderings, on the same pairs (test_rm_baselines)
        baselines = results[name]["baselines"]
        assert set(baselines) == {"initial_likelihood", "longer"} and all(0 <= v <= 1 for v in baselines.values())
    trained = load_reward_model(cfg.output_dir)
    untrained = reward_model_from_causal_lm(tiny_lm_dir, pad_token_id=trained.config.pad_token_id)
    untrained_weights = dict(untrained.named_parameters())
    for name, param in trained.named_parameters():
        if name != "score.weight":  # the head is re-initialized at random, so compare the trunk only
            assert not torch.equal(param, untrained_weights[name]), f"{name} did not change"
    lines = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, results["steps"] + 1))
    assert "valid_accuracy" in lines[-1] and "heldout_accuracy" in lines[-1]


def test_normalization_makes_demonstrations_score_mean_zero_after_reload(trained_run):
    cfg, results, demos = trained_run
    assert abs(results["normalization"]["mean_after"]) < 1e-4
    assert abs(results["normalization"]["mean_before"]) > 1e-3  # the bias had something to do
    records = [json.loads(line) for line in demos.read_text().splitlines()]
    scorer = RewardScorer(cfg.output_dir, device="cpu")
    scores = scorer.score([r["prompt"] for r in records], [r["response"] for r in records])
    assert abs(scores.double().mean().item()) < 1e-4
    raw = scorer.score([r["prompt"] for r in records], [r["response"] for r in records], normalized=False)
    torch.testing.assert_close(scores - raw, torch.full_like(raw, getattr(scorer.model.config, BIAS_KEY)))


def test_saved_dir_loads_with_plain_transformers_and_gives_the_same_raw_scores(trained_run, tiny_tokenizer):
    cfg, _, _ = trained_run
    plain = AutoModelForSequenceClassification.from_pretrained(cfg.output_dir, num_labels=1).eval()
    ours = load_reward_model(cfg.output_dir)
    sequences = [c for comparison in encoded_toy(tiny_tokenizer, 4) for c in comparison.completions]
    input_ids, attention_mask = pad_right(sequences, tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        plain_scores = plain(input_ids=input_ids, attention_mask=attention_mask).logits.squeeze(-1)
    raw = score_sequences(ours, sequences, tiny_tokenizer.pad_token_id, batch_size=3, normalized=False)
    torch.testing.assert_close(plain_scores, raw, rtol=1e-4, atol=1e-5)


def test_scorer_restores_input_order_across_length_sorted_batches(trained_run):
    cfg, _, _ = trained_run
    scorer = RewardScorer(cfg.output_dir, batch_size=2, device="cpu")
    prompts = ["Q: say cat words\nA:", "Q: hi\nA:", "Q: say red words\nA:"] * 2
    responses = [" cat cat cat cat", " red", " blue mat", " cat", " red red red red red red", " sang"]
    batched = scorer.score(prompts, responses)
    one_by_one = torch.cat([scorer.score([p], [r]) for p, r in zip(prompts, responses)])
    torch.testing.assert_close(batched, one_by_one, rtol=1e-4, atol=1e-5)


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, tiny_lm_dir, monkeypatch):
    comparisons, demos = toy_files(tmp_path, 48, seed=1)
    straight = rm.run(rm_config(tmp_path / "a", tiny_lm_dir, comparisons, demos, save_every=2, valid_fraction=0.0))

    real_step, calls = rm.accumulate_ranking_gradients, []

    def crash_at_fifth_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    cfg = rm_config(tmp_path / "b", tiny_lm_dir, comparisons, demos, save_every=2, valid_fraction=0.0)
    monkeypatch.setattr(rm, "accumulate_ranking_gradients", crash_at_fifth_step)
    with pytest.raises(KeyboardInterrupt):
        rm.run(cfg)
    monkeypatch.setattr(rm, "accumulate_ranking_gradients", real_step)
    resumed = rm.run(cfg)  # continues from the step-4 checkpoint
    assert resumed["normalization"]["bias"] == pytest.approx(straight["normalization"]["bias"], abs=1e-6)
    a, b = load_reward_model(tmp_path / "a" / "rm"), load_reward_model(tmp_path / "b" / "rm")
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6, msg=name)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, straight["steps"] + 1))


def policy_samples_record(rng: random.Random) -> tuple[dict, int]:
    """A toy record as a small policy would give it: its best sample drawn twice and a sample that ended at once
    (empty, ranked last). Returns it with its number of distinct untied pairs, counted here independently."""
    record = toy_comparison(rng, 3, "L0")
    scores = {text: text.split().count(GOOD_WORD) for text in record["responses"]}
    responses = [*record["responses"], max(record["responses"], key=scores.get), ""]
    scores[""] = -1
    levels = sorted(set(scores.values()), reverse=True)
    record["responses"] = responses
    record["ranking"] = [[i for i, r in enumerate(responses) if scores[r] == level] for level in levels]
    distinct = list(scores.values())
    n_pairs = sum(a != b for a, b in itertools.combinations(distinct, 2))
    return record, n_pairs


def test_trains_on_policy_samples_with_empty_and_repeated_responses(tmp_path, tiny_lm_dir):
    """The stage trains on empty and repeated samples, reports distinct pairs and learns to rank empty last."""
    rng = random.Random(5)
    train, train_pairs = zip(*(policy_samples_record(rng) for _ in range(96)))
    valid, _ = zip(*(policy_samples_record(rng) for _ in range(24)))
    train_file = write_jsonl(tmp_path / "train.jsonl", list(train))
    valid_file = write_jsonl(tmp_path / "valid.jsonl", list(valid))
    cfg = rm_config(
        tmp_path, tiny_lm_dir, train_file, None, valid_comparisons=str(valid_file), epochs=2, baselines=False
    )
    results = rm.run(cfg)
    assert "baselines" not in results["valid"]
    counts = results["data"]["train"]
    assert counts["comparisons"] == 96 and counts["merged_responses"] == 96
    assert counts["pairs"] == sum(train_pairs) < sum(Comparison(**_as_comparison(r)).n_pairs for r in train)
    assert results["valid_accuracy"] > 0.7
    best = [r["responses"][r["ranking"][0][0]] for r in valid]
    scores = RewardScorer(cfg.output_dir, device="cpu").score([r["prompt"] for r in valid] * 2, best + [""] * 24)
    assert sum(s_best > s_empty for s_best, s_empty in zip(scores[:24], scores[24:])) >= 20


def test_runs_on_real_hh_rlhf_pairs(tmp_path, tiny_lm_dir):
    """Real data: long dialogues get left-truncated, long replies dropped, and the stage still runs end to end."""
    hh_file = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
    if not hh_file.exists():
        pytest.skip("shared HH-RLHF data not present")
    with gzip.open(hh_file, "rt", encoding="utf-8") as f:
        lines = list(itertools.islice(f, 120))
    subset = tmp_path / "hh.jsonl"
    subset.write_text("".join(lines))
    cfg = rm_config(tmp_path, tiny_lm_dir, subset, None, max_prompt_tokens=32, max_response_tokens=90, skip_bad=True)
    results = rm.run(cfg)
    train = results["data"]["train"]
    assert results["data"]["skipped_records"]["comparisons"] >= 1  # a record with an empty final reply
    assert train["truncated_prompts"] > 0 and train["dropped_responses"] > 0
    assert train["pairs"] == train["comparisons"]  # every HH record is one K=2 pair
    assert results["normalization"]["source"].startswith("best-ranked")
    assert abs(results["normalization"]["mean_after"]) < 1e-4
    assert 0.0 <= results["valid_accuracy"] <= 1.0


@pytest.mark.parametrize("from_policy", [True, False])
def test_sandbox_default_generates_ranked_k_way_data(tmp_path, tiny_lm_dir, from_policy):
    cfg = load_config(
        rm.Config,
        overrides=[
            f"model={tiny_lm_dir}",
            f"output_dir={tmp_path / 'rm'}",
            "sandbox_prompts=16",
            "sandbox_demonstrations=8",
            f"sandbox_samples_from_policy={str(from_policy).lower()}",
            "max_prompt_tokens=100",
            "max_response_tokens=24",
            "valid_fraction=0.25",
            "device=cpu",
        ],
    )
    results = rm.run(cfg)
    records = [json.loads(line) for line in (tmp_path / "rm" / rm.SANDBOX_COMPARISONS).read_text().splitlines()]
    assert 10 <= len(records) <= 16
    for record in records:
        assert 2 <= len(record["responses"]) <= 9 and record["labeler_id"].isdigit()
        assert Comparison(record["prompt"], record["responses"], record["ranking"])  # a valid permutation
    assert all(len(r["responses"]) >= 4 for r in records) or from_policy  # only empty samples are removed
    demos = (tmp_path / "rm" / rm.SANDBOX_DEMONSTRATIONS).read_text().splitlines()
    assert len(demos) == 8 and results["normalization"]["n"] + results["normalization"]["dropped_over_length"] == 8
    assert results["data"]["train"]["comparisons"] > 0
    agreement = results["labeler_agreement_on_samples"]
    assert 0.0 <= agreement["mean"] <= 1.0 and 0 < agreement["prompts"] <= 16


@pytest.fixture
def loaded_models(monkeypatch) -> list[str]:
    """The paths ``load_causal_lm`` loads from, in order, while the test runs."""
    loaded = []
    real_load = causal_lm.load_causal_lm

    def recording_load(path, *args, **kwargs):
        loaded.append(str(path))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr("instructrl.models.causal_lm.load_causal_lm", recording_load)
    return loaded


def test_sandbox_samples_come_from_the_named_policy(tmp_path, tiny_lm_dir, loaded_models):
    loaded = loaded_models
    policy_dir = tmp_path / "policy"
    shutil.copytree(tiny_lm_dir, policy_dir)
    overrides = [f"model={tiny_lm_dir}", f"output_dir={tmp_path / 'rm'}", "sandbox_prompts=6", "device=cpu"]
    rm.run(load_config(rm.Config, overrides=[*overrides, f"sandbox_sample_policy={policy_dir}", "epochs=1"]))
    assert loaded == [str(policy_dir)]  # sampled from the named policy, not from ``model``
    with pytest.raises(ConfigError, match="sandbox_sample_policy"):
        load_config(rm.Config, overrides=[*overrides, f"sandbox_sample_policy={tmp_path / 'missing'}"])


def test_a_second_round_ranks_the_named_policys_samples_and_leaves_the_first_round_as_it_was(
    tmp_path, tiny_lm_dir, monkeypatch, loaded_models
):
    from instructrl import world as world_module

    def small_pool(world, stage, seed=None):  # 8 prompts: the second round runs out and starts again
        return world_module.stage_tasks(world, stage, seed)[:8]

    monkeypatch.setattr(rm, "stage_tasks", small_pool)
    loaded = loaded_models
    later_policy = tmp_path / "ppo_policy"
    shutil.copytree(tiny_lm_dir, later_policy)
    settings = [f"model={tiny_lm_dir}", "sandbox_prompts=6", "sandbox_demonstrations=4", "device=cpu"]
    settings += ["max_response_tokens=16", "sandbox_agreement_prompts=0"]

    def comparisons(name: str, *extra: str) -> list[dict]:
        cfg = load_config(rm.Config, overrides=[*settings, *extra])
        rm.sandbox_data(cfg, load_tokenizer(str(tiny_lm_dir)), tmp_path.joinpath(name))
        lines = tmp_path.joinpath(name, rm.SANDBOX_COMPARISONS).read_text().splitlines()
        return [json.loads(line) for line in lines]

    tmp_path.joinpath("one", "two").mkdir(parents=True)
    one_round = comparisons("one")
    loaded.clear()
    two_rounds = comparisons("two", f"sandbox_round2_policy={later_policy}", "sandbox_round2_prompts=4")
    assert loaded == [str(tiny_lm_dir), str(later_policy)]  # the first round's policy, then the named one
    first, second = [r for r in two_rounds if "round" not in r], [r for r in two_rounds if r.get("round") == 2]
    assert first == one_round and len(first) + len(second) == len(two_rounds) and second
    pool = [t.id for t in small_pool(world_module.load_world("sandbox", 0), "rm")]
    assert {r["id"] for r in second} <= {pool[6], pool[7], pool[0], pool[1]}  # after the first round's, wrapped
    with pytest.raises(ConfigError, match="sandbox_round2_policy"):
        load_config(rm.Config, overrides=[*settings, f"sandbox_round2_policy={tmp_path / 'missing'}"])
    with pytest.raises(ConfigError, match="sandbox_round2_reward_model"):
        load_config(rm.Config, overrides=[*settings, f"sandbox_round2_reward_model={tiny_lm_dir}"])


def test_the_previous_reward_model_is_measured_on_the_second_rounds_comparisons_only(tmp_path, tiny_lm_dir):
    tokenizer = load_tokenizer(str(tiny_lm_dir))
    previous = tmp_path / "previous_rm"
    reward_model_from_causal_lm(tiny_lm_dir, tokenizer.pad_token_id).save_pretrained(previous)
    tokenizer.save_pretrained(previous)
    round1 = {"prompt": "Q: 1\nA:", "responses": [" a", " b b"], "ranking": [0, 1], "labeler_id": "0"}
    round2 = [
        {"prompt": "Q: 2\nA:", "responses": [" cat", " red", " mat"], "ranking": [2, 0, 1], "labeler_id": "1"},
        {"prompt": "Q: 3\nA:", "responses": [" blue", " blue red"], "ranking": [1, 0], "labeler_id": "2"},
    ]
    path = tmp_path / "comparisons.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [round1, *[r | {"round": 2} for r in round2]]))
    cfg = load_config(
        rm.Config,
        overrides=[
            f"model={tiny_lm_dir}",
            f"sandbox_round2_policy={tiny_lm_dir}",
            f"sandbox_round2_reward_model={previous}",
        ],
    )
    measured = rm.previous_rm_on_round2(cfg, tokenizer, path)
    assert measured["reward_model"] == str(previous) and measured["pairs"] == 4 and measured["prompts"] == 2

    # The same pairs scored by hand: r(winner) > r(loser) under the previous model, over the two rankings.
    scorer = RewardScorer(str(previous), device="cpu")
    right = 0
    for record in round2:
        scores = scorer.score([record["prompt"]] * len(record["responses"]), record["responses"], normalized=False)
        order = record["ranking"]
        right += sum(
            bool(scores[order[i]] > scores[order[j]]) for i in range(len(order)) for j in range(i + 1, len(order))
        )
    assert measured["accuracy"] == pytest.approx(right / 4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gradients_and_scores_match_cpu(trained_run, tiny_tokenizer, tiny_lm_dir, tmp_path):
    cfg, _, _ = trained_run
    prompts, responses = ["Q: 1 say cat words\nA:", "Q: 2 hi\nA:"], [" cat cat", " red blue mat"]
    on_cpu = RewardScorer(cfg.output_dir, device="cpu").score(prompts, responses)
    on_gpu = RewardScorer(cfg.output_dir, device="cuda").score(prompts, responses)
    torch.testing.assert_close(on_gpu, on_cpu, rtol=1e-3, atol=1e-4)

    batch = encoded_toy(tiny_tokenizer, 6, seed=5)
    grads = []
    for device in ("cpu", "cuda"):
        model = load_reward_model(cfg.output_dir).to(device)
        rm.accumulate_ranking_gradients(model, batch, 2, tiny_tokenizer.pad_token_id)
        grads.append(torch.cat([p.grad.flatten().cpu() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-5)

    comparisons, demos = toy_files(tmp_path, 60)
    results = rm.run(rm_config(tmp_path, tiny_lm_dir, comparisons, demos, device="cuda"))
    assert abs(results["normalization"]["mean_after"]) < 1e-4


# --------------------------------------------------------------------------- command line


def test_cli_rm_then_rm_score(tmp_path, tiny_lm_dir):
    comparisons, demos = toy_files(tmp_path, 24)
    out = tmp_path / "cli_rm"
    sets = {
        "model": tiny_lm_dir,
        "output_dir": out,
        "comparisons": comparisons,
        "demonstrations": demos,
        "batch_size": 8,
        "device": "cpu",
    }
    argv = ["rm"] + [arg for k, v in sets.items() for arg in ("--set", f"{k}={v}")]
    assert main(argv) == 0
    assert (out / "results.json").exists() and (out / "config.json").exists()

    to_score = [
        {"prompt": "Q: say cat words\nA:", "response": " cat cat", "id": 1},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "red"}], "id": 2},
    ]
    scored_path = tmp_path / "scored.jsonl"
    argv = ["rm", "score", "--set", f"model={out}", "--set", f"input={write_jsonl(tmp_path / 'in.jsonl', to_score)}"]
    assert main(argv + ["--set", f"output={scored_path}", "--set", "device=cpu"]) == 0
    scored = [json.loads(line) for line in scored_path.read_text().splitlines()]
    assert [r["id"] for r in scored] == [1, 2] and scored[1]["messages"] == to_score[1]["messages"]
    expected = RewardScorer(out, device="cpu").score(["Q: say cat words\nA:"], [" cat cat"])
    assert scored[0]["score"] == pytest.approx(expected.item(), abs=1e-5)


def test_cli_rm_score_reports_a_missing_input(tmp_path, tiny_lm_dir, capsys):
    argv = ["rm", "score", "--set", f"model={tiny_lm_dir}", "--set", f"input={tmp_path / 'nope.jsonl'}"]
    assert main(argv + ["--set", f"output={tmp_path / 'out.jsonl'}"]) == 2
    assert "input" in capsys.readouterr().err


CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def test_with_a_chat_template_every_stage_renders_a_prompt_alike(tiny_tokenizer, tmp_path):
    """The RM's bias is fitted on demonstrations and shifts the scores of comparisons and PPO prompts: with a
    chat template, a chat demonstration, a plain one, a comparison, an SFT example, a PPO prompt and the scorer
    must all see the same prompt tokens (plain prompts go through the template as one user message)."""
    import copy

    from instructrl.data.loading import render_chat_prompt
    from instructrl.data.records import Demonstration
    from instructrl.stages import sft
    from instructrl.stages.ppo_data import load_prompt_data

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = CHAT_TEMPLATE
    question = "what is 2 plus 3 ?"
    turns = ({"role": "user", "content": question},)
    chat_demo = Demonstration(render_chat_prompt(turns), "5", prompt_messages=turns)
    plain_demo = Demonstration(question, "5")
    demonstrations, dropped = rm.encode_demonstrations([chat_demo, plain_demo], tok, 64, 64)
    (comparison,), _ = rm.encode_comparisons([Comparison(question, ("5", "6"), (0, 1))], tok, 64, 64)
    assert dropped == 0 and demonstrations[0] == demonstrations[1] == list(comparison.completions[0])
    assert sft.encode_demonstration(plain_demo, tok, 64, 64).input_ids == demonstrations[0]

    prompt_ids = tok(f"<user> {question}\n<assistant>", add_special_tokens=False)["input_ids"]
    assert demonstrations[0][: len(prompt_ids)] == prompt_ids  # the template itself, not the plain text
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": question}) + "\n")
    assert load_prompt_data(str(tmp_path / "prompts.jsonl"), tok, 64, seed=0).ids == [prompt_ids]
