"""benchmarks/demo_seeds.py: the table over seeds, from finished runs' files (the runs themselves take minutes)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from conftest import load_benchmark
from instructrl.eval.stats import wilson_interval


@pytest.fixture(scope="module")
def seeds():
    return load_benchmark("demo_seeds")


def _win(policy: str, wins: int, ties: int, n: int, baseline: str = "sft") -> dict:
    rate = (wins + ties / 2) / n
    return {"policy": policy, "baseline": baseline, "judge": "gold", "group": "all", "rate": rate, "low": rate - 0.05,
            "high": rate + 0.05, "n": n, "wins": wins, "ties": ties, "losses": n - wins - ties}  # fmt: skip


def _fake_run(folder: Path, row1: float, rm: float, agreement: float, wins: int, ties: int) -> None:
    headline = [
        {"id": "1", "claim": "PPO-ptx vs SFT", "value": row1, "low": row1 - 5, "high": row1 + 5, "unit": "%"},
        {"id": "4a", "claim": "RM accuracy", "value": rm, "low": None, "high": None, "unit": "%"},
        {"id": "4b", "claim": "RM accuracy, held out", "value": None, "low": None, "high": None, "unit": "%"},
        {"id": "4d", "claim": "agreement", "value": agreement, "low": None, "high": None, "unit": "%"},
    ]
    (folder / "eval").mkdir(parents=True)
    summary = {"seconds": {"pretrain": 100.0, "ppo": 50.0}, "cpu_seconds": {"pretrain": 190.0}, "headline": headline}
    (folder / "summary.json").write_text(json.dumps(summary))
    metrics = {"win_rates": [_win("ppo_ptx", wins, ties, 300), _win("ppo", 10, 280, 300)]}
    (folder / "eval" / "metrics.json").write_text(json.dumps(metrics))
    (folder / "rm").mkdir()
    baselines = {"initial_likelihood": (rm + 10) / 100, "longer": 0.4}
    (folder / "rm" / "results.json").write_text(json.dumps({"valid": {"baselines": baselines}, "heldout": None}))


def test_table_gives_each_seed_the_spread_and_row_1_pooled(seeds, tmp_path):
    _fake_run(tmp_path / "seed0", 57.2, 57.4, 73.2, wins=74, ties=195)
    _fake_run(tmp_path / "seed3", 52.0, 67.5, 71.0, wins=40, ties=232)
    seeds.main(["--seeds", "0", "3", "--output-dir", str(tmp_path), "--table-only"])
    result = json.loads((tmp_path / "seeds.json").read_text())
    row1 = result["rows"]["1"]
    assert row1["mean"] == pytest.approx(54.6) and row1["std"] == pytest.approx(statistics.stdev([57.2, 52.0]))
    assert row1["seeds"]["3"] == {"value": 52.0, "low": 47.0, "high": 57.0}
    assert result["rows"]["4b"]["mean"] is None  # a row no seed measured stays empty, not 0
    # The issue-26 bar: RM accuracy as a share of the agreement on the same samples, per seed.
    assert result["rows"]["4a/4d"]["seeds"]["0"]["value"] == round(100 * 57.4 / 73.2, 1)
    assert result["rows"]["1p"]["seeds"]["0"]["value"] == round(100 * (10 + 140) / 300, 1)
    # Beside the RM's accuracy: its initial model's likelihood on the same pairs (rm/results.json).
    assert result["rows"]["4a·L"]["seeds"]["3"]["value"] == 77.5 and "4b·L" not in result["rows"]
    # Pooled: wins + ties/2 over both seeds' 600 prompts, with the Wilson interval of that count.
    pooled = result["pooled_row_1"]
    successes = 74 + 40 + (195 + 232) / 2
    low, high = wilson_interval(successes, 600)
    assert pooled["n"] == 600 and pooled["rate"] == pytest.approx(100 * successes / 600)
    assert (pooled["low"], pooled["high"]) == (pytest.approx(100 * low), pytest.approx(100 * high))
    assert result["seconds"]["0"] == {"wall": 150.0, "cpu": 190.0}
    table = (tmp_path / "seeds.md").read_text()
    assert "| 1 | PPO-ptx vs SFT | 57.2 [52.2, 62.2] | 52 [47, 57] | 54.6 ± 3.7 |" in table
    assert f"Row 1 pooled over 2 seeds: {100 * successes / 600:.1f}%" in table
    assert not math.isnan(pooled["low"])


def test_the_second_rounds_rows_are_pooled_when_every_seed_has_them(seeds, tmp_path):
    for seed, wins in ((0, 80), (1, 60)):
        _fake_run(tmp_path / f"seed{seed}", 55.0, 57.4, 73.2, wins=74, ties=195)
        path = tmp_path / f"seed{seed}" / "eval" / "metrics.json"
        metrics = json.loads(path.read_text())
        metrics["win_rates"] += [
            _win("ppo_ptx_round2", wins, 180, 300),
            _win("ppo_ptx_round2", 70, 170, 300, "ppo_ptx"),
        ]
        path.write_text(json.dumps(metrics))
    seeds.main(["--seeds", "0", "1", "--output-dir", str(tmp_path), "--table-only"])
    pooled = json.loads((tmp_path / "seeds.json").read_text())["pooled"]
    assert pooled["1r"]["n"] == 600 and pooled["1r"]["rate"] == pytest.approx(100 * (140 + 180) / 600)
    assert pooled["1r vs 1"]["rate"] == pytest.approx(100 * (140 + 170) / 600)
    assert f"Row 1r pooled: {100 * 320 / 600:.1f}%" in (tmp_path / "seeds.md").read_text()

    _fake_run(tmp_path / "one_round" / "seed0", 55.0, 57.4, 73.2, wins=74, ties=195)
    seeds.main(["--seeds", "0", "--output-dir", str(tmp_path / "one_round"), "--table-only"])
    assert json.loads((tmp_path / "one_round" / "seeds.json").read_text())["pooled"] == {}


def test_missing_runs_are_named(seeds, tmp_path):
    _fake_run(tmp_path / "seed0", 57.2, 57.4, 73.2, wins=74, ties=195)
    with pytest.raises(SystemExit, match="seed1"):
        seeds.main(["--seeds", "0", "1", "--output-dir", str(tmp_path), "--table-only"])
