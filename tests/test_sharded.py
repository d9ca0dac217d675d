"""Sharded training (``run.sharding=fsdp``, FSDP2): 2 CPU processes over gloo against 1 process on the same global
batch; the weights really split; kill and resume 2 → 2 (exact) and 2 → 1 (warned, within 1e-5: PPO through
its sampling shards); exports that load.

The 2-process runs start the real CLI once per rank with the variables a launcher sets (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``), as ``torchrun`` does, under a timeout: a rank that waits forever on a
collective the other rank never joins fails the test instead of blocking it. Dropout is off, so the only
differences left between 1 and 2 processes are float summation orders.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from instructrl.cli import main
from instructrl.utils.checkpoint import list_checkpoints
from test_distributed import (  # noqa: F401 - ppo_env is a fixture
    PPO_STATISTICS,
    TOLERANCE,
    _free_port,
    _metrics,
    _ppo_sets,
    _sets,
    cli_launcher_command,
    launcher_env,
    max_metric_difference,
    max_weight_difference,
    ppo_env,
    report,
    run_cli_launcher_flag,
    run_launcher,
)

SRC = str(Path(__file__).resolve().parents[1] / "src")


def launch_ranks(*cli_args: str, processes: int = 2, timeout: float = 240, module: bool = True) -> list[str]:
    """``python -m instructrl ARGS`` (``module`` false: ``python ARGS``) once per rank, as a launcher starts them;
    every rank must exit 0 within ``timeout`` seconds (a hang is killed and fails). Returns each rank's output."""
    port = str(_free_port())
    ranks = []
    for rank in range(processes):
        env = {
            **os.environ,
            "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(processes),
            "LOCAL_WORLD_SIZE": str(processes), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
            "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]),
        }  # fmt: skip
        command = [sys.executable, *(["-m", "instructrl"] if module else []), *cli_args]
        ranks.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for process in ranks:
            outputs.append(process.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        for process in ranks:
            process.kill()
        pytest.fail(f"a rank did not finish within {timeout} s (hang): {' '.join(cli_args)}")
    for rank, (process, output) in enumerate(zip(ranks, outputs)):
        assert process.returncode == 0, f"rank {rank} failed:\n{output[-5000:]}"
    return outputs


def shard_files(run_dir: Path) -> list[int]:
    """Bytes of each rank's file in the newest checkpoint's sharded folder (``__<rank>_0.distcp``)."""
    newest = sorted((run_dir / "checkpoints").glob("step-*"))[-1] / "sharded"
    return [(newest / f"__{rank}_0.distcp").stat().st_size for rank in range(2)]


def assert_weights_split(run_dir: Path) -> None:
    """Each rank wrote about half of the weights and optimizer states (its local shards), not a full copy."""
    sizes = shard_files(run_dir)
    assert all(0.4 < size / sum(sizes) < 0.6 for size in sizes), sizes


def assert_loadable(run_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run_dir)
    assert type(model).__name__ == "LlamaForCausalLM"  # the model's own class, not FSDP's subclass


# --------------------------------------------------------------------------- the setting


def test_sharding_setting_is_validated_and_shared_by_the_stages():
    from instructrl.config import ConfigError, load_config
    from instructrl.stages import ppo, rm, sft

    for config in (sft.Config, rm.Config, ppo.Config):
        assert load_config(config).run.sharding == "none"  # the default: today's DDP path
        assert load_config(config, overrides=["sharding=fsdp"]).run.sharding == "fsdp"
    with pytest.raises(ConfigError, match="run.sharding"):
        load_config(sft.Config, overrides=["run.sharding=zero3"])
    with pytest.raises(ConfigError, match="lora.enabled"):
        load_config(sft.Config, overrides=["run.sharding=fsdp", "lora.enabled=true"])


# --------------------------------------------------------------------------- SFT


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory, tiny_lm_dir):
    """One unsharded process and two sharded ones on the same global batches, each with a checkpoint at step 9."""
    root = tmp_path_factory.mktemp("sharded_sft")
    rows = [  # answers of 1 to 3 numbers: the ranks hold different token counts
        {"prompt": f"Instruction: count {i % 5} ?\nResponse:", "response": f" {i % 9}" * (1 + i % 3)}
        for i in range(24)
    ]
    (root / "demos.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = _sets(
        model=tiny_lm_dir, data=root / "demos.jsonl", batch_size=4, micro_batch_size=1, epochs=2, ptx_fraction=0,
        lr=0.01, residual_dropout=0, device="cpu", threads=1, save_every=3,
    )  # fmt: skip
    assert main(["sft", *common, "--set", f"output_dir={root / 'one'}"]) == 0
    launch_ranks("sft", *common, *_sets(sharding="fsdp", output_dir=root / "two"))
    return root, common


