"""The alignment tax: what RLHF costs the base model's abilities outside the instruction format.

InstructGPT found that PPO fine-tuning lowers performance on public NLP benchmarks (SQuADv2, DROP,
HellaSwag, WMT Fr→En) and that mixing pretraining gradients into PPO (PPO-ptx) recovers most of it
(§4.2, Table 14). The sandbox measures the same thing on text that is not an instruction at all:

* **held-out perplexity** exp(mean NLL) and **next-token accuracy** (top-1, teacher-forced) on
  ``world.heldout_text(n)``: stories, descriptions and counting sequences drawn from the corpus's
  distribution of unrelated documents but never part of any corpus (the pretraining stage's
  :func:`~instructrl.stages.pretrain.token_stream` windows, so the numbers are comparable to its log);
* **fact completion**: knowledge the base model only has from the corpus, probed in the corpus's own
  sentence form, not as an instruction (``"the capital of norland is"`` → ``vesk``);
* **in-context continuation**: the next word of a held-out document where the context fixes it — the next
  number of a counting sequence, the animal a story is about when it is named again, the place a
  description is about.

Both probe skills are scored by greedy decoding: the first word the model writes must be the expected one.
Lower perplexity and higher accuracies are better; compare each tuned policy with the SFT model and the
base model it came from.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from instructrl.eval.generate import generate_responses
from instructrl.models.causal_lm import load_causal_lm, load_tokenizer
from instructrl.models.scoring import max_positions
from instructrl.sandbox import tasks as sandbox_tasks
from instructrl.stages.pretrain import token_stream


@dataclass(frozen=True)
class Probe:
    """A text prefix and the word that must come next."""

    prefix: str
    expected: str
    kind: str
    """What the probe tests (``capital``, ``sound``, ``color``, ``counting``, ``story``, ``description``)."""


@dataclass(frozen=True)
class TaxRow:
    """One model's non-instruction abilities."""

    model: str
    heldout_perplexity: float
    """exp(mean token NLL) on held-out non-instruction text (lower is better)."""
    next_token_accuracy: float
    """Top-1 next-token accuracy on the same tokens."""
    fact_accuracy: float
    """Fact-sentence completion accuracy (greedy first word)."""
    continuation_accuracy: float
    """In-context continuation accuracy on held-out documents (greedy first word)."""
    heldout_tokens: int
    fact_probes: int
    continuation_probes: int


# --------------------------------------------------------------------------- held-out text


