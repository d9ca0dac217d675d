"""Kill tests: every stage, SIGKILLed at pseudo-random points, resumes to exactly the uninterrupted result.

Each stage runs as ``python -m instructrl.cli STAGE`` in a subprocess that kills itself with SIGKILL at a point
named by the ``INSTRUCTRL_TEST_KILL_AT`` test hook (:mod:`instructrl.utils.kill_hook`): right after a metrics
line, halfway through writing a checkpoint, right after one, or just before ``results.json`` is renamed into
place. Kill points are drawn with fixed seeds and chained (kill, restart, kill later, ..., finish), and the
final weights (``torch.equal`` on every tensor) and metrics are compared with an uninterrupted run made with
the same settings. Everything runs on the CPU with one thread, where torch is deterministic.

The default run tries 2 hook kill points per stage (3 for the demo). Slow tests add three more seeds of 3 hook
points per stage (two of 3 for the demo), and kills by the clock at arbitrary moments (2 seeds of 3 per stage).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import QUICK_DEMO
from instructrl.cli import main
from instructrl.utils.kill_hook import KILL_AT_ENV

SRC = Path(__file__).resolve().parents[1] / "src"
FAST_SEEDS, SLOW_SEEDS = (0,), (1, 2, 3)
SUBPROCESS_TIMEOUT_S = 900
"""Only a hang should reach this: on a loaded 2-core machine one quick demo subprocess can take minutes."""


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Stages set torch's thread count (threads=1 here); put the session's back for the other test modules."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- kill points


def kill_points(seed: int, total_steps: int, save_every: int, count: int, out: Path) -> list[str]:
    """``count`` distinct kill specs for a run of ``out``, drawn with ``seed``, in the order the run reaches them.

    Candidates: after any step's metrics line; inside or right after any checkpoint; before results.json.
    Sorted by position, each later point lies past the checkpoint the previous kill resumes from, so every
    point is reached in its own process.
    """
    candidates = [((step, 0), f"log:{step}:{out / 'metrics.jsonl'}") for step in range(1, total_steps + 1)]
    for step in range(save_every, total_steps, save_every):
        candidates.append(((step, 1), f"checkpoint-write:{step}:{out}"))
        candidates.append(((step, 2), f"checkpoint-done:{step}:{out}"))
    candidates.append(((total_steps + 1, 0), f"write:*:{out / 'results.json'}"))
    return [spec for _, spec in sorted(random.Random(seed).sample(candidates, count))]


def run_until_killed(argv: list[str], spec: str, log: Path) -> None:
    """Run the CLI in a subprocess that SIGKILLs itself at ``spec``; fail if it ended any other way."""
    env = {
        **os.environ,
        KILL_AT_ENV: spec,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    with open(log, "w") as f:
        proc = subprocess.run(
            [sys.executable, "-m", "instructrl.cli", *argv],
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=SUBPROCESS_TIMEOUT_S,
        )
    output = log.read_text()[-3000:]
    assert proc.returncode == -signal.SIGKILL, f"kill point {spec} not reached (exit {proc.returncode}):\n{output}"


# --------------------------------------------------------------------------- comparing runs


def load_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(model_dir.glob("*.safetensors"))
    assert files, f"no weights in {model_dir}"
    return {f"{f.name}/{k}": v for f in files for k, v in load_file(f).items()}


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_weights(a), load_weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{b} differs from {a} in {different[:5]}"


def metric_rows(path: Path) -> list[dict]:
    """Metrics records without wall-clock timings (the only thing allowed to differ)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def results_without_timing(run_dir: Path) -> dict:
    """results.json without its run time, and with the run's own folder written as <out>."""
    text = (run_dir / "results.json").read_text().replace(str(run_dir), "<out>")
    return {k: v for k, v in json.loads(text).items() if k != "seconds"}


