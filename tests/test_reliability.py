"""Reliability: non-finite steps skipped and counted, NaN models never saved, out-of-memory and full-disk
messages, corrupted checkpoints, forced resumes and the demo's own config check."""

from __future__ import annotations

import errno
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from instructrl import demo
from instructrl.cli import main
from instructrl.config import RunSettings, save_config
from instructrl.errors import UserFacingError
from instructrl.stages import ppo, ppo_trainers, rm, sft
from instructrl.utils import checkpoint
from instructrl.utils.checkpoint import list_checkpoints, load_latest_checkpoint, save_checkpoint
from instructrl.utils.guards import (
    NonFiniteGuard,
    is_disk_full,
    is_out_of_memory,
    out_of_memory_advice,
    require_finite_weights,
)

TINY_PRETRAIN = ("sandbox_docs=300", "heldout_docs=40", "vocab_size=400", "model.d_model=32", "model.n_layers=1",
                 "model.n_heads=2", "seq_len=32", "batch_size=8", "eval_every=100", "threads=1",
                 "device=cpu")  # fmt: skip


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def pretrain(out: Path, *settings: str) -> int:
    items = (f"output_dir={out}", *TINY_PRETRAIN, *settings)
    return main(["pretrain", *(arg for item in items for arg in ("--set", item))])


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# --------------------------------------------------------------------------- the non-finite guard


def test_guard_skips_counts_resets_and_stops_after_too_many_in_a_row(capsys):
    guard = NonFiniteGuard(max_in_a_row=3)
    assert guard.step_is_finite(1, loss=torch.tensor(0.5), grad_norm=2.0)
    assert not guard.step_is_finite(2, loss=float("nan"), grad_norm=1.0)
    assert "step 2: non-finite loss" in capsys.readouterr().err
    assert not guard.step_is_finite(3, loss=1.0, grad_norm=torch.tensor(float("inf")))
    assert guard.step_is_finite(4, loss=1.0, grad_norm=None)  # a finite step resets the run of bad ones
    assert (guard.skipped, guard.in_a_row, guard.metrics()) == (2, 0, {"nonfinite_skipped": 2})
    assert not guard.step_is_finite(5, loss=float("nan"))
    assert not guard.step_is_finite(6, loss=float("nan"))
    with pytest.raises(UserFacingError, match=r"3 steps in a row .*max_nonfinite_steps=3"):
        guard.step_is_finite(7, loss=float("nan"))
    restored = NonFiniteGuard(3)
    restored.load_state_dict(guard.state_dict())
    assert restored == guard


def nan_at_training_calls(monkeypatch, bad_calls: set[int]) -> None:
    """Make the k-th training cross-entropy (k in ``bad_calls``, 1-based) NaN; evaluation calls are left alone."""
    real, calls = torch.nn.functional.cross_entropy, []

    def cross_entropy(*args, **kwargs):
        loss = real(*args, **kwargs)
        if "reduction" in kwargs:  # held-out perplexity uses reduction="sum"
            return loss
        calls.append(1)
        return loss * float("nan") if len(calls) in bad_calls else loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", cross_entropy)


def test_pretrain_skips_a_nan_loss_reports_it_and_never_steps_on_it(tmp_path, monkeypatch, capsys):
    nan_at_training_calls(monkeypatch, {2})
    assert pretrain(tmp_path / "run", "max_steps=4", "save_every=3") == 0
    assert "step 2: non-finite grad_norm, loss; update skipped" in capsys.readouterr().err
    rows = metrics(tmp_path / "run")
    assert [r.get("nonfinite_skipped", 0) for r in rows] == [0, 1, 1, 1]
    _, state = load_latest_checkpoint(tmp_path / "run")
    adam_steps = {int(s["step"]) for s in state["optimizer"]["state"].values()}
    assert adam_steps == {2}  # 3 steps, one skipped: Adam stepped twice
    assert state["guard"] == {"skipped": 1, "in_a_row": 0}
    assert all(torch.isfinite(w).all() for w in weights(tmp_path / "run").values())


