"""The InstructGPT pipeline on the built-in sandbox, end to end, resumable.

Stages run in order, each into its own folder under ``output_dir``; a stage whose ``results.json`` exists
is skipped, so re-running after an interruption continues where it stopped (and stages resume from their
own checkpoints). Re-running with a config that would change the results is refused unless ``force_resume``
is set. The sandbox data (corpus, prompts, demonstrations, labeled comparisons, labeler
agreement) is written first, and the sandbox prompts go through the same ``data prepare`` pipeline a user's
API prompts would.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from instructrl.config import (
    ConfigError,
    check_resume_compatible,
    load_config,
    require,
    require_non_negative,
    require_positive,
    require_world,
    resume_fingerprint,
    run_key,
    save_config,
)
from instructrl.errors import UserFacingError
from instructrl.utils.io import atomic_write_json

CONFIG_FILE = "instructrl_demo.yaml"


@dataclass
class Config:
    """The sandbox demo."""

    output_dir: str = "runs/demo"
    """Run directory; each stage writes a subfolder."""
    quick: bool = False
    """Tiny sizes everywhere: the whole pipeline in a few minutes (a smoke run, not a result)."""
    seed: int = 0
    """Seed of the world and of every stage."""
    world: str = "sandbox"
    """The world every stage draws its data from and eval judges with: 'sandbox', 'path/to/file.py:factory' or
    'package.module:factory' (``run.world`` of each stage; template: examples/shop_world.py)."""
    threads: int = 0
    """CPU threads for torch (0 = torch default)."""
    eval_prompts: int = 300
    """Held-out test prompts used for the win rates."""
    kl_coef: float = 0.1
    """β of both PPO runs. With the paper's 0.02 the sandbox policy exploited its small reward model and lost to
    SFT on the gold judge (empty responses to harmful requests, one-word answers to "repeat" tasks); of the
    larger values tried, 0.1 won most often against SFT and also removed most of the SFT policy's filler words
    (measurements: benchmarks/RESULTS.md)."""
    ptx_batch_ratio: float = 2.0
    """Pretraining windows per RL episode in PPO-ptx (paper: 8 sequences per episode). A sandbox episode is ~40
    tokens and a window 64, so 2 windows already give 3× as many pretraining tokens as RL tokens, at a fraction
    of the paper ratio's cost in time (measurements: benchmarks/RESULTS.md)."""
    large_d_model: int = 256
    """Width of the larger base model, GPT-3's part in the headline's row 2 ("1.3B InstructGPT is preferred to 175B
    GPT-3"): pretrained only, evaluated plain and few-shot prompted. The small model is 128 wide, 4 layers (0.94M
    parameters); 320 × 8 layers would be the ~10× of the paper's comparison (10.2M parameters) but takes several
    times as long to pretrain."""
    large_n_layers: int = 4
    """Blocks of the larger base model (256 × 4: 3.4M parameters, 3.6× the small one)."""
    large_pretrain_steps: int = 300
    """Pretraining steps of the larger base model. The small one takes 900 of the same batch size; a step of the
    larger one costs more, and 300 of them keep the whole demo within 20 minutes on a 2-core CPU, in float32 (bf16
    pays only where the CPU multiplies it natively). Timings: benchmarks/RESULTS.md."""
    large_sft: bool = False
    """Also fine-tune the larger base model on the demonstrations: the headline's extra row 2c, small PPO-ptx vs a
    larger SFT model (Stiennon et al.'s comparison). Off by default: it adds minutes on a CPU (timings and the
    win rates measured with it: benchmarks/RESULTS.md)."""
    rm_from_large: bool = False
    """Initialize the reward model from the larger SFT model (needs ``large_sft``; InstructGPT used one 6B RM for
    policies of 1.3B-175B) instead of the small one; it still ranks the small policy's samples. Off by default: a
    10.2M-parameter RM gained validation accuracy but not accuracy on held-out labelers, and gave no better PPO,
    while PPO's value model (initialized from the RM) became many times costlier (measurements:
    benchmarks/RESULTS.md)."""
    rounds: int = 1
    """Rounds of rankings (1 or 2). With 2, InstructGPT's repeat of steps 2-3: the world's labelers rank samples
    of the first round's PPO-ptx policy on ``round2_prompts`` more prompts, a second reward model trains on both
    rounds' comparisons, and a second PPO-ptx run starts again from SFT against it; eval reports it as row 1r, and
    as row 4e how the first reward model ranks its policy's samples. A repair for a reward model PPO exploited
    (4e far below 4a), not a default: the second RM can be exploited too (README, Status). This adds about the
    time of the rm and ppo_ptx stages."""
    round2_prompts: int = 500
    """Prompts ranked in the second round (InstructGPT: most comparisons of SFT samples, fewer of PPO samples;
    the first round ranks 1,500)."""
    resume: bool = True
    """Skip finished stages and resume interrupted ones from their checkpoints; false reruns every stage."""
    force_resume: bool = False
    """Resume even when the config (or a stage's) changed in a way that alters results."""

    def validate(self) -> None:
        require_non_negative(self, "threads", "kl_coef")
        require_positive(self, "ptx_batch_ratio")
        require_positive(self, "eval_prompts", "large_d_model", "large_n_layers", "large_pretrain_steps")
        require(self.large_d_model % 64 == 0, "large_d_model", "must be a multiple of 64 (64-wide heads)")
        require_world(self.world, "world")
        require(self.large_sft or not self.rm_from_large, "rm_from_large", "needs large_sft=true")
        require(self.rounds in (1, 2), "rounds", f"must be 1 or 2, got {self.rounds}")
        require_positive(self, "round2_prompts")


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
    common = (f"run.seed={cfg.seed}", f"run.threads={cfg.threads}", f"run.world={cfg.world}")
    q = cfg.quick
    tiny_model = ("model.d_model=64", "model.n_layers=2")
    steps = [
        Step(
            "sandbox",
            "instructrl.sandbox.make",
            (f"output_dir={data}", f"seed={cfg.seed}", f"world={cfg.world}")
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
    ]
    base_large, sft_large = run / "base_large", run / "sft_large"
    large_spec = (
        ("model.d_model=96", "model.n_layers=3", "model.n_heads=3")
        if q
        else (f"model.d_model={cfg.large_d_model}", f"model.n_layers={cfg.large_n_layers}")
        + (f"model.n_heads={cfg.large_d_model // 64}", "lr=1e-3")
    )
    steps.append(
        Step(
            "pretrain_large",
            "instructrl.stages.pretrain",
            # The small model's tokenizer: the reward model must read the policy's token ids.
            (f"output_dir={base_large}", f"tokenizer={base}", f"sandbox_seed={cfg.seed}", *common, *large_spec)
            + (
                ("sandbox_docs=3000", "max_steps=30", "eval_every=30", "save_every=30")
                if q
                else (f"max_steps={cfg.large_pretrain_steps}",)
            ),
        )
    )
    if cfg.large_sft:
        steps.append(
            Step(
                "sft_large",
                "instructrl.stages.sft",
                (f"model={base_large}", f"output_dir={sft_large}", f"sandbox_seed={cfg.seed}", *common)
                + (("sandbox_demos=300", "epochs=1") if q else ()),
            )
        )
    rm_init = sft_large if cfg.rm_from_large else sft
    # The RM ranks samples of the policy PPO will train (the small SFT model), whichever model it starts from.
    rm_settings = (f"model={rm_init}", f"sandbox_sample_policy={sft}", f"sandbox_seed={cfg.seed}")
    rm_settings += ("heldout_labelers=[6,7]", *common)
    rm_settings += ("sandbox_prompts=80", "sandbox_demonstrations=40", "sandbox_agreement_prompts=40") if q else ()
    steps.append(Step("rm", "instructrl.stages.rm", (f"output_dir={rm}", *rm_settings)))
    # PPO-ptx uses 64-token windows (sandbox documents average ~40 tokens); with the paper's 8 windows per episode
    # of 128 tokens it ran several times slower than PPO on a CPU, see ``ptx_batch_ratio``.
    ptx_settings = ("ptx.seq_len=64", f"ptx.batch_ratio={cfg.ptx_batch_ratio}")

    def ppo_step(name: str, reward_model: Path, out: Path, ptx: tuple[str, ...]) -> Step:
        overrides = (f"policy={sft}", f"reward_model={reward_model}", f"output_dir={out}", f"sandbox_seed={cfg.seed}")
        overrides += (*common, *ptx, f"kl.coef={cfg.kl_coef}")
        overrides += ("iterations=3", "batch_size=16", "ptx.sandbox_docs=300") if q else ("save_policy_every=20",)
        return Step(name, "instructrl.stages.ppo", overrides)

    steps.append(ppo_step("ppo", rm, ppo, ("ptx.coef=0.0",)))
    steps.append(ppo_step("ppo_ptx", rm, ppo_ptx, ptx_settings))
    ppo_runs = {"ppo": ppo, "ppo_ptx": ppo_ptx}
    if cfg.rounds == 2:
        # The second round ranks the first round's PPO-ptx samples beside the first round's comparisons (the same
        # SFT samples, redrawn with the same seed), and PPO-ptx starts again from SFT against the new RM.
        rm2, ppo_ptx2 = run / "rm_round2", run / "ppo_ptx_round2"
        round2 = (
            f"sandbox_round2_policy={ppo_ptx / 'policy'}",
            f"sandbox_round2_reward_model={rm}",
            f"sandbox_round2_prompts={40 if q else cfg.round2_prompts}",
        )
        steps.append(Step("rm_round2", "instructrl.stages.rm", (f"output_dir={rm2}", *rm_settings, *round2)))
        steps.append(ppo_step("ppo_ptx_round2", rm2, ppo_ptx2, ptx_settings))
        ppo_runs["ppo_ptx_round2"] = ppo_ptx2
    policies = {"sft": sft, "ppo": ppo / "policy", "ppo_ptx": ppo_ptx / "policy", "base_large": base_large}
    if cfg.large_sft:
        policies["sft_large"] = sft_large
    if cfg.rounds == 2:
        policies["ppo_ptx_round2"] = ppo_runs["ppo_ptx_round2"] / "policy"
    steps.append(
        Step(
            "eval",
            "instructrl.eval.run",
            (
                f"output_dir={run / 'eval'}",
                f"sandbox_seed={cfg.seed}",
                f"run.threads={cfg.threads}",
                f"run.world={cfg.world}",
                f"prompts={60 if q else cfg.eval_prompts}",
                "policies={" + ", ".join(f"{name}: {path}" for name, path in policies.items()) + "}",
                "prompted=[base_large]",  # the paper's "GPT-3 prompted"
                f"base_model={base}",
                f"reward_model={rm}",
                f"agreement={data / 'agreement.json'}",
                *((f"round2_rm_results={run / 'rm_round2' / 'results.json'}",) if cfg.rounds == 2 else ()),
                "ppo_runs={" + ", ".join(f"{name}: {path}" for name, path in ppo_runs.items()) + "}",
            )
            + (("best_of_n=2", "overopt_prompts=20", "heldout_docs=50") if q else ()),
        )
    )
    return steps


def _done(output_dir: Path) -> bool:
    return (output_dir / "results.json").exists() or (output_dir / "report.json").exists()


def check_previous_run(run_dir: Path, cfg: Config) -> None:
    """Refuse to continue a run directory made with a config that gives different results (unless forced).

    Without this check a finished stage would be skipped and its old outputs silently reused.
    """
    previous = run_dir / CONFIG_FILE
    if not (cfg.resume and previous.is_file()):
        return
    try:
        saved = resume_fingerprint(load_config(Config, previous))
    except ConfigError as e:
        raise UserFacingError(f"{previous} is not a readable demo config ({e}); use another output_dir") from None
    check_resume_compatible(saved, cfg, str(run_dir))


def resume_overrides(stage_config: type, cfg: Config) -> list[str]:
    """The demo's resume settings, for the stages whose config has them (in its run block or at the top)."""
    names = {f.name for f in dataclasses.fields(stage_config)}
    wanted = {run_key(stage_config, "resume"): cfg.resume, run_key(stage_config, "force_resume"): cfg.force_resume}
    return [f"{key}={str(value).lower()}" for key, value in wanted.items() if key.startswith("run.") or key in names]


def run(cfg: Config) -> dict:
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    check_previous_run(run_dir, cfg)
    save_config(cfg, run_dir / CONFIG_FILE)
    t0 = time.time()
    timings, cpu_timings = {}, {}
    for step in plan(cfg):
        module = importlib.import_module(step.module)
        stage_cfg = load_config(module.Config, None, [*step.overrides, *resume_overrides(module.Config, cfg)])
        out = Path(stage_cfg.output_dir)
        if cfg.resume and _done(out):
            print(f"[demo] {step.name}: already done ({out}), skipping", flush=True)
            continue
        print(f"\n[demo] {step.name} -> {out}", flush=True)
        started, cpu_started = time.time(), time.process_time()
        module.run(stage_cfg)
        timings[step.name] = round(time.time() - started, 1)
        cpu_timings[step.name] = round(time.process_time() - cpu_started, 1)

    results = json.loads((run_dir / "eval" / "results.json").read_text())
    # CPU seconds beside wall seconds: on a machine shared with other jobs the wall time says little about a stage.
    # A re-run keeps the timings of the stages it skipped.
    previous = run_dir / "summary.json"
    earlier = json.loads(previous.read_text()) if previous.is_file() else {}
    summary = {
        "seconds": {**earlier.get("seconds", {}), **timings},
        "cpu_seconds": {**earlier.get("cpu_seconds", {}), **cpu_timings},
        **results,
    }
    atomic_write_json(run_dir / "summary.json", json.loads(json.dumps(summary, default=str)))
    print(f"\n[demo] finished in {time.time() - t0:.0f}s; outputs in {run_dir}/", flush=True)
    print(f"[demo] report: {run_dir / 'eval' / 'report.html'}", flush=True)
    return results
