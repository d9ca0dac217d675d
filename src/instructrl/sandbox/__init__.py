"""A miniature InstructGPT world that runs the whole RLHF method on one CPU in minutes.

``SandboxWorld`` implements :class:`instructrl.world.World`: it supplies prompts split by user, a "web"
corpus to pretrain a tiny base model on, simulated labelers who write demonstrations and rank responses,
and a hidden gold judgement for evaluation. Any object with the methods of :class:`~instructrl.world.World`
can stand in for it.
"""

from instructrl.sandbox.labelers import pairwise_agreement, synthetic_agreement
from instructrl.sandbox.world import SandboxWorld

__all__ = ["SandboxWorld", "pairwise_agreement", "synthetic_agreement"]