def test_pretrain_stops_after_max_nonfinite_steps_in_a_row_and_saves_nothing(tmp_path, monkeypatch, capsys):
    nan_at_training_calls(monkeypatch, set(range(1, 100)))
    assert pretrain(tmp_path / "run", "max_steps=6", "max_nonfinite_steps=2") == 1
    err = capsys.readouterr().err
    assert "2 steps in a row had a non-finite" in err and "max_nonfinite_steps=2" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_a_model_with_nan_weights_is_never_saved(tmp_path, monkeypatch, capsys):
    from instructrl.stages import pretrain as pretrain_stage

    real = pretrain_stage.stream_perplexity

    def poison_then_evaluate(model, *args, **kwargs):  # the final evaluation runs just before the save
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(pretrain_stage, "stream_perplexity", poison_then_evaluate)
    assert pretrain(tmp_path / "run", "max_steps=2") == 1
    assert "not saving the pretrained model: NaN/inf values in" in capsys.readouterr().err
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_a_checkpoint_with_nan_weights_is_refused_and_the_previous_one_kept(tmp_path):
    save_checkpoint(tmp_path, 1, {"model": {"w": torch.ones(2)}})
    with pytest.raises(UserFacingError, match=r"not saving checkpoint 2: NaN/inf values in model\.w"):
        save_checkpoint(tmp_path, 2, {"model": {"w": torch.tensor([1.0, float("nan")])}, "rng": torch.zeros(3)})
    step, state = load_latest_checkpoint(tmp_path)
    assert step == 1 and torch.equal(state["model"]["w"], torch.ones(2))
    require_finite_weights({"rng": torch.tensor([255], dtype=torch.uint8), "lr": [torch.tensor(1e-3)]}, "x")


def test_sft_skips_a_nan_loss(tmp_path, tiny_lm_dir, monkeypatch):
    real, calls = sft.response_nll_sum, []

    def nan_on_third_call(model, batch, autocast_dtype=None):
        calls.append(1)
        nll, n = real(model, batch, autocast_dtype)
        return (nll * float("nan") if len(calls) == 3 else nll), n

    monkeypatch.setattr(sft, "response_nll_sum", nan_on_third_call)
    demos = tmp_path / "demos.jsonl"
    demos.write_text("".join(json.dumps({"prompt": f"Q: {i}\nA:", "response": f" {i} cat"}) + "\n" for i in range(21)))
    settings = [f"model={tiny_lm_dir}", f"data={demos}", f"output_dir={tmp_path / 'sft'}", "batch_size=4",
                "epochs=1", "ptx_fraction=0", "threads=1", "device=cpu"]  # fmt: skip
    assert main(["sft", *(a for s in settings for a in ("--set", s))]) == 0
    assert [r.get("nonfinite_skipped", 0) for r in metrics(tmp_path / "sft")] == [0, 0, 1, 1, 1]


def test_rm_skips_a_nan_gradient(tmp_path, tiny_lm_dir, monkeypatch):
    real, calls = rm.accumulate_ranking_gradients, []

    def nan_gradient_on_second_step(model, *args, **kwargs):
        calls.append(1)
        stats = real(model, *args, **kwargs)
        if len(calls) == 2:
            next(p for p in model.parameters() if p.grad is not None).grad.fill_(float("nan"))
        return stats

    monkeypatch.setattr(rm, "accumulate_ranking_gradients", nan_gradient_on_second_step)
    comparisons = tmp_path / "comparisons.jsonl"
    comparisons.write_text(
        "".join(json.dumps({"prompt": f"Q: {i}\nA:", "chosen": " cat", "rejected": " red"}) + "\n" for i in range(12))
    )
    settings = [f"model={tiny_lm_dir}", f"comparisons={comparisons}", f"output_dir={tmp_path / 'rm'}", "batch_size=4",
                "micro_batch_size=0", "valid_fraction=0", "threads=1", "device=cpu"]  # fmt: skip
    assert main(["rm", *(a for s in settings for a in ("--set", s))]) == 0
    assert [r.get("nonfinite_skipped", 0) for r in metrics(tmp_path / "rm")] == [0, 1, 1]


