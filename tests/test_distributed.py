"""Data parallelism: 2 processes (CPU, gloo, launched with ``accelerate launch``) against 1 process on the same
global batch, for SFT, the reward model and PPO; a 2-process PPO checkpoint that loads.

The 2-process runs go through the real CLI under ``accelerate launch --multi_gpu --num_processes 2``; on a
machine without GPUs accelerate runs them as CPU processes over gloo. Dropout is off everywhere so the only
differences left are float summation orders (≈1e-7).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from instructrl.cli import main
from instructrl.utils.checkpoint import list_checkpoints, load_latest_checkpoint
from instructrl.utils.distributed import Runtime
from instructrl.utils.io import read_jsonl_lenient
from instructrl.utils.seed import RANK_SEED_STRIDE

TOLERANCE = 1e-5
"""Largest difference allowed between the 1- and 2-process numbers: absolute for weights and for statistics
of magnitude up to 1, relative above (see :func:`max_metric_difference`). Measured below 1e-6 on an AVX-512
CPU; 1.3e-5 absolute on an AVX2-only one, for an RM statistic of magnitude ~4 after six steps (3e-6 relative)."""


# --------------------------------------------------------------------------- helpers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env() -> dict[str, str]:
    """The environment of a launched run: one thread a process, this checkout's package first on the path."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
    }