@dataclass(frozen=True)
class Stage:
    """A tiny run of one stage: its ``--set`` settings, its length and what to compare."""

    name: str
    settings: tuple[str, ...]
    total_steps: int
    save_every: int
    model_dirs: tuple[str, ...] = ("",)
    metric_files: tuple[str, ...] = ("metrics.jsonl",)

    def argv(self, out: Path) -> list[str]:
        items = (f"output_dir={out}", "device=cpu", "threads=1", *self.settings)
        return [self.name, *(arg for item in items for arg in ("--set", item))]


def assert_same_run(stage: Stage, reference: Path, resumed: Path) -> None:
    for sub in stage.model_dirs:
        assert_same_weights(reference / sub, resumed / sub)
    for name in stage.metric_files:
        assert metric_rows(resumed / name) == metric_rows(reference / name), f"{name} differs after resume"
    assert results_without_timing(resumed) == results_without_timing(reference)


# --------------------------------------------------------------------------- tiny stage settings


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def stage_inputs(tmp_path_factory, tiny_lm_dir, tiny_tokenizer) -> dict[str, Path]:
    """Demonstrations, comparisons, prompts, texts and a tiny reward model for the stages to train on."""
    from instructrl.models.reward import reward_model_from_causal_lm

    root = tmp_path_factory.mktemp("kill_inputs")
    rng = random.Random(0)
    words = ["red", "blue", "green", "mat", "sang", "cat"]
    demos = [
        {"prompt": f"Q: say {rng.choice(words)} {i}\nA:", "response": " " + " ".join(rng.sample(words, 3))}
        for i in range(24)
    ]
    responses, ranking = [" cat cat", " red", " blue mat"], [0, 1, 2]
    comparisons = [
        {"prompt": f"Q: {i} words\nA:", "responses": responses[: 2 + i % 2], "ranking": ranking[: 2 + i % 2]}
        for i in range(40)
    ]
    torch.manual_seed(0)
    reward_model = reward_model_from_causal_lm(tiny_lm_dir, tiny_tokenizer.pad_token_id)
    reward_model.save_pretrained(root / "rm")
    tiny_tokenizer.save_pretrained(root / "rm")
    return {
        "policy": tiny_lm_dir,
        "rm": root / "rm",
        "demos": _write_jsonl(root / "demos.jsonl", demos),
        "comparisons": _write_jsonl(root / "comparisons.jsonl", comparisons),
        "prompts": _write_jsonl(root / "prompts.jsonl", [{"prompt": d["prompt"]} for d in demos[:8]]),
        "texts": _write_jsonl(root / "texts.jsonl", [{"text": d["prompt"] + d["response"]} for d in demos]),
    }


def stages(inputs: dict[str, Path]) -> dict[str, Stage]:
    pretrain = (
        "max_steps=8",
        "save_every=2",
        "eval_every=3",
        "sandbox_docs=300",
        "heldout_docs=40",
        "vocab_size=400",
        "model.d_model=32",
        "model.n_layers=1",
        "model.n_heads=2",
        "seq_len=32",
        "batch_size=8",
    )
    sft = (
        f"model={inputs['policy']}",
        f"data={inputs['demos']}",
        "batch_size=4",
        "epochs=2",
        "ptx_fraction=0",
        "lr=0.01",
        "save_every=2",
        "valid_fraction=0.1",
    )
    rm = (
        f"model={inputs['policy']}",
        f"comparisons={inputs['comparisons']}",
        f"demonstrations={inputs['demos']}",
        "batch_size=6",
        "micro_batch_size=3",
        "lr=0.003",
        "eval_every=3",
        "save_every=2",
        "valid_fraction=0.1",
    )
    ppo = (f"policy={inputs['policy']}", f"reward_model={inputs['rm']}", f"prompts={inputs['prompts']}",
           f"ptx.data={inputs['texts']}", "iterations=6", "batch_size=4", "minibatch_size=2",
           "generation.max_new_tokens=6", "ptx.coef=1.0", "ptx.seq_len=16", "ptx.batch_ratio=1", "kl.adaptive=true",
           "kl.target=0.5", "ema_decay=0.9", "sample_every=2", "save_every=2")  # fmt: skip
    return {
        "pretrain": Stage("pretrain", pretrain, total_steps=8, save_every=2),
        # 24 demonstrations, 2 held out: 22 // 4 = 5 steps per epoch
        "sft": Stage("sft", sft, total_steps=10, save_every=2),
        # 40 prompts, 4 held out: 36 / 6 = 6 steps
        "rm": Stage("rm", rm, total_steps=6, save_every=2),
        "ppo": Stage(
            "ppo", ppo, 6, 2, model_dirs=("policy", "value"), metric_files=("metrics.jsonl", "samples.jsonl")
        ),
    }


