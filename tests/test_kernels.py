"""The kernel swaps of instructrl.fast.kernels compute what the models computed before, gradients included."""

from __future__ import annotations

import pytest
import torch
from transformers.activations import GELUTanh, NewGELUActivation

from instructrl.fast import kernels
from instructrl.fast.head import FusedHeadLogProbs
from instructrl.fast.kernels import (
    FLOAT32_CPU_ATTENTION,
    few_rows_cpu_lm_head,
    float32_cpu_attention,
    fuse_activations,
    keep_dense_gradients,
    sparse_untied_embedding_gradient,
    speed_up_ppo_models,
    tied_embedding,
    tied_embedding_rows_into_grad,
)
from instructrl.fast.sampler import CachedSampler
from instructrl.models.causal_lm import ModelSpec, build_causal_lm
from instructrl.models.logprobs import FullLogits
from instructrl.stages.ppo_build import build_run
from test_overlap import minibatch_step
from test_ppo import env, make_cfg, scored_rollout  # noqa: F401  (its module-scoped fixture is reused)


def tiny(tokenizer, arch: str, tie: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    spec = ModelSpec(arch=arch, d_model=32, n_layers=2, n_heads=2, max_seq_len=64, tie_embeddings=tie)
    return build_causal_lm(spec, tokenizer).double().eval()


def loss_and_grads(model, ids: torch.Tensor, backwards: int = 1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """LM loss (through embedding and LM head); ``backwards`` > 1 accumulates gradients as micro-batches do."""
    model.zero_grad(set_to_none=True)
    for _ in range(backwards):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    return loss.detach(), {k: p.grad for k, p in model.named_parameters() if p.grad is not None}


def test_gelu_new_is_replaced_by_the_one_kernel_tanh_gelu_with_the_same_outputs_and_gradients(tiny_tokenizer):
    x = torch.linspace(-8, 8, 10001, dtype=torch.float64)
    torch.testing.assert_close(GELUTanh()(x), NewGELUActivation()(x), rtol=0, atol=1e-15)

    ids = torch.randint(5, 200, (3, 12), generator=torch.Generator().manual_seed(1))
    model = tiny(tiny_tokenizer, "gpt2")
    expected_loss, expected_grads = loss_and_grads(model, ids)
    assert fuse_activations(model) == 2  # one per block
    assert not any(type(m) is NewGELUActivation for m in model.modules())
    assert fuse_activations(model) == 0  # idempotent
    loss, grads = loss_and_grads(model, ids)
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=1e-12)
    assert grads.keys() == expected_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-9, atol=1e-12, msg=name)
    assert fuse_activations(tiny(tiny_tokenizer, "llama")) == 0  # SiLU is one kernel already


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_tied_embedding_rows_into_grad_leave_the_accumulated_gradient_unchanged(tiny_tokenizer, arch):
    ids = torch.randint(5, 200, (3, 12), generator=torch.Generator().manual_seed(2))
    ids[0, :3] = tiny_tokenizer.pad_token_id  # the padding row gets no gradient, as in F.embedding
    model = tiny(tiny_tokenizer, arch)
    expected_loss, expected_grads = loss_and_grads(model, ids, backwards=2)
    assert tied_embedding_rows_into_grad(model)
    assert not tied_embedding_rows_into_grad(model)  # applied once
    loss, grads = loss_and_grads(model, ids, backwards=2)
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=0)
    weight = model.get_input_embeddings().weight
    assert not weight.grad.is_sparse  # dense, as AdamW (fused or not) requires
    assert grads.keys() == expected_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-12, atol=1e-14, msg=name)
    with torch.no_grad():  # inference goes through the plain lookup
        torch.testing.assert_close(model(input_ids=ids).logits, model(input_ids=ids).logits)
    torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True).step()
    state = model.state_dict()
    assert set(state) == set(tiny(tiny_tokenizer, arch).state_dict())  # same parameters, same names


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_float32_cpu_attention_changes_nothing_in_float32_and_stays_close_under_bf16(tiny_tokenizer, arch, tmp_path):
    ids = torch.randint(5, 200, (3, 12), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding: the attention mask must still be applied
    model = tiny(tiny_tokenizer, arch).float()
    expected_loss, expected_grads = loss_and_grads(model, ids)
    expected = model(input_ids=ids, attention_mask=mask).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(input_ids=ids, attention_mask=mask).logits.float()
    assert float32_cpu_attention(model)
    assert model.config._attn_implementation == FLOAT32_CPU_ATTENTION
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, expected, rtol=0, atol=0)
    loss, grads = loss_and_grads(model, ids)
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=0)
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=0, atol=0, msg=name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        after = model(input_ids=ids, attention_mask=mask).logits.float()
    # bf16 matmuls elsewhere keep their rounding; the float32 attention is no further from float32 than before
    assert (after - expected).abs().max() <= 1.5 * (before - expected).abs().max() + 1e-3
    model.save_pretrained(tmp_path)  # the saved config does not name the kernel
    assert FLOAT32_CPU_ATTENTION not in (tmp_path / "config.json").read_text()
    eager = tiny(tiny_tokenizer, arch)
    eager.set_attn_implementation("eager")
    assert not float32_cpu_attention(eager)  # only SDPA models are switched


