"""Stage 3 (PPO / PPO-ptx): masking, temperature, ptx gradient, frozen models, accumulation, β control, bandit,
exact resume and the CLI, all on tiny in-process models."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from instructrl.config import ConfigError, load_config
from instructrl.fast.head import FusedHeadLogProbs
from instructrl.models.causal_lm import ModelSpec, build_causal_lm, load_causal_lm, load_tokenizer
from instructrl.models.logprobs import FullLogits
from instructrl.models.reward import last_token_scores, load_reward_model, reward_model_from_causal_lm
from instructrl.rollout import HFGenerateBackend, truncate_after_eos
from instructrl.stages import ppo, ppo_build, ppo_data
from instructrl.stages.ppo import train_iteration
from instructrl.stages.ppo_build import PPORun, build_run
from instructrl.stages.ppo_data import PromptSampler
from instructrl.stages.ppo_rollout import (
    PPOModels,
    Rollout,
    compute_advantages,
    gather_rollout,
    left_pad,
    sample_responses,
    score_rollout,
)
from instructrl.stages.ppo_trainers import PolicyEMA, reduce_side_stats

PROMPTS = [
    "Instruction: what is 2 plus 3 ?\nResponse:",
    "the capital of norland is",
    "Q: what is 1 plus 1 ?\nA:",
    "once upon a time",
]
TEXTS = ["the capital of norland is vesk .", "once upon a time a small cat sat on a mat and sang ."] * 20


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_lm_dir, tiny_tokenizer) -> dict[str, Path]:
    """A tiny reward model, a second tiny LM far from the policy (a reference with large KL), prompts and texts."""
    root = tmp_path_factory.mktemp("ppo_env")
    torch.manual_seed(0)
    rm = reward_model_from_causal_lm(tiny_lm_dir, tiny_tokenizer.pad_token_id)
    rm.save_pretrained(root / "rm")
    tiny_tokenizer.save_pretrained(root / "rm")
    torch.manual_seed(1)
    other = build_causal_lm(ModelSpec(d_model=32, n_layers=2, n_heads=2, max_seq_len=128), tiny_tokenizer)
    with torch.no_grad():  # sharpen its (tied) unembedding: far from the near-uniform policy, KL of several nats
        other.get_output_embeddings().weight.mul_(30.0)
    other.save_pretrained(root / "other_lm")
    tiny_tokenizer.save_pretrained(root / "other_lm")
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    (root / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return {"policy": tiny_lm_dir, **{k: root / k for k in ("rm", "other_lm")}, "root": root,
            "prompts": root / "prompts.jsonl", "texts": root / "texts.jsonl"}  # fmt: skip


def make_cfg(env, out: Path, *overrides: str) -> ppo.Config:
    base = [
        f"output_dir={out}",
        f"policy={env['policy']}",
        f"reward_model={env['rm']}",
        f"prompts={env['prompts']}",
        f"ptx.data={env['texts']}",
        "iterations=2",
        "batch_size=8",
        "minibatch_size=4",
        "micro_batch_size=2",
        "generation.max_new_tokens=6",
        "ptx.seq_len=16",
        "ptx.batch_ratio=1",
        "sample_every=0",
        "resume=false",
        "device=cpu",
    ]
    return load_config(ppo.Config, overrides=[*base, *overrides])


class ScriptedBackend:
    """A generation backend that returns fixed responses (for exact masking checks)."""

    def __init__(self, responses: torch.Tensor):
        self.responses = responses

    def generate(self, prompt_ids, attention_mask, max_new_tokens, temperature, generator=None):
        return self.responses[: prompt_ids.shape[0], :max_new_tokens]

    def sync_weights(self, model):
        pass


@pytest.fixture
def new_run():
    """``build_run``, with the runs' worker threads (``overlap_models``) stopped after the test."""
    runs: list[PPORun] = []

    def build(cfg: ppo.Config, **kwargs) -> PPORun:
        runs.append(build_run(cfg, **kwargs))
        return runs[-1]

    yield build
    for run in runs:
        run.close()


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    def dense(p: torch.Tensor) -> torch.Tensor:
        if p.grad is None:
            return torch.zeros_like(p)
        return p.grad.to_dense() if p.grad.is_sparse else p.grad.clone()

    return {k: dense(p) for k, p in model.named_parameters()}


