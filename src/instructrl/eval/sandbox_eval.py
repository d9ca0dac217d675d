"""Evaluation on a :class:`~instructrl.world.World`: responses of each policy to held-out prompts, judged.

The gold judgement plays the part of InstructGPT's human evaluators on held-out customers' prompts;
behaviour flags (refusals of harmful requests, confidently wrong facts, toxic words, format constraints
met) are the sandbox's analogues of the paper's harmlessness, truthfulness and instruction-following axes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from instructrl.errors import UserFacingError
from instructrl.eval.generate import generate_responses
from instructrl.eval.stats import WinRate, win_rate
from instructrl.models.causal_lm import load_causal_lm, load_tokenizer
from instructrl.world import Task, World, has_extra


@dataclass
class PolicyEval:
    """One policy's responses to a fixed list of tasks, with gold scores and behaviour flags."""

    name: str
    tasks: list[Task]
    responses: list[str]
    stopped: list[bool]
    gold: list[float]
    """Gold score of each response; empty when no world judged them (prompts from a file)."""
    flags: list[dict] = field(repr=False)

    def rate(self, flag: str, where: str | None = None) -> float:
        """Fraction of responses with ``flag`` set, optionally only on tasks of category ``where``."""
        picked = [f[flag] for t, f in zip(self.tasks, self.flags) if where is None or t.category == where]
        return sum(bool(x) for x in picked) / max(1, len(picked))

    def mean_gold(self) -> float:
        return sum(self.gold) / max(1, len(self.gold))


def eval_tasks(world: World, split: str = "test", n: int = 0) -> list[Task]:
    """Held-out tasks, deduplicated by prompt text (identical prompts share ground truth), first ``n``."""
    seen, out = set(), []
    for t in world.tasks(split):
        if t.prompt not in seen:
            seen.add(t.prompt)
            out.append(t)
    return out[:n] if n else out


@torch.inference_mode()
def evaluate_policy(
    name: str,
    model_dir: str | Path,
    world: World | None,
    tasks: list[Task],
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
    prefix_examples: int = 0,
) -> PolicyEval:
    """Generate one response per task from the policy at ``model_dir`` and judge each with the gold score.

    ``prefix_examples > 0`` prompts the model few-shot: :func:`instruction_prefix` goes before every prompt (the
    responses are still judged as answers to the bare prompts).
    """
    tokenizer = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir, tokenizer).to(device)
    prefix = instruction_prefix(world, prefix_examples) if prefix_examples else ""
    generated = generate_responses(
        model,
        tokenizer,
        [prefix + t.prompt for t in tasks],
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
    )
    return policy_eval_from_responses(name, world, tasks, [g.text for g in generated], [g.stopped for g in generated])


def instruction_prefix(world: World, n_examples: int, separator: str = "\n") -> str:
    """A few-shot prefix that puts a base model into instruction-following mode, as the paper's "GPT-3 prompted".

    ``n_examples`` plain prompts of the world's train split, one per category in the order the categories first
    appear there, leaving out the category named "harmful" (it would teach refusing, which is more than following
    instructions); each the shortest of its category (the prefix must leave room in the windows the models were
    pretrained on), with the world's ``reference_response`` and ``separator``. The default newline keeps the
    examples and the prompt one document, as the corpus's chained instruction documents are; separated by EOS they
    were ignored, since a pretrained model learns that text before a document boundary says nothing about what
    follows (measurements: benchmarks/RESULTS.md).
    """
    if not has_extra(world, "reference_response"):
        raise UserFacingError("prompted: the few-shot prefix needs a world with reference_response()")
    chosen: dict[str, Task] = {}
    for task in world.tasks("train"):
        best = chosen.get(task.category)
        if (
            task.type == "plain"
            and task.category != "harmful"
            and (best is None or len(task.prompt) < len(best.prompt))
        ):
            chosen[task.category] = task
    if not 0 < n_examples <= len(chosen):
        raise UserFacingError(
            f"prompt_examples: must be 1..{len(chosen)} (one per category of the world's plain train prompts), "
            f"got {n_examples}"
        )
    shots = list(chosen.values())[:n_examples]
    return "".join(f"{t.prompt}{world.reference_response(t)}{separator}" for t in shots)


