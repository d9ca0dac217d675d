"""Seeding: one function so every stage seeds python, numpy and torch the same way."""

from __future__ import annotations

import random

import numpy as np
import torch

RANK_SEED_STRIDE = 100_003
"""Prime stride between ranks' seeds, so data-parallel workers sample different responses
[ppo-details: per-rank-seed]."""


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seed python, numpy and torch with ``seed + rank * RANK_SEED_STRIDE``; returns the seed used."""
    s = seed + rank * RANK_SEED_STRIDE
    random.seed(s)
    np.random.seed(s % (2**32))
    torch.manual_seed(s)
    return s


def rng_state() -> dict:
    """Snapshot of every RNG this project uses, for exact resume."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
