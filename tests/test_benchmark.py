"""Smoke test of benchmarks/ppo_throughput.py at a tiny shape (the real shapes take minutes: not part of the suite)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "ppo_throughput.py"
HAVE_TRL = importlib.util.find_spec("trl") is not None


def test_benchmark_script_runs_at_a_tiny_shape(tmp_path):
    """Both precisions of ours (bf16 without the kernel swaps), and TRL's PPOTrainer when the ``bench`` extra is
    installed (else --no-peer), in two alternating rounds."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(SCRIPT), "--shapes", "tiny", "--iterations", "1", "--warmup", "1", "--rounds", "2",
           "--precisions", "fp32,bf16:plain", "--threads", "1", "--peak-seconds", "0.1",
           "--json", str(out)]  # fmt: skip
    cmd += ["--peer-precisions", "fp32,bf16"] if HAVE_TRL else ["--no-peer"]
    src = str(SCRIPT.parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ours fp32" in proc.stdout and "ours bf16:plain" in proc.stdout and "generation ours" in proc.stdout
    report = json.loads(out.read_text())
    sides = report["shapes"]["tiny"]["sides"]
    assert ("peer fp32" in sides) == HAVE_TRL and ("peer bf16" in sides) == HAVE_TRL
    assert all(r["total"] > 0 for side in sides.values() for r in side["iterations"])
    assert all(len(side["iterations"]) == 2 and len(side["round_totals"]) == 2 for side in sides.values())
    assert ("ratio per round" in proc.stdout) == HAVE_TRL
    assert ("ours bf16:plain vs peer bf16: ratio" in proc.stdout) == HAVE_TRL
    assert f"torch kernels {report['cpu']['capability']}, native bf16 matmul" in proc.stdout


@pytest.fixture
def bench(monkeypatch):
    """The benchmark script as a module (registered in sys.modules: its dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location("ppo_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_bf16_runs_by_default_only_where_matmuls_run_it_natively(bench):
    assert bench.default_precisions("cpu", native_bf16=True) == "fp32,bf16"
    assert bench.default_precisions("cpu", native_bf16=False) == "fp32"
    assert bench.default_precisions("cuda", native_bf16=False) == "fp32,bf16"


def test_peer_precisions_must_start_with_fp32(bench, capsys):
    for bad in ("bf16", "fp32,fp16"):
        with pytest.raises(SystemExit):
            bench.main(["--peer-precisions", bad])
        assert "--peer-precisions" in capsys.readouterr().err


def test_rounds_pool_the_iterations_and_keep_each_rounds_median(bench):
    def result(totals, peak):
        return {"iterations": [{"total": t} for t in totals], "peak_rss_mib": peak, "rss_before_mib": 1.0}

    rounds = [{"ours": result([3.0, 1.0, 2.0], 10.0)}, {"ours": result([5.0, 4.0, 6.0], 12.0)}]
    merged = bench.merge_rounds(rounds)["ours"]
    assert merged["round_totals"] == [2.0, 5.0]
    assert sorted(r["total"] for r in merged["iterations"]) == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert bench.summarize(merged["iterations"])["total"] == 3.5
    assert merged["peak_rss_mib"] == 12.0


def test_generation_benchmark_times_the_halves_at_once_on_two_threads(bench, tmp_path):
    import torch

    shape = bench.SHAPES["tiny"]
    assets = bench.build_assets(shape, tmp_path)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = bench.run_generation(shape, assets, repeats=1)
    finally:
        torch.set_num_threads(before)
    assert set(result) == {"model.generate", "ours", "ours, halves"}
    assert result["ours, halves"]["tokens"] == result["ours"]["tokens"]  # the same rows' uniforms: same tokens
    assert all(r["seconds"] > 0 for r in result.values())