@pytest.fixture
def ppo_inputs(tmp_path, tiny_lm_dir, tiny_tokenizer) -> list[str]:
    from instructrl.models.reward import reward_model_from_causal_lm

    torch.manual_seed(0)
    reward_model_from_causal_lm(tiny_lm_dir, tiny_tokenizer.pad_token_id).save_pretrained(tmp_path / "rm")
    tiny_tokenizer.save_pretrained(tmp_path / "rm")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Q: {i}\nA:"}) + "\n" for i in range(4)))
    settings = [f"policy={tiny_lm_dir}", f"reward_model={tmp_path / 'rm'}", f"prompts={prompts}", "ptx.coef=0",
                f"output_dir={tmp_path / 'ppo'}", "iterations=2", "batch_size=4", "minibatch_size=2",
                "generation.max_new_tokens=4", "sample_every=0", "threads=1", "device=cpu"]  # fmt: skip
    return ["ppo", *(a for s in settings for a in ("--set", s))]


def test_ppo_skips_a_nan_minibatch_and_reports_its_iteration(tmp_path, ppo_inputs, monkeypatch, capsys):
    real, calls = ppo_trainers.policy_loss, []

    def nan_loss_on_first_minibatch(*args, **kwargs):  # one micro-batch per minibatch: the first policy step
        calls.append(1)
        loss, stats = real(*args, **kwargs)
        return (loss * float("nan") if len(calls) == 1 else loss), stats  # a NaN loss, hence a NaN gradient

    monkeypatch.setattr(ppo_trainers, "policy_loss", nan_loss_on_first_minibatch)
    assert main([*ppo_inputs, "--set", "save_every=1"]) == 0
    assert "iteration 1: non-finite loss/policy, policy/grad_norm; update skipped" in capsys.readouterr().err
    assert [r.get("nonfinite_skipped", 0) for r in metrics(tmp_path / "ppo")] == [1, 1]
    step, state = load_latest_checkpoint(tmp_path / "ppo")
    assert step == 1 and state["nonfinite"] == {"skipped": 1, "in_a_row": 0}
    # two minibatches in iteration 1: the policy's NaN gradient skipped its own first step, so it stepped once;
    # the value model's gradients were finite in both minibatches, so it stepped twice (each side skips alone)
    adam_steps = {
        name: {int(s["step"]) for s in state[name]["state"].values()}
        for name in ("policy_optimizer", "value_optimizer")
    }
    assert adam_steps == {"policy_optimizer": {1}, "value_optimizer": {2}}


# --------------------------------------------------------------------------- out of memory


def test_out_of_memory_becomes_advice_and_other_errors_pass_through():
    advice = r"out of memory during training .*lower batch_size, seq_len"
    with pytest.raises(UserFacingError, match=advice), out_of_memory_advice("training", "batch_size", "seq_len"):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(UserFacingError, match="lower micro_batch_size"), out_of_memory_advice("x", "micro_batch_size"):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
    with pytest.raises(RuntimeError, match="shape mismatch"), out_of_memory_advice("training", "batch_size"):
        raise RuntimeError("shape mismatch")
    assert is_out_of_memory(MemoryError()) and not is_out_of_memory(ValueError("out of memory"))


