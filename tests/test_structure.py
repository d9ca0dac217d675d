"""The PPO loop stays readable: one iteration in one function, the speed machinery behind its two seams.

These are checks on the source text, so that a later speed-up cannot quietly turn the loop back into a
skeleton of runners and buffers."""

from __future__ import annotations

import ast
import inspect
import re

from instructrl.stages import ppo, ppo_trainers

SPEED_MACHINERY = re.compile(r"runner|overlap|kernel|buffer|fused|claim", re.IGNORECASE)
"""Words that name speed machinery; the loop reaches it only through ``models.logprobs`` and
``models.side_by_side``."""


def called_names(function) -> set[str]:
    """The names (or attribute names) of everything ``function`` calls directly."""
    tree = ast.parse(inspect.getsource(function).lstrip())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            target = node.func
            names.add(target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", ""))
    return names


def referenced_attributes(function) -> set[str]:
    """Every ``x.name`` that ``function``'s text reads (called, or handed to ``side_by_side``)."""
    tree = ast.parse(inspect.getsource(function).lstrip())
    return {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}


def test_one_ppo_iteration_is_one_function_of_at_most_120_lines_without_speed_machinery():
    source = inspect.getsource(ppo.train_iteration)
    assert len(source.splitlines()) <= 120
    assert SPEED_MACHINERY.findall(source) == []
    for step in ("# 1. Sample", "# 2. Score", "# 3. Rewards", "# 4. PPO epochs", "# 5. "):
        assert step in source, f"train_iteration lost its step {step!r}"


def test_the_clipped_surrogate_and_the_value_loss_are_two_calls_from_the_iteration():
    """train_iteration → PolicyTrainer.train_step → rl.policy_loss (and the same for the value loss), and the
    trainers' steps name no speed machinery either."""
    assert "train_step" in referenced_attributes(ppo.train_iteration)  # handed to models.side_by_side
    assert "policy_loss" in called_names(ppo_trainers.PolicyTrainer.train_step)
    assert "value_loss" in called_names(ppo_trainers.ValueTrainer.train_step)
    for step in (ppo_trainers.PolicyTrainer.train_step, ppo_trainers.ValueTrainer.train_step):
        assert SPEED_MACHINERY.findall(inspect.getsource(step)) == []


def test_the_structure_checks_can_fail():
    def loop_with_machinery(run):
        run.runner.run(lambda: None)

    assert SPEED_MACHINERY.findall(inspect.getsource(loop_with_machinery)) == ["runner"]
    assert "run" in called_names(loop_with_machinery)
