"""The PPO hot path's optimizations against the straightforward computations they replace, and bf16 mixed
precision against fp32, on tiny in-process models."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from instructrl.fast import head
from instructrl.fast.head import FusedHeadLogProbs, fused_lm_head
from instructrl.fast.overlap import OverlapRunner, SequentialRunner
from instructrl.fast.sampler import CachedSampler, sample_inverse_cdf
from instructrl.models.causal_lm import ModelSpec, build_causal_lm
from instructrl.models.logprobs import FullLogits
from instructrl.rollout import HFGenerateBackend, sample_multinomial
from instructrl.stages import ppo
from instructrl.stages.ppo_build import build_run
from instructrl.stages.ppo_rollout import left_pad, score_rollout
from instructrl.stages.ppo_trainers import reduce_side_stats
from test_overlap import minibatch_step, torch_threads
from test_ppo import env, make_cfg, scored_rollout  # noqa: F401  (its module-scoped fixture is reused)

FAST, REFERENCE = FusedHeadLogProbs(), FullLogits()
"""The two sides of the log-prob seam: through the fused LM head, and from the model's full logits."""


def params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_head_logprobs_and_gradients_match_straightforward_path(tiny_tokenizer, arch, temperature):
    torch.manual_seed(0)
    spec = ModelSpec(arch=arch, d_model=32, n_layers=2, n_heads=2, max_seq_len=64)
    model = build_causal_lm(spec, tiny_tokenizer).double().eval()
    assert fused_lm_head(model) is not None  # the fused path is the one under test
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

    got, got_grads = value_and_grads(FAST.responses)
    expected, expected_grads = value_and_grads(REFERENCE.responses)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    assert got_grads.keys() == expected_grads.keys()
    for name in expected_grads:
        torch.testing.assert_close(got_grads[name], expected_grads[name], rtol=1e-9, atol=1e-10, msg=name)

    with torch.inference_mode():
        logprobs, entropy = FAST.responses(model, input_ids, attention_mask, response, temperature, True)
        want_logprobs, want_entropy = REFERENCE.responses(
            model, input_ids, attention_mask, response, temperature, True
        )
        torch.testing.assert_close(want_logprobs, expected, rtol=0, atol=0)
        torch.testing.assert_close(logprobs, expected, rtol=0, atol=1e-10)
        torch.testing.assert_close(entropy, want_entropy, rtol=0, atol=1e-10)


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

    assert fused_lm_head(model) is not None
    got, got_grads = value_and_grads(lambda: FAST.texts(model, windows))
    expected, expected_grads = value_and_grads(lambda: REFERENCE.texts(model, windows))
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
    assert fused_lm_head(wrapper) is not None  # found under .module
    expected = FAST.responses(model, ids, mask, ids[:, -3:], 0.9)
    torch.testing.assert_close(FAST.responses(wrapper, ids, mask, ids[:, -3:], 0.9), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(FAST.texts(wrapper, ids), FAST.texts(model, ids))
    assert wrapper.calls == 2


def test_unknown_architectures_take_the_straightforward_path(tiny_tokenizer, monkeypatch):
    model = build_causal_lm(ModelSpec(d_model=32, n_layers=1, n_heads=2), tiny_tokenizer)
    monkeypatch.setattr(head, "FUSED_HEAD_MODEL_TYPES", frozenset())
    assert fused_lm_head(model) is None
    ids = torch.randint(5, 200, (2, 5))
    mask = torch.ones_like(ids)
    torch.testing.assert_close(
        FAST.responses(model, ids, mask, ids[:, -2:], 1.0), REFERENCE.responses(model, ids, mask, ids[:, -2:], 1.0)
    )
    torch.testing.assert_close(FAST.texts(model, ids), REFERENCE.texts(model, ids))


def test_rollout_and_update_with_fused_head_equal_the_straightforward_ones(env, tmp_path):  # noqa: F811
    """A whole PPO step with the run's log-prob seam (the fused head) and with the reference seam put in its place:
    rollout tensors and the parameters after one optimizer step agree."""
    cfg = make_cfg(env, tmp_path, "ptx.coef=0", "generation.temperature=0.8")
    results = {}
    for path in ("fused", "straightforward"):
        torch.manual_seed(0)
        run = build_run(cfg)
        assert type(run.models.logprobs) is FusedHeadLogProbs and run.actor.logprobs is run.models.logprobs
        if path == "straightforward":  # the rollout's and the training step's log-probs
            run.models.logprobs = run.actor.logprobs = FullLogits()
        try:
            rollout = scored_rollout(run)
            stats = minibatch_step(run, rollout.select(slice(0, cfg.minibatch_size)))
        finally:
            run.close()
        results[path] = (rollout, stats, params(run.models.policy))
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

    from instructrl.fast import sampler as fast_sampler
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
    for module in (sampler, fast_sampler):
        monkeypatch.setattr(module, "sampling_mode", lambda device_type: torch.inference_mode())
    theirs, per_token = sample()
    assert per_token > 1  # without it: once per forward, i.e. per generated token
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cached_sampler_draws_the_same_tokens_with_the_halves_sampled_at_once(tiny_tokenizer, precision):
    """With a concurrent runner the two halves of the batch are sampled on two threads: same tokens (every row
    has its own uniforms), rows that finish at different steps included, and the caller's autocast holds in
    the worker threads too."""
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
            tokens = CachedSampler(model, eos, pad, runner=runner).generate(query, query_mask, 12, 0.9, generator)
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


@pytest.mark.parametrize("backend", ["cached", "hf"])
def test_the_cached_sampler_gets_the_runs_runner_and_the_hf_backend_none(env, tmp_path, backend):  # noqa: F811
    """``make_sampler`` hands the run's runner to our sampler (which samples the halves of a batch at once with a
    concurrent one); ``generate`` takes no runner. ``build_run`` passes its own runner
    (test_overlap.py::test_ppo_ptx_with_overlapped_models_equals_the_sequential_run)."""
    from instructrl.models.causal_lm import load_causal_lm, load_tokenizer
    from instructrl.stages.ppo_build import make_sampler
    from instructrl.utils.distributed import get_runtime

    cfg = make_cfg(env, tmp_path, f"generation.backend={backend}")
    tok = load_tokenizer(env["policy"])
    policy = load_causal_lm(env["policy"], tok).eval()
    runner = OverlapRunner(2)
    try:
        sampler = make_sampler(cfg, policy, tok, get_runtime("cpu"), runner)
    finally:
        runner.close()
    assert sampler.model is policy
    if backend == "cached":
        assert type(sampler) is CachedSampler and sampler.runner is runner
        assert make_sampler(cfg, policy, tok, get_runtime("cpu")).runner is None  # no runner: one after the other
    else:
        assert type(sampler) is HFGenerateBackend and not hasattr(sampler, "runner")


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
    run32 = build_run(cfg32)
    run16 = build_run(cfg16)
    try:
        run16.models.policy.load_state_dict(run32.models.policy.state_dict())
        run16.models.value_model.load_state_dict(run32.models.value_model.state_dict())
        rollout = scored_rollout(run32)

        # the rollout's forwards, re-run in bf16 on the same responses
        assert run32.models.autocast_dtype is None and run16.models.autocast_dtype == torch.bfloat16
        with run16.models.precision():
            scored16 = score_rollout(run16.models, rollout.query, rollout.query_mask, rollout.response,
                                     rollout.response_mask, rollout.has_eos, cfg16.generation.temperature)  # fmt: skip
        mask = rollout.response_mask
        for field in ("logprobs", "ref_logprobs"):
            diff = (getattr(scored16, field) - getattr(rollout, field)).abs()[mask]
            assert diff.max() < BF16_LOGPROB_TOLERANCE, (field, diff.max())
        assert (scored16.values - rollout.values).abs()[mask].max() < BF16_LOGPROB_TOLERANCE

        minibatch = rollout.select(slice(0, cfg32.minibatch_size))
        stats32 = minibatch_step(run32, minibatch)
        stats16 = minibatch_step(run16, minibatch)
    finally:
        run32.close()
        run16.close()
    for key in ("loss/policy", "loss/value", "loss/ptx"):
        assert abs(stats16[key] - stats32[key]) <= BF16_LOSS_TOLERANCE * (abs(stats32[key]) + 0.01), key
    assert stats16["policy/grad_norm"] == pytest.approx(stats32["policy/grad_norm"], rel=0.1)


def test_bf16_rollout_has_ratio_one_on_its_first_minibatch(env, tmp_path, monkeypatch):  # noqa: F811
    run = build_run(make_cfg(env, tmp_path, "precision=bf16", "ptx.coef=0"))
    per_minibatch = []

    def recording(sides, runtime):
        per_minibatch.append(reduce_side_stats(sides, runtime))
        return per_minibatch[-1]

    monkeypatch.setattr(ppo, "reduce_side_stats", recording)
    try:
        ppo.train_iteration(run)
    finally:
        run.close()
    assert len(per_minibatch) == run.cfg.ppo_epochs * run.cfg.batch_size // run.cfg.minibatch_size
    assert abs(per_minibatch[0]["policy/ratio_max"] - 1.0) < 1e-2


def plain_autocast_logprobs(model, input_ids, attention_mask, response, temperature):
    """log softmax(model(...).logits / T) gathered at the response, under bf16 autocast, no fused head, no cache."""
    from instructrl.models.reward import position_ids_from_mask

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=input_ids, attention_mask=attention_mask,
                       position_ids=position_ids_from_mask(attention_mask)).logits  # fmt: skip
    logits = logits[:, -response.shape[1] - 1 : -1].float() / temperature  # (B, R, V)
    return torch.log_softmax(logits, dim=-1).gather(-1, response[..., None])[..., 0]