def raise_out_of_memory(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def test_pretrain_out_of_memory_names_what_to_lower(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", raise_out_of_memory)
    assert pretrain(tmp_path / "run", "max_steps=2") == 1
    err = capsys.readouterr().err
    assert "out of memory during training" in err and "lower batch_size, seq_len" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("module", "target", "expected"),
    [
        (ppo, "sample_responses", "out of memory during rollout generation"),
        (ppo_trainers, "value_loss", "out of memory during the PPO update"),  # inside the value model's step
    ],
    ids=["rollout", "update"],
)
def test_ppo_out_of_memory_names_what_to_lower(ppo_inputs, monkeypatch, capsys, module, target, expected):
    monkeypatch.setattr(module, target, raise_out_of_memory)
    assert main(ppo_inputs) == 1
    err = capsys.readouterr().err
    assert expected in err and ("generation.max_new_tokens" in err or "micro_batch_size" in err)


def test_sft_and_rm_out_of_memory_name_what_to_lower(tmp_path, tiny_lm_dir, monkeypatch):
    monkeypatch.setattr(sft, "response_nll_sum", raise_out_of_memory)
    monkeypatch.setattr(rm, "accumulate_ranking_gradients", raise_out_of_memory)
    demos = tmp_path / "demos.jsonl"
    demos.write_text("".join(json.dumps({"prompt": f"Q: {i}\nA:", "response": " cat"}) + "\n" for i in range(8)))
    with pytest.raises(UserFacingError, match="lower micro_batch_size, max_prompt_tokens, max_response_tokens"):
        sft.run(sft.Config(model=str(tiny_lm_dir), data=str(demos), output_dir=str(tmp_path / "sft"), batch_size=4,
                           ptx_fraction=0, run=RunSettings(device="cpu")))  # fmt: skip
    comparisons = tmp_path / "comparisons.jsonl"
    comparisons.write_text("".join(json.dumps({"prompt": "Q:", "chosen": " a", "rejected": " b"}) + "\n"))
    with pytest.raises(UserFacingError, match="lower micro_batch_size, max_prompt_tokens, max_response_tokens"):
        rm.run(rm.Config(model=str(tiny_lm_dir), comparisons=str(comparisons), output_dir=str(tmp_path / "rm"),
                         valid_fraction=0, run=RunSettings(device="cpu")))  # fmt: skip


# --------------------------------------------------------------------------- full disk


def test_disk_full_mid_checkpoint_keeps_the_previous_one_and_the_run_resumes_exactly(tmp_path, monkeypatch, capsys):
    assert pretrain(tmp_path / "straight", "max_steps=6", "save_every=2") == 0
    real, calls = checkpoint._write_state, []

    def disk_fills_on_second_checkpoint(path, state):
        calls.append(1)
        if len(calls) < 2:
            return real(path, state)
        path.write_bytes(b"PK\x03\x04 half a zip file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "_write_state", disk_fills_on_second_checkpoint)
    assert pretrain(tmp_path / "run", "max_steps=6", "save_every=2") == 1
    err = capsys.readouterr().err
    assert "no space left on the device while writing checkpoint 4" in err and "previous checkpoint is intact" in err
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-00000002"]
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))
    assert load_latest_checkpoint(tmp_path / "run")[0] == 2

    monkeypatch.setattr(checkpoint, "_write_state", real)
    assert pretrain(tmp_path / "run", "max_steps=6", "save_every=2") == 0  # space freed: resume from step 2
    assert_same_weights(tmp_path / "straight", tmp_path / "run")
    assert metrics(tmp_path / "run") == metrics(tmp_path / "straight")


def test_disk_full_is_recognised_even_when_torch_wraps_it():
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert is_disk_full(
        RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos; No space left on device")
    )
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))


def test_any_command_reports_a_full_disk_in_one_line(tmp_path, monkeypatch, capsys):
    from instructrl.data import prepare

    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(json.dumps({"prompt": f"prompt {i}", "user_id": i}) + "\n" for i in range(5)))

    def disk_full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(prepare, "atomic_write_text", disk_full)
    assert main(["data", "prepare", "--set", f"input={source}", "--set", f"output_dir={tmp_path / 'out'}"]) == 1
    err = capsys.readouterr().err
    assert "instructrl data prepare: error: no space left on the device" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "report.json").exists()