def policy_and_value_grads(run: PPORun) -> dict[str, torch.Tensor]:
    return {**grads(run.models.policy), **{"v." + k: g for k, g in grads(run.models.value_model).items()}}


def assert_grads_close(a, b, rtol=1e-4, atol=1e-6):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=f"gradient of {name} differs")


def without_optimizer_steps(monkeypatch, run: PPORun) -> None:
    """The trainers' ``train_step`` zeroes, accumulates, clips and reports as usual but leaves the weights alone:
    its gradients stay in ``.grad`` (the next ``zero_grad`` is at the start of the next step)."""
    for optimizer in (run.actor.optimizer, run.critic.optimizer):
        monkeypatch.setattr(optimizer, "step", lambda *args, **kwargs: None)


def scored_rollout(run: PPORun) -> Rollout:
    """Steps 1-3 of ``train_iteration``: the next prompts, sampled, scored, gathered, rewards and advantages."""
    cfg, generation, runtime = run.cfg, run.cfg.generation, run.runtime
    eos, pad = run.tokenizer.eos_token_id, run.tokenizer.pad_token_id
    prompt_index = run.prompts.next_batch(cfg.batch_size)
    query, query_mask = left_pad([run.prompts.ids[i] for i in runtime.shard(prompt_index)], pad)
    query, query_mask = query.to(runtime.device), query_mask.to(runtime.device)
    with run.models.precision():
        response, response_mask, has_eos = sample_responses(
            run.sampler, query, query_mask, generation.max_new_tokens, generation.temperature, eos, pad,
            generation.batch_size, run.sampling.owned(),
        )  # fmt: skip
        rollout = score_rollout(
            run.models, query, query_mask, response, response_mask, has_eos, generation.temperature,
            cfg.missing_eos_score, cfg.forward_batch_size or cfg.micro_batch_size or cfg.minibatch_size,
        )  # fmt: skip
    rollout = gather_rollout(rollout, runtime, pad)
    return compute_advantages(
        rollout, run.kl_controller.value, cfg.gamma, cfg.lam, cfg.whiten_rewards, cfg.whiten_advantages
    )


# --------------------------------------------------------------------------- EOS truncation and masking


def test_truncate_after_eos_masks_after_first_eos_and_keeps_it():
    eos, pad = 1, 0
    responses = torch.tensor([[5, 1, 7, 1], [5, 6, 7, 8], [1, 9, 9, 9]])
    truncated, mask, has_eos = truncate_after_eos(responses, eos, pad)
    assert truncated.tolist() == [[5, 1, 0, 0], [5, 6, 7, 8], [1, 0, 0, 0]]
    assert mask.tolist() == [[True, True, False, False], [True] * 4, [True, False, False, False]]
    assert has_eos.tolist() == [True, False, True]