def test_bf16_ppo_logprobs_in_iteration_two_are_those_of_the_current_policy(env, tmp_path, monkeypatch):  # noqa: F811
    """After a bf16 iteration's fused-AdamW steps, the next iteration's rollout and training log-probs (fused head)
    equal a plain autocast forward of the policy as it is at that moment, within bf16 rounding."""
    cfg = make_cfg(env, tmp_path, "precision=bf16", "ptx.coef=0", "lr=0.01", "warmup_iterations=0",
                   "generation.temperature=0.8")  # fmt: skip
    run = build_run(cfg)
    seam = run.models.logprobs
    assert type(seam) is FusedHeadLogProbs and run.actor.logprobs is seam  # the rollout's and training's seam
    checked = {"rollout": [], "training": []}
    original = seam.responses

    def checking(model, input_ids, attention_mask, response, temperature, with_entropy=False):
        out = original(model, input_ids, attention_mask, response, temperature, with_entropy)
        if run.iteration == 1 and getattr(model, "module", model) is run.models.policy:
            kind = "training" if torch.is_grad_enabled() else "rollout"
            got = (out[0] if with_entropy else out).detach()
            want = plain_autocast_logprobs(run.models.policy, input_ids, attention_mask, response, temperature)
            checked[kind].append((got - want).abs().max().item())
        return out

    monkeypatch.setattr(seam, "responses", checking)
    try:
        ppo.train_iteration(run)
        ppo.train_iteration(run)
    finally:
        run.close()
    assert checked["rollout"] and checked["training"]
    assert max(checked["rollout"]) < 2e-2, checked["rollout"]
    assert checked["training"][0] < 2e-2, checked["training"]  # the first minibatch of iteration 2


@pytest.mark.parametrize("backend", [CachedSampler, HFGenerateBackend])
def test_bf16_sampling_after_fused_adamw_steps_samples_from_the_current_weights(tiny_tokenizer, backend):
    """Autocast's cast cache (the sampler's bf16 weight copies) never outlives a sampling call: after fused-AdamW
    steps, which do not bump version counters, the sampler draws what a fresh copy of the stepped model draws."""
    import copy

    torch.manual_seed(0)
    model = build_causal_lm(ModelSpec(d_model=32, n_layers=2, n_heads=2, max_seq_len=64), tiny_tokenizer).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    query, mask = left_pad([[5, 6, 7], [8, 9]], tiny_tokenizer.pad_token_id)
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id

    def sample(m):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return backend(m, eos, pad).generate(query, mask, 8, 1.0, torch.Generator().manual_seed(3))

    sample(model)  # a first call under autocast, as the previous rollout was
    for _ in range(3):
        optimizer.zero_grad()
        model(input_ids=query, attention_mask=mask, labels=query).loss.backward()
        optimizer.step()
        assert torch.equal(sample(model), sample(copy.deepcopy(model)))
