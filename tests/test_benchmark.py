"""Smoke test of benchmarks/ppo_throughput.py at a tiny shape (the real shapes take minutes: not part of the suite)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "ppo_throughput.py"
HAVE_TRL = importlib.util.find_spec("trl") is not None


def test_benchmark_script_runs_at_a_tiny_shape(tmp_path):
    """Both precisions of ours, and TRL's PPOTrainer when the ``bench`` extra is installed (else --no-peer)."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(SCRIPT), "--shapes", "tiny", "--iterations", "1", "--warmup", "1",
           "--threads", "1", "--peak-seconds", "0.1", "--json", str(out)]  # fmt: skip
    if not HAVE_TRL:
        cmd.append("--no-peer")
    src = str(SCRIPT.parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ours fp32" in proc.stdout and "ours bf16" in proc.stdout and "generation ours" in proc.stdout
    report = json.loads(out.read_text())
    sides = report["shapes"]["tiny"]["sides"]
    assert ("peer fp32" in sides) == HAVE_TRL
    assert all(r["total"] > 0 for side in sides.values() for r in side["iterations"])