def policy_eval_from_responses(
    name: str, world: World | None, tasks: list[Task], responses: list[str], stopped: list[bool]
) -> PolicyEval:
    """Judge given responses (one per task) with the gold score and behaviour flags; ``stopped`` says whether
    each response ended with EOS (it replaces the text-based ``stopped`` flag of ``world.analysis``). Without a
    world (prompts from a file) there is no gold score (``gold`` is empty); without a world or its ``analysis``
    extra ``stopped`` is the only flag."""
    if not len(tasks) == len(responses) == len(stopped):
        raise ValueError(f"{len(tasks)} tasks, {len(responses)} responses, {len(stopped)} stop flags")
    flags = []
    for t, text, ended in zip(tasks, responses, stopped):
        f = world.analysis(t, text) if has_extra(world, "analysis") else {}
        f["stopped"] = ended
        flags.append(f)
    gold = [world.gold_score(t, text) for t, text in zip(tasks, responses)] if world is not None else []
    return PolicyEval(name, tasks, list(responses), list(stopped), gold, flags)


def reference_policy_eval(world: World, tasks: list[Task], name: str = "reference") -> PolicyEval:
    """The world's ideal responses (``world.reference_response``) as a policy: the ceiling of any win rate."""
    responses = [world.reference_response(t) for t in tasks]
    return policy_eval_from_responses(name, world, tasks, responses, [True] * len(tasks))


def compare(a: PolicyEval, b: PolicyEval) -> WinRate:
    """Win rate of policy ``a`` over ``b`` by the gold judgement on the same tasks (ties count ½)."""
    if [t.id for t in a.tasks] != [t.id for t in b.tasks]:
        raise ValueError(f"{a.name} and {b.name} were evaluated on different tasks")
    return win_rate(a.gold, b.gold)


def format_required(world: World, task: Task) -> bool:
    """Whether ``task`` asks for a format: a plain prompt with a stated constraint ("answer in one word .")
    or a few-shot prompt (whose examples set the bare-answer format)."""
    return task.type == "few-shot" or (has_extra(world, "spec") and world.spec(task).constraint is not None)


@dataclass(frozen=True)
class BehaviourRow:
    """Sandbox analogues of the paper's axes beyond preference, for one policy on the evaluation tasks.

    Rates are fractions over the tasks named in each field's doc; ``n_*`` are those denominators.
    """

    model: str
    n: int
    """Evaluation tasks."""
    mean_gold: float
    """Mean gold score over all tasks."""
    correct: float
    """Helpfulness: correct answers among harmless tasks."""
    harmful_refused: float
    """Harmlessness: refusals among harmful requests (higher is better)."""
    harmful_complied: float
    """Harmlessness: harmful requests the response starts carrying out (lower is better)."""
    harmless_refused: float
    """Over-refusal: refusals among harmless requests (lower is better). A reward model that overrates refusals
    shows here first: its comparisons of SFT samples hold almost no refusal of a harmless request."""
    toxic: float
    """Harmlessness: responses containing an insult, over all tasks."""
    wrong_fact: float
    """Truthfulness: fact questions answered confidently with a wrong fact (the sandbox's hallucination)."""
    followed_format: float
    """Instruction following: format constraints met, among tasks that require a format."""
    stopped: float
    """Responses that ended with EOS."""
    mean_words: float
    """Mean response length in words."""
    n_harmless: int
    n_harmful: int
    n_facts: int
    n_format: int


def _rate(values: list[bool]) -> float:
    return sum(bool(v) for v in values) / len(values) if values else float("nan")


def behaviour_row(pe: PolicyEval, world: World) -> BehaviourRow:
    """Behaviour rates of one evaluated policy (see :class:`BehaviourRow`); NaN where a task set is empty."""
    pairs = list(zip(pe.tasks, pe.flags))
    harmless = [f for t, f in pairs if t.category != "harmful"]
    harmful = [f for t, f in pairs if t.category == "harmful"]
    facts = [f["stated_wrong_fact"] for t, f in pairs if t.category == "facts"]
    formatted = [f["followed_format"] for t, f in pairs if format_required(world, t)]
    return BehaviourRow(
        model=pe.name,
        n=len(pe.tasks),
        mean_gold=pe.mean_gold(),
        correct=_rate([f["correct"] for f in harmless]),
        harmful_refused=_rate([f["refused"] for f in harmful]),
        harmful_complied=_rate([f["complied"] for f in harmful]),
        harmless_refused=_rate([f["refused"] for f in harmless]),
        toxic=_rate([f["toxic"] for f in pe.flags]),
        wrong_fact=_rate(facts),
        followed_format=_rate(formatted),
        stopped=_rate(pe.stopped),
        mean_words=sum(len(r.split()) for r in pe.responses) / max(1, len(pe.responses)),
        n_harmless=len(harmless),
        n_harmful=len(harmful),
        n_facts=len(facts),
        n_format=len(formatted),
    )
