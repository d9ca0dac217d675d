"""benchmarks/guardrail_margins.py: each guardrail's worst value per PPO run, read from a finished run's files."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import load_benchmark


@pytest.fixture(scope="module")
def margins():
    return load_benchmark("guardrail_margins")


def _iteration(step: int, kl: float, ent: float, distinct: float, eos: float, above: float, **flags) -> dict:
    record = {"step": step, "objective/kl": kl, "policy/entropy": ent, "response/distinct_fraction": distinct}
    record |= {"response/eos_rate": eos, "guardrails/score_above_rm_max": above}
    return record | {f"guardrails/{name}": value for name, value in flags.items()}


def test_worst_values_are_ratios_and_rises_over_the_first_rollout(margins, tmp_path, capsys):
    run = tmp_path / "demo"
    ppo = run / "ppo_ptx"
    ppo.mkdir(parents=True)
    (ppo / "instructrl_ppo.yaml").write_text(
        yaml.safe_dump({"guardrails": {"max_kl": 20.0, "min_entropy_ratio": 0.5}})
    )
    rows = [
        _iteration(1, 0.0, 2.0, 0.8, 1.0, 0.1),
        _iteration(2, 3.0, 0.8, 0.4, 0.9, 0.3, entropy=1.0),
        _iteration(3, 2.0, 1.5, 0.6, 0.95, 0.2),
    ]
    (ppo / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [{"step": 0, "note": "x"}, *rows]))
    (run / "eval").mkdir()
    win = {"policy": "ppo_ptx", "baseline": "sft", "judge": "gold", "group": "all", "rate": 0.6, "low": 0.5}
    (run / "eval" / "metrics.json").write_text(json.dumps({"win_rates": [win | {"high": 0.7, "n": 100}]}))

    result = margins.run_margins(ppo)
    assert result["kl"] == {"sft": None, "worst": 3.0, "at_iteration": 2, "threshold": 20.0, "failed_iterations": []}
    assert result["entropy"]["worst"] == pytest.approx(0.4) and result["entropy"]["failed_iterations"] == [2]
    assert result["entropy"]["sft"] == 2.0 and result["entropy"]["threshold"] == 0.5
    assert result["distinct"]["worst"] == pytest.approx(0.5) and result["distinct"]["at_iteration"] == 2
    assert result["missing_eos"]["worst"] == pytest.approx(0.1) and result["rm_range"]["worst"] == pytest.approx(0.2)
    assert result["missing_eos"]["threshold"] is None  # not in this run's settings

    margins.main([str(run)])
    table = capsys.readouterr().out
    assert f"| {run}/ppo_ptx | 60.0% [50.0, 70.0] | 3 @2 (limit 20.0) | 0.4 @2 (limit 0.5); failed 1× (2–2) |" in table