@torch.inference_mode()
def stream_metrics(
    model, stream: torch.Tensor, seq_len: int, max_windows: int = 0, batch_size: int = 32
) -> tuple[float, float, int]:
    """``(perplexity, next-token accuracy, tokens)`` on consecutive non-overlapping windows of ``stream``.

    Same windows as :func:`~instructrl.stages.pretrain.stream_perplexity`: window w covers tokens
    [w·L, w·L + L] and predicts its last L. Perplexity = exp(Σ NLL / N); accuracy = fraction of the N
    predicted tokens that are the argmax.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n_windows = (len(stream) - 1) // seq_len
    if max_windows:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise ValueError(f"held-out text is shorter than one window of {seq_len} tokens")
    total_nll, correct, total = 0.0, 0, 0
    try:
        for start in range(0, n_windows, batch_size):
            offsets = [w * seq_len for w in range(start, min(n_windows, start + batch_size))]
            x = torch.stack([stream[o : o + seq_len] for o in offsets]).to(device)  # (b, L)
            y = torch.stack([stream[o + 1 : o + 1 + seq_len] for o in offsets]).to(device)  # (b, L)
            logits = model(input_ids=x).logits.float()  # (b, L, V)
            total_nll += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
            correct += int((logits.argmax(dim=-1) == y).sum())
            total += y.numel()
    finally:
        model.train(was_training)
    return math.exp(total_nll / total), correct / total, total


# --------------------------------------------------------------------------- probes


def fact_probes() -> list[Probe]:
    """Every fact of the sandbox fact tables as a corpus-style sentence with its last word left out."""
    probes = [Probe(f"the capital of {k} is", v, "capital") for k, v in sandbox_tasks.CAPITALS.items()]
    probes += [Probe(f"{sandbox_tasks.with_article(k)} says", v, "sound") for k, v in sandbox_tasks.SOUNDS.items()]
    probes += [Probe(f"the color of {k} is", v, "color") for k, v in sandbox_tasks.COLORS.items()]
    return probes


_STORY = re.compile(r"^(once upon a time there was a \w+ (\w+) named \w+ \. the) \2 ")
_DESCRIPTION = re.compile(r"^(the (\w+) is \w+ \. there are \w+ \w+ in the) \2 ")
_COUNT_BY = re.compile(r"^(count by \d+ from \d+ :) (.+)$")
_COUNT_NAMES = re.compile(r"^(\w+ counts the \w+ :) (.+) \.$")


def continuation_probe(text: str) -> Probe | None:
    """The in-context continuation probe of one held-out document, or None when it has no fixed next word.

    * story: "once upon a time there was a happy fox named tom . the" → ``fox``;
    * description: "the park is big . there are four cats in the" → ``park``;
    * counting: the first three numbers (digits or number words, up or down) → the fourth.
    """
    if m := _STORY.match(text):
        return Probe(m.group(1), m.group(2), "story")
    if m := _DESCRIPTION.match(text):
        return Probe(m.group(1), m.group(2), "description")
    for pattern in (_COUNT_BY, _COUNT_NAMES):
        if m := pattern.match(text):
            numbers = m.group(2).split()
            if len(numbers) >= 4:
                return Probe(f"{m.group(1)} {' '.join(numbers[:3])}", numbers[3], "counting")
    return None


def continuation_probes(texts: list[str]) -> list[Probe]:
    """Probes of every held-out document that has one (see :func:`continuation_probe`)."""
    return [p for p in (continuation_probe(t) for t in texts) if p is not None]


def first_word(text: str) -> str:
    words = text.split()
    return words[0] if words else ""


def probe_accuracy(model, tokenizer, probes: list[Probe], max_new_tokens: int = 4, batch_size: int = 64) -> float:
    """Fraction of probes whose greedy continuation starts with the expected word (NaN with no probes)."""
    if not probes:
        return float("nan")
    generated = generate_responses(
        model,
        tokenizer,
        [p.prefix for p in probes],
        max_new_tokens=max_new_tokens,
        temperature=0.0,
        batch_size=batch_size,
    )
    return sum(first_word(g.text) == p.expected for g, p in zip(generated, probes)) / len(probes)


# --------------------------------------------------------------------------- one model


def measure_tax(
    name: str,
    model_dir: str | Path,
    heldout_texts: list[str],
    seq_len: int = 128,
    max_windows: int = 0,
    fact_probe_list: list[Probe] | None = None,
    device: str | torch.device = "cpu",
) -> TaxRow:
    """Held-out perplexity, next-token accuracy and both probe skills of the model at ``model_dir``.

    ``seq_len`` is capped at the model's context. ``fact_probe_list`` defaults to :func:`fact_probes`.
    """
    tokenizer = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir, tokenizer).to(device)
    limit = max_positions(model)
    window = min(seq_len, limit) if limit else seq_len
    perplexity, accuracy, n_tokens = stream_metrics(model, token_stream(heldout_texts, tokenizer), window, max_windows)
    facts = fact_probes() if fact_probe_list is None else fact_probe_list
    continuations = continuation_probes(heldout_texts)
    return TaxRow(
        model=name,
        heldout_perplexity=perplexity,
        next_token_accuracy=accuracy,
        fact_accuracy=probe_accuracy(model, tokenizer, facts),
        continuation_accuracy=probe_accuracy(model, tokenizer, continuations),
        heldout_tokens=n_tokens,
        fact_probes=len(facts),
        continuation_probes=len(continuations),
    )
