"""The InstructGPT pipeline on the built-in sandbox, end to end, resumable.

Stages run in order, each into its own folder under ``output_dir``; a stage whose ``results.json`` exists
is skipped, so re-running after an interruption continues where it stopped (and stages resume from their
own checkpoints). The sandbox data (corpus, prompts, demonstrations, labeled comparisons, labeler
agreement) is written first, and the sandbox prompts go through the same ``data prepare`` pipeline a user's
API prompts would.
"""

from __future__ import annotations

import importlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from instructrl.config import load_config, require_non_negative, require_positive, save_config


@dataclass
class Config:
    """The sandbox demo."""

    output_dir: str = "runs/demo"
    """Run directory; each stage writes a subfolder."""
    quick: bool = False
    """Tiny sizes everywhere: the whole pipeline in a few minutes (a smoke run, not a result)."""
    seed: int = 0
    """Seed of the sandbox world and of every stage."""
    threads: int = 0
    """CPU threads for torch (0 = torch default)."""
    eval_prompts: int = 300
    """Held-out test prompts used for the win rates."""

    def validate(self) -> None:
        require_non_negative(self, "threads")
        require_positive(self, "eval_prompts")


@dataclass(frozen=True)
class Step:
    """One stage of the pipeline: a command module, its overrides and its output folder name."""

    name: str
    module: str
    overrides: tuple[str, ...]


def plan(cfg: Config) -> list[Step]:
    """The stages and their settings (full or quick)."""
    run = Path(cfg.output_dir)
    data, base, sft, rm = run / "data", run / "base", run / "sft", run / "rm"
    ppo, ppo_ptx = run / "ppo", run / "ppo_ptx"
    common = (f"seed={cfg.seed}", f"threads={cfg.threads}")
    q = cfg.quick
    tiny_model = ("model.d_model=64", "model.n_layers=2")
    steps = [
        Step(
            "sandbox",
            "instructrl.sandbox.make",
            (f"output_dir={data}", f"seed={cfg.seed}")
            + (("corpus_docs=2000", "sft_prompts=200", "rm_prompts=150", "agreement_prompts=100") if q else ()),
        ),
        Step(
            "prepare", "instructrl.data.prepare", (f"input={data / 'prompts.jsonl'}", f"output_dir={run / 'prepared'}")
        ),
        Step(
            "pretrain",
            "instructrl.stages.pretrain",
            (f"output_dir={base}", f"sandbox_seed={cfg.seed}", *common)
            + (("sandbox_docs=3000", "max_steps=60", *tiny_model, "eval_every=30", "save_every=30") if q else ()),
        ),
        Step(
            "sft",
            "instructrl.stages.sft",
            (f"model={base}", f"output_dir={sft}", f"sandbox_seed={cfg.seed}", *common)
            + (("sandbox_demos=300", "epochs=1") if q else ()),
        ),
        Step(
            "rm",
            "instructrl.stages.rm",
            (f"model={sft}", f"output_dir={rm}", f"sandbox_seed={cfg.seed}", "heldout_labelers=[6,7]", *common)
            + (("sandbox_prompts=80", "sandbox_demonstrations=40") if q else ()),
        ),
    ]
    # PPO-ptx keeps the paper's 8 pretraining sequences per episode but uses 64-token windows: sandbox documents
    # average ~40 tokens, and 128-token windows made PPO-ptx 6x slower than PPO on a 2-core CPU (847 s vs 139 s).
    for name, out, ptx in (("ppo", ppo, ("ptx.coef=0.0",)), ("ppo_ptx", ppo_ptx, ("ptx.seq_len=64",))):
        steps.append(
            Step(
                name,
                "instructrl.stages.ppo",
                (f"policy={sft}", f"reward_model={rm}", f"output_dir={out}", f"sandbox_seed={cfg.seed}", *common, *ptx)
                + (("iterations=3", "batch_size=16", "ptx.sandbox_docs=300") if q else ("save_policy_every=20",)),
            )
        )
    steps.append(
        Step(
            "eval",
            "instructrl.eval.run",
            (
                f"output_dir={run / 'eval'}",
                f"sandbox_seed={cfg.seed}",
                f"threads={cfg.threads}",
                f"prompts={60 if q else cfg.eval_prompts}",
                f"policies={{sft: {sft}, ppo: {ppo / 'policy'}, ppo_ptx: {ppo_ptx / 'policy'}}}",
                f"base_model={base}",
                f"reward_model={rm}",
                f"agreement={data / 'agreement.json'}",
                f"ppo_runs={{ppo: {ppo}, ppo_ptx: {ppo_ptx}}}",
            )
            + (("best_of_n=2", "overopt_prompts=20", "heldout_docs=50") if q else ()),
        )
    )
    return steps


def _done(output_dir: Path) -> bool:
    return (output_dir / "results.json").exists() or (output_dir / "report.json").exists()


def run(cfg: Config) -> dict:
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "instructrl_demo.yaml")
    t0 = time.time()
    timings = {}
    for step in plan(cfg):
        module = importlib.import_module(step.module)
        stage_cfg = load_config(module.Config, None, list(step.overrides))
        out = Path(stage_cfg.output_dir)
        if _done(out):
            print(f"[demo] {step.name}: already done ({out}), skipping", flush=True)
            continue
        print(f"\n[demo] {step.name} -> {out}", flush=True)
        started = time.time()
        module.run(stage_cfg)
        timings[step.name] = round(time.time() - started, 1)

    results = json.loads((run_dir / "eval" / "results.json").read_text())
    (run_dir / "summary.json").write_text(json.dumps({"seconds": timings, **results}, indent=2, default=str) + "\n")
    print(f"\n[demo] finished in {time.time() - t0:.0f}s; outputs in {run_dir}/", flush=True)
    print(f"[demo] report: {run_dir / 'eval' / 'report.html'}", flush=True)
    return results