def test_untied_embedding_rows_accumulate_into_a_dense_buffer_that_is_kept_between_steps(tiny_tokenizer):
    ids = torch.randint(5, 200, (3, 12), generator=torch.Generator().manual_seed(5))
    reference, model = tiny(tiny_tokenizer, "llama", tie=False), tiny(tiny_tokenizer, "llama", tie=False)
    assert tied_embedding(model) is None
    weight = sparse_untied_embedding_gradient(model)
    assert weight is model.get_input_embeddings().weight and model.get_input_embeddings().sparse
    assert sparse_untied_embedding_gradient(model) is None  # applied once
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True) for m in (reference, model)]
    keep_dense_gradients(optimizers[0], frozenset())  # nothing kept: zero_grad as it was
    assert "zero_grad" not in vars(optimizers[0])
    keep_dense_gradients(
        optimizers[1], frozenset({weight})
    )  # zero_grad() keeps this buffer, as PPO's trainers call it
    buffer = None
    for _ in range(3):
        for m, optimizer in zip((reference, model), optimizers):
            optimizer.zero_grad()
            assert all(p.grad is None for p in m.parameters() if p is not weight)
            for _ in range(2):  # two micro-batches
                m(input_ids=ids, labels=ids).loss.backward()
        assert not weight.grad.is_sparse
        buffer = buffer or weight.grad.data_ptr()
        assert weight.grad.data_ptr() == buffer  # the same buffer every step: no fresh (vocab × d) allocation
        expected = dict(reference.named_parameters())
        for name, param in model.named_parameters():
            torch.testing.assert_close(param.grad, expected[name].grad, rtol=1e-12, atol=1e-14, msg=name)
        for optimizer in optimizers:
            optimizer.step()
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=name)


def test_a_sparse_gradient_into_a_missing_buffer_is_made_dense(tiny_tokenizer):
    model = tiny(tiny_tokenizer, "llama", tie=False)
    weight = sparse_untied_embedding_gradient(model)
    ids = torch.randint(5, 200, (2, 6))
    model(input_ids=ids, labels=ids).loss.backward()  # no zero_gradients first: the hook densifies
    assert not weight.grad.is_sparse
    torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True).step()


def test_untied_or_frozen_embeddings_are_left_alone(tiny_tokenizer):
    untied = tiny(tiny_tokenizer, "llama", tie=False)
    assert tied_embedding(untied) is None
    assert not tied_embedding_rows_into_grad(untied)
    assert type(untied.get_input_embeddings()) is torch.nn.Embedding
    frozen = tiny(tiny_tokenizer, "llama").requires_grad_(False)
    assert not tied_embedding_rows_into_grad(frozen)
    assert type(frozen.get_input_embeddings()) is torch.nn.Embedding