def run_launcher(command: list[str], timeout: float = 420) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=launcher_env())
    assert result.returncode == 0, f"2-process run failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def launch_two_processes(*cli_args: str) -> subprocess.CompletedProcess:
    """``accelerate launch --multi_gpu --num_processes 2 -m instructrl ARGS``, as a user would type it."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return run_launcher(command + ["--main_process_port", str(_free_port()), "-m", "instructrl", *cli_args])


def cli_launcher_command(args: list[str], monkeypatch) -> list[str]:
    """The command ``instructrl CMD --num-processes 2 ...`` launches (checked), on a free port."""
    launched = []
    monkeypatch.setattr(subprocess, "call", lambda command: launched.append(command) or 0)
    assert main(args) == 0
    monkeypatch.undo()
    (command,) = launched
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"] and "--num-processes" not in command
    assert command[command.index("--num_processes") + 1] == "2" and command[-len(args) + 3 :] == args[3:]
    at = command.index("-m", 3)  # the launcher's own options end here
    return command[:at] + ["--main_process_port", str(_free_port())] + command[at:]


def run_cli_launcher_flag(args: list[str], monkeypatch) -> subprocess.CompletedProcess:
    """``instructrl CMD --num-processes 2 ...``: check the command the CLI launches, then run it on a free port."""
    return run_launcher(cli_launcher_command(args, monkeypatch))


def _sets(**settings) -> list[str]:
    args = []
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    return args


def _metrics(run_dir: Path) -> list[dict]:
    return read_jsonl_lenient(run_dir / "metrics.jsonl")


def max_metric_difference(a: list[dict], b: list[dict], keys: list[str]) -> float:
    """Largest |x − y| / max(1, |x|, |y|) over the logged ``keys``: float32 rounding grows with a value's size
    (margins and gradient norms reach several units), so large values are compared relatively."""
    assert len(a) == len(b) and a, (len(a), len(b))
    return max(
        abs(x[k] - y[k]) / max(1.0, abs(x[k]), abs(y[k])) for x, y in zip(a, b) for k in keys if x.get(k) is not None
    )


def report(stage: str, loss_difference: float, weight_difference: float | None) -> None:
    """The measured 1- vs 2-process differences, for the log (pytest -s)."""
    weights = f", weights {weight_difference:.1e}" if weight_difference is not None else ""
    print(f"{stage}: 1 vs 2 processes, max |difference| of losses/statistics {loss_difference:.1e}{weights}")


def max_weight_difference(a: Path, b: Path) -> float:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


# --------------------------------------------------------------------------- the runtime itself


class FakeRank(Runtime):
    def __init__(self, rank: int, world_size: int):
        super().__init__(torch.device("cpu"))
        self.rank, self.world_size = rank, world_size


@pytest.mark.parametrize("n, world", [(8, 2), (7, 2), (5, 3), (2, 4)])
def test_shards_are_contiguous_disjoint_and_cover_the_batch(n, world):
    shards = [FakeRank(r, world).shard(list(range(n))) for r in range(world)]
    assert sum(shards, []) == list(range(n))  # in rank order: gathering restores the global order
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_gradient_normalizer_turns_rank_averaged_gradients_into_the_global_mean():
    # DDP averages: (1/N) Σ_r sum_r / (n/N) = Σ_r sum_r / n. With one process the divisor is n itself.
    assert Runtime(torch.device("cpu")).gradient_normalizer(12) == 12.0


@pytest.mark.parametrize("max_norm", [float("inf"), 0.5])
def test_clip_grad_norm_returns_torchs_norm_and_clips_only_when_asked(max_norm):
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    inputs = torch.randn(5, 4)
    for model in models:
        model(inputs).square().sum().backward()
    before = [p.grad.clone() for p in models[0].parameters()]
    ours = Runtime(torch.device("cpu")).clip_grad_norm_(models[0], max_norm)
    theirs = torch.nn.utils.clip_grad_norm_(models[1].parameters(), max_norm)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    assert ours > 0.5  # so that 0.5 clips
    for mine, reference, original in zip(models[0].parameters(), models[1].parameters(), before):
        torch.testing.assert_close(mine.grad, reference.grad, rtol=1e-6, atol=1e-7)
        assert torch.equal(mine.grad, original) == (max_norm == float("inf"))  # untouched unless clipped
    assert Runtime(torch.device("cpu")).clip_grad_norm_(torch.nn.Linear(2, 2), max_norm) == 0  # no gradients


def test_per_rank_state_round_trips_and_a_different_process_count_is_detected():
    rank1 = FakeRank(1, 2)
    saved = {"per_rank": ["state of rank 0", "state of rank 1"]}
    assert rank1.own_rank_state(saved) == "state of rank 1"
    assert Runtime(torch.device("cpu")).own_rank_state("plain") == "plain"  # single-process format unchanged
    with pytest.warns(UserWarning, match="2 process"):
        assert Runtime(torch.device("cpu")).own_rank_state(saved) is None
    with pytest.warns(UserWarning, match="1 process"):
        assert rank1.own_rank_state({"python": 1}) is None


class RecordingBackend:
    """A sampler that draws (B, n) token ids from the generator it is given and records each call's prompts."""

    def __init__(self):
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def generate(self, prompt_ids, attention_mask, max_new_tokens, temperature, generator=None):
        self.calls.append((prompt_ids, attention_mask))
        return torch.randint(5, 50, (prompt_ids.shape[0], max_new_tokens), generator=generator)


def test_each_sampling_shard_samples_its_rows_as_a_process_holding_only_them_would():
    from instructrl.stages.ppo_rollout import SamplingShards, left_pad, sample_responses

    prompts = [[7] * 3, [8] * 1, [9] * 2, [6] * 5, [5] * 1, [4] * 2]  # the longest in the second half
    query, mask = left_pad(prompts, pad_token_id=0)
    backend = RecordingBackend()
    shards = SamplingShards(2, seed=11, runtime=Runtime(torch.device("cpu")))  # one process, two shards
    response, _, _ = sample_responses(backend, query, mask, 4, 1.0, 1, 0, batch_size=2, generator=shards.owned())

    alone = RecordingBackend()  # each half as a process that held only it: its own padding and generator
    halves = []
    for rank in range(2):
        own_query, own_mask = left_pad(FakeRank(rank, 2).shard(prompts), pad_token_id=0)
        generator = SamplingShards(2, seed=11, runtime=FakeRank(rank, 2)).owned()
        assert [g.initial_seed() for g in generator] == [11 + rank * RANK_SEED_STRIDE]  # as rank r seeds today
        halves.append(sample_responses(alone, own_query, own_mask, 4, 1.0, 1, 0, 2, generator)[0])
    assert torch.equal(response, torch.cat(halves))
    assert len(backend.calls) == len(alone.calls) == 4  # generation.batch_size chunks within each shard
    with pytest.raises(ValueError, match="5 prompts cannot be split into 2 equal sampling shards"):
        sample_responses(backend, query[:5], mask[:5], 4, 1.0, 1, 0, generator=shards.owned())
    for (ids, call_mask), (own_ids, own_mask) in zip(backend.calls, alone.calls):
        assert torch.equal(ids, own_ids) and torch.equal(call_mask, own_mask)  # the same shapes and padding


