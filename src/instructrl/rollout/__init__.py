"""Rollout generation for PPO: the sampling backend interface and the Hugging Face ``generate`` backend."""

from instructrl.rollout.sampler import GenerationBackend, HFGenerateBackend, run_with_generator, truncate_after_eos

__all__ = ["GenerationBackend", "HFGenerateBackend", "run_with_generator", "truncate_after_eos"]
