"""How close each PPO run of finished demo runs came to every guardrail, beside what the gold judge said of it.

    python benchmarks/guardrail_margins.py runs/demo runs/shop ...   # a markdown table, then JSON

For every PPO run in the given demo folders (a subfolder with ``instructrl_ppo.yaml`` and ``metrics.jsonl``), the
guardrails' numbers as :mod:`instructrl.stages.ppo_guardrails` reads them: the SFT policy's value (iteration 1),
the run's worst value and its iteration, and the threshold that run checked against, for

- ``kl``: the largest KL(π ‖ π^SFT) per response, nats;
- ``entropy``, ``distinct``: the smallest per-token entropy and distinct-response fraction, as a ratio to SFT's;
- ``missing_eos``, ``rm_range``: the largest rise over SFT's share of responses without EOS, and of finished
  responses scored above the reward model's range;

with the iterations each check failed (from ``guardrails/<check>`` flags) and, from the demo's evaluation, the
run's policy's gold win rate against SFT. Healthy runs (winning against SFT) should stay clear of every threshold
and runs that lost should not; the table shows by how much, to set the thresholds on measurements.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from instructrl.stages.ppo_guardrails import CHECKS, RELATIVE_CHECKS, flag_key
from instructrl.utils.io import read_jsonl_lenient

THRESHOLD_SETTINGS = {
    "kl": "max_kl",
    "entropy": "min_entropy_ratio",
    "distinct": "min_distinct_ratio",
    "missing_eos": "max_missing_eos_rise",
    "rm_range": "max_above_rm_range_rise",
}
"""The ``guardrails`` setting each check compares with (an absolute KL; ratios to, or rises over, SFT's value)."""
RATIO_CHECKS = ("entropy", "distinct")


def run_margins(ppo_dir: Path) -> dict:
    """Each check's SFT value, worst value (as the setting reads it: a ratio, a rise or the KL itself), the
    iteration it was reached, the threshold and the iterations that failed."""
    settings = (yaml.safe_load((ppo_dir / "instructrl_ppo.yaml").read_text()) or {}).get("guardrails") or {}
    records = [r for r in read_jsonl_lenient(ppo_dir / "metrics.jsonl") if "objective/kl" in r]
    out = {}
    for name, check in CHECKS.items():
        values = [(r.get("step"), check.value(r)) for r in records]
        values = [(step, v) for step, v in values if v is not None]
        if not values:
            continue
        baseline = values[0][1] if name in RELATIVE_CHECKS else 0.0
        if name in RATIO_CHECKS:
            measured = [(step, v / baseline if baseline else float("nan")) for step, v in values]
            step, worst = min(measured, key=lambda sv: sv[1])
        else:
            measured = [(step, v - baseline) for step, v in values]
            step, worst = max(measured, key=lambda sv: sv[1])
        failed = [r.get("step") for r in records if r.get(flag_key(name)) == 1.0]
        out[name] = {
            "sft": baseline if name in RELATIVE_CHECKS else None,
            "worst": worst,
            "at_iteration": step,
            "threshold": settings.get(THRESHOLD_SETTINGS[name]),
            "failed_iterations": failed,
        }
    return out


def gold_win_rate(run_dir: Path, policy: str) -> dict | None:
    path = run_dir / "eval" / "metrics.json"
    if not path.is_file():
        return None
    for r in json.loads(path.read_text())["win_rates"]:
        if (r["policy"], r["baseline"], r["judge"], r["group"]) == (policy, "sft", "gold", "all"):
            return {"rate": r["rate"], "low": r["low"], "high": r["high"], "n": r["n"]}
    return None


def _cell(m: dict) -> str:
    failed = m["failed_iterations"]
    flag = f"; failed {len(failed)}× ({failed[0]}–{failed[-1]})" if failed else ""
    return f"{m['worst']:.3g} @{m['at_iteration']} (limit {m['threshold']}){flag}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="demo output folders")
    args = parser.parse_args(argv)
    result = {}
    for run_dir in args.runs:
        for ppo_dir in sorted(p.parent for p in run_dir.glob("*/instructrl_ppo.yaml")):
            if (ppo_dir / "metrics.jsonl").is_file():
                margins = run_margins(ppo_dir)
                result[f"{run_dir}/{ppo_dir.name}"] = {"gold_vs_sft": gold_win_rate(run_dir, ppo_dir.name), **margins}
    print("| run | gold vs SFT | " + " | ".join(CHECKS) + " |")
    print("|---" * (len(CHECKS) + 2) + "|")
    for name, row in result.items():
        win = row["gold_vs_sft"]
        win_cell = f"{100 * win['rate']:.1f}% [{100 * win['low']:.1f}, {100 * win['high']:.1f}]" if win else "-"
        print(f"| {name} | {win_cell} | " + " | ".join(_cell(row[c]) if c in row else "-" for c in CHECKS) + " |")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