def test_rollout_masks_everything_after_eos_and_scores_the_last_token(env, tmp_path, monkeypatch, new_run):
    # row 0: EOS at 2 then junk; row 1: no EOS (gets the missing-EOS score); row 2: EOS first; row 3: EOS at the end
    tok = load_tokenizer(env["policy"])
    eos, pad = tok.eos_token_id, tok.pad_token_id
    responses = torch.tensor(
        [[40, 41, eos, 42, 43, 44], [40, 41, 42, 43, 44, 45], [eos, 50, 51, 52, 53, 54], [60, 61, 62, 63, 64, eos]]
    )
    cfg = make_cfg(env, tmp_path, f"ref_policy={env['other_lm']}", "missing_eos_score=-3.0", "kl.coef=0.1",
                   "batch_size=4", "grad_clip=0", "ptx.coef=0")  # fmt: skip
    run = new_run(cfg, sampler=ScriptedBackend(responses))
    prompt_ids = run.prompts.ids  # the prompts in file order
    assert prompt_ids == [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    query, query_mask = left_pad(prompt_ids, pad)
    response, response_mask, has_eos = sample_responses(run.sampler, query, query_mask, 6, 1.0, eos, pad)
    rollout = score_rollout(run.models, query, query_mask, response, response_mask, has_eos, 1.0, -3.0)
    rollout = compute_advantages(rollout, kl_coef=0.1)

    lengths = [3, 6, 1, 6]
    expected_mask = torch.tensor([[t < n for t in range(6)] for n in lengths])
    assert torch.equal(rollout.response_mask, expected_mask)
    assert rollout.has_eos.tolist() == [True, False, True, True]
    after = ~expected_mask
    assert (rollout.response[after] == pad).all()
    zero_after_eos = ("logprobs", "ref_logprobs", "values", "entropy", "rewards", "non_score_rewards", "kl",
                      "advantages", "returns")  # fmt: skip
    for name in zero_after_eos:
        assert (getattr(rollout, name)[after] == 0).all(), f"{name} is not zero after EOS"
    assert (rollout.logprobs[expected_mask] != 0).all()

    # RM score: read at the EOS of the unpadded sequence; the missing-EOS row gets the fixed score instead
    rm = load_reward_model(env["rm"]).eval()
    for row, n in enumerate(lengths):
        ids = torch.tensor([prompt_ids[row] + responses[row, :n].tolist()])
        alone = last_token_scores(rm, ids, torch.ones_like(ids))
        torch.testing.assert_close(rollout.raw_scores[row : row + 1], alone, rtol=1e-5, atol=1e-5)
    assert rollout.scores[1] == -3.0 and rollout.scores[0] == rollout.raw_scores[0]

    # the score lands on the last valid token, on top of the per-token KL penalty (rewards are never whitened)
    kl_penalty = -0.1 * (rollout.logprobs - rollout.ref_logprobs)
    for row, n in enumerate(lengths):
        expected = kl_penalty[row, :n].clone()
        torch.testing.assert_close(rollout.non_score_rewards[row, :n], expected)
        expected[n - 1] += rollout.scores[row]
        torch.testing.assert_close(rollout.rewards[row, :n], expected)

    # losses ignore positions after EOS: garbage there does not change any gradient (one policy and one value
    # step on the whole rollout in micro-batches of 2, without optimizer steps)
    without_optimizer_steps(monkeypatch, run)
    run.actor.train_step(rollout)
    run.critic.train_step(rollout)
    clean = policy_and_value_grads(run)
    garbage = dataclasses.replace(
        rollout, **{k: getattr(rollout, k).clone() for k in ("advantages", "returns", "values", "logprobs")}
    )
    for name in ("advantages", "returns", "values", "logprobs"):
        getattr(garbage, name)[after] = 1e4
    run.actor.train_step(garbage)
    run.critic.train_step(garbage)
    dirty = policy_and_value_grads(run)
    assert any(g.abs().max() > 0 for g in clean.values())
    assert_grads_close(clean, dirty, rtol=0, atol=0)


# --------------------------------------------------------------------------- temperature and the first ratio


@pytest.mark.parametrize("logprobs", [FullLogits(), FusedHeadLogProbs()], ids=["full_logits", "fused_head"])
def test_rollout_logprobs_are_from_logits_over_temperature(env, logprobs):
    tok = load_tokenizer(env["policy"])
    policy = load_causal_lm(env["policy"], tok).eval()
    backend = HFGenerateBackend(policy, tok.eos_token_id, tok.pad_token_id)
    prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    query, query_mask = left_pad(prompt_ids, tok.pad_token_id)
    temperature = 0.7
    generator = torch.Generator().manual_seed(0)
    score = lambda q, qm, r, rm: torch.zeros(q.shape[0])  # noqa: E731
    value = load_reward_model(env["rm"]).eval()
    models = PPOModels(policy=policy, ref_policy=policy, value_model=value, score=score, logprobs=logprobs)
    response, response_mask, has_eos = sample_responses(
        backend, query, query_mask, 6, temperature, tok.eos_token_id, tok.pad_token_id, generator=generator
    )
    rollout = score_rollout(models, query, query_mask, response, response_mask, has_eos, temperature)

    for row in range(len(PROMPTS)):  # unpadded forward per row, plain torch
        n = int(rollout.response_mask[row].sum())
        response = rollout.response[row, :n]
        ids = torch.tensor([prompt_ids[row] + response.tolist()])
        with torch.no_grad():
            logits = policy(input_ids=ids).logits[0, len(prompt_ids[row]) - 1 : -1]  # (n, V)
        scaled = torch.log_softmax(logits / temperature, -1).gather(-1, response[:, None])[:, 0]
        plain = torch.log_softmax(logits, -1).gather(-1, response[:, None])[:, 0]
        torch.testing.assert_close(rollout.logprobs[row, :n], scaled, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(rollout.logprobs[row, :n], plain, atol=1e-3)
        torch.testing.assert_close(rollout.ref_logprobs[row, :n], scaled, rtol=1e-5, atol=1e-5)


def test_first_ppo_minibatch_has_ratio_one(env, tmp_path, monkeypatch, new_run):
    run = new_run(make_cfg(env, tmp_path, "generation.temperature=0.8", "ptx.coef=0"))
    policy_sides = []  # the policy's statistics of every minibatch train_iteration steps on
    train_step = run.actor.train_step

    def recorded_train_step(minibatch):
        policy_sides.append(train_step(minibatch))
        return policy_sides[-1]

    monkeypatch.setattr(run.actor, "train_step", recorded_train_step)
    train_iteration(run)
    assert len(policy_sides) == 2  # batch 8, minibatches of 4, one epoch
    first = reduce_side_stats(policy_sides[:1], run.runtime)
    assert first["policy/approx_kl"] < 1e-10
    assert abs(first["policy/ratio_max"] - 1.0) < 1e-5
    assert first["policy/clipfrac"] == 0.0


# --------------------------------------------------------------------------- PPO-ptx


def test_ptx_gradient_is_ppo_gradient_plus_gamma_times_lm_gradient(env, tmp_path, monkeypatch, new_run):
    gamma = 2.5
    run = new_run(make_cfg(env, tmp_path, f"ptx.coef={gamma}", "grad_clip=0", "ema_decay=null"))
    minibatch = scored_rollout(run).select(slice(0, 4))
    # keep the accumulated gradients: no optimizer step; record the pretraining batch the step draws
    without_optimizer_steps(monkeypatch, run)
    drawn = []
    sample = run.actor.ptx.windows.sample
    monkeypatch.setattr(run.actor.ptx.windows, "sample", lambda n: drawn.append(sample(n)) or drawn[-1])

    stats = run.actor.train_step(minibatch)
    with_ptx = grads(run.models.policy)
    (windows,) = drawn
    assert windows.shape == (4, 16) and stats.losses["loss/ptx"] > 0

    dataclasses.replace(run.actor, ptx=None).train_step(minibatch)  # the same trainer as plain PPO
    ppo_only = grads(run.models.policy)
    assert len(drawn) == 1
    run.actor.optimizer.zero_grad()
    logits = run.models.policy(input_ids=windows).logits[:, :-1]
    F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).backward()  # ∇(−mean log π(x))
    lm = grads(run.models.policy)
    assert_grads_close(with_ptx, {k: ppo_only[k] + gamma * lm[k] for k in lm})
    assert any(lm[k].abs().max() > 1e-4 for k in lm)
    assert any((ppo_only[k] - with_ptx[k]).abs().max() > 1e-4 for k in lm)


def test_plain_ppo_never_reads_pretraining_data(env, tmp_path, monkeypatch, new_run):
    def forbidden(*args, **kwargs):
        raise AssertionError("pretraining data was read with ptx.coef = 0")

    monkeypatch.setattr(ppo_build, "load_pretraining_windows", forbidden)
    monkeypatch.setattr(ppo_data, "load_texts", forbidden)
    with pytest.raises(AssertionError, match="pretraining data"):  # the guard is live
        new_run(make_cfg(env, tmp_path, "ptx.coef=1.0"))
    run = new_run(make_cfg(env, tmp_path, "ptx.coef=0"))
    metrics, _, _ = train_iteration(run)
    assert run.actor.ptx is None and metrics["loss/ptx"] is None


def test_frozen_models_stay_fixed_and_trained_models_change(env, tmp_path, monkeypatch, new_run):
    texts_before = hashlib.sha256(env["texts"].read_bytes()).hexdigest()
    loaded = []  # the models build_run loads from reward-model directories: the reward model, then the value model
    load = ppo_build.load_reward_model
    monkeypatch.setattr(ppo_build, "load_reward_model", lambda path: loaded.append(load(path)) or loaded[-1])
    run = new_run(make_cfg(env, tmp_path, f"ref_policy={env['other_lm']}", "ptx.coef=1.0"))
    reward_model, value_model = loaded
    assert value_model is run.models.value_model is run.critic.model and run.models.policy is run.actor.model
    rm_init = load_reward_model(env["rm"])
    assert all(torch.equal(p, rm_init.state_dict()[k]) for k, p in value_model.state_dict().items())
    frozen = {"ref": params(run.models.ref_policy), "rm": params(reward_model)}
    trained = {"policy": params(run.models.policy), "value": params(value_model)}
    train_iteration(run)

    for name, model in (("ref", run.models.ref_policy), ("rm", reward_model)):
        assert not any(p.requires_grad for p in model.parameters()), f"{name} is trainable"
        for key, p in model.named_parameters():
            assert torch.equal(p, frozen[name][key]), f"{name}.{key} changed"
    for name, model in (("policy", run.models.policy), ("value", value_model)):
        for key, p in model.named_parameters():
            assert not torch.equal(p, trained[name][key]), f"{name}.{key} did not change"
    assert hashlib.sha256(env["texts"].read_bytes()).hexdigest() == texts_before


def test_zero_value_head_option(env, tmp_path, new_run):
    run = new_run(make_cfg(env, tmp_path, "value_head_init=zero", "ptx.coef=0"))
    assert (run.models.value_model.score.weight == 0).all()


# --------------------------------------------------------------------------- accumulation, β, EMA, sampler


def test_gradient_accumulation_is_invariant_to_micro_batch_size(env, tmp_path, monkeypatch, new_run):
    """One policy step and one value step on the whole batch (8 episodes, 6 pretraining windows) give the same
    gradients with one episode and one window per forward/backward as with all of them at once."""
    run = new_run(make_cfg(env, tmp_path, "ptx.coef=3.0", "ptx.batch_ratio=1.5", "grad_clip=0"))
    rollout = scored_rollout(run)
    without_optimizer_steps(monkeypatch, run)
    windows = run.actor.ptx.windows.state_dict()
    results = []
    for micro in (1, rollout.size):
        run.actor.ptx.windows.load_state_dict(windows)  # both steps draw the same pretraining windows
        ptx = dataclasses.replace(run.actor.ptx, micro_batch_size=micro)
        assert ptx.batch_size == 6
        policy_side = dataclasses.replace(run.actor, micro_batch_size=micro, ptx=ptx).train_step(rollout)
        dataclasses.replace(run.critic, micro_batch_size=micro).train_step(rollout)
        assert policy_side.finite and policy_side.losses["loss/ptx"] > 0
        results.append(policy_and_value_grads(run))
    assert_grads_close(results[0], results[1])


@pytest.mark.parametrize("target, direction", [(1e-3, 1), (1e4, -1)])
def test_adaptive_kl_moves_beta_toward_target(env, tmp_path, new_run, target, direction):
    cfg = make_cfg(
        env, tmp_path, f"ref_policy={env['other_lm']}", "kl.adaptive=true", "kl.coef=0.1", f"kl.target={target}",
        "kl.horizon=80", "ptx.coef=0", "ppo_epochs=1",
    )  # fmt: skip
    run = new_run(cfg)
    betas = [train_iteration(run)[0]["objective/beta"] for _ in range(3)] + [run.kl_controller.value]
    steps = [b - a for a, b in zip(betas, betas[1:])]
    assert all(direction * s > 0 for s in steps), betas
    # KL far from target: every step is the clipped ±20% × n_steps / horizon
    assert betas[1] == pytest.approx(0.1 * (1 + direction * 0.2 * 8 / 80))


def test_ema_follows_its_formula_and_swaps_back():
    model = torch.nn.Linear(3, 2)
    ema = PolicyEMA(model, decay=0.9)
    start = params(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for name, p in model.named_parameters():
        torch.testing.assert_close(ema.shadow[name], 0.9 * start[name] + 0.1 * p.detach())
    live = params(model)
    with ema.swapped_into(model):
        assert torch.equal(model.weight, ema.shadow["weight"])
    assert all(torch.equal(p, live[k]) for k, p in model.named_parameters())


def test_prompt_sampler_cycles_reshuffles_and_resumes():
    sampler = PromptSampler(5, seed=0)
    first, second = sampler.next(5), sampler.next(5)
    assert sorted(first) == sorted(second) == list(range(5)) and sampler.passes == 1
    state = sampler.state_dict()
    ahead = sampler.next(7)
    resumed = PromptSampler(5, seed=123)
    resumed.load_state_dict(state)
    assert resumed.next(7) == ahead


def test_hf_backend_sampling_is_reproducible_and_leaves_global_rng_alone(env):
    tok = load_tokenizer(env["policy"])
    backend = HFGenerateBackend(load_causal_lm(env["policy"], tok).eval(), tok.eos_token_id, tok.pad_token_id)
    query, mask = left_pad([tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS], tok.pad_token_id)
    global_state = torch.get_rng_state()
    a = backend.generate(query, mask, 8, 1.0, torch.Generator().manual_seed(5))
    b = backend.generate(query, mask, 8, 1.0, torch.Generator().manual_seed(5))
    assert a.shape == (len(PROMPTS), 8) and torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), global_state)