def test_sampling_shards_resume_at_any_process_count_that_divides_them():
    from instructrl.errors import UserFacingError
    from instructrl.stages.ppo_rollout import SamplingShards

    one_process = SamplingShards(2, seed=3, runtime=Runtime(torch.device("cpu")))
    for generator in one_process.owned():
        torch.rand(5, generator=generator)  # advanced past their seeds
    states = one_process.state_dict()
    assert len(states) == 2
    for rank in range(2):  # two processes continue one shard each
        resumed = SamplingShards(2, seed=3, runtime=FakeRank(rank, 2))
        resumed.load_state_dict(states)
        assert torch.equal(resumed.owned()[0].get_state(), states[rank])
    fresh = SamplingShards(2, seed=3, runtime=FakeRank(0, 2))
    with pytest.warns(UserWarning, match="3 sampling shard.*2 processes cannot share"):
        fresh.load_state_dict([states[0]] * 3)
    assert [g.initial_seed() for g in fresh.owned()] == [3]  # kept its freshly seeded shard
    with pytest.raises(UserFacingError, match="generation.sampling_shards=3 must be divisible"):
        SamplingShards(3, seed=3, runtime=FakeRank(0, 2))


def test_sampling_shards_setting_must_divide_the_rollout_batch():
    from instructrl.config import ConfigError, load_config
    from instructrl.stages import ppo

    assert load_config(ppo.Config).generation.sampling_shards is None  # one shard per process at the start
    cfg = load_config(ppo.Config, overrides=["batch_size=8", "minibatch_size=4", "generation.sampling_shards=4"])
    assert cfg.generation.sampling_shards == 4
    for bad in ("3", "0"):
        with pytest.raises(ConfigError, match="generation.sampling_shards"):
            load_config(
                ppo.Config, overrides=["batch_size=8", "minibatch_size=4", f"generation.sampling_shards={bad}"]
            )


# --------------------------------------------------------------------------- SFT and RM: 2 processes == 1


def test_sft_two_processes_match_one_on_the_same_global_batch(tmp_path, tiny_lm_dir, monkeypatch):
    # answers of 1 to 3 numbers: ranks hold different token counts, so the loss normalizer matters
    rows = [
        {"prompt": f"Instruction: count {i % 5} ?\nResponse:", "response": f" {i % 9}" * (1 + i % 3)}
        for i in range(24)
    ]
    data = tmp_path / "demos.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = _sets(
        model=tiny_lm_dir, data=data, batch_size=4, micro_batch_size=1, epochs=2, ptx_fraction=0, lr=0.01,
        residual_dropout=0, device="cpu", threads=1, save_every=1000,
    )  # fmt: skip
    assert main(["sft", *common, "--set", f"output_dir={tmp_path / 'one'}"]) == 0
    two_args = ["sft", "--num-processes", "2", *common, "--set", f"output_dir={tmp_path / 'two'}"]
    run_cli_launcher_flag(two_args, monkeypatch)

    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert [m["tokens"] for m in one] == [m["tokens"] for m in two]  # each rank trained on half, not all
    report("sft", max_metric_difference(one, two, ["loss"]), max_weight_difference(tmp_path / "one", tmp_path / "two"))
    assert max_metric_difference(one, two, ["loss", "grad_norm", "valid_loss"]) < TOLERANCE
    assert max_weight_difference(tmp_path / "one", tmp_path / "two") < TOLERANCE
    assert one[-1]["loss"] < one[0]["loss"] - 0.1  # it trained: the comparison is not between two no-ops


