"""The optional vLLM rollout backend: its CPU-side helpers everywhere; the engine itself only where vLLM and a
CUDA GPU exist (skipped otherwise, which includes this project's CI)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from instructrl.rollout import truncate_after_eos
from instructrl.rollout.vllm_backend import request_seeds, responses_to_tensor, unpadded_prompts

EOS, PAD = 2, 0


def test_unpadded_prompts_drop_the_left_padding():
    ids = torch.tensor([[PAD, PAD, 5, 6], [7, 8, 9, 10]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert unpadded_prompts(ids, mask) == [[5, 6], [7, 8, 9, 10]]


def test_responses_are_padded_to_the_budget_and_end_with_eos_when_stopped():
    out = responses_to_tensor([([5, 6], True), ([5, 6, EOS], True), ([5, 6, 7, 8], False), ([], True)], 4, EOS, PAD)
    assert out.tolist() == [[5, 6, EOS, PAD], [5, 6, EOS, PAD], [5, 6, 7, 8], [EOS, PAD, PAD, PAD]]
    _, mask, has_eos = truncate_after_eos(out, EOS, PAD)  # what the PPO loop makes of it
    assert has_eos.tolist() == [True, True, False, True] and mask.sum(1).tolist() == [3, 3, 4, 1]


def test_request_seeds_follow_the_rollout_generator():
    a = request_seeds(torch.Generator().manual_seed(1), 4)
    assert a == request_seeds(torch.Generator().manual_seed(1), 4) and len(set(a)) == 4
    assert request_seeds(None, 2) == [None, None]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where there is no GPU")
def test_choosing_vllm_without_a_gpu_is_a_clear_error(tmp_path, tiny_lm_dir):
    from instructrl.errors import UserFacingError
    from instructrl.models.reward import reward_model_from_causal_lm
    from instructrl.stages.ppo_build import build_run
    from test_ppo import make_cfg

    rm = reward_model_from_causal_lm(tiny_lm_dir, pad_token_id=PAD)
    rm.save_pretrained(tmp_path / "rm")
    env = {
        "policy": tiny_lm_dir,
        "rm": tmp_path / "rm",
        "prompts": tmp_path / "p.jsonl",
        "texts": tmp_path / "t.jsonl",
    }
    env["prompts"].write_text('{"prompt": "the capital of norland is"}\n')
    env["texts"].write_text('{"text": "the capital of norland is vesk ."}\n')
    with pytest.raises(UserFacingError, match="CUDA"):
        build_run(make_cfg(env, tmp_path / "out", "generation.backend=vllm"))


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM needs a CUDA GPU")
def test_vllm_samples_reproducibly_and_follows_synced_weights(tmp_path, tiny_tokenizer):
    from instructrl.models.causal_lm import ModelSpec, build_causal_lm
    from instructrl.rollout.vllm_backend import VLLMBackend

    def sharp_model(seed: int):  # scaled (tied) embeddings: confident argmaxes that kernel differences keep
        torch.manual_seed(seed)
        model = build_causal_lm(ModelSpec(d_model=64, n_layers=2, n_heads=2, max_seq_len=128), tiny_tokenizer)
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(30.0)
        return model.eval()

    def greedy(model, ids, mask):
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=8, min_new_tokens=8)
        return out[:, ids.shape[1] :]

    first_policy, updated_policy = sharp_model(0), sharp_model(1)
    first_policy.save_pretrained(tmp_path / "policy")
    tiny_tokenizer.save_pretrained(tmp_path / "policy")
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    backend = VLLMBackend(str(tmp_path / "policy"), eos, pad, gpu_memory_utilization=0.2, seed=0)
    ids = torch.tensor([[pad, 5, 6, 7], [8, 9, 10, 11]])
    mask = (ids != pad).long()

    sampled = backend.generate(ids, mask, 8, 1.0, torch.Generator().manual_seed(3))
    assert sampled.shape == (2, 8)
    assert torch.equal(sampled, backend.generate(ids, mask, 8, 1.0, torch.Generator().manual_seed(3)))

    def agreement(engine_out, reference):  # up to the first EOS the engine stopped at
        _, valid, _ = truncate_after_eos(engine_out, eos, pad)
        return (engine_out == reference)[valid].float().mean().item()

    near_greedy = lambda: backend.generate(ids, mask, 8, 0.01, torch.Generator().manual_seed(3))  # noqa: E731
    assert agreement(near_greedy(), greedy(first_policy, ids, mask)) > 0.9
    backend.sync_weights(updated_policy)
    after_sync = near_greedy()
    assert agreement(after_sync, greedy(updated_policy, ids, mask)) > 0.9
    assert agreement(after_sync, greedy(first_policy, ids, mask)) < 0.5