def test_config_rejects_minibatch_that_does_not_divide_batch(env, tmp_path):
    with pytest.raises(ConfigError, match="minibatch_size"):
        make_cfg(env, tmp_path, "batch_size=10", "minibatch_size=4")


# --------------------------------------------------------------------------- learning, resume, CLI


def test_bandit_ppo_raises_probability_of_rewarded_token(env, tmp_path, new_run):
    """Reward 1 when the response contains token X (one the initial policy writes in ~10% of responses): five PPO
    iterations raise P(X ∈ y) several-fold. X is picked from the policy's own samples so that each batch holds a
    few rewarded episodes; with a token seen in ~2% of responses the outcome hung on a handful of lucky draws."""
    tok = load_tokenizer(env["policy"])
    cfg = make_cfg(
        env, tmp_path, "batch_size=32", "minibatch_size=8", "micro_batch_size=8", "ppo_epochs=4", "lr=0.01",
        "value_lr=0.01", "warmup_iterations=0", "kl.coef=0", "missing_eos_score=null", "ptx.coef=0",
        "ema_decay=null", "value_head_init=zero", "generation.max_new_tokens=8",
    )  # fmt: skip
    x_token = torch.tensor(-1)

    def contains_x(query, query_mask, response, response_mask):
        return ((response == x_token) & response_mask).any(dim=1).float()

    run = new_run(cfg, score_fn=contains_x)
    query, mask = left_pad([run.prompts.ids[i % 4] for i in range(512)], tok.pad_token_id)

    def responses() -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(123)
        response, response_mask, _ = sample_responses(
            run.sampler, query, mask, 8, 1.0, tok.eos_token_id, tok.pad_token_id, generator=generator
        )
        return response, response_mask

    response, response_mask = responses()
    present = torch.zeros(len(tok), dtype=torch.long)
    for row, row_mask in zip(response, response_mask):
        present[row[row_mask].unique()] += 1
    present[[tok.eos_token_id, tok.pad_token_id]] = 0
    rates = present.float() / len(response)
    x_token.fill_(int((rates - 0.1).abs().argmin()))
    before = rates[x_token].item()
    for _ in range(5):
        train_iteration(run)
    after = contains_x(query, mask, *responses()).mean().item()
    print(f"bandit: token {tok.decode([int(x_token)])!r}, P(X in response) {before:.3f} -> {after:.3f}")
    assert 0.02 < before < 0.2 and after > 3 * before


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def test_resume_from_checkpoint_reproduces_uninterrupted_run(env, tmp_path):
    overrides = ("kl.adaptive=true", "kl.target=0.5", "ptx.coef=1.0", "save_every=1", "resume=true", "ema_decay=0.9")
    straight = tmp_path / "straight"
    ppo.run(make_cfg(env, straight, *overrides))
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step-00000001", resumed / "checkpoints" / "step-00000001")
    ppo.run(make_cfg(env, resumed, *overrides))

    for sub in ("policy", "value"):
        a, b = _weights(straight / sub), _weights(resumed / sub)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{sub}/{key} differs after resume"
    rows = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (straight, resumed)]
    assert [r["step"] for r in rows[1]] == [2]
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith("time/")}  # noqa: E731
    assert strip(rows[0][1]) == strip(rows[1][0])