def test_rm_two_processes_match_one_on_the_same_global_batch(tmp_path, tiny_lm_dir):
    from test_rm import toy_files
    from test_trackers import assert_tensorboard_matches_jsonl

    comparisons, demos = toy_files(tmp_path, 40)
    common = _sets(
        model=tiny_lm_dir, comparisons=comparisons, demonstrations=demos, batch_size=7, micro_batch_size=2,
        epochs=2, lr=0.003, device="cpu", threads=1, eval_every=3, save_every=1000,
    )  # fmt: skip
    assert main(["rm", *common, "--set", f"output_dir={tmp_path / 'one'}"]) == 0
    launch_two_processes("rm", *common, "--set", f"output_dir={tmp_path / 'two'}", "--set", "report_to=tensorboard")

    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    for key in ("prompts", "pairs", "completions"):  # global counts: every prompt seen once per step
        assert [m[key] for m in one] == [m[key] for m in two]
    assert one[0]["prompts"] == 7  # odd: the ranks' shares (4 and 3 prompts) differ, so the normalizer matters
    keys = ["loss", "accuracy", "margin_mean", "score_mean", "score_std", "grad_norm", "valid_loss"]
    report("rm", max_metric_difference(one, two, ["loss"]), max_weight_difference(tmp_path / "one", tmp_path / "two"))
    assert max_metric_difference(one, two, keys) < TOLERANCE
    assert max_weight_difference(tmp_path / "one", tmp_path / "two") < TOLERANCE
    bias = [json.loads((tmp_path / d / "config.json").read_text())["instructrl_reward_bias"] for d in ("one", "two")]
    assert abs(bias[0] - bias[1]) < TOLERANCE
    # only rank 0 logs to the trackers: one event file of metrics, equal to the JSONL's
    board = tmp_path / "two" / "tensorboard" / "rm"
    assert len(list(board.glob("events.out.tfevents.*"))) == 1
    assert_tensorboard_matches_jsonl(tmp_path / "two", "rm")


# --------------------------------------------------------------------------- PPO