@pytest.fixture(scope="module")
def references(tmp_path_factory, stage_inputs) -> dict[str, Path]:
    """One uninterrupted run per stage (in-process), made once for every kill test."""
    root, threads = tmp_path_factory.mktemp("kill_references"), torch.get_num_threads()
    out = {}
    try:
        for name, stage in stages(stage_inputs).items():
            out[name] = root / name
            assert main(stage.argv(out[name])) == 0
    finally:
        torch.set_num_threads(threads)  # set before the function-scoped fixture below records the session's value
    return out


def check_stage_survives_kills(stage: Stage, reference: Path, out: Path, seed: int, count: int) -> list[str]:
    specs = kill_points(seed, stage.total_steps, stage.save_every, count, out)
    for i, spec in enumerate(specs):
        run_until_killed(stage.argv(out), spec, out.parent / f"{stage.name}-kill{i}.log")
    assert main(stage.argv(out)) == 0  # the last restart finishes the run
    assert_same_run(stage, reference, out)
    return specs


# --------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("name", ["pretrain", "sft", "rm", "ppo"])
@pytest.mark.parametrize("seed", FAST_SEEDS)
def test_stage_killed_twice_resumes_to_the_uninterrupted_result(name, seed, references, stage_inputs, tmp_path):
    check_stage_survives_kills(stages(stage_inputs)[name], references[name], tmp_path / name, seed, count=2)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pretrain", "sft", "rm", "ppo"])
@pytest.mark.parametrize("seed", SLOW_SEEDS)
def test_stage_killed_at_more_points_resumes_to_the_uninterrupted_result(
    name, seed, references, stage_inputs, tmp_path
):
    check_stage_survives_kills(stages(stage_inputs)[name], references[name], tmp_path / name, seed, count=3)


