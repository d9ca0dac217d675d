"""A miniature InstructGPT world that runs the whole RLHF method on one CPU in minutes.

``SandboxWorld`` supplies prompts split by user, a "web" corpus to pretrain a tiny base model on,
simulated labelers who write demonstrations and rank responses, and a hidden gold judgement for
evaluation. Any object with the methods of :class:`World` can stand in for it.
"""

from instructrl.sandbox.labelers import pairwise_agreement, synthetic_agreement
from instructrl.sandbox.world import SPLITS, SandboxWorld, Task, World

__all__ = ["SPLITS", "SandboxWorld", "Task", "World", "pairwise_agreement", "synthetic_agreement"]
