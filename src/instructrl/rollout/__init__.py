"""Rollout generation for PPO: the sampling backend interface, the ``generate`` backend and EOS truncation.

Our own KV-cache sampler, the default, is :class:`instructrl.fast.sampler.CachedSampler`."""

from instructrl.rollout.sampler import (
    GenerationBackend,
    HFGenerateBackend,
    run_with_generator,
    sample_multinomial,
    truncate_after_eos,
)

__all__ = [
    "GenerationBackend",
    "HFGenerateBackend",
    "run_with_generator",
    "sample_multinomial",
    "truncate_after_eos",
]