@pytest.fixture
def gpt2_policy(tmp_path, tiny_tokenizer):
    path = tmp_path / "gpt2_policy"
    model = tiny(tiny_tokenizer, "gpt2").float()
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("policy", ["llama", "gpt2"])
def test_a_ppo_ptx_step_with_fused_kernels_equals_the_one_without(env, tmp_path, gpt2_policy, policy):  # noqa: F811
    """Rollout tensors, losses and the updated weights agree; the swaps really happened."""
    overrides = ["ptx.coef=1.0", "generation.temperature=0.8"]
    if policy == "gpt2":
        overrides.append(f"policy={gpt2_policy}")
    results = {}
    for fused in (True, False):
        cfg = make_cfg(env, tmp_path / str(fused), *overrides, f"fused_kernels={str(fused).lower()}")
        torch.manual_seed(0)
        run = build_run(cfg)
        models = run.models
        activations = [type(m) for m in models.policy.modules() if type(m) in (NewGELUActivation, GELUTanh)]
        assert all(t is (GELUTanh if fused else NewGELUActivation) for t in activations)
        assert bool(activations) == (policy == "gpt2")
        assert (type(models.policy.get_input_embeddings()) is not torch.nn.Embedding) == fused
        assert models.value_model.get_input_embeddings().sparse == fused
        assert (type(models.policy.get_output_embeddings()) is not torch.nn.Linear) == fused
        kernels = {m.config._attn_implementation for m in (models.policy, models.ref_policy, models.value_model)}
        assert kernels == {FLOAT32_CPU_ATTENTION if fused else "sdpa"}
        assert type(models.logprobs) is (FusedHeadLogProbs if fused else FullLogits)  # and the log-prob seam
        assert run.actor.logprobs is models.logprobs
        # the optimizers keep the dense buffers of the embeddings whose rows go straight into .grad
        assert all(("zero_grad" in vars(o)) == fused for o in (run.actor.optimizer, run.critic.optimizer))
        try:
            rollout = scored_rollout(run)
            stats = minibatch_step(run, rollout.select(slice(0, cfg.minibatch_size)))
        finally:
            run.close()
        value_embedding = models.value_model.get_input_embeddings().weight
        assert value_embedding.grad is not None and not value_embedding.grad.is_sparse  # dense, as AdamW needs
        weights = {k: v.detach().clone() for k, v in models.policy.named_parameters()}
        weights |= {f"value.{k}": v.detach().clone() for k, v in models.value_model.named_parameters()}
        results[fused] = (rollout, stats, weights)
    (a, stats_a, weights_a), (b, stats_b, weights_b) = results[True], results[False]
    torch.testing.assert_close(a.response, b.response, rtol=0, atol=0)
    for field in ("logprobs", "ref_logprobs", "values", "scores", "advantages"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=1e-5, atol=1e-5, msg=field)
    for key in ("loss/policy", "loss/value", "loss/ptx", "policy/grad_norm"):
        assert stats_a[key] == pytest.approx(stats_b[key], rel=1e-4, abs=1e-6), key
    for name in weights_a:
        torch.testing.assert_close(weights_a[name], weights_b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_several_processes_keep_the_dense_embedding(tiny_tokenizer):
    """DDP/ZeRO would take a sparse-flagged weight for a sparse-gradient parameter: not under N > 1."""
    policy, other = tiny(tiny_tokenizer, "gpt2"), tiny(tiny_tokenizer, "gpt2")
    value, frozen = tiny(tiny_tokenizer, "llama", tie=False), tiny(tiny_tokenizer, "llama", tie=False)
    frozen.requires_grad_(False)
    assert speed_up_ppo_models(policy, (other, value, frozen), world_size=2) == frozenset()
    assert not any(m.get_input_embeddings().sparse for m in (policy, other, value, frozen))
    assert all(type(m.get_input_embeddings()) is torch.nn.Embedding for m in (policy, other, value, frozen))
    assert not any(type(m) is NewGELUActivation for model in (policy, other) for m in model.modules())
    kept = speed_up_ppo_models(policy, (other, value, frozen), world_size=1)
    # the untied trainable one (sparse rows) and the policy's tied one (head gradient and rows go into .grad)
    assert kept == {value.get_input_embeddings().weight, policy.get_input_embeddings().weight}
    assert type(policy.get_input_embeddings()) is not torch.nn.Embedding  # rows into .grad
    assert type(other.get_input_embeddings()) is torch.nn.Embedding  # not the policy
    assert value.get_input_embeddings().sparse and not frozen.get_input_embeddings().sparse


def count_mm(monkeypatch) -> list[int]:
    """Counts calls of ``torch.mm`` (the few-rows head's product; ``F.linear`` does not call it)."""
    calls, mm = [], torch.mm
    monkeypatch.setattr(torch, "mm", lambda *args, **kwargs: calls.append(1) or mm(*args, **kwargs))
    return calls


@pytest.mark.parametrize("bias", [False, True])
def test_the_few_rows_head_computes_what_linear_computes_and_only_where_it_is_faster(monkeypatch, bias):
    torch.manual_seed(0)
    head = torch.nn.Linear(48, kernels.LARGE_VOCABULARY, bias=bias)
    plain = torch.nn.Linear(48, kernels.LARGE_VOCABULARY, bias=bias)
    plain.load_state_dict(head.state_dict())
    model = torch.nn.Module()
    model.get_output_embeddings = lambda: head
    assert few_rows_cpu_lm_head(model)
    assert not few_rows_cpu_lm_head(model)  # applied once
    assert isinstance(head, torch.nn.Linear) and head.state_dict().keys() == plain.state_dict().keys()
    calls = count_mm(monkeypatch)
    for shape in [(1, 48), (5, 1, 48), (4, 16, 48), (2, 3, 1, 48)]:  # up to FEW_ROWS = 64 rows
        x = torch.randn(shape)
        with torch.inference_mode():
            out, expected = head(x), plain(x)
        assert out.shape == expected.shape and out.is_contiguous()
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert len(calls) == 4
    x = torch.randn(kernels.FEW_ROWS + 1, 48)
    with torch.no_grad():
        torch.testing.assert_close(head(x), plain(x), rtol=0, atol=0)  # too many rows: F.linear itself
        with torch.autocast("cpu", dtype=torch.bfloat16):
            head(x[:4])  # autocast: F.linear
        head.double()(x[:4].double())  # float64: F.linear
    x = torch.randn(4, 48, requires_grad=True)
    torch.testing.assert_close(head.float()(x), plain(x), rtol=0, atol=0)  # autograd: F.linear, training untouched
    assert len(calls) == 4


def test_a_small_vocabulary_keeps_linear(tiny_tokenizer, monkeypatch):
    model = tiny(tiny_tokenizer, "llama").float()
    assert model.config.vocab_size < kernels.LARGE_VOCABULARY
    assert few_rows_cpu_lm_head(model)
    calls = count_mm(monkeypatch)
    with torch.inference_mode():
        model(input_ids=torch.randint(5, 200, (2, 4)))
    assert not calls
    assert not few_rows_cpu_lm_head(torch.nn.Linear(2, 2))  # no output embedding to swap


def test_sampling_with_the_few_rows_head_draws_the_same_tokens():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=kernels.LARGE_VOCABULARY, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    prompts = torch.randint(2, kernels.LARGE_VOCABULARY, (6, 5))
    mask = torch.ones_like(prompts)
    mask[0, :2] = 0
    responses = {}
    for swapped in (False, True):
        if swapped:
            assert few_rows_cpu_lm_head(model)
        sampler = CachedSampler(model, eos_token_id=1, pad_token_id=0)
        responses[swapped] = sampler.generate(prompts, mask, 12, 0.9, torch.Generator().manual_seed(3))
    assert torch.equal(responses[True], responses[False])


def test_generate_responses_uses_the_few_rows_head_and_generates_the_same(tiny_tokenizer, monkeypatch):
    from instructrl.eval.generate import generate_responses

    monkeypatch.setattr(kernels, "LARGE_VOCABULARY", 1)  # the tiny vocabulary counts as large here
    prompts = ["the cat", "a dog sat on", "x"]
    calls = count_mm(monkeypatch)
    swapped = generate_responses(tiny(tiny_tokenizer, "llama").float(), tiny_tokenizer, prompts, 8, temperature=0.7)
    assert calls  # the prefill's and every decoding step's logits came from (W · hᵀ)ᵀ
    calls.clear()
    monkeypatch.setattr(kernels._FewRowsLinear, "forward", torch.nn.Linear.forward)  # the head as it was
    plain = generate_responses(tiny(tiny_tokenizer, "llama").float(), tiny_tokenizer, prompts, 8, temperature=0.7)
    assert not calls
    assert plain == swapped
