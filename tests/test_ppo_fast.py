"""The PPO hot path's optimizations against the straightforward computations they replace, and bf16 mixed
precision against fp32, on tiny in-process models."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from instructrl.models.causal_lm import ModelSpec, build_causal_lm
from instructrl.rl import logprobs_from_logits
from instructrl.rollout import CachedSampler, HFGenerateBackend, sample_inverse_cdf, sample_multinomial
from instructrl.stages import ppo_parts
from instructrl.stages.ppo_parts import (
    compute_advantages,
    left_pad,
    make_rollout,
    response_logits,
    response_logprobs,
)
from instructrl.stages.ppo_session import build_session, collect_rollout, minibatch_step
from test_overlap import torch_threads
from test_ppo import env, make_cfg  # noqa: F401  (its module-scoped fixture is reused)


def straightforward_logprobs(model, input_ids, attention_mask, response, temperature):
    """The reference: full-vocabulary logits at the response positions, then log-softmax + gather."""
    logits = response_logits(model, input_ids, attention_mask, response.shape[1])  # (B, R, V)
    return logprobs_from_logits(logits, response, temperature)


def params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_head_logprobs_and_gradients_match_straightforward_path(tiny_tokenizer, arch, temperature):
    torch.manual_seed(0)
    spec = ModelSpec(arch=arch, d_model=32, n_layers=2, n_heads=2, max_seq_len=64)
    model = build_causal_lm(spec, tiny_tokenizer).double().eval()
    assert ppo_parts.fused_lm_head(model) is not None  # the fused path is the one under test
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(5, 200, (n,), generator=g).tolist() for n in (3, 7, 5)]
    query, query_mask = left_pad(prompts, tiny_tokenizer.pad_token_id)  # left padding: position ids matter
    response = torch.randint(5, 200, (3, 6), generator=g)
    response_mask = torch.ones_like(response)
    input_ids = torch.cat([query, response], dim=1)
    attention_mask = torch.cat([query_mask, response_mask], dim=1)
    upstream = torch.randn(3, 6, generator=g, dtype=torch.float64)

    def value_and_grads(fn):
        model.zero_grad(set_to_none=True)
        out = fn(model, input_ids, attention_mask, response, temperature)
        (out * upstream).sum().backward()
        return out.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    got, got_grads = value_and_grads(response_logprobs)
    expected, expected_grads = value_and_grads(straightforward_logprobs)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    assert got_grads.keys() == expected_grads.keys()
    for name in expected_grads:
        torch.testing.assert_close(got_grads[name], expected_grads[name], rtol=1e-9, atol=1e-10, msg=name)

    with torch.inference_mode():
        logprobs, entropy = response_logprobs(model, input_ids, attention_mask, response, temperature, True)
        logits = response_logits(model, input_ids, attention_mask, response.shape[1])
        torch.testing.assert_close(logprobs, expected, rtol=0, atol=1e-10)
        torch.testing.assert_close(entropy, ppo_parts.entropy_from_logits(logits, temperature), rtol=0, atol=1e-10)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_fused_ptx_logprobs_and_gradients_match_the_full_logits(tiny_tokenizer, arch):
    torch.manual_seed(0)
    model = build_causal_lm(ModelSpec(arch=arch, d_model=32, n_layers=2, n_heads=2), tiny_tokenizer).double()
    windows = torch.randint(5, 200, (3, 9), generator=torch.Generator().manual_seed(2))

    def value_and_grads(fn):
        model.zero_grad(set_to_none=True)
        out = fn()
        out.sum().backward()
        return out.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    def full_logits():
        logits = model(input_ids=windows, use_cache=False).logits[:, :-1]
        return ppo_parts.logprobs_from_logits(logits, windows[:, 1:], 1.0)

    got, got_grads = value_and_grads(lambda: ppo_parts.ptx_logprobs(model, windows))
    expected, expected_grads = value_and_grads(full_logits)
    assert got.shape == (3, 8)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    assert got_grads.keys() == expected_grads.keys()
    for name in expected_grads:
        torch.testing.assert_close(got_grads[name], expected_grads[name], rtol=1e-9, atol=1e-10, msg=name)


def test_a_wrapped_model_is_called_whole_and_gives_the_same_logprobs(tiny_tokenizer):
    """DDP (``.module``) or PEFT wrappers must see the forward: they are called whole, the plain model skips
    its LM head by going through its base model."""
    torch.manual_seed(0)
    model = build_causal_lm(ModelSpec(arch="llama", d_model=32, n_layers=1, n_heads=2), tiny_tokenizer).double()

    class Wrapper(torch.nn.Module):  # what DDP looks like to the code: the model under .module
        def __init__(self, module):
            super().__init__()
            self.module, self.calls = module, 0

        def forward(self, **kwargs):
            self.calls += 1
            return self.module(**kwargs)

    wrapper = Wrapper(model)
    ids = torch.randint(5, 200, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    expected = response_logprobs(model, ids, mask, ids[:, -3:], 0.9)
    torch.testing.assert_close(response_logprobs(wrapper, ids, mask, ids[:, -3:], 0.9), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(ppo_parts.ptx_logprobs(wrapper, ids), ppo_parts.ptx_logprobs(model, ids))
    assert wrapper.calls == 2


def test_unknown_architectures_take_the_straightforward_path(tiny_tokenizer, monkeypatch):
    model = build_causal_lm(ModelSpec(d_model=32, n_layers=1, n_heads=2), tiny_tokenizer)
    monkeypatch.setattr(ppo_parts, "FUSED_HEAD_MODEL_TYPES", frozenset())
    assert ppo_parts.fused_lm_head(model) is None
    ids = torch.randint(5, 200, (2, 5))
    mask = torch.ones_like(ids)
    torch.testing.assert_close(
        response_logprobs(model, ids, mask, ids[:, -2:], 1.0),
        straightforward_logprobs(model, ids, mask, ids[:, -2:], 1.0),
    )


def test_rollout_and_update_with_fused_head_equal_the_straightforward_ones(env, tmp_path, monkeypatch):  # noqa: F811
    """A whole PPO step: rollout tensors and the parameters after one optimizer step agree."""
    cfg = make_cfg(env, tmp_path, "ptx.coef=0", "generation.temperature=0.8")
    results = {}
    for path in ("fused", "straightforward"):
        if path == "straightforward":
            monkeypatch.setattr(ppo_parts, "FUSED_HEAD_MODEL_TYPES", frozenset())
        torch.manual_seed(0)
        session = build_session(cfg)
        rollout, _ = collect_rollout(session)
        rollout = compute_advantages(rollout, session.kl_controller.value)
        stats = minibatch_step(session, rollout.select(slice(0, cfg.minibatch_size)))
        results[path] = (rollout, stats, params(session.policy))
    (a, stats_a, policy_a), (b, stats_b, policy_b) = results["fused"], results["straightforward"]
    torch.testing.assert_close(a.response, b.response, rtol=0, atol=0)
    for field in ("logprobs", "ref_logprobs", "entropy", "values", "scores", "advantages"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=1e-5, atol=1e-5, msg=field)
    for key in ("loss/policy", "loss/value", "policy/grad_norm"):
        assert stats_a[key] == pytest.approx(stats_b[key], rel=1e-4, abs=1e-6), key
    for name in policy_a:
        torch.testing.assert_close(policy_a[name], policy_b[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_cached_sampler_with_multinomial_draws_returns_exactly_what_generate_returns(
    tiny_tokenizer, arch, temperature
):
    """Same generator state -> the same tokens, PAD after EOS, and the same generator state afterwards."""
    torch.manual_seed(0)
    model = build_causal_lm(ModelSpec(arch=arch, d_model=32, n_layers=2, n_heads=2, max_seq_len=64), tiny_tokenizer)
    model.eval()
    pad = tiny_tokenizer.pad_token_id
    with torch.no_grad():  # sharpen the (tied) unembedding: a peaked distribution with a few frequent tokens
        model.get_output_embeddings().weight.mul_(20.0)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(5, 200, (n,), generator=g).tolist() for n in (2, 6, 4, 6, 1)]
    query, query_mask = left_pad(prompts, pad)
    # the stop token: a frequently sampled one, so that rows finish at different steps
    sampled = HFGenerateBackend(model, tiny_tokenizer.eos_token_id, pad).generate(query, query_mask, 12, 1.0, g)
    eos = int(torch.mode(sampled.flatten()).values)
    for seed in range(4):
        a, b = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        ours = CachedSampler(model, eos, pad, draw=sample_multinomial).generate(query, query_mask, 12, temperature, a)
        theirs = HFGenerateBackend(model, eos, pad).generate(query, query_mask, 12, temperature, b)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        assert torch.equal(a.get_state(), b.get_state())
    assert (ours == eos).any(), "the test should exercise EOS"


@pytest.mark.parametrize("backend", [CachedSampler, HFGenerateBackend])
def test_bf16_sampling_casts_each_weight_once_and_samples_what_inference_mode_samples(
    tiny_tokenizer, backend, monkeypatch
):
    """Under autocast, sampling leaves inference mode so that autocast keeps its weight casts for the whole
    loop: the LM head's weight is cast once instead of once per token, the tokens are the same, and the
    enclosing inference mode and an empty cast cache are back afterwards."""
    from torch.profiler import profile

    from instructrl.rollout import sampler

    torch.manual_seed(0)
    model = build_causal_lm(ModelSpec(arch="llama", d_model=32, n_layers=2, n_heads=2, max_seq_len=64), tiny_tokenizer)
    model.eval()
    head_shape = list(model.get_output_embeddings().weight.shape)
    pad = tiny_tokenizer.pad_token_id
    query, query_mask = left_pad([[5, 6, 7], [8, 9]], pad)
    eos = tiny_tokenizer.eos_token_id

    def sample() -> tuple[torch.Tensor, int]:
        generator = torch.Generator().manual_seed(1)
        with profile(record_shapes=True) as prof, torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            tokens = backend(model, eos, pad).generate(query, query_mask, 6, 1.0, generator)
            assert torch.is_inference_mode_enabled()
        casts = [e for e in prof.events() if e.name == "aten::_to_copy" and e.input_shapes[:1] == [head_shape]]
        return tokens, len(casts)

    ours, casts = sample()
    assert casts == 1
    monkeypatch.setattr(sampler, "sampling_mode", lambda device_type: torch.inference_mode())
    theirs, per_token = sample()
    assert per_token > 1  # without it: once per forward, i.e. per generated token
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cached_sampler_draws_the_same_tokens_with_the_halves_sampled_at_once(tiny_tokenizer, precision):
    """With a concurrent runner the two halves of the batch are sampled on two threads: same tokens (every row
    has its own uniforms), rows that finish at different steps included, and the caller's autocast holds in
    the worker threads too."""
    from instructrl.utils.overlap import OverlapRunner, SequentialRunner

    torch.manual_seed(0)
    model = build_causal_lm(ModelSpec(arch="llama", d_model=32, n_layers=2, n_heads=2, max_seq_len=64), tiny_tokenizer)
    model.eval()
    with torch.no_grad():  # a peaked distribution: a frequent token to stop on
        model.get_output_embeddings().weight.mul_(20.0)
    pad = tiny_tokenizer.pad_token_id
    g = torch.Generator().manual_seed(3)
    query, query_mask = left_pad([torch.randint(5, 200, (n,), generator=g).tolist() for n in (2, 6, 4, 6, 1)], pad)
    probe = CachedSampler(model, tiny_tokenizer.eos_token_id, pad).generate(query, query_mask, 12, 1.0, g)
    eos = int(torch.mode(probe.flatten()).values)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    seen: list[tuple[str, bool]] = []  # (thread, autocast on) at every forward
    model.register_forward_pre_hook(
        lambda *_: seen.append((threading.current_thread().name, torch.is_autocast_enabled("cpu")))
    )

    def sample(runner) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(7)
        with torch.inference_mode(), autocast:
            tokens = CachedSampler(model, eos, pad).generate(query, query_mask, 12, 0.9, generator, runner=runner)
        return tokens, generator.get_state()

    runner = OverlapRunner(2)
    try:
        with torch_threads(2):
            (one, state_one), (halves, state_halves) = sample(SequentialRunner()), sample(runner)
    finally:
        runner.close()
    torch.testing.assert_close(halves, one, rtol=0, atol=0)
    assert torch.equal(state_one, state_halves)  # the same uniforms were drawn, (steps × rows) up front
    in_workers = [autocast_on for thread, autocast_on in seen if thread.startswith("instructrl-overlap")]
    assert len({thread for thread, _ in seen}) == 3  # the caller's thread and two workers
    assert in_workers and all(on == (precision == "bf16") for on in in_workers)
    lengths = (one != pad).sum(dim=1)
    assert lengths.min() < lengths.max(), "rows should finish at different steps"


def test_rollout_passes_its_runner_only_to_backends_that_take_one(env):  # noqa: F811
    from instructrl.models.causal_lm import load_causal_lm, load_tokenizer
    from instructrl.models.reward import load_reward_model
    from instructrl.stages.ppo_parts import RolloutSettings
    from instructrl.utils.overlap import SequentialRunner

    tok = load_tokenizer(env["policy"])
    policy = load_causal_lm(env["policy"], tok).eval()
    value = load_reward_model(env["rm"]).eval()
    query, query_mask = left_pad([[5, 6, 7], [8, 9]], tok.pad_token_id)
    calls = []

    class Recording:
        def __init__(self, takes_runner: bool):
            self.takes_runner = takes_runner

        def generate(self, prompt_ids, attention_mask, max_new_tokens, temperature, generator=None, **options):
            calls.append(options)
            return torch.full((prompt_ids.shape[0], max_new_tokens), tok.eos_token_id)

        def sync_weights(self, model):
            pass

    runner = SequentialRunner()
    settings = RolloutSettings(3, 1.0, tok.eos_token_id, tok.pad_token_id)
    score = lambda q, qm, r, rm: torch.zeros(q.shape[0])  # noqa: E731
    for takes in (True, False):
        make_rollout(policy, policy, value, Recording(takes), score, query, query_mask, settings, None, runner)
    assert calls == [{"runner": runner}, {}]


def test_inverse_cdf_draw_matches_a_python_loop_and_never_draws_zero_probability_tokens():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(64, 9, generator=g), dim=-1)
    probs[:, 3] = 0.0  # a token that must never be drawn
    state = g.get_state()
    got = sample_inverse_cdf(probs, g)
    g.set_state(state)
    u = torch.rand(64, 1, generator=g, dtype=torch.float64)[:, 0].tolist()
    for row in range(64):
        p = probs[row].double().tolist()
        x, total, expected = u[row] * sum(p), 0.0, None
        for v, pv in enumerate(p):
            total += pv
            if x < total:
                expected = v
                break
        assert got[row].item() == expected
    assert (got != 3).all()


def test_inverse_cdf_draw_frequencies_match_the_distribution():
    g = torch.Generator().manual_seed(1)
    probs = torch.tensor([[0.5, 0.0, 0.2, 0.25, 0.05]]).expand(40000, 5)
    counts = torch.bincount(sample_inverse_cdf(probs, g), minlength=5).double() / 40000
    torch.testing.assert_close(counts, probs[0].double(), rtol=0, atol=0.01)  # 4 s.e. ≈ 0.01 at p = 0.5


# --------------------------------------------------------------------------- bf16 mixed precision

BF16_LOGPROB_TOLERANCE = 0.05
"""Nats: largest |log π_bf16 − log π_fp32| over response tokens allowed in the tests below."""
BF16_LOSS_TOLERANCE = 0.05
"""Relative difference (of |fp32 loss| + 0.01) allowed between bf16 and fp32 PPO losses on the same batch."""


def test_bf16_mixed_precision_losses_track_fp32(env, tmp_path):  # noqa: F811
    """On the same rollout, the bf16 forwards' log-probs, values and PPO losses stay near the fp32 ones, and the
    first minibatch of a bf16 rollout still has ratio 1 (rollout and training share numerics)."""
    cfg32 = make_cfg(env, tmp_path / "fp32", "ptx.coef=0.5", "generation.temperature=0.8")
    cfg16 = dataclasses.replace(
        cfg32, output_dir=str(tmp_path / "bf16"), run=dataclasses.replace(cfg32.run, precision="bf16")
    )
    torch.manual_seed(0)
    session32 = build_session(cfg32)
    session16 = build_session(cfg16)
    session16.policy.load_state_dict(session32.policy.state_dict())
    session16.value_model.load_state_dict(session32.value_model.state_dict())
    rollout, _ = collect_rollout(session32)
    rollout = compute_advantages(rollout, session32.kl_controller.value)

    # the rollout's forwards, re-run in bf16 on the same responses
    settings16 = session16.rollout_settings()
    assert settings16.autocast_dtype == torch.bfloat16

    class Replay:
        def generate(self, prompt_ids, attention_mask, max_new_tokens, temperature, generator=None):
            width = rollout.response.shape[1]
            pad = torch.full((prompt_ids.shape[0], max_new_tokens - width), settings16.pad_token_id)
            return torch.cat([rollout.response, pad], dim=1)

    scored16 = make_rollout(session16.policy, session16.ref_policy, session16.value_model, Replay(),
                            session16.score_fn, rollout.query, rollout.query_mask, settings16)  # fmt: skip
    mask = rollout.response_mask
    for field in ("logprobs", "ref_logprobs"):
        diff = (getattr(scored16, field) - getattr(rollout, field)).abs()[mask]
        assert diff.max() < BF16_LOGPROB_TOLERANCE, (field, diff.max())
    assert (scored16.values - rollout.values).abs()[mask].max() < BF16_LOGPROB_TOLERANCE

    minibatch = rollout.select(slice(0, cfg32.minibatch_size))
    stats32 = minibatch_step(session32, minibatch)
    stats16 = minibatch_step(session16, minibatch)
    for key in ("loss/policy", "loss/value", "loss/ptx"):
        assert abs(stats16[key] - stats32[key]) <= BF16_LOSS_TOLERANCE * (abs(stats32[key]) + 0.01), key
    assert stats16["policy/grad_norm"] == pytest.approx(stats32["policy/grad_norm"], rel=0.1)


def test_bf16_rollout_has_ratio_one_on_its_first_minibatch(env, tmp_path):  # noqa: F811
    from instructrl.stages.ppo_session import ppo_update

    session = build_session(make_cfg(env, tmp_path, "precision=bf16", "ptx.coef=0"))
    rollout, _ = collect_rollout(session)
    first = ppo_update(session, compute_advantages(rollout, session.kl_controller.value))[0]
    assert abs(first["policy/ratio_max"] - 1.0) < 1e-2