def test_cli_smoke_run_writes_policy_value_metrics_and_results(env, tmp_path):
    from transformers import AutoModelForCausalLM

    from instructrl.cli import main

    out = tmp_path / "cli"
    args = [f"output_dir={out}", f"policy={env['policy']}", f"reward_model={env['rm']}", f"prompts={env['prompts']}",
            f"ptx.data={env['texts']}", "iterations=2", "batch_size=4", "minibatch_size=2", "ptx.seq_len=16",
            "ptx.batch_ratio=1", "generation.max_new_tokens=5", "sample_every=1", "num_samples=2",
            "save_policy_every=1", "tensorboard=false"]  # fmt: skip
    assert main(["ppo", *[x for a in args for x in ("--set", a)]]) == 0

    AutoModelForCausalLM.from_pretrained(out / "policy")
    load_tokenizer(out / "policy")
    load_reward_model(out / "value")
    assert (out / "policy-iter-0001" / "model.safetensors").exists()
    assert (out / "policy-iter-0002" / "model.safetensors").exists()
    results = json.loads((out / "results.json").read_text())
    assert results["variant"] == "PPO-ptx" and results["episodes"] == 8 and results["released_weights"] == "ema"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for name in ppo.SUMMARY_METRICS + ("time/iteration",):
        assert all(r[name] is not None for r in records), name
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and {"prompt", "response", "score", "has_eos"} <= samples[0].keys()