def test_sft_sharded_over_two_processes_matches_one(sft_runs):
    root, _ = sft_runs
    one, two = _metrics(root / "one"), _metrics(root / "two")
    assert [m["tokens"] for m in one] == [m["tokens"] for m in two]
    report("sft fsdp", max_metric_difference(one, two, ["loss"]), max_weight_difference(root / "one", root / "two"))
    assert max_metric_difference(one, two, ["loss", "grad_norm", "valid_loss"]) < TOLERANCE
    assert max_weight_difference(root / "one", root / "two") < TOLERANCE  # the exported selection, whole
    assert one[-1]["loss"] < one[0]["loss"] - 0.1
    results = [json.loads((root / d / "results.json").read_text()) for d in ("one", "two")]
    assert results[0]["selected_epoch"] == results[1]["selected_epoch"]
    assert abs(results[0]["valid_loss"] - results[1]["valid_loss"]) < TOLERANCE
    assert_weights_split(root / "two")
    assert_loadable(root / "two")
    assert load_file(root / "two" / "model.safetensors").keys() == load_file(root / "one" / "model.safetensors").keys()


def test_sft_sharded_resume_two_to_two_is_exact_and_two_to_one_warns(sft_runs):
    root, common = sft_runs
    for name in ("again", "single"):
        shutil.copytree(root / "two", root / name)
        (root / name / "results.json").unlink()
    outputs = launch_ranks("sft", *common, *_sets(sharding="fsdp", output_dir=root / "again"))
    assert "resumed from step 9" in outputs[0]
    two, again = _metrics(root / "two"), _metrics(root / "again")
    assert again == two  # the redone step 10, bit for bit
    assert max_weight_difference(root / "two", root / "again") == 0.0
    assert (
        json.loads((root / "again" / "results.json").read_text())["history"]
        == json.loads((root / "two" / "results.json").read_text())["history"]
    )

    with pytest.warns(UserWarning, match="written by 2 process"):  # one process reads the shards whole
        assert main(["sft", *common, *_sets(sharding="fsdp", output_dir=root / "single")]) == 0
    single = _metrics(root / "single")
    assert max_metric_difference(two, single, ["loss", "grad_norm", "valid_loss"]) < TOLERANCE
    assert max_weight_difference(root / "two", root / "single") < TOLERANCE


# --------------------------------------------------------------------------- RM


def test_rm_sharded_over_two_processes_matches_one_with_a_ragged_last_micro_batch(tmp_path, tiny_lm_dir):
    from test_rm import toy_files

    comparisons, demos = toy_files(tmp_path, 40)
    common = _sets(  # 7 prompts a step, micro-batches of 1: rank 0 runs 4 passes, rank 1 three and one of weight 0
        model=tiny_lm_dir, comparisons=comparisons, demonstrations=demos, batch_size=7, micro_batch_size=1,
        epochs=2, lr=0.003, device="cpu", threads=1, eval_every=3, save_every=4,
    )  # fmt: skip
    assert main(["rm", *common, "--set", f"output_dir={tmp_path / 'one'}"]) == 0
    launch_ranks("rm", *common, *_sets(sharding="fsdp", output_dir=tmp_path / "two"))

    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    for key in ("prompts", "pairs", "completions"):
        assert [m[key] for m in one] == [m[key] for m in two]
    keys = ["loss", "accuracy", "margin_mean", "score_mean", "score_std", "grad_norm", "valid_loss"]
    difference = max_weight_difference(tmp_path / "one", tmp_path / "two")
    report("rm fsdp", max_metric_difference(one, two, ["loss"]), difference)
    assert max_metric_difference(one, two, keys) < TOLERANCE
    assert difference < TOLERANCE
    bias = [json.loads((tmp_path / d / "config.json").read_text())["instructrl_reward_bias"] for d in ("one", "two")]
    assert bias[0] != 0 and abs(bias[0] - bias[1]) < TOLERANCE  # normalized to the demonstrations alike
    assert_weights_split(tmp_path / "two")

    from instructrl.models.reward import load_reward_model

    assert type(load_reward_model(tmp_path / "two")).__name__ == "LlamaForSequenceClassification"


