"""Pretraining stage: tokenizer with distinct PAD/EOS, HF-loadable output, perplexity, resume."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from instructrl.cli import main
from instructrl.models.tokenizer import train_bpe_tokenizer

TINY = [
    "--set",
    "sandbox_docs=300",
    "--set",
    "heldout_docs=40",
    "--set",
    "vocab_size=400",
    "--set",
    "model.d_model=32",
    "--set",
    "model.n_layers=1",
    "--set",
    "model.n_heads=2",
    "--set",
    "seq_len=32",
    "--set",
    "batch_size=8",
    "--set",
    "eval_every=5",
]


def test_tokenizer_has_distinct_pad_and_eos_and_round_trips():
    tok = train_bpe_tokenizer(["hello world , über naïve ü"] * 20, vocab_size=300)
    assert tok.pad_token_id != tok.eos_token_id
    text = "hello wörld ✓ 42"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: nothing is unknown


def test_pretrain_saves_a_plain_hf_model_that_generates(tmp_path):
    out = tmp_path / "base"
    assert main(["pretrain", "--set", f"output_dir={out}", "--set", "max_steps=10", *TINY]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["heldout_perplexity"] > 1 and results["steps"] == 10
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("Instruction: what is 2 plus 3 ?\nResponse:", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert generated.shape[1] > ids.shape[1]
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 10 and losses[-1] < losses[0]


def test_bf16_mixed_precision_tracks_fp32_and_keeps_float32_weights(tmp_path):
    """precision=bf16: the same 10 steps give per-step losses within 2% of fp32's, and the saved weights are fp32."""
    curves = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        args = ["pretrain", "--set", f"output_dir={out}", "--set", "max_steps=10", "--set", f"precision={precision}"]
        assert main([*args, *TINY]) == 0
        curves[precision] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        dtypes = {p.dtype for p in AutoModelForCausalLM.from_pretrained(out).parameters()}
        assert dtypes == {torch.float32}
    assert curves["bf16"] != curves["fp32"]  # autocast really ran
    for fp32, bf16 in zip(curves["fp32"], curves["bf16"]):
        assert abs(bf16 - fp32) <= 0.02 * fp32


def test_pretrain_resume_reproduces_the_uninterrupted_run(tmp_path):
    common = ["--set", "max_steps=8", "--set", "save_every=4", *TINY]
    assert main(["pretrain", "--set", f"output_dir={tmp_path / 'a'}", *common]) == 0
    assert main(["pretrain", "--set", f"output_dir={tmp_path / 'b'}", *common]) == 0
    (tmp_path / "b" / "model.safetensors").unlink()  # as if it died after the step-4 checkpoint
    assert main(["pretrain", "--set", f"output_dir={tmp_path / 'b'}", *common]) == 0
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_a_changed_config_is_refused(tmp_path, capsys):
    common = ["--set", f"output_dir={tmp_path / 'c'}", "--set", "save_every=4", *TINY]
    assert main(["pretrain", "--set", "max_steps=8", *common]) == 0
    assert main(["pretrain", "--set", "max_steps=8", "--set", "lr=0.01", *common]) == 1
    assert "changed: lr" in capsys.readouterr().err


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_without_native_bf16_matmuls_warns_once(monkeypatch, native):
    from instructrl.stages import common

    monkeypatch.setattr(common, "cpu_has_native_bf16", lambda: native)
    common._warn_software_bf16.cache_clear()
    cpu = torch.device("cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            with common.mixed_precision(cpu, torch.bfloat16):
                assert torch.get_autocast_dtype("cpu") == torch.bfloat16
        with common.mixed_precision(cpu, None):  # fp32: no autocast, never a warning
            assert not torch.is_autocast_enabled("cpu")
    software = [w for w in caught if "bf16 in software" in str(w.message)]
    assert len(software) == (0 if native else 1)
    common._warn_software_bf16.cache_clear()