def test_constant_returns_log_no_nan(env, tmp_path, new_run):
    """Every score 0, no KL penalty and a zero value head: the returns do not vary, so the explained variance
    is undefined and logged as None (JSON null); no metric is NaN. (A CUDA run of the bandit test drew such
    a first batch and logged NaN before.)"""
    cfg = make_cfg(env, tmp_path, "kl.coef=0", "value_head_init=zero", "ptx.coef=0", "iterations=1",
                   "missing_eos_score=null")  # fmt: skip

    def zero_score(query, query_mask, response, response_mask):
        return torch.zeros(query.shape[0])

    run = new_run(cfg, score_fn=zero_score)
    metrics, _, _ = train_iteration(run)
    assert metrics["value/explained_variance"] is None
    assert all(v is None or math.isfinite(v) for v in metrics.values()), metrics


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ppo_on_cuda_samples_reproducibly_and_learns_the_bandit(env, tmp_path, new_run):
    tok = load_tokenizer(env["policy"])
    x_token = tok(" cat", add_special_tokens=False)["input_ids"][0]

    def contains_x(query, query_mask, response, response_mask):
        return ((response == x_token) & response_mask).any(dim=1).float()

    cfg = make_cfg(
        env, tmp_path, "device=cuda", "batch_size=128", "minibatch_size=32", "micro_batch_size=32", "ppo_epochs=4",
        "lr=0.01", "value_lr=0.01", "warmup_iterations=0", "kl.coef=0", "missing_eos_score=null", "ptx.coef=1.0",
        "ema_decay=0.9", "value_head_init=zero", "generation.max_new_tokens=8", "iterations=8",
    )  # fmt: skip
    run = new_run(cfg, score_fn=contains_x)
    assert run.runtime.device.type == "cuda" and run.sampling.owned()[0].device.type == "cuda"
    query, mask = left_pad([run.prompts.ids[i % 4] for i in range(256)], tok.pad_token_id)
    query, mask = query.cuda(), mask.cuda()

    def p_x() -> float:
        generator = torch.Generator(device="cuda").manual_seed(123)
        response, response_mask, _ = sample_responses(
            run.sampler, query, mask, 8, 1.0, tok.eos_token_id, tok.pad_token_id, generator=generator
        )
        return contains_x(query, mask, response, response_mask).mean().item()

    cuda_state = torch.cuda.get_rng_state()
    before = p_x()
    assert p_x() == before and torch.equal(torch.cuda.get_rng_state(), cuda_state)
    for _ in range(cfg.iterations):
        metrics, _, _ = train_iteration(run)
        assert all(v is None or v == v for v in metrics.values()), metrics  # no NaN
    after = p_x()
    print(f"cuda bandit: P(X in response) {before:.3f} -> {after:.3f}")
    assert before < 0.1 and after > 0.4
    run.save_policy(tmp_path / "policy")
    assert (tmp_path / "policy" / "model.safetensors").exists()


def test_a_batch_of_one_response_that_is_only_eos_trains_without_error(env, tmp_path, tiny_tokenizer, new_run):
    """batch_size=1 and EOS sampled first leave one response token: whitening has no spread to divide by, and
    the iteration must still run (advantage 0, finite losses), not stop on an undefined variance."""
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    cfg = make_cfg(env, tmp_path, "batch_size=1", "minibatch_size=1", "micro_batch_size=1", "ptx.coef=0")
    responses = torch.tensor([[eos] + [pad] * 5])
    run = new_run(cfg, sampler=ScriptedBackend(responses))
    metrics, rollout, _ = train_iteration(run)
    assert int(rollout.response_mask.sum()) == 1
    assert torch.equal(rollout.advantages, torch.zeros_like(rollout.advantages))
    assert math.isfinite(metrics["loss/policy"]) and math.isfinite(metrics["loss/value"])
