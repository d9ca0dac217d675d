"""Rollout generation for PPO: the sampling backend interface, our KV-cache sampler and the ``generate`` backend."""

from instructrl.rollout.sampler import (
    CachedSampler,
    GenerationBackend,
    HFGenerateBackend,
    run_with_generator,
    sample_inverse_cdf,
    sample_multinomial,
    truncate_after_eos,
)

__all__ = [
    "CachedSampler",
    "GenerationBackend",
    "HFGenerateBackend",
    "run_with_generator",
    "sample_inverse_cdf",
    "sample_multinomial",
    "truncate_after_eos",
]
