"""The sandbox demo's headline at several seeds: every row per seed, its mean ± standard deviation over seeds,
and row 1 (PPO-ptx vs SFT, gold judge) pooled over seeds with its Wilson interval.

    python benchmarks/demo_seeds.py                          # seeds 0-4 into runs/seeds/seed{N}, then the table
    python benchmarks/demo_seeds.py --seeds 0 1 --output-dir /tmp/seeds
    python benchmarks/demo_seeds.py --table-only             # only (re)write the table from finished runs
    python benchmarks/demo_seeds.py --set eval_prompts=500   # any demo setting, for every seed

Each seed is one ``instructrl demo --set seed=N`` in its own folder, one after another (a demo uses every core;
running two at once only makes both slower). The demo resumes, so an interrupted sweep continues where it
stopped. On the 2-core VM one seed takes about as long as ``make demo`` (benchmarks/RESULTS.md has the
measured times); the table records each seed's wall and CPU seconds from its ``summary.json``.

Writes ``seeds.json`` (everything) and ``seeds.md`` (the table) into ``--output-dir``. The standard deviation
is over seeds (n − 1 denominator): it is the spread a user re-running the demo with another seed should
expect, not an error bar of the mean. The pooled row 1 counts every seed's test prompts as trials (wins plus
half the ties over all of them): the seeds' worlds draw different prompts, labelers and models, so the pooled
interval is the interval of "PPO-ptx beats SFT in this sandbox", not of one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from instructrl.eval.stats import wilson_interval

POOLED = ("ppo_ptx", "sft")
"""(policy, baseline) of the headline's row 1 (gold judge), pooled over seeds."""
POOLED_ROUND2 = {"1r": ("ppo_ptx_round2", "sft"), "1r vs 1": ("ppo_ptx_round2", "ppo_ptx")}
"""With ``--set rounds=2``: the second round's PPO-ptx against SFT and against the first round's, pooled too."""

EXTRA_ROWS = {
    "1p": ("ppo", "PPO vs SFT win rate (gold judge)"),
    "1c": ("reference", "ceiling: ideal responses vs SFT"),
}
"""Gold-judge win rates against SFT that the headline gives only in notes, added as rows: id -> (policy, claim)."""


def gold_win_rate(metrics: dict, policy: str, baseline: str = "sft") -> dict | None:
    """The ``policy`` vs ``baseline`` gold-judge win rate over all test prompts, from eval's metrics.json."""
    for r in metrics["win_rates"]:
        if (r["policy"], r["baseline"], r["judge"], r["group"]) == (policy, baseline, "gold", "all"):
            return r
    return None


def run_seed(seed: int, folder: Path, settings: list[str]) -> None:
    overrides = [f"seed={seed}", f"output_dir={folder}", *settings]
    command = [sys.executable, "-m", "instructrl", "demo", *(x for o in overrides for x in ("--set", o))]
    print(f"[seeds] seed {seed}: {' '.join(command[2:])}", flush=True)
    subprocess.run(command, check=True)


def pooled_row_1(runs: dict[int, dict], policy: str = POOLED[0], baseline: str = POOLED[1]) -> dict:
    """Wins + ties/2 over every seed's row-1 comparisons (or ``policy`` vs ``baseline``), with the Wilson interval
    of the pooled rate."""
    wins = ties = n = 0
    for metrics in runs.values():
        row = gold_win_rate(metrics, policy, baseline)
        wins, ties, n = wins + row["wins"], ties + row["ties"], n + row["n"]
    low, high = wilson_interval(wins + ties / 2, n)
    return {
        "rate": 100 * (wins + ties / 2) / n,
        "low": 100 * low,
        "high": 100 * high,
        "n": n,
        "wins": wins,
        "ties": ties,
    }


BASELINE_ROWS = {
    "4a·L": ("valid", "the initial model's likelihood on 4a's pairs"),
    "4b·L": ("heldout", "the initial model's likelihood on 4b's pairs"),
}
"""From each seed's rm/results.json: the RM's likelihood baseline (``rm_baselines``) on the pairs of rows 4a/4b."""


