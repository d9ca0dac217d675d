"""benchmarks/rm_ensembles.py on the quick demo: member 0 is the run's own reward model, and the averages are
measured for every M."""

from __future__ import annotations

import json

import torch

from conftest import load_benchmark


def test_member_zero_reproduces_the_runs_reward_model(quick_demo_run, tmp_path):
    ensembles = load_benchmark("rm_ensembles")
    threads = torch.get_num_threads()
    try:  # the quick demo ran on one thread; the same threads give the same floats
        ensembles.main([str(quick_demo_run), "--members", "3", "--threads", "1", "--work-dir", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    result = json.loads((tmp_path / "rm_ensembles.json").read_text())
    stage = json.loads((quick_demo_run / "rm" / "results.json").read_text())
    assert result["members"][0] == {"valid": stage["valid_accuracy"], "heldout": stage["heldout_accuracy"]}
    assert len(result["members"]) == 3 and {"M=2", "M=3"} <= set(result)
    for m in ("M=2", "M=3"):
        for kind in ("weight_average", "ensemble"):
            assert all(0.0 <= result[m][kind][name] <= 1.0 for name in ("valid", "heldout"))
    table = ensembles.table(result)
    assert "| weight average of 3 |" in table and "| 3 members: mean ± sd (range) |" in table


def test_one_member_has_no_average(quick_demo_run, tmp_path):
    ensembles = load_benchmark("rm_ensembles")
    threads = torch.get_num_threads()
    try:
        result = ensembles.measure(quick_demo_run, 1, tmp_path, threads=1)
    finally:
        torch.set_num_threads(threads)
    assert len(result["members"]) == 1 and not any(key.startswith("M=") for key in result)