def test_generate_out_of_memory_names_what_to_lower(tmp_path, tiny_lm_dir, monkeypatch, capsys):
    from instructrl.stages import generate

    monkeypatch.setattr(generate, "generate_responses", raise_out_of_memory)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Q: hi\nA:"}) + "\n")
    settings = [f"model={tiny_lm_dir}", f"input={prompts}", f"output={tmp_path / 'samples.jsonl'}", "device=cpu"]
    assert main(["generate", *(a for s in settings for a in ("--set", s))]) == 1
    assert "out of memory during generation" in capsys.readouterr().err


# --------------------------------------------------------------------------- corrupted checkpoints


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_one_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x10
    path.write_bytes(bytes(data))


def garble_manifest(path: Path) -> None:
    (path.parent / "manifest.json").write_text('{"step": 6, "files": ["not", "a", "mapping"]}')


@pytest.mark.parametrize("corrupt", [truncate, flip_one_bit, garble_manifest])
def test_corrupted_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys, corrupt):
    assert pretrain(tmp_path / "straight", "max_steps=8", "save_every=2") == 0
    assert pretrain(tmp_path / "run", "max_steps=8", "save_every=2") == 0
    newest, previous = list_checkpoints(tmp_path / "run")[::-1]
    assert (newest.name, previous.name) == ("step-00000006", "step-00000004")
    (tmp_path / "run" / "model.safetensors").unlink()  # as if it died before its final save
    corrupt(newest / "state.pt")
    with pytest.warns(UserWarning, match="step-00000006 is corrupted or incomplete; falling back"):
        assert pretrain(tmp_path / "run", "max_steps=8", "save_every=2") == 0
    assert "resumed from step 4" in capsys.readouterr().out
    assert_same_weights(tmp_path / "straight", tmp_path / "run")
    assert metrics(tmp_path / "run") == metrics(tmp_path / "straight")


def test_every_checkpoint_corrupted_starts_over_with_warnings(tmp_path):
    save_checkpoint(tmp_path, 1, {"x": torch.ones(1)})
    save_checkpoint(tmp_path, 2, {"x": torch.ones(1)})
    for path in list_checkpoints(tmp_path):
        flip_one_bit(path / "state.pt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_latest_checkpoint(tmp_path) is None
    assert len(caught) == 2


# --------------------------------------------------------------------------- forced resume, the demo's config


def test_force_resume_continues_despite_a_changed_config(tmp_path, capsys):
    assert pretrain(tmp_path / "run", "max_steps=4", "save_every=2") == 0
    assert pretrain(tmp_path / "run", "max_steps=4", "save_every=2", "lr=0.01") == 1
    assert "--force-resume" in capsys.readouterr().err
    items = (f"output_dir={tmp_path / 'run'}", *TINY_PRETRAIN, "max_steps=4", "save_every=2", "lr=0.01")
    assert main(["pretrain", "--force-resume", "--resume", *(a for i in items for a in ("--set", i))]) == 0
    captured = capsys.readouterr()
    assert "resuming despite a changed config (changed: lr)" in captured.err
    assert "resumed from step 2" in captured.out


def test_demo_refuses_a_run_directory_made_with_a_different_config(tmp_path):
    save_config(demo.Config(output_dir=str(tmp_path), quick=True, seed=0), tmp_path / demo.CONFIG_FILE)
    demo.check_previous_run(tmp_path, demo.Config(output_dir=str(tmp_path), quick=True, seed=0, threads=2))
    with pytest.raises(UserFacingError, match=r"changed: seed"):
        demo.check_previous_run(tmp_path, demo.Config(output_dir=str(tmp_path), quick=True, seed=1))
    demo.check_previous_run(tmp_path, demo.Config(output_dir=str(tmp_path), quick=True, seed=1, force_resume=True))
    demo.check_previous_run(tmp_path, demo.Config(output_dir=str(tmp_path), quick=True, seed=1, resume=False))


def test_demo_passes_its_resume_settings_to_the_training_stages():
    cfg = demo.Config(resume=False, force_resume=True)
    assert demo.resume_overrides(sft.Config, cfg) == ["run.resume=false", "run.force_resume=true"]
    from instructrl.data import prepare

    assert demo.resume_overrides(prepare.Config, cfg) == []