@pytest.fixture(scope="module")
def ppo_env(tmp_path_factory, tiny_lm_dir, tiny_tokenizer):
    """A policy that stops at various lengths, a reward model, a far-away reference policy, prompts and texts."""
    from instructrl.config import load_config
    from instructrl.models.causal_lm import ModelSpec, build_causal_lm
    from instructrl.models.reward import reward_model_from_causal_lm
    from instructrl.stages import sft
    from test_ppo import TEXTS
    from test_rm import toy_files

    root = tmp_path_factory.mktemp("ppo_dist")
    _, demos = toy_files(root, 20)  # four-word answers: the SFT policy learns to emit EOS after a few tokens
    settings = _sets(
        model=tiny_lm_dir, data=demos, output_dir=root / "policy", batch_size=4, epochs=6, ptx_fraction=0, lr=0.01,
        residual_dropout=0, valid_fraction=0.1, device="cpu",
    )  # fmt: skip
    sft.run(load_config(sft.Config, overrides=settings[1::2]))
    torch.manual_seed(0)
    reward_model_from_causal_lm(tiny_lm_dir, tiny_tokenizer.pad_token_id).save_pretrained(root / "rm")
    tiny_tokenizer.save_pretrained(root / "rm")
    torch.manual_seed(1)  # a reference policy far from the policy, so that the KL terms are far from 0
    reference = build_causal_lm(ModelSpec(d_model=32, n_layers=2, n_heads=2, max_seq_len=128), tiny_tokenizer)
    with torch.no_grad():
        reference.get_output_embeddings().weight.mul_(30.0)
    reference.save_pretrained(root / "reference")
    tiny_tokenizer.save_pretrained(root / "reference")
    prompts = [f"Q: {i} say {word} words\nA:" for i, word in enumerate(["cat", "red", "mat", "sang"] * 3)]
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    (root / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return root


def _ppo_sets(ppo_env: Path, tiny_lm_dir: Path, out: Path, **extra) -> list[str]:
    return _sets(
        output_dir=out, policy=ppo_env / "policy", ref_policy=ppo_env / "reference", reward_model=ppo_env / "rm",
        prompts=ppo_env / "prompts.jsonl", missing_eos_score="null",
        **{"ptx.data": ppo_env / "texts.jsonl", "ptx.seq_len": 16, "ptx.batch_ratio": 1.5, "ptx.coef": 1.0,
           "generation.max_new_tokens": 6, "kl.adaptive": "true", "kl.target": 0.5},
        iterations=3, batch_size=8, minibatch_size=4, micro_batch_size=1, sample_every=0, save_every=2,
        ema_decay=0.9, device="cpu", threads=1, seed=3, **extra,
    )  # fmt: skip


PPO_STATISTICS = [
    "objective/reward", "objective/score", "objective/kl", "objective/kl_k3", "objective/non_score_reward",
    "policy/entropy", "response/length", "response/eos_rate", "value/explained_variance",
    "loss/policy", "loss/value", "loss/ptx", "policy/approx_kl", "policy/clipfrac", "value/clipfrac",
    "policy/grad_norm", "value/grad_norm", "policy/ratio_max",
]  # fmt: skip


def test_ppo_two_processes_match_one_and_save_a_checkpoint_that_loads(tmp_path, ppo_env, tiny_lm_dir):
    from instructrl.config import load_config
    from instructrl.rl import AdaptiveKLController
    from instructrl.stages import ppo

    launch_two_processes("ppo", *_ppo_sets(ppo_env, tiny_lm_dir, tmp_path / "two"))
    two = _metrics(tmp_path / "two")
    assert [m["step"] for m in two] == [1, 2, 3]
    assert [p.name for p in list_checkpoints(tmp_path / "two")] == ["step-00000002"]  # one writer, one checkpoint

    # Resumed with 2 processes from the checkpoint of iteration 2, iteration 3 is redone exactly (per-rank RNGs).
    shutil.copytree(tmp_path / "two", tmp_path / "again")
    resumed_run = launch_two_processes("ppo", *_ppo_sets(ppo_env, tiny_lm_dir, tmp_path / "again"))
    assert "resumed from iteration 2" in resumed_run.stdout
    again = _metrics(tmp_path / "again")
    assert [m["step"] for m in again] == [1, 2, 3]
    assert {k: v for k, v in again[2].items() if not k.startswith("time/")} == {
        k: v for k, v in two[2].items() if not k.startswith("time/")
    }
    assert max_weight_difference(tmp_path / "two" / "policy", tmp_path / "again" / "policy") == 0.0

    # One process, same global batch, sampled in the 2 processes' sampling shards; capture the advantages it whitened.
    whitened = []
    real_compute = ppo.compute_advantages  # the name train_iteration calls

    def recording(rollout, *args, **kwargs):
        out = real_compute(rollout, *args, **kwargs)
        whitened.append(out.advantages[out.response_mask])
        return out

    overrides = [s for s in _ppo_sets(ppo_env, tiny_lm_dir, tmp_path / "one") if s != "--set"]
    cfg = load_config(ppo.Config, overrides=[*overrides, "iterations=1", "generation.sampling_shards=2"])
    ppo.compute_advantages = recording
    try:
        ppo.run(cfg)
    finally:
        ppo.compute_advantages = real_compute
    one = _metrics(tmp_path / "one")
    assert abs(whitened[0].mean().item()) < 1e-5 and abs(whitened[0].std().item() - 1) < 1e-4  # whitened globally
    report("ppo first iteration", max_metric_difference(one, two[:1], PPO_STATISTICS), None)
    assert max_metric_difference(one, two[:1], PPO_STATISTICS) < TOLERANCE
    assert one[0]["objective/kl"] > 1 and one[0]["loss/ptx"] > 1  # the statistics compared are not trivially 0
    assert one[0]["objective/score"] != 0 and one[0]["policy/grad_norm"] > 0
    assert 0 < one[0]["response/eos_rate"] < 1  # ranks hold different token counts: the normalizers matter

    # β after iteration 1 comes from the global KL: iteration 2 of the 2-process run starts from it.
    beta_from_global_kl = AdaptiveKLController(cfg.kl.coef, cfg.kl.target, cfg.kl.horizon)
    beta_from_global_kl.update(one[0]["objective/kl"], cfg.batch_size)
    assert abs(two[1]["objective/beta"] - beta_from_global_kl.value) < 1e-8

    # The 2-process checkpoint resumes in 1 process (warned), its 2 sampling shards sampled there: the same run.
    step, state = load_latest_checkpoint(tmp_path / "two")
    assert step == 2 and len(state["sampling_shards"]) == 2
    two_overrides = [s for s in _ppo_sets(ppo_env, tiny_lm_dir, tmp_path / "two") if s != "--set"]
    resumed_cfg = load_config(ppo.Config, overrides=two_overrides)
    (tmp_path / "two" / "results.json").unlink()
    with pytest.warns(UserWarning, match="written by 2 process"):
        results = ppo.run(resumed_cfg)
    assert results["iterations"] == 3 and [m["step"] for m in _metrics(tmp_path / "two")] == [1, 2, 3]
    difference = max_weight_difference(tmp_path / "again" / "policy", tmp_path / "two" / "policy")
    report("ppo resumed 2 -> 1", max_metric_difference(two, _metrics(tmp_path / "two"), PPO_STATISTICS), difference)
    assert max_metric_difference(two, _metrics(tmp_path / "two"), PPO_STATISTICS) < TOLERANCE
    assert difference < TOLERANCE


# --------------------------------------------------------------------------- configs and the CLI's launcher


CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"


def test_accelerate_configs_load_and_accelerates_own_sharding_engines_are_refused():
    from accelerate.commands.config.config_args import ClusterConfig

    from instructrl.errors import UserFacingError
    from instructrl.utils.distributed import AcceleratedRuntime

    names = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
    assert names == ["fsdp", "multi_gpu_ddp", "multi_node", "single_gpu"]  # fsdp.yaml: tests/test_sharded.py
    for name in names:
        config = ClusterConfig.from_yaml_file(CONFIGS / f"{name}.yaml")  # accelerate's own loader validates keys
        fake = type("FakeAccelerator", (), {"distributed_type": config.distributed_type, "process_index": 0})
        fake.num_processes, fake.device = config.num_processes, torch.device("cpu")
        if name in ("multi_gpu_ddp", "multi_node"):
            assert AcceleratedRuntime(fake()).world_size == config.num_processes
        elif name != "single_gpu":
            with pytest.raises(UserFacingError, match="run.sharding=fsdp"):
                AcceleratedRuntime(fake())


def test_launcher_command_with_a_config_file_and_flag_stripping():
    from instructrl.cli import _strip_launch_flags, launcher_command

    rest = ["--num-processes", "4", "--set", "x=1", "--accelerate-config=f.yaml"]
    assert _strip_launch_flags(rest) == ["--set", "x=1"]
    command = launcher_command("ppo", ["--set", "x=1"], 4, "f.yaml")
    assert command[1:] == ["-m", "accelerate.commands.launch", "--config_file", "f.yaml", "--num_processes", "4",
                           "-m", "instructrl", "ppo", "--set", "x=1"]  # fmt: skip