# --------------------------------------------------------------------------- helpers of the sharded runtime


def test_lockstep_pads_the_shorter_rank_with_uncounted_repeats():
    from instructrl.utils.distributed import Runtime, ShardedRuntime

    class TwoRanks(ShardedRuntime):
        def __init__(self, busiest: int):
            self.busiest, self.rank, self.world_size = busiest, 1, 2

        def max(self, value: float) -> float:
            return max(value, self.busiest)

    assert TwoRanks(4).lockstep([0, 1, 2]) == [(0, True), (1, True), (2, True), (2, False)]
    assert TwoRanks(3).lockstep([0, 1, 2]) == [(0, True), (1, True), (2, True)]
    assert Runtime(torch.device("cpu")).lockstep([0, 1]) == [(0, True), (1, True)]  # unsharded: unchanged


# --------------------------------------------------------------------------- PPO and PPO-ptx


def in_run_dir(args: list[str], run_dir: Path) -> list[str]:
    """``args`` with ``output_dir`` set to ``run_dir`` (a later ``--set`` wins)."""
    return [*args, *_sets(output_dir=run_dir)]


@pytest.fixture(scope="module")
def sharded_ppo(tmp_path_factory, ppo_env, tiny_lm_dir):  # noqa: F811
    """An uninterrupted sharded PPO-ptx run of 2 processes, started as a user would (``instructrl ppo
    --num-processes 2 --set run.sharding=fsdp ...``), with a checkpoint after every iteration. Returns its folder
    and its arguments. ptx.batch_ratio 1.5 × minibatch 4 = 6 windows of micro-batches of 1 (3 a rank); frozen
    models sharded."""
    root = tmp_path_factory.mktemp("sharded_ppo")
    args = [*_ppo_sets(ppo_env, tiny_lm_dir, root / "two"), *_sets(**{"run.sharding": "fsdp", "save_every": 1})]
    with pytest.MonkeyPatch.context() as monkeypatch:
        run_cli_launcher_flag(["ppo", "--num-processes", "2", *args], monkeypatch)
    return root / "two", args


@pytest.mark.slow  # two PPO runs of 2 processes and one of one (~30 s), after the fixture's (~15 s)
def test_ppo_ptx_sharded_matches_one_process_and_ddp(sharded_ppo, tmp_path, ppo_env, tiny_lm_dir):  # noqa: F811
    from instructrl.config import load_config
    from instructrl.stages import ppo

    run_dir, args = sharded_ppo
    launch_ranks("ppo", *_ppo_sets(ppo_env, tiny_lm_dir, tmp_path / "ddp"))  # the unsharded 2-process run
    two, ddp = _metrics(run_dir), _metrics(tmp_path / "ddp")
    assert [m["step"] for m in two] == [1, 2, 3]
    difference = max_weight_difference(tmp_path / "ddp" / "policy", run_dir / "policy")
    report("ppo fsdp vs ddp, 3 iterations", max_metric_difference(ddp, two, PPO_STATISTICS), difference)
    assert max_metric_difference(ddp, two, PPO_STATISTICS) < TOLERANCE  # the same samples: gathered weights
    assert difference < TOLERANCE  # the EMA policy, exported whole
    assert max_weight_difference(tmp_path / "ddp" / "value", run_dir / "value") < TOLERANCE
    assert two[0]["loss/ptx"] > 1 and two[0]["objective/kl"] > 1
    assert_weights_split(run_dir)
    assert_loadable(run_dir / "policy")

    # one process sampling the 2 processes' sampling shards: the same run
    overrides = [s for s in in_run_dir(args, tmp_path / "one") if s != "--set"]
    ppo.run(load_config(ppo.Config, overrides=[*overrides, "generation.sampling_shards=2"]))
    one = _metrics(tmp_path / "one")
    difference = max_weight_difference(run_dir / "policy", tmp_path / "one" / "policy")
    report("ppo fsdp, 3 iterations", max_metric_difference(one, two, PPO_STATISTICS), difference)
    assert max_metric_difference(one, two, PPO_STATISTICS) < TOLERANCE
    assert difference < TOLERANCE

    # the other settings: sampling in lockstep on the sharded policy, whole frozen models: the same run
    launch_ranks(
        "ppo", *in_run_dir(args, tmp_path / "variant"), *_sets(sharded_sampling="lockstep", frozen_models="full")
    )
    assert max_metric_difference(two, _metrics(tmp_path / "variant"), PPO_STATISTICS) < TOLERANCE
    assert max_weight_difference(run_dir / "policy", tmp_path / "variant" / "policy") < TOLERANCE


