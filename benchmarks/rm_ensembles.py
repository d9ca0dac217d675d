"""Is a finished demo run's reward-model accuracy a matter of luck in training? Train M more reward models on its
very comparisons, each with another data order, and measure each one, their weight average and their ensemble.

    python benchmarks/rm_ensembles.py runs/seeds/seed0 --members 4      # prints a table, writes rm_ensembles.json

Every member is the RM stage's own model and step (``rm.build_model``, ``rm.train_step``) on the run's saved
comparisons, split as the stage split them; member 0 uses the stage's seed, so it reproduces the run's RM when
run with the threads the run had. All members share the scalar head's initialization (drawn from the stage's
seed) and differ only in the order the training prompts are visited, as the reward models of one pretrained
model averaged weight by weight in WARM (Ramé et al. 2024). For M = 2 … members:

- ``weight_average``: one model whose every weight is the mean of the first M members' (WARM);
- ``ensemble``: the mean of the first M members' scores (a prediction ensemble, as in Coste et al. 2024).

If the members' spread is small next to the spread between seeds, the seeds differ by their data, not by the
optimizer's luck, and averaging reward models cannot make the stage steadier (docs/sandbox-findings.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from instructrl.config import load_config
from instructrl.models.causal_lm import load_tokenizer
from instructrl.stages import rm
from instructrl.stages.training_run import TrainingRun, TrainingState

SETS = ("valid", "heldout")


def train_member(cfg: rm.Config, stage: TrainingRun, data: rm.RankingData, tokenizer, order_seed: int):
    """One reward model as the stage trains it, its head drawn from ``cfg.run.seed``, its data order from
    ``order_seed``."""
    runtime, pad_id = stage.runtime, tokenizer.pad_token_id
    runtime.seed(cfg.run.seed)
    model = rm.build_model(cfg, tokenizer, data, runtime.device)
    total_steps = rm.training_steps(cfg, len(data.train), runtime.world_size)
    order = rm.training_order(len(data.train), cfg.epochs, order_seed)
    state = TrainingState.adam_cosine(model, cfg, total_steps, 0, runtime)
    training_model = state.prepare(forward=rm.raw_last_token_scores)
    model.train()
    for step in range(total_steps):
        batch = [data.train[i] for i in order[step * cfg.batch_size : (step + 1) * cfg.batch_size]]
        rm.train_step(cfg, state, training_model, batch, pad_id, step)
    return model.eval()


def measure(run: Path, members: int, work_dir: Path, threads: int = 0) -> dict:
    rm_dir = run / "rm"
    cfg = load_config(
        rm.Config,
        rm_dir / "instructrl_rm.yaml",
        [
            f"comparisons={rm_dir / rm.SANDBOX_COMPARISONS}",
            f"demonstrations={rm_dir / rm.SANDBOX_DEMONSTRATIONS}",
            f"output_dir={work_dir}",
            "run.resume=false",
            f"run.threads={threads}",
        ],
    )
    stage = TrainingRun.start(cfg, "rm")
    tokenizer = load_tokenizer(cfg.model)
    data = rm.build_data(cfg, tokenizer, stage)
    pad_id = tokenizer.pad_token_id
    encoded = {"valid": data.valid, "heldout": data.heldout}
    weights, scores = [], {name: [] for name in SETS}
    result: dict = {"run": str(run), "members": []}
    for k in range(members):
        model = train_member(cfg, stage, data, tokenizer, cfg.run.seed + 7919 * k)
        accuracy = {}
        for name in SETS:
            metrics, member_scores = rm.evaluate(model, encoded[name], pad_id, cfg.eval_batch_size)
            accuracy[name] = metrics["accuracy"]
            scores[name].append(member_scores)
        result["members"].append(accuracy)
        weights.append({key: value.detach().clone() for key, value in model.state_dict().items()})
        print(f"member {k}: " + ", ".join(f"{n} {100 * a:.1f}" for n, a in accuracy.items()), flush=True)
    for m in range(2, members + 1):
        model.load_state_dict({key: sum(w[key] for w in weights[:m]) / m for key in weights[0]})
        average, ensemble = {}, {}
        for name in SETS:
            average[name] = rm.evaluate(model, encoded[name], pad_id, cfg.eval_batch_size)[0]["accuracy"]
            mean_scores = torch.stack(scores[name][:m]).mean(0)
            ensemble[name] = rm.pairwise_metrics(mean_scores, encoded[name])["accuracy"]
        result[f"M={m}"] = {"weight_average": average, "ensemble": ensemble}
    stage_results = json.loads((rm_dir / "results.json").read_text())
    result["stage"] = {name: stage_results[f"{name}_accuracy"] for name in SETS}
    return result


def table(result: dict) -> str:
    members = result["members"]
    lines = ["| | " + " | ".join(SETS) + " |", "|---|" + "---|" * len(SETS)]
    lines.append("| the run's RM | " + " | ".join(f"{100 * result['stage'][n]:.1f}" for n in SETS) + " |")
    spread = []
    for name in SETS:
        values = [100 * m[name] for m in members]
        sd = f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else ""
        spread.append(f"{statistics.fmean(values):.1f}{sd} ({min(values):.1f}–{max(values):.1f})")
    lines.append(f"| {len(members)} members: mean ± sd (range) | " + " | ".join(spread) + " |")
    for m in range(2, len(members) + 1):
        for kind in ("weight_average", "ensemble"):
            cells = " | ".join(f"{100 * result[f'M={m}'][kind][n]:.1f}" for n in SETS)
            lines.append(f"| {kind.replace('_', ' ')} of {m} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished demo run (its rm/ and the model rm/ started from)")
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--work-dir", type=Path, default=None, help="scratch folder (default: RUN/rm_ensembles)")
    ns = parser.parse_args(argv)
    result = measure(ns.run, ns.members, ns.work_dir or ns.run / "rm_ensembles", ns.threads)
    (ns.work_dir or ns.run / "rm_ensembles").joinpath("rm_ensembles.json").write_text(json.dumps(result, indent=1))
    print(table(result), end="")


if __name__ == "__main__":
    main()