def metric_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def run_and_kill_by_the_clock(argv: list[str], metrics: Path, after_lines: int, delay_s: float, log: Path) -> bool:
    """Start the CLI and SIGKILL it ``delay_s`` after ``metrics`` holds ``after_lines`` lines, wherever it then is
    (mid-step, mid-write, mid-save); True when the kill landed before the run finished by itself."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "instructrl.cli", *argv], env=env, stdout=f, stderr=f)
        try:
            deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
            while proc.poll() is None and time.monotonic() < deadline:
                if metric_lines(metrics) >= after_lines:
                    time.sleep(delay_s)
                    proc.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.002)
            returncode = proc.wait(timeout=SUBPROCESS_TIMEOUT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert returncode in (0, -signal.SIGKILL), log.read_text()[-3000:]
    return returncode == -signal.SIGKILL


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pretrain", "sft", "rm", "ppo"])
@pytest.mark.parametrize("seed", (0, 1))
def test_stage_killed_by_the_clock_resumes_to_the_uninterrupted_result(name, seed, references, stage_inputs, tmp_path):
    """Kills at arbitrary moments, not at hook points: a torn metrics line, a half-written file, a half-saved model."""
    stage, out = stages(stage_inputs)[name], tmp_path / name
    rng = random.Random(seed)
    thresholds = [1] + sorted(rng.sample(range(2, stage.total_steps), 2))  # the first kill always lands mid-run
    landed = [
        run_and_kill_by_the_clock(
            stage.argv(out), out / "metrics.jsonl", k, rng.uniform(0.0, 0.1), tmp_path / f"clock-kill{i}.log"
        )
        for i, k in enumerate(thresholds)
    ]
    assert landed[0], "the first kill should land while the run is still training"
    assert main(stage.argv(out)) == 0
    assert_same_run(stage, references[name], out)


def test_kill_points_are_distinct_ordered_and_seeded(tmp_path):
    a = kill_points(5, total_steps=8, save_every=2, count=4, out=tmp_path)
    assert a == kill_points(5, total_steps=8, save_every=2, count=4, out=tmp_path)
    assert len(set(a)) == 4
    steps = [int(spec.split(":")[1]) if spec.split(":")[1] != "*" else 9 for spec in a]
    assert steps == sorted(steps)


# --------------------------------------------------------------------------- the demo


def demo_kill_candidates(out: Path) -> list[str]:
    """Kill points across the quick demo, in pipeline order: inside stages and before their completion markers."""
    return [
        f"write:*:{out / 'data' / 'results.json'}",
        f"checkpoint-write:30:{out / 'base'}",
        f"log:45:{out / 'base' / 'metrics.jsonl'}",
        f"write:*:{out / 'base' / 'results.json'}",
        f"log:3:{out / 'sft' / 'metrics.jsonl'}",
        f"log:2:{out / 'rm' / 'metrics.jsonl'}",
        f"log:2:{out / 'ppo' / 'metrics.jsonl'}",
        f"write:*:{out / 'ppo_ptx' / 'results.json'}",
        f"log:2:{out / 'rm_round2' / 'metrics.jsonl'}",
        f"write:*:{out / 'ppo_ptx_round2' / 'results.json'}",
        f"write:*:{out / 'eval' / 'results.json'}",
    ]


def demo_kill_points(seed: int, count: int, out: Path) -> list[str]:
    candidates = demo_kill_candidates(out)
    return [candidates[i] for i in sorted(random.Random(seed).sample(range(len(candidates)), count))]


def json_without_run_dir(path: Path, run_dir: Path, drop: tuple[str, ...] = ("seconds",)) -> dict:
    data = json.loads(path.read_text().replace(str(run_dir), "<out>"))
    return {k: v for k, v in data.items() if k not in drop}


def assert_same_demo(reference: Path, resumed: Path) -> None:
    models = (
        "base",
        "sft",
        "base_large",
        "rm",
        "ppo/policy",
        "ppo/value",
        "ppo_ptx/policy",
        "ppo_ptx/value",
        "rm_round2",
        "ppo_ptx_round2/policy",
        "ppo_ptx_round2/value",
    )
    for model_dir in models:
        assert_same_weights(reference / model_dir, resumed / model_dir)
    for stage in ("base", "sft", "rm", "ppo", "ppo_ptx", "rm_round2", "ppo_ptx_round2"):
        assert metric_rows(resumed / stage / "metrics.jsonl") == metric_rows(reference / stage / "metrics.jsonl")
        reference_results = json_without_run_dir(reference / stage / "results.json", reference)
        assert json_without_run_dir(resumed / stage / "results.json", resumed) == reference_results, stage
    reference_eval = json_without_run_dir(reference / "eval" / "metrics.json", reference, drop=("info",))
    assert json_without_run_dir(resumed / "eval" / "metrics.json", resumed, drop=("info",)) == reference_eval


def check_demo_survives_kills(reference: Path, out: Path, seed: int, count: int) -> list[str]:
    argv = [*QUICK_DEMO, "--set", f"output_dir={out}"]
    specs = demo_kill_points(seed, count, out)
    for i, spec in enumerate(specs):
        run_until_killed(argv, spec, out.parent / f"demo-kill{i}.log")
    assert main(argv) == 0
    assert_same_demo(reference, out)
    return specs


def test_demo_killed_three_times_resumes_to_the_uninterrupted_result(quick_demo_run, tmp_path):
    check_demo_survives_kills(quick_demo_run, tmp_path / "demo", seed=0, count=3)


@pytest.mark.slow
@pytest.mark.parametrize("seed", (1, 2))
def test_demo_killed_at_more_points_resumes_to_the_uninterrupted_result(quick_demo_run, tmp_path, seed):
    check_demo_survives_kills(quick_demo_run, tmp_path / "demo", seed=seed, count=3)
