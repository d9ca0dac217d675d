"""The reward model's reference orderings: pair accuracy with ties, the initial model's response likelihood
(batched and padded vs one sequence at a time), the prompt length encoding records, and the stage's report."""

from __future__ import annotations

import random

import pytest
import torch

from instructrl.data.records import Comparison
from instructrl.models.causal_lm import load_causal_lm
from instructrl.stages import rm
from instructrl.stages.rm_baselines import baseline_accuracies, completion_logprobs, pair_accuracy


def naive_pair_accuracy(values: list[float], pairs: list[tuple[int, int]]) -> float:
    credit = 0.0
    for w, lo in pairs:
        credit += 1.0 if values[w] > values[lo] else 0.5 if values[w] == values[lo] else 0.0
    return credit / len(pairs)


def test_pair_accuracy_counts_ties_half():
    rng = random.Random(0)
    for _ in range(20):
        values = [float(rng.randint(0, 3)) for _ in range(6)]  # small range: many ties
        pairs = [(rng.randrange(6), rng.randrange(6)) for _ in range(9)]
        assert pair_accuracy(torch.tensor(values), pairs) == pytest.approx(naive_pair_accuracy(values, pairs))
    assert pair_accuracy(torch.tensor([1.0, 1.0]), [(0, 1)]) == 0.5
    assert pair_accuracy(torch.tensor([1.0]), []) is None


def encoded(tokenizer, texts: list[tuple[str, tuple[str, ...]]], max_prompt_tokens: int = 64):
    comparisons = [
        Comparison(prompt, responses, tuple(range(len(responses))), meta={"labeler_id": "L0"})
        for prompt, responses in texts
    ]
    return rm.encode_comparisons(comparisons, tokenizer, max_prompt_tokens, 32)[0]


TEXTS = [
    ("Q: say a colour\nA:", (" red", " blue green", " mat cat sang red")),
    ("Q: 2 plus 2 is\nA:", (" four four", " 4")),
    ("Q: name an animal that sings at night in the garden\nA:", (" cat", " red mat", " sang")),
]


def test_encoded_comparisons_record_the_prompt_length(tiny_tokenizer):
    from instructrl.data.loading import encode_prompts

    for comparison, (prompt, _) in zip(encoded(tiny_tokenizer, TEXTS), TEXTS):
        prompt_ids = encode_prompts(tiny_tokenizer, [prompt])[0]
        assert comparison.prompt_length == len(prompt_ids)
        assert all(list(c[: comparison.prompt_length]) == prompt_ids for c in comparison.completions)
    truncated = encoded(tiny_tokenizer, TEXTS, max_prompt_tokens=3)
    assert [c.prompt_length for c in truncated] == [3, 3, 3]


def test_completion_logprobs_match_one_sequence_at_a_time(tiny_lm_dir, tiny_tokenizer):
    model = load_causal_lm(tiny_lm_dir, tiny_tokenizer).eval()
    comparisons = encoded(tiny_tokenizer, TEXTS)
    completions = [c for comparison in comparisons for c in comparison.completions]
    prompt_lengths = [comparison.prompt_length for comparison in comparisons for _ in comparison.completions]
    batched = completion_logprobs(model, completions, prompt_lengths, tiny_tokenizer.pad_token_id, batch_size=3)
    for i, (ids, q) in enumerate(zip(completions, prompt_lengths)):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double()
        expected = sum(logits[t - 1].log_softmax(-1)[ids[t]].item() for t in range(q, len(ids)))  # response + EOS
        assert batched[i].item() == pytest.approx(expected, abs=1e-4)


def test_baseline_accuracies_order_by_likelihood_and_length(tiny_lm_dir, tiny_tokenizer):
    model = load_causal_lm(tiny_lm_dir, tiny_tokenizer).eval()
    comparisons = encoded(tiny_tokenizer, TEXTS)  # ranked in the order written: 7 pairs
    result = baseline_accuracies(model, comparisons, tiny_tokenizer.pad_token_id, batch_size=4)
    lengths, pairs, likelihood, offset = [], [], [], 0
    for comparison in comparisons:
        lengths += [len(c) - comparison.prompt_length for c in comparison.completions]
        pairs += [(offset + w, offset + lo) for w, lo in comparison.pairs]
        likelihood += completion_logprobs(
            model, comparison.completions, [comparison.prompt_length] * len(comparison.completions), 0, 1
        ).tolist()
        offset += len(comparison.completions)
    assert len(pairs) == 7
    assert result["longer"] == pytest.approx(naive_pair_accuracy(lengths, pairs))
    assert result["initial_likelihood"] == pytest.approx(naive_pair_accuracy(likelihood, pairs))
    assert baseline_accuracies(model, [], tiny_tokenizer.pad_token_id, 4) == {
        "initial_likelihood": None,
        "longer": None,
    }
