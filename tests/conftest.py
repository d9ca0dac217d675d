"""Shared fixtures: a tiny tokenizer and tiny causal LMs built in-process (nothing is downloaded); the labeling
server in a subprocess."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SHARED = Path(__file__).resolve().parents[2] / "shared"
"""The ``../shared`` folder beside the project (seed, references, real data)."""

TINY_TEXTS = [
    "Instruction: what is 2 plus 3 ?\nResponse: 5",
    "Instruction: reverse the words : red blue green\nResponse: green blue red",
    "the capital of norland is vesk .",
    "once upon a time a small cat sat on a mat and sang .",
    "Q: what is 1 plus 1 ?\nA: 2\nQ: what is 2 plus 2 ?\nA: 4",
] * 40


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from instructrl.models.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(TINY_TEXTS, vocab_size=300)


def _save_tiny_lm(path: Path, tokenizer, arch: str = "llama", seed: int = 0) -> Path:
    from instructrl.models.causal_lm import ModelSpec, build_causal_lm

    torch.manual_seed(seed)
    model = build_causal_lm(ModelSpec(arch=arch, d_model=32, n_layers=2, n_heads=2, max_seq_len=128), tokenizer)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved tiny Llama-style causal LM + tokenizer directory (random weights)."""
    return _save_tiny_lm(tmp_path_factory.mktemp("tiny_lm"), tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved tiny GPT-2-style causal LM + tokenizer directory (random weights)."""
    return _save_tiny_lm(tmp_path_factory.mktemp("tiny_gpt2"), tiny_tokenizer, arch="gpt2")


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` as a module (the benchmark scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


QUICK_DEMO = ["demo", "--quick", "--set", "threads=1", "--set", "rounds=2"]
"""The quick demo the tests run: one thread, so that kill tests can compare bit for bit, and two rounds of
rankings, so that every stage the demo has runs (and is killed) in it."""


@pytest.fixture(scope="session")
def quick_demo_run(tmp_path_factory) -> Path:
    """``instructrl demo --quick`` (``QUICK_DEMO``) run once per session."""
    from instructrl.cli import main

    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("demo") / "run"
    try:
        assert main([*QUICK_DEMO, "--set", f"output_dir={out}"]) == 0
    finally:
        torch.set_num_threads(threads)  # the demo set one thread; the other tests keep the session's setting
    return out


def assignment_outcome(db: Path, assignment_id: int) -> tuple[str, str | None, str | None]:
    """(status, skip reason, skip note) of one assignment in a labeling database."""
    from instructrl.label.db import Assignment, open_database

    with open_database(db) as database, database.read() as session:
        assignment = session.get(Assignment, assignment_id)
        return assignment.status, assignment.skip_reason, assignment.skip_note


@contextlib.contextmanager
def label_serve_process(db: Path, *settings: str) -> Iterator[str]:
    """``instructrl label serve`` on ``db`` in a subprocess on a free port, started through the real command line
    with ``--set`` for each of ``settings``; yields its base URL (ending in ``/``) and stops it on the way out."""
    overrides = [arg for setting in (f"db={db}", "port=0", *settings) for arg in ("--set", setting)]
    proc = subprocess.Popen(
        [sys.executable, "-u", "-m", "instructrl", "label", "serve", *overrides],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = None
        for line in proc.stdout:
            match = re.search(r" at (http://\S+/) ", line)
            if match:
                url = match.group(1)
                break
        # keep reading the server's output so that a full pipe can never block it
        threading.Thread(target=proc.stdout.read, daemon=True).start()
        assert url is not None, "instructrl label serve did not start"
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)
