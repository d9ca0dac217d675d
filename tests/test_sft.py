"""SFT stage: response-only loss mask, accumulation invariance, weight updates, LoRA, CLI, resume."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from instructrl.cli import main
from instructrl.data.records import Demonstration
from instructrl.models.causal_lm import load_causal_lm
from instructrl.stages.sft import IGNORE, collate, encode_demonstration, pack_examples, response_nll_sum


def _write_demos(path, n=24):
    rows = []
    for i in range(n):
        a, b = i % 5, (i * 3) % 4
        rows.append({"prompt": f"Instruction: what is {a} plus {b} ?\nResponse:", "response": f" {a + b}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_mask_covers_response_and_eos_only(tiny_tokenizer):
    demo = Demonstration(prompt="Instruction: what is 2 plus 3 ?\nResponse:", response=" 5")
    ex = encode_demonstration(demo, tiny_tokenizer, 100, 100)
    n_prompt = len(tiny_tokenizer(demo.prompt, add_special_tokens=False)["input_ids"])
    assert ex.labels[:n_prompt] == [IGNORE] * n_prompt
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]
    assert ex.input_ids[-1] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.pad_token_id != tiny_tokenizer.eos_token_id
    batch = collate([ex, encode_demonstration(Demonstration("Q", " a b c d e f"), tiny_tokenizer, 100, 100)], 0)
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()


def test_over_length_examples_are_dropped(tiny_tokenizer):
    demo = Demonstration(prompt="what is 2 plus 3 ?", response=" 5 5 5 5 5 5 5 5 5")
    assert encode_demonstration(demo, tiny_tokenizer, 100, 3) is None
    assert encode_demonstration(demo, tiny_tokenizer, 2, 100) is None


def test_packing_keeps_every_token(tiny_tokenizer):
    exs = [encode_demonstration(Demonstration(f"p{i}", f" r{i}"), tiny_tokenizer, 50, 50) for i in range(7)]
    packed = pack_examples(exs, 12)
    assert sum(len(r.input_ids) for r in packed) == sum(len(e.input_ids) for e in exs)
    assert all(len(r.input_ids) <= max(12, max(len(e.input_ids) for e in exs)) for r in packed)


def test_gradient_accumulation_1x8_equals_8x1(tiny_lm_dir, tiny_tokenizer):
    demos = [
        Demonstration(f"Instruction: what is {i} plus 1 ?\nResponse:", " " + " ".join(["7"] * (i % 4 + 1)))
        for i in range(8)
    ]
    exs = [encode_demonstration(d, tiny_tokenizer, 100, 100) for d in demos]
    grads, losses = [], []
    for micro in (8, 1):
        model = load_causal_lm(tiny_lm_dir, tiny_tokenizer)
        batches = [collate(exs[s : s + micro], tiny_tokenizer.pad_token_id) for s in range(0, 8, micro)]
        n_tokens = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
        total = 0.0
        for b in batches:
            nll, _ = response_nll_sum(model, b)
            (nll / n_tokens).backward()
            total += nll.item()
        losses.append(total / n_tokens)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_bf16_response_nll_tracks_fp32(tiny_lm_dir, tiny_tokenizer):
    """The SFT loss and its gradient under bf16 autocast stay close to fp32 (same weights, same batch)."""
    demos = [Demonstration(f"Instruction: what is {i} plus 2 ?\nResponse:", f" {i + 2}") for i in range(6)]
    batch = collate([encode_demonstration(d, tiny_tokenizer, 100, 100) for d in demos], tiny_tokenizer.pad_token_id)
    results = {}
    for dtype in (None, torch.bfloat16):
        model = load_causal_lm(tiny_lm_dir, tiny_tokenizer)
        nll, n_tokens = response_nll_sum(model, batch, dtype)
        (nll / n_tokens).backward()
        assert nll.dtype == torch.float32
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results[dtype] = (nll.item() / n_tokens, grad)
    (loss32, grad32), (loss16, grad16) = results[None], results[torch.bfloat16]
    assert loss16 != loss32 and abs(loss16 - loss32) <= 0.01 * loss32
    assert torch.nn.functional.cosine_similarity(grad16, grad32, dim=0) > 0.99


def _run_sft(tmp_path, tiny_lm_dir, out_name, *extra):
    data = _write_demos(tmp_path / "demos.jsonl")
    args = [
        "sft",
        "--set",
        f"model={tiny_lm_dir}",
        "--set",
        f"data={data}",
        "--set",
        f"output_dir={tmp_path / out_name}",
    ]
    args += ["--set", "batch_size=4", "--set", "epochs=2", "--set", "ptx_fraction=0", "--set", "lr=0.01"]
    for e in extra:
        args += ["--set", e]
    assert main(args) == 0
    return tmp_path / out_name


def test_cli_run_changes_weights_and_saves_hf_model(tmp_path, tiny_lm_dir, tiny_tokenizer):
    out = _run_sft(tmp_path, tiny_lm_dir, "sft")
    before = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    after = AutoModelForCausalLM.from_pretrained(out)
    changed = [
        n for (n, a), (_, b) in zip(before.named_parameters(), after.named_parameters()) if not torch.equal(a, b)
    ]
    assert len(changed) == len(list(before.parameters()))  # full fine-tuning touches every weight
    results = json.loads((out / "results.json").read_text())
    assert results["selected_by"] == "loss" and results["valid_loss"] is not None
    assert (out / "instructrl_sft.yaml").exists() and (out / "metrics.jsonl").exists()


def test_lora_trains_adapters_only_and_merges(tmp_path, tiny_lm_dir):
    out = _run_sft(tmp_path, tiny_lm_dir, "sft_lora", "lora.enabled=true", "lora.r=4")
    before = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    after = AutoModelForCausalLM.from_pretrained(out)
    b, a = dict(before.named_parameters()), dict(after.named_parameters())
    assert set(a) == set(b)  # merged: a plain model again
    assert torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])  # not adapted
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], b["model.layers.0.self_attn.q_proj.weight"])


def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path, tiny_lm_dir):
    full = _run_sft(tmp_path, tiny_lm_dir, "a", "save_every=2")
    # A second run that "dies" after its checkpoints: drop its final outputs and run again to resume.
    partial = _run_sft(tmp_path, tiny_lm_dir, "b", "save_every=2")
    (partial / "model.safetensors").unlink()
    resumed = _run_sft(tmp_path, tiny_lm_dir, "b", "save_every=2")
    for (n, x), (_, y) in zip(
        AutoModelForCausalLM.from_pretrained(full).named_parameters(),
        AutoModelForCausalLM.from_pretrained(resumed).named_parameters(),
    ):
        assert torch.equal(x, y), n


def test_config_errors_fail_before_work(tmp_path, capsys):
    assert main(["sft", "--set", "lr=-1"]) == 2
    assert "lr: must be > 0" in capsys.readouterr().err
    assert main(["sft", "--set", "epoch=3"]) == 2
    assert "did you mean 'epochs'" in capsys.readouterr().err
    assert main(["sft", "--set", f"data={tmp_path / 'missing.jsonl'}"]) == 2


def test_generate_command_writes_one_record_per_sample(tmp_path, tiny_lm_dir):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Instruction: what is 1 plus 1 ?\\nResponse:", "user_id": 7, "id": "a"}\n')
    out = tmp_path / "gen.jsonl"
    args = ["generate", "--set", f"model={tiny_lm_dir}", "--set", f"input={prompts}", "--set", f"output={out}"]
    assert main([*args, "--set", "samples_per_prompt=3", "--set", "max_new_tokens=5", "--set", "device=cpu"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["sample"] for r in rows] == [0, 1, 2]
    assert all(r["id"] == "a" and r["user_id"] == "7" and 1 <= r["n_tokens"] <= 5 for r in rows)