def table(summaries: dict[int, dict], metrics: dict[int, dict], rm_results: dict[int, dict] | None = None) -> dict:
    """Per headline row: each seed's value and interval, and the mean and standard deviation over seeds."""
    seeds = sorted(summaries)
    rows: dict[str, dict] = {}
    for seed in seeds:
        for row in summaries[seed]["headline"]:
            entry = rows.setdefault(row["id"], {"claim": row["claim"], "unit": row["unit"], "seeds": {}})
            entry["seeds"][seed] = {"value": row["value"], "low": row["low"], "high": row["high"]}
    for id_, (split, claim) in BASELINE_ROWS.items():
        for seed, results in sorted((rm_results or {}).items()):
            likelihood = ((results.get(split) or {}).get("baselines") or {}).get("initial_likelihood")
            if likelihood is not None:
                entry = rows.setdefault(id_, {"claim": claim, "unit": "%", "seeds": {}})
                entry["seeds"][seed] = {"value": round(100 * likelihood, 1), "low": None, "high": None}
    for id_, (policy, claim) in EXTRA_ROWS.items():
        for seed in seeds:
            r = gold_win_rate(metrics[seed], policy)
            if r is not None:
                entry = rows.setdefault(id_, {"claim": claim, "unit": "%", "seeds": {}})
                entry["seeds"][seed] = {k: round(100 * r[k], 1) for k in ("rate", "low", "high")}
                entry["seeds"][seed]["value"] = entry["seeds"][seed].pop("rate")
    # The issue-26 bar: the RM's accuracy as a share of the labelers' own agreement on the same samples.
    for id_, claim in (("4a/4d", "RM accuracy (4a) / agreement on its samples (4d)"), ("4b/4d", "4b / 4d")):
        accuracy, agreement = rows.get(id_[:2]), rows.get("4d")
        if accuracy is None or agreement is None:
            continue
        shares = {}
        for seed, v in accuracy["seeds"].items():
            a = agreement["seeds"].get(seed, {}).get("value")
            share = round(100 * v["value"] / a, 1) if v["value"] is not None and a else None
            shares[seed] = {"value": share, "low": None, "high": None}
        rows[id_] = {"claim": claim, "unit": "%", "seeds": shares}
    for entry in rows.values():
        values = [v["value"] for v in entry["seeds"].values() if v["value"] is not None]
        entry["mean"] = statistics.fmean(values) if values else None
        entry["std"] = statistics.stdev(values) if len(values) > 1 else None
    times = {
        seed: {"wall": sum(s.get("seconds", {}).values()), "cpu": sum(s.get("cpu_seconds", {}).values())}
        for seed, s in summaries.items()
    }
    pooled = {
        id_: pooled_row_1(metrics, *pair)
        for id_, pair in POOLED_ROUND2.items()
        if all(gold_win_rate(m, *pair) is not None for m in metrics.values())
    }
    return {"seeds": seeds, "rows": rows, "pooled_row_1": pooled_row_1(metrics), "pooled": pooled, "seconds": times}


def _cell(v: dict, with_interval: bool = True) -> str:
    if v["value"] is None:
        return "—"
    interval = f" [{v['low']:g}, {v['high']:g}]" if with_interval and v["low"] is not None else ""
    return f"{v['value']:g}{interval}"


def markdown(result: dict, compact: bool = False) -> str:
    """The table; ``compact`` drops each seed's interval except row 1's (the README's version)."""
    seeds = result["seeds"]
    head = "| row | claim | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd |"
    lines = [head, "|" + "---|" * (len(seeds) + 3)]
    for id_, entry in result["rows"].items():
        with_interval = not compact or id_ == "1"
        cells = [_cell(entry["seeds"].get(s, {"value": None}), with_interval) for s in seeds]
        spread = "—" if entry["mean"] is None else f"{entry['mean']:.3g}"
        if entry["std"] is not None:
            spread += f" ± {entry['std']:.2g}"
        lines.append(f"| {id_} | {entry['claim']} | " + " | ".join(cells) + f" | {spread} |")
    p = result["pooled_row_1"]
    lines += [
        "",
        f"Row 1 pooled over {len(seeds)} seeds: {p['rate']:.1f}% [{p['low']:.1f}, {p['high']:.1f}] "
        f"(n = {p['n']}: {p['wins']} wins, {p['ties']} ties; Wilson 95%).",
        *(
            f"Row {id_} pooled: {q['rate']:.1f}% [{q['low']:.1f}, {q['high']:.1f}] (n = {q['n']})."
            for id_, q in result.get("pooled", {}).items()
        ),
        "",
        "Seconds per seed (wall / CPU): "
        + ", ".join(f"seed {s}: {t['wall']:.0f} / {t['cpu']:.0f}" for s, t in result["seconds"].items())
        + ".",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--output-dir", type=Path, default=Path("runs/seeds"))
    parser.add_argument("--table-only", action="store_true", help="aggregate finished runs; run nothing")
    parser.add_argument("--set", dest="settings", action="append", default=[], help="demo setting, key=value")
    ns = parser.parse_args(argv)
    folders = {seed: ns.output_dir / f"seed{seed}" for seed in ns.seeds}
    if not ns.table_only:
        for seed, folder in folders.items():
            run_seed(seed, folder, ns.settings)
    missing = [str(f) for f in folders.values() if not (f / "summary.json").is_file()]
    if missing:
        sys.exit(f"no finished demo in: {', '.join(missing)}")
    summaries = {seed: json.loads((f / "summary.json").read_text()) for seed, f in folders.items()}
    metrics = {seed: json.loads((f / "eval" / "metrics.json").read_text()) for seed, f in folders.items()}
    rm_files = {seed: f / "rm" / "results.json" for seed, f in folders.items()}
    rm_results = {seed: json.loads(path.read_text()) for seed, path in rm_files.items() if path.is_file()}
    result = table(summaries, metrics, rm_results)
    ns.output_dir.mkdir(parents=True, exist_ok=True)
    (ns.output_dir / "seeds.json").write_text(json.dumps(result, indent=1) + "\n")
    (ns.output_dir / "seeds.md").write_text(
        markdown(result) + "\nWithout the intervals (row 1 keeps them):\n\n" + markdown(result, compact=True)
    )
    print(markdown(result), end="")


if __name__ == "__main__":
    main()