def kill_after_first_checkpoint(command: list[str], run_dir: Path, timeout: float = 240) -> None:
    """Start ``command`` in its own process group and SIGKILL the whole group (launcher and ranks) as soon as
    ``run_dir`` holds its first complete checkpoint (checkpoints are renamed into place once complete)."""
    process = subprocess.Popen(
        command, env=launcher_env(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.monotonic() + timeout
    try:
        while not list_checkpoints(run_dir) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the group is gone only if the run already ended
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL, f"the run ended by itself (exit {process.returncode})"
    assert list_checkpoints(run_dir) and not (run_dir / "results.json").exists()  # killed mid-run


@pytest.mark.slow  # a killed and a resumed PPO run of 2 processes, one of one (~30 s), after the fixture's
def test_ppo_sharded_killed_resumes_on_two_processes_exactly_and_on_one_within_tolerance(
    sharded_ppo, tmp_path, monkeypatch
):
    run_dir, args = sharded_ppo
    killed = tmp_path / "killed"
    kill_after_first_checkpoint(cli_launcher_command(["ppo", "--num-processes", "2", *in_run_dir(args, killed)],
                                                     monkeypatch), killed)  # fmt: skip
    for name in ("again", "single"):
        shutil.copytree(killed, tmp_path / name)
    two = _metrics(run_dir)

    # (a) 2 processes: the uninterrupted run, bit for bit
    resumed = run_cli_launcher_flag(
        ["ppo", "--num-processes", "2", *in_run_dir(args, tmp_path / "again")], monkeypatch
    )
    assert "resumed from iteration" in resumed.stdout
    strip = lambda m: {k: v for k, v in m.items() if not k.startswith("time/")}  # noqa: E731
    assert [strip(m) for m in _metrics(tmp_path / "again")] == [strip(m) for m in two]
    for model in ("policy", "value"):
        assert max_weight_difference(run_dir / model, tmp_path / "again" / model) == 0.0

    # (b) 1 process (warned): the checkpoint's 2 sampling shards sampled here, the same tokens; sums in another order
    with pytest.warns(UserWarning, match="written by 2 process"):
        assert main(["ppo", *in_run_dir(args, tmp_path / "single")]) == 0
    single = _metrics(tmp_path / "single")
    assert [m["step"] for m in single] == [1, 2, 3]
    difference = max(max_weight_difference(run_dir / m, tmp_path / "single" / m) for m in ("policy", "value"))
    report("ppo fsdp killed, resumed 2 -> 1", max_metric_difference(two, single, PPO_STATISTICS), difference)
    assert max_metric_difference(two, single, PPO_STATISTICS) < TOLERANCE
    assert difference < TOLERANCE


# --------------------------------------------------------------------------- sampling from a sharded policy


def sampling_worker(policy_dir: str, out_dir: str) -> None:
    """One rank of :func:`test_sharded_sampling_matches_the_unsharded_model_and_ranks_stop_together`: samples its
    own prompts from the sharded policy (gathered and lockstep) and from a plain copy, with the same seeds."""
    from instructrl.fast.sampler import CachedSampler
    from instructrl.models.causal_lm import load_causal_lm, load_tokenizer
    from instructrl.stages.ppo_build import GatheredSampler
    from instructrl.stages.ppo_rollout import left_pad
    from instructrl.utils.distributed import get_runtime
    from instructrl.utils.sharding import local_bytes

    runtime = get_runtime("cpu", "fsdp")
    tokenizer = load_tokenizer(policy_dir)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    plain = load_causal_lm(policy_dir, tokenizer).eval()
    sharded = runtime.distribute(load_causal_lm(policy_dir, tokenizer).eval())
    words = ["cat", "red", "mat", "sang"]
    prompts = [f"Q: {i} say {words[(i + runtime.rank) % 4]} words\nA:" for i in range(3 + 2 * runtime.rank)]
    query, mask = left_pad([tokenizer(p)["input_ids"] for p in prompts], pad)

    def sample(sampler) -> list[list[int]]:
        generator = torch.Generator().manual_seed(7 + runtime.rank)
        return sampler.generate(query, mask, 12, 1.0, generator).tolist()

    gathered = GatheredSampler(sharded, lambda copy: CachedSampler(copy, eos, pad))
    result = {
        "plain": sample(CachedSampler(plain, eos, pad)),
        "gathered": sample(gathered),
        "lockstep": sample(CachedSampler(sharded, eos, pad, stop=runtime.all_finished)),
        "local_bytes": local_bytes(sharded),
        "full_bytes": local_bytes(plain),
    }
    (Path(out_dir) / f"rank{runtime.rank}.json").write_text(json.dumps(result))


def test_sharded_sampling_matches_the_unsharded_model_and_ranks_stop_together(tmp_path, ppo_env):  # noqa: F811
    launch_ranks(str(Path(__file__)), "sampling", str(ppo_env / "policy"), str(tmp_path), module=False, timeout=120)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank in ranks:
        assert rank["gathered"] == rank["plain"]  # the same tokens as the unsharded model, same seeds
        assert rank["lockstep"] == rank["plain"]
        assert 0.45 < rank["local_bytes"] / rank["full_bytes"] < 0.55  # each rank holds half of the weights
    pad = 0

    def steps(rows: list[list[int]]) -> int:  # decoding steps until every row ended (EOS, then PAD)
        return max(len([t for t in row if t != pad]) for row in rows)

    from instructrl.models.causal_lm import load_tokenizer

    pad = load_tokenizer(ppo_env / "policy").pad_token_id
    assert steps(ranks[0]["plain"]) != steps(ranks[1]["plain"])  # the ranks' samples stop at different steps


# --------------------------------------------------------------------------- the launch config


def test_accelerate_fsdp_config_starts_a_sharded_run_that_writes_a_loadable_model(tmp_path, tiny_lm_dir):
    from instructrl.cli import launcher_command

    rows = [{"prompt": f"Q: {i} ?\nA:", "response": f" {i % 7}"} for i in range(16)]
    (tmp_path / "demos.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = _sets(
        model=tiny_lm_dir, data=tmp_path / "demos.jsonl", batch_size=4, epochs=2, ptx_fraction=0,
        residual_dropout=0, device="cpu", threads=1, save_every=1, output_dir=tmp_path / "run",
    )  # fmt: skip
    command = launcher_command(
        "sft", args, 2, str(Path(__file__).resolve().parents[1] / "configs/accelerate/fsdp.yaml")
    )
    at = command.index("-m", 3)  # the launcher's own options end here
    run_launcher(command[:at] + ["--main_process_port", str(_free_port())] + command[at:])
    assert_weights_split(tmp_path / "run")  # sharded although run.sharding was left at 'none'
    assert_loadable(tmp_path / "run")


if __name__ == "__main__" and sys.argv[1:2] == ["sampling"]:
    sampling_worker(*sys.argv[2:])


def test_readme_memory_table_is_the_formula_and_the_formula_counts_bytes():
    from instructrl.utils.sharding import ppo_bytes_per_process

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for name, parameters in (("1B", 1e9), ("7B", 7e9), ("13B", 13e9)):
        expected = [ppo_bytes_per_process(parameters, 1, "none")]
        expected += [ppo_bytes_per_process(parameters, n) for n in (2, 8)]
        expected += [ppo_bytes_per_process(parameters, n, sharded_sampling="lockstep") for n in (2, 8)]
        expected += [ppo_bytes_per_process(parameters, 8, frozen_models="full")]
        row = "| " + " | ".join([name, *(f"{b / 1e9:.0f}" for b in expected)]) + " |"
        assert row in readme, row
    # by hand for 1B at N = 2: (2 × 16 + 4 EMA) / 2 + 2 × 4 frozen / 2 + 4 gathered copy = 26 bytes a parameter
    assert ppo_bytes_per_process(1, 2) == 26
    assert ppo_bytes_per_process(1, 1, "fsdp") == ppo_bytes_per_process(1, 4, "none") == 44  # nothing split
