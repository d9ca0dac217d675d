"""instructrl.rl math (and the fused LM head, instructrl.fast.head) against naive references written as python loops
over plain floats."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from instructrl.fast.head import lm_head_logprobs
from instructrl.rl import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_k1,
    kl_k2,
    kl_k3,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    ptx_loss,
    ranking_loss,
    shaped_rewards,
    value_loss,
)

SEEDS = [0, 1, 2]
DT = torch.float64  # references are python floats; float64 keeps the comparisons tight


# --------------------------------------------------------------------------- helpers


def ragged_mask(batch: int, steps: int, generator: torch.Generator, allow_empty: bool = False) -> torch.Tensor:
    """(B, T) prefix mask with random lengths; always includes a full row and a length-1 row."""
    low = 0 if allow_empty else 1
    lengths = torch.randint(low, steps + 1, (batch,), generator=generator)
    lengths[0], lengths[1] = steps, 1
    return (torch.arange(steps)[None, :] < lengths[:, None]).to(DT)


def lengths_of(mask: torch.Tensor) -> list[int]:
    return [int(n) for n in mask.sum(dim=1).tolist()]


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def poison_padding(x: torch.Tensor, mask: torch.Tensor, value: float) -> torch.Tensor:
    """Write ``value`` (inf / nan) where the mask is 0, as real padding may hold."""
    return torch.where(mask != 0, x, torch.full_like(x, value))


# --------------------------------------------------------------------------- log-probs and entropy


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_logprobs_match_naive_log_softmax_gather(seed, temperature, chunk_size):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(5, 7, 11, generator=g, dtype=DT) * 3
    labels = torch.randint(0, 11, (5, 7), generator=g)
    naive = torch.log_softmax(logits / temperature, dim=-1).gather(-1, labels[..., None])[..., 0]
    got = logprobs_from_logits(logits, labels, temperature=temperature, chunk_size=chunk_size)
    assert got.shape == (5, 7)
    torch.testing.assert_close(got, naive)


def test_logprobs_match_python_loop():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 4, generator=g, dtype=DT)
    labels = torch.randint(0, 4, (2, 3), generator=g)
    temperature = 0.6
    got = logprobs_from_logits(logits, labels, temperature=temperature)
    for b, t in itertools.product(range(2), range(3)):
        z = [v / temperature for v in logits[b, t].tolist()]
        expected = z[labels[b, t]] - math.log(sum(math.exp(v) for v in z))
        assert got[b, t].item() == pytest.approx(expected, abs=1e-12)


def test_logprobs_temperature_equals_prescaled_logits():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 4, 9, generator=g, dtype=DT)
    labels = torch.randint(0, 9, (3, 4), generator=g)
    torch.testing.assert_close(
        logprobs_from_logits(logits, labels, temperature=0.7), logprobs_from_logits(logits / 0.7, labels)
    )
    # a different temperature is a different distribution: the scaling is not a no-op
    assert not torch.allclose(
        logprobs_from_logits(logits, labels, temperature=0.7), logprobs_from_logits(logits, labels)
    )


def test_logprobs_gradient_matches_naive():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 5, 8, generator=g, dtype=DT, requires_grad=True)
    labels = torch.randint(0, 8, (4, 5), generator=g)
    weights = torch.randn(4, 5, generator=g, dtype=DT)
    (logprobs_from_logits(logits, labels, temperature=0.8, chunk_size=3) * weights).sum().backward()
    grad = logits.grad.clone()
    logits.grad = None
    naive = torch.log_softmax(logits / 0.8, dim=-1).gather(-1, labels[..., None])[..., 0]
    (naive * weights).sum().backward()
    torch.testing.assert_close(grad, logits.grad)


def test_logprobs_bf16_logits_computed_in_float32():
    g = torch.Generator().manual_seed(6)
    logits = (torch.randn(2, 3, 50, generator=g) * 5).to(torch.bfloat16)
    labels = torch.randint(0, 50, (2, 3), generator=g)
    got = logprobs_from_logits(logits, labels)
    assert got.dtype == torch.float32
    naive = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels[..., None])[..., 0]
    torch.testing.assert_close(got, naive)


def test_logprobs_rejects_bad_arguments():
    logits, labels = torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="temperature"):
        logprobs_from_logits(logits, labels, temperature=0.0)
    with pytest.raises(ValueError, match="leading dims"):
        logprobs_from_logits(logits, labels[:, :2])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_entropy_matches_python_loop(seed, temperature):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 4, 6, generator=g, dtype=DT) * 2
    got = entropy_from_logits(logits, temperature=temperature, chunk_size=2)
    for b, t in itertools.product(range(3), range(4)):
        z = [v / temperature for v in logits[b, t].tolist()]
        normaliser = sum(math.exp(v) for v in z)
        probs = [math.exp(v) / normaliser for v in z]
        expected = -sum(p * math.log(p) for p in probs)
        assert got[b, t].item() == pytest.approx(expected, abs=1e-12)


def test_entropy_of_uniform_is_log_vocab():
    got = entropy_from_logits(torch.zeros(2, 3, 17, dtype=DT))
    torch.testing.assert_close(got, torch.full((2, 3), math.log(17), dtype=DT))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize(("chunk_elements", "vocab_block"), [(1, 1), (3 * 11, 4), (1 << 20, 2048), (7, 11)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_lm_head_logprobs_and_gradients_match_naive_head_then_log_softmax(
    seed, temperature, chunk_elements, vocab_block, with_bias
):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(4, 5, 6, generator=g, dtype=DT, requires_grad=True)
    weight = torch.randn(11, 6, generator=g, dtype=DT, requires_grad=True)
    bias = torch.randn(11, generator=g, dtype=DT, requires_grad=True) if with_bias else None
    labels = torch.randint(0, 11, (4, 5), generator=g)
    upstream = torch.randn(4, 5, generator=g, dtype=DT)  # an arbitrary loss Σ upstream · log π

    def naive_logprobs():
        logits = hidden @ weight.T + (bias if bias is not None else 0)  # (B, T, V)
        return torch.log_softmax(logits / temperature, dim=-1).gather(-1, labels[..., None])[..., 0]

    def gradients(fn):
        inputs = [t for t in (hidden, weight, bias) if t is not None]
        value = fn()
        return value.detach(), torch.autograd.grad((value * upstream).sum(), inputs)

    fused = lambda: lm_head_logprobs(hidden, weight, labels, temperature, bias, chunk_elements, vocab_block)  # noqa: E731
    got, got_grads = gradients(fused)
    expected, expected_grads = gradients(naive_logprobs)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    for a, b in zip(got_grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)

    with torch.no_grad():
        logprobs, entropy = lm_head_logprobs(
            hidden, weight, labels, temperature, bias, chunk_elements, vocab_block, with_entropy=True
        )
        logits = hidden @ weight.T + (bias if bias is not None else 0)
        torch.testing.assert_close(logprobs, expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(entropy, entropy_from_logits(logits, temperature), rtol=0, atol=1e-12)
        no_grad = lm_head_logprobs(hidden, weight, labels, temperature, bias, chunk_elements, vocab_block)
        torch.testing.assert_close(no_grad, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("vocab_block", [1, 4, 2048])
def test_fused_lm_head_with_a_frozen_head_gives_only_the_hidden_gradient(vocab_block):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(4, 5, 6, generator=g, dtype=DT, requires_grad=True)
    weight = torch.randn(11, 6, generator=g, dtype=DT)  # frozen, as under LoRA
    labels = torch.randint(0, 11, (4, 5), generator=g)
    logprobs = lm_head_logprobs(hidden, weight, labels, 0.8, None, vocab_block=vocab_block)
    (got,) = torch.autograd.grad(logprobs.sum(), hidden)
    naive = torch.log_softmax(hidden @ weight.T / 0.8, dim=-1).gather(-1, labels[..., None]).sum()
    (expected,) = torch.autograd.grad(naive, hidden)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert weight.grad is None


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("vocab_block", [4, 2048])
def test_fused_lm_head_adding_into_grad_gives_the_same_sum_in_the_same_buffer(autocast, vocab_block):
    """``weight_grad_into_grad``: ∂/∂W is added into the existing ``.grad`` (same storage, what was there is
    kept), autograd gets none for the weight, and the hidden-state gradient is unchanged."""
    dtype = torch.float32 if autocast else DT
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(3, 5, 8, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(13, 8, generator=g, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 13, (3, 5), generator=g)
    upstream = torch.randn(3, 5, generator=g, dtype=dtype)
    earlier = torch.randn(13, 8, generator=g, dtype=dtype)  # e.g. the previous micro-batch's gradient

    def run(into_grad: bool):
        hidden.grad, weight.grad = None, earlier.clone()
        buffer = weight.grad
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = lm_head_logprobs(
                hidden, weight, labels, 0.9, vocab_block=vocab_block, weight_grad_into_grad=into_grad
            )
        (out * upstream).sum().backward()
        return out.detach(), hidden.grad.clone(), weight.grad.clone(), weight.grad is buffer

    out_a, hidden_a, weight_a, same_a = run(True)
    out_b, hidden_b, weight_b, _ = run(False)
    assert same_a  # added in place: no new (V, d) tensor
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)
    torch.testing.assert_close(hidden_a, hidden_b, rtol=0, atol=0)
    tolerance = 1e-5 if autocast else 1e-12  # bf16 products are rounded before (into) or after (returned) the add
    torch.testing.assert_close(weight_a, weight_b, rtol=tolerance, atol=tolerance)

    hidden.grad = weight.grad = None  # a missing .grad is allocated as zeros first
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = lm_head_logprobs(hidden, weight, labels, 0.9, vocab_block=vocab_block, weight_grad_into_grad=True)
    (out * upstream).sum().backward()
    torch.testing.assert_close(weight.grad, weight_b - earlier, rtol=tolerance, atol=tolerance)
    (got,) = torch.autograd.grad(
        (lm_head_logprobs(hidden, weight, labels, weight_grad_into_grad=True) * upstream).sum(),
        weight,
        allow_unused=True,
    )
    assert got is None  # autograd.grad does not see it: documented, and why it is for one process only


def test_fused_lm_head_under_autocast_follows_a_changed_weight_and_guards_pending_graphs():
    """The bf16 head computes with the weight as it is at each call; changing the weight in place while an
    earlier graph still needs it makes that graph's backward fail instead of using new numbers."""
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 3, 8, generator=g)
    weight = torch.randn(9, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 9, (2, 3), generator=g)

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return lm_head_logprobs(hidden, weight, labels, vocab_block=4)

    def reference():  # a fresh cast: the head applied to the weight as it is now
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            logits = (hidden.bfloat16() @ weight.detach().bfloat16().T).float()
        return torch.log_softmax(logits, dim=-1).gather(-1, labels[..., None])[..., 0]

    first = forward()
    torch.testing.assert_close(first.detach(), reference(), rtol=0, atol=1e-6)
    first.sum().backward()
    with torch.no_grad():
        weight.mul_(-2.0)  # as an optimizer step would: in place
    second = forward()
    torch.testing.assert_close(second.detach(), reference(), rtol=0, atol=1e-6)
    with torch.no_grad():
        weight.add_(1.0)
    third = forward()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        second.sum().backward()
    third.sum().backward()


def test_fused_lm_head_keeps_nothing_without_autograd():
    hidden, weight = torch.randn(2, 3, 4), torch.randn(7, 4, requires_grad=True)
    labels = torch.randint(0, 7, (2, 3))
    with torch.no_grad():
        out = lm_head_logprobs(hidden, weight, labels)
    assert out.grad_fn is None and out.dtype == torch.float32


def test_fused_lm_head_with_no_positions_gives_empty_results_and_zero_weight_gradient():
    hidden = torch.randn(2, 0, 6, dtype=DT, requires_grad=True)
    weight = torch.randn(11, 6, dtype=DT, requires_grad=True)
    labels = torch.zeros(2, 0, dtype=torch.long)
    out = lm_head_logprobs(hidden, weight, labels, vocab_block=4)
    assert out.shape == (2, 0)
    out.sum().backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight))
    logprobs, entropy = lm_head_logprobs(hidden.detach(), weight, labels, vocab_block=4, with_entropy=True)
    assert logprobs.shape == entropy.shape == (2, 0)


@pytest.mark.parametrize("vocab_block", [5, 2048])
def test_fused_lm_head_under_bf16_autocast_tracks_float32(vocab_block):
    """Under bf16 autocast the matmuls run in bf16 and the softmax and gradient sums in float32: the log-probs
    stay within bf16's rounding of the logits (|z| ≲ 10 here: 2^-8 · 10 ≈ 0.04) and the gradients close."""
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(3, 7, 16, generator=g, requires_grad=True)
    weight = (torch.randn(37, 16, generator=g) * 0.5).requires_grad_()
    labels = torch.randint(0, 37, (3, 7), generator=g)
    upstream = torch.randn(3, 7, generator=g)

    def run(autocast: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = lm_head_logprobs(hidden, weight, labels, 0.9, vocab_block=vocab_block)
        grads = torch.autograd.grad((out * upstream).sum(), (hidden, weight))
        return out.detach(), grads

    (out32, grads32), (out16, grads16) = run(False), run(True)
    assert out16.dtype == torch.float32
    torch.testing.assert_close(out16, out32, rtol=0, atol=0.05)
    for got, expected in zip(grads16, grads32):
        assert got.dtype == torch.float32
        assert (got - expected).norm() <= 0.02 * expected.norm()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        scored, _ = lm_head_logprobs(hidden, weight, labels, 0.9, vocab_block=vocab_block, with_entropy=True)
    torch.testing.assert_close(scored, out32, rtol=0, atol=0.05)


# --------------------------------------------------------------------------- masked statistics


@pytest.mark.parametrize("seed", SEEDS)
def test_masked_mean_matches_loop_and_ignores_padding(seed):
    g = torch.Generator().manual_seed(seed)
    mask = ragged_mask(6, 8, g)
    x = poison_padding(torch.randn(6, 8, generator=g, dtype=DT), mask, float("nan"))
    selected = [x[b, t].item() for b in range(6) for t in range(8) if mask[b, t]]
    assert masked_mean(x, mask).item() == pytest.approx(sum(selected) / len(selected), abs=1e-12)
    per_row = masked_mean(x, mask, dim=1)
    for b, n in enumerate(lengths_of(mask)):
        assert per_row[b].item() == pytest.approx(sum(x[b, :n].tolist()) / n, abs=1e-12)
    # a bool mask selects the same entries
    assert masked_mean(x, mask.bool()).item() == pytest.approx(masked_mean(x, mask).item(), abs=1e-12)


def test_masked_mean_of_empty_row_is_zero():
    x = torch.tensor([[1.0, 2.0], [float("inf"), 4.0]], dtype=DT)
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]], dtype=DT)
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([1.5, 0.0], dtype=DT))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("unbiased", [True, False])
def test_masked_var_matches_loop(seed, unbiased):
    g = torch.Generator().manual_seed(seed)
    mask = ragged_mask(5, 7, g)
    x = poison_padding(torch.randn(5, 7, generator=g, dtype=DT) * 3 + 1, mask, float("inf"))
    selected = [x[b, t].item() for b in range(5) for t in range(7) if mask[b, t]]
    mean = sum(selected) / len(selected)
    expected = sum((v - mean) ** 2 for v in selected) / (len(selected) - (1 if unbiased else 0))
    assert masked_var(x, mask, unbiased=unbiased).item() == pytest.approx(expected, abs=1e-12)


def test_masked_var_of_too_few_entries_is_zero_and_whitening_only_centres():
    """One valid token (batch_size=1, EOS sampled first) or none: variance 0, whitened advantages 0, no error."""
    x = torch.tensor([[2.5, float("nan"), 7.0]], dtype=DT)
    one = torch.tensor([[1, 0, 0]])
    for unbiased in (True, False):
        assert masked_var(x, one, unbiased=unbiased).item() == 0.0
        assert masked_var(x, torch.zeros(1, 3), unbiased=unbiased).item() == 0.0
    torch.testing.assert_close(masked_whiten(x, one), torch.zeros(1, 3, dtype=DT))
    torch.testing.assert_close(masked_whiten(x, one, shift_mean=False), torch.tensor([[2.5, 0.0, 0.0]], dtype=DT))
    torch.testing.assert_close(masked_whiten(x, torch.zeros(1, 3)), torch.zeros(1, 3, dtype=DT))
    advantages, returns = gae(torch.tensor([[1.5, 0.0, 0.0]]), torch.tensor([[0.3, 9.0, 9.0]]), one)
    assert torch.isfinite(masked_whiten(advantages, one)).all() and torch.isfinite(returns).all()


@pytest.mark.parametrize("seed", SEEDS)
def test_masked_whiten_has_zero_mean_unit_std_on_masked_entries(seed):
    g = torch.Generator().manual_seed(seed)
    mask = ragged_mask(6, 9, g)
    x = poison_padding(torch.randn(6, 9, generator=g, dtype=DT) * 4 + 3, mask, float("nan"))
    whitened = masked_whiten(x, mask)
    assert masked_mean(whitened, mask).item() == pytest.approx(0.0, abs=1e-10)
    assert masked_var(whitened, mask).item() == pytest.approx(1.0, abs=1e-6)
    assert torch.all(whitened[mask == 0] == 0)
    # naive loop: (x − μ) / sqrt(σ² + eps) with unbiased σ²
    selected = [x[b, t].item() for b in range(6) for t in range(9) if mask[b, t]]
    mean = sum(selected) / len(selected)
    std = math.sqrt(sum((v - mean) ** 2 for v in selected) / (len(selected) - 1) + 1e-8)
    for b, t in zip(*torch.nonzero(mask, as_tuple=True)):
        assert whitened[b, t].item() == pytest.approx((x[b, t].item() - mean) / std, abs=1e-10)


@pytest.mark.parametrize("seed", SEEDS)
def test_masked_whiten_without_mean_shift_keeps_the_mean(seed):
    g = torch.Generator().manual_seed(seed)
    mask = ragged_mask(6, 9, g)
    x = torch.randn(6, 9, generator=g, dtype=DT) * 4 + 3
    whitened = masked_whiten(x, mask, shift_mean=False)
    assert masked_mean(whitened, mask).item() == pytest.approx(masked_mean(x, mask).item(), abs=1e-10)
    assert masked_var(whitened, mask).item() == pytest.approx(1.0, abs=1e-6)
    # shifting by the mean is the only difference between the two modes
    shifted = masked_whiten(x, mask, shift_mean=True) + masked_mean(x, mask)
    torch.testing.assert_close(whitened[mask != 0], shifted[mask != 0])


def test_masked_whiten_biased_variance_option():
    g = torch.Generator().manual_seed(9)
    mask = ragged_mask(4, 5, g)
    x = torch.randn(4, 5, generator=g, dtype=DT)
    whitened = masked_whiten(x, mask, unbiased=False)
    assert masked_var(whitened, mask, unbiased=False).item() == pytest.approx(1.0, abs=1e-6)


# --------------------------------------------------------------------------- GAE


def naive_gae(rewards, values, length, gamma, lam):
    """Textbook per-sequence backward loop over the valid tokens only."""
    advantages = [0.0] * length
    next_value, next_advantage = 0.0, 0.0
    for t in reversed(range(length)):
        delta = rewards[t] + gamma * next_value - values[t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[t] = next_advantage
        next_value = values[t]
    return advantages, [a + v for a, v in zip(advantages, values)]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_per_sequence_loop_on_ragged_masks(seed, gamma, lam):
    g = torch.Generator().manual_seed(seed)
    mask = ragged_mask(7, 10, g, allow_empty=True)
    rewards = poison_padding(torch.randn(7, 10, generator=g, dtype=DT), mask, float("nan"))
    values = poison_padding(torch.randn(7, 10, generator=g, dtype=DT), mask, float("inf"))
    advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)
    for b, n in enumerate(lengths_of(mask)):
        expected_adv, expected_ret = naive_gae(rewards[b, :n].tolist(), values[b, :n].tolist(), n, gamma, lam)
        assert advantages[b, :n].tolist() == pytest.approx(expected_adv, abs=1e-10)
        assert returns[b, :n].tolist() == pytest.approx(expected_ret, abs=1e-10)
        assert torch.all(advantages[b, n:] == 0) and torch.all(returns[b, n:] == 0)


def test_gae_with_gamma_lambda_one_is_monte_carlo():
    rewards = torch.tensor([[0.1, -0.2, 1.5, 0.0]], dtype=DT)
    values = torch.tensor([[0.3, 0.7, -0.4, 9.0]], dtype=DT)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=DT)
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # A_t = Σ_{s≥t} r_s − V_t; the value 9.0 beyond the last token must not bootstrap
    torch.testing.assert_close(advantages, torch.tensor([[1.4 - 0.3, 1.3 - 0.7, 1.5 + 0.4, 0.0]], dtype=DT))
    torch.testing.assert_close(returns, torch.tensor([[1.4, 1.3, 1.5, 0.0]], dtype=DT))


def test_gae_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="same"):
        gae(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))


# --------------------------------------------------------------------------- KL estimators and shaped rewards


@pytest.mark.parametrize("seed", SEEDS)
def test_kl_estimators_match_formulas(seed):
    g = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(4, 6, generator=g, dtype=DT) * 5
    ref_logprobs = -torch.rand(4, 6, generator=g, dtype=DT) * 5
    k1, k2, k3 = kl_k1(logprobs, ref_logprobs), kl_k2(logprobs, ref_logprobs), kl_k3(logprobs, ref_logprobs)
    for b, t in itertools.product(range(4), range(6)):
        lp, rlp = logprobs[b, t].item(), ref_logprobs[b, t].item()
        r = math.exp(rlp) / math.exp(lp)
        assert k1[b, t].item() == pytest.approx(lp - rlp, abs=1e-12)
        assert k2[b, t].item() == pytest.approx(0.5 * (lp - rlp) ** 2, abs=1e-12)
        assert k3[b, t].item() == pytest.approx((r - 1) - math.log(r), abs=1e-10)
    assert torch.all(k2 >= 0) and torch.all(k3 >= 0)


@pytest.mark.parametrize("seed", SEEDS)
def test_k1_and_k3_are_unbiased_for_the_exact_kl(seed):
    # Expectation under y ~ π taken exactly over a small vocabulary, no sampling noise.
    g = torch.Generator().manual_seed(seed)
    log_pi = torch.log_softmax(torch.randn(12, generator=g, dtype=DT) * 2, dim=0)
    log_ref = torch.log_softmax(torch.randn(12, generator=g, dtype=DT) * 2, dim=0)
    pi = log_pi.exp().tolist()
    exact_kl = sum(p * (a - b) for p, a, b in zip(pi, log_pi.tolist(), log_ref.tolist()))
    assert exact_kl > 0
    for estimator in (kl_k1, kl_k3):
        expectation = sum(p * k for p, k in zip(pi, estimator(log_pi, log_ref).tolist()))
        assert expectation == pytest.approx(exact_kl, abs=1e-10)
    # k2 is biased: same sign, different value
    k2_expectation = sum(p * k for p, k in zip(pi, kl_k2(log_pi, log_ref).tolist()))
    assert k2_expectation != pytest.approx(exact_kl, abs=1e-6)


def naive_shaped_rewards(scores, logprobs, ref_logprobs, mask, kl_coef):
    batch, steps = mask.shape
    rewards = [[0.0] * steps for _ in range(batch)]
    for b in range(batch):
        last = max((t for t in range(steps) if mask[b, t]), default=None)
        for t in range(steps):
            if mask[b, t]:
                rewards[b][t] = -kl_coef * (logprobs[b, t].item() - ref_logprobs[b, t].item())
        if last is not None:
            rewards[b][last] += scores[b].item()
    return rewards


@pytest.mark.parametrize("seed", SEEDS)
def test_shaped_rewards_match_loop(seed):
    g = torch.Generator().manual_seed(seed)
    mask = ragged_mask(6, 8, g, allow_empty=True)
    logprobs = poison_padding(-torch.rand(6, 8, generator=g, dtype=DT) * 4, mask, float("-inf"))
    ref_logprobs = poison_padding(-torch.rand(6, 8, generator=g, dtype=DT) * 4, mask, float("-inf"))
    scores = torch.randn(6, generator=g, dtype=DT)
    rewards, non_score, kl = shaped_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.05)
    expected = naive_shaped_rewards(scores, logprobs, ref_logprobs, mask, 0.05)
    for b in range(6):
        assert rewards[b].tolist() == pytest.approx(expected[b], abs=1e-12)
    torch.testing.assert_close(non_score, -0.05 * kl)
    assert torch.isfinite(rewards).all()


def test_kl_penalty_on_response_tokens_only_and_score_on_last_valid_token():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=DT)
    logprobs = torch.full((3, 5), -1.0, dtype=DT)
    ref_logprobs = torch.full((3, 5), -2.0, dtype=DT)  # k1 = 1 on every token
    scores = torch.tensor([10.0, 20.0, 30.0], dtype=DT)
    rewards, non_score, kl = shaped_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.1)
    torch.testing.assert_close(kl, mask)
    torch.testing.assert_close(non_score, -0.1 * mask)
    expected = torch.tensor(
        [[-0.1, -0.1, 9.9, 0, 0], [19.9, 0, 0, 0, 0], [-0.1, -0.1, -0.1, -0.1, 29.9]],
        dtype=DT,
    )
    torch.testing.assert_close(rewards, expected)
    # Σ_t reward_t = r_θ − β Σ_t kl_t per row
    torch.testing.assert_close(rewards.sum(1), scores - 0.1 * mask.sum(1))


def test_shaped_rewards_empty_row_gets_no_score():
    mask = torch.tensor([[0, 0, 0], [1, 1, 0]], dtype=DT)
    rewards, _, _ = shaped_rewards(
        torch.tensor([5.0, 7.0], dtype=DT), torch.zeros(2, 3, dtype=DT), torch.zeros(2, 3, dtype=DT), mask, 0.1
    )
    torch.testing.assert_close(rewards, torch.tensor([[0, 0, 0], [0, 7.0, 0]], dtype=DT))


# --------------------------------------------------------------------------- KL controllers


def test_fixed_controller_never_moves():
    controller = FixedKLController(0.02)
    for kl in (0.0, 5.0, 1e6):
        controller.update(kl, n_steps=512)
    assert controller.value == 0.02
    restored = FixedKLController(1.0)
    restored.load_state_dict(controller.state_dict())
    assert restored.value == 0.02


def test_adaptive_controller_direction_and_formula():
    up = AdaptiveKLController(0.15, target=6.0, horizon=10_000)
    up.update(6.6, n_steps=512)  # e = 0.1
    assert up.value == pytest.approx(0.15 * (1 + 0.1 * 512 / 10_000))
    down = AdaptiveKLController(0.15, target=6.0, horizon=10_000)
    down.update(5.4, n_steps=512)  # e = −0.1
    assert down.value == pytest.approx(0.15 * (1 - 0.1 * 512 / 10_000))
    still = AdaptiveKLController(0.15, target=6.0, horizon=10_000)
    still.update(torch.tensor(6.0), n_steps=512)
    assert still.value == pytest.approx(0.15)


def test_adaptive_controller_clips_error_at_0_2():
    far_above = AdaptiveKLController(0.1, target=1.0, horizon=100)
    far_above.update(1000.0, n_steps=10)
    assert far_above.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    far_below = AdaptiveKLController(0.1, target=1.0, horizon=100)
    far_below.update(0.0, n_steps=10)
    assert far_below.value == pytest.approx(0.1 * (1 - 0.2 * 10 / 100))


def test_adaptive_controller_steers_kl_to_target():
    # Toy closed loop: the policy's KL falls as the penalty grows, KL = c / β.
    controller = AdaptiveKLController(0.01, target=6.0, horizon=1_000)
    c = 0.6  # KL hits the target at β = 0.1
    gaps = []
    for _ in range(400):
        kl = c / controller.value
        gaps.append(abs(kl - 6.0))
        controller.update(kl, n_steps=256)
    assert gaps[-1] < 0.05 * gaps[0]
    assert controller.value == pytest.approx(0.1, rel=0.05)


def test_adaptive_controller_state_round_trip_and_validation():
    controller = AdaptiveKLController(0.15, target=6.0, horizon=10_000)
    controller.update(12.0, n_steps=512)
    restored = AdaptiveKLController(0.15, target=6.0, horizon=10_000)
    restored.load_state_dict(controller.state_dict())
    assert restored.value == controller.value
    with pytest.raises(ValueError, match="finite"):
        controller.update(float("nan"), n_steps=1)
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0.0, horizon=1)


# --------------------------------------------------------------------------- ranking loss (InstructGPT Eq. 1)


def all_pairs(order: list[int]) -> list[tuple[int, int]]:
    """(winner, loser) for every pair of a ranking given best-first."""
    return [(order[i], order[j]) for i in range(len(order)) for j in range(i + 1, len(order))]


def pairs_to_tensors(pairs_by_group: list[list[tuple[int, int]]]):
    winners = [w for pairs in pairs_by_group for w, _ in pairs]
    losers = [lo for pairs in pairs_by_group for _, lo in pairs]
    groups = [g for g, pairs in enumerate(pairs_by_group) for _ in pairs]
    return torch.tensor(winners), torch.tensor(losers), torch.tensor(groups)


@pytest.mark.parametrize("k", range(2, 10))
def test_ranking_loss_equals_eq1_for_one_prompt(k):
    g = torch.Generator().manual_seed(k)
    rewards = torch.randn(k, generator=g, dtype=DT) * 2
    order = torch.randperm(k, generator=g).tolist()  # labeler ranking, best first
    pairs = all_pairs(order)
    assert len(pairs) == math.comb(k, 2)
    winners, losers, groups = pairs_to_tensors([pairs])
    loss, stats = ranking_loss(rewards, winners, losers, groups, num_groups=1)
    r = rewards.tolist()
    expected = -sum(log_sigmoid(r[w] - r[lo]) for w, lo in pairs) / math.comb(k, 2)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    # the same number as the plain mean over explicitly enumerated pairs
    margins = torch.stack([rewards[w] - rewards[lo] for w, lo in pairs])
    assert loss.item() == pytest.approx((-F.logsigmoid(margins)).mean().item(), abs=1e-12)
    assert stats["rm/accuracy"].item() == pytest.approx(sum(r[w] > r[lo] for w, lo in pairs) / len(pairs))
    assert stats["rm/margin_mean"].item() == pytest.approx(sum(r[w] - r[lo] for w, lo in pairs) / len(pairs))
    assert stats["rm/num_pairs"].item() == len(pairs)


@pytest.mark.parametrize("seed", SEEDS)
def test_ranking_loss_batch_of_prompts_with_different_k_weighs_each_prompt_once(seed):
    g = torch.Generator().manual_seed(seed)
    ks = [2, 4, 9, 5, 3]
    offsets = [sum(ks[:i]) for i in range(len(ks))]
    rewards = torch.randn(sum(ks), generator=g, dtype=DT, requires_grad=True)
    pairs_by_group = []
    for k, offset in zip(ks, offsets):
        order = (torch.randperm(k, generator=g) + offset).tolist()
        pairs_by_group.append(all_pairs(order))
    # drop one "tied" pair from the K=4 prompt: it now has 5 pairs and still weighs 1
    pairs_by_group[1] = pairs_by_group[1][1:]
    winners, losers, groups = pairs_to_tensors(pairs_by_group)
    loss, _ = ranking_loss(rewards, winners, losers, groups, num_groups=len(ks))

    def naive(r):
        per_prompt = [-sum(F.logsigmoid(r[w] - r[lo]) for w, lo in pairs) / len(pairs) for pairs in pairs_by_group]
        return sum(per_prompt) / len(per_prompt)

    reference = naive(rewards)
    assert loss.item() == pytest.approx(reference.item(), abs=1e-12)
    (grad,) = torch.autograd.grad(loss, rewards)
    (expected_grad,) = torch.autograd.grad(reference, rewards)
    torch.testing.assert_close(grad, expected_grad)


def test_ranking_loss_skips_prompts_without_pairs_and_is_stable_for_huge_margins():
    rewards = torch.tensor([1000.0, -1000.0, 0.0, 0.0], dtype=DT, requires_grad=True)
    # prompt 0: loser scored far above winner; prompt 1 (completions 2, 3) was all ties -> no pairs
    loss, stats = ranking_loss(rewards, torch.tensor([1]), torch.tensor([0]), torch.tensor([0]), num_groups=2)
    assert loss.item() == pytest.approx(2000.0)
    loss.backward()
    assert torch.isfinite(rewards.grad).all()
    assert stats["rm/accuracy"].item() == 0.0


def test_ranking_loss_accumulates_over_micro_batches_with_normalizer():
    g = torch.Generator().manual_seed(11)
    ks = [3, 6, 4, 2]
    offsets = [sum(ks[:i]) for i in range(len(ks))]
    rewards = torch.randn(sum(ks), generator=g, dtype=DT, requires_grad=True)
    pairs_by_group = [all_pairs(list(range(offset, offset + k))) for k, offset in zip(ks, offsets)]
    winners, losers, groups = pairs_to_tensors(pairs_by_group)
    full, _ = ranking_loss(rewards, winners, losers, groups, num_groups=4)
    (full_grad,) = torch.autograd.grad(full, rewards)

    total = 0
    for micro in ([0, 1], [2, 3]):
        w, lo, gr = pairs_to_tensors([pairs_by_group[i] for i in micro])
        part, _ = ranking_loss(rewards, w, lo, gr, num_groups=2, normalizer=4)
        total = total + part
    (micro_grad,) = torch.autograd.grad(total, rewards)
    assert total.item() == pytest.approx(full.item(), abs=1e-12)
    torch.testing.assert_close(micro_grad, full_grad)


def test_ranking_loss_rejects_out_of_range_group():
    with pytest.raises(ValueError, match="num_groups"):
        ranking_loss(torch.zeros(2), torch.tensor([0]), torch.tensor([1]), torch.tensor([3]), num_groups=1)


# --------------------------------------------------------------------------- policy loss


def naive_policy_loss(logprobs, rollout_logprobs, advantages, mask, eps):
    total, count, clipped_count, k3_sum, k2_sum, ratios = 0.0, 0, 0, 0.0, 0.0, []
    for b, t in itertools.product(range(mask.shape[0]), range(mask.shape[1])):
        if not mask[b, t]:
            continue
        log_ratio = logprobs[b, t].item() - rollout_logprobs[b, t].item()
        ratio, adv = math.exp(log_ratio), advantages[b, t].item()
        surrogate = ratio * adv
        clipped_surrogate = min(max(ratio, 1 - eps), 1 + eps) * adv
        total += -min(surrogate, clipped_surrogate)
        clipped_count += clipped_surrogate < surrogate
        k3_sum += (ratio - 1) - log_ratio
        k2_sum += 0.5 * log_ratio**2
        ratios.append(ratio)
        count += 1
    return total / count, {
        "policy/clipfrac": clipped_count / count,
        "policy/approxkl_k3": k3_sum / count,
        "policy/approxkl_k2": k2_sum / count,
        "policy/ratio_mean": sum(ratios) / count,
        "policy/ratio_max": max(ratios),
    }


def random_policy_batch(seed: int, batch: int = 6, steps: int = 9):
    g = torch.Generator().manual_seed(seed)
    mask = ragged_mask(batch, steps, g)
    rollout_logprobs = -torch.rand(batch, steps, generator=g, dtype=DT) * 3
    logprobs = rollout_logprobs + torch.randn(batch, steps, generator=g, dtype=DT) * 0.3
    advantages = torch.randn(batch, steps, generator=g, dtype=DT)
    return logprobs, rollout_logprobs, advantages, mask


@pytest.mark.parametrize("seed", SEEDS)
def test_policy_loss_matches_loop(seed):
    logprobs, rollout_logprobs, advantages, mask = random_policy_batch(seed)
    loss, stats = policy_loss(logprobs, rollout_logprobs, advantages, mask, clip_range=0.2)
    expected_loss, expected_stats = naive_policy_loss(logprobs, rollout_logprobs, advantages, mask, 0.2)
    assert loss.item() == pytest.approx(expected_loss, abs=1e-12)
    assert 0 < expected_stats["policy/clipfrac"] < 1  # the random batch exercises both branches
    for key, value in expected_stats.items():
        assert stats[key].item() == pytest.approx(value, abs=1e-12), key
        assert not stats[key].requires_grad


def test_policy_loss_at_ratio_one_is_minus_mean_advantage():
    _, rollout_logprobs, advantages, mask = random_policy_batch(4)
    logprobs = rollout_logprobs.clone().requires_grad_(True)
    loss, stats = policy_loss(logprobs, rollout_logprobs, advantages, mask)
    assert loss.item() == pytest.approx(-masked_mean(advantages, mask).item(), abs=1e-12)
    assert stats["policy/clipfrac"].item() == 0.0
    assert stats["policy/approxkl_k3"].item() == 0.0
    assert stats["policy/ratio_max"].item() == 1.0


def test_policy_loss_gradient_is_zero_where_clipped():
    eps = 0.2
    # tokens: (ratio, advantage)
    cases = [
        (1.5, 1.0),  # above 1 + ε, A > 0: clipped, no gradient
        (0.5, -1.0),  # below 1 − ε, A < 0: clipped, no gradient
        (1.5, -1.0),  # above 1 + ε, A < 0: pessimistic unclipped branch, gradient flows
        (0.5, 1.0),  # below 1 − ε, A > 0: unclipped, gradient flows
        (1.1, 1.0),  # inside the trust region: gradient flows
    ]
    ratios = torch.tensor([[r for r, _ in cases]], dtype=DT)
    advantages = torch.tensor([[a for _, a in cases]], dtype=DT)
    rollout_logprobs = torch.full_like(ratios, -2.0)
    logprobs = (rollout_logprobs + ratios.log()).requires_grad_(True)
    mask = torch.ones_like(ratios)
    loss, stats = policy_loss(logprobs, rollout_logprobs, advantages, mask, clip_range=eps)
    loss.backward()
    grad = logprobs.grad[0]
    assert grad[0].item() == 0.0 and grad[1].item() == 0.0
    # d/dlogπ of −ρA / n = −ρA / n
    for i in (2, 3, 4):
        r, a = cases[i]
        assert grad[i].item() == pytest.approx(-r * a / len(cases), abs=1e-12)
    assert stats["policy/clipfrac"].item() == pytest.approx(2 / 5)


def test_policy_loss_ignores_poisoned_padding():
    logprobs, rollout_logprobs, advantages, mask = random_policy_batch(7)
    logprobs = poison_padding(logprobs, mask, float("-inf")).requires_grad_(True)
    rollout_logprobs = poison_padding(rollout_logprobs, mask, float("-inf"))
    advantages = poison_padding(advantages, mask, float("nan"))
    loss, stats = policy_loss(logprobs, rollout_logprobs, advantages, mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logprobs.grad).all()
    assert torch.all(logprobs.grad[mask == 0] == 0)
    assert all(torch.isfinite(v) for v in stats.values())


# --------------------------------------------------------------------------- value loss and explained variance


def naive_value_loss(values, rollout_values, returns, mask, eps):
    total, count, clipped_count = 0.0, 0, 0
    for b, t in itertools.product(range(mask.shape[0]), range(mask.shape[1])):
        if not mask[b, t]:
            continue
        v, v_roll, ret = values[b, t].item(), rollout_values[b, t].item(), returns[b, t].item()
        v_clip = v_roll + min(max(v - v_roll, -eps), eps)
        total += 0.5 * max((v - ret) ** 2, (v_clip - ret) ** 2)
        clipped_count += (v_clip - ret) ** 2 > (v - ret) ** 2
        count += 1
    return total / count, clipped_count / count


@pytest.mark.parametrize("seed", SEEDS)
def test_value_loss_matches_loop(seed):
    g = torch.Generator().manual_seed(seed)
    mask = ragged_mask(6, 8, g)
    rollout_values = torch.randn(6, 8, generator=g, dtype=DT)
    values = rollout_values + torch.randn(6, 8, generator=g, dtype=DT) * 0.4
    returns = torch.randn(6, 8, generator=g, dtype=DT)
    loss, stats = value_loss(values, rollout_values, returns, mask, clip_range=0.2)
    expected_loss, expected_clipfrac = naive_value_loss(values, rollout_values, returns, mask, 0.2)
    assert loss.item() == pytest.approx(expected_loss, abs=1e-12)
    assert stats["val/clipfrac"].item() == pytest.approx(expected_clipfrac, abs=1e-12)
    assert 0 < expected_clipfrac < 1


def test_value_loss_gradient_is_zero_where_clipped_error_dominates():
    rollout_values = torch.tensor([[0.0, 0.0, 0.0]], dtype=DT)
    returns = torch.tensor([[1.0, 1.0, 0.1]], dtype=DT)
    # token 0: V moved past the clip toward R (clipped error larger -> no gradient)
    # token 1: V moved away from R (unclipped error larger -> gradient V − R)
    # token 2: inside the clip range (both equal -> gradient V − R)
    values = torch.tensor([[0.5, -0.5, 0.05]], dtype=DT, requires_grad=True)
    loss, stats = value_loss(values, rollout_values, returns, torch.ones_like(values), clip_range=0.2)
    loss.backward()
    assert values.grad[0, 0].item() == 0.0
    assert values.grad[0, 1].item() == pytest.approx((-0.5 - 1.0) / 3)
    assert values.grad[0, 2].item() == pytest.approx((0.05 - 0.1) / 3)
    assert stats["val/clipfrac"].item() == pytest.approx(1 / 3)


def test_explained_variance_cases():
    g = torch.Generator().manual_seed(12)
    mask = ragged_mask(4, 6, g)
    returns = torch.randn(4, 6, generator=g, dtype=DT)
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    constant = torch.full_like(returns, masked_mean(returns, mask).item())
    assert explained_variance(constant, returns, mask).item() == pytest.approx(0.0, abs=1e-12)
    values = torch.randn(4, 6, generator=g, dtype=DT)
    selected = [(values[b, t].item(), returns[b, t].item()) for b in range(4) for t in range(6) if mask[b, t]]
    n = len(selected)
    mean_r = sum(r for _, r in selected) / n
    residuals = [r - v for v, r in selected]
    mean_res = sum(residuals) / n
    expected = 1 - (sum((e - mean_res) ** 2 for e in residuals) / n) / (
        sum((r - mean_r) ** 2 for _, r in selected) / n
    )
    assert explained_variance(values, returns, mask).item() == pytest.approx(expected, abs=1e-12)
    assert math.isnan(explained_variance(values, torch.ones_like(returns), mask).item())


# --------------------------------------------------------------------------- ptx loss


@pytest.mark.parametrize("seed", SEEDS)
def test_ptx_loss_is_negative_token_mean_logprob(seed):
    g = torch.Generator().manual_seed(seed)
    mask = ragged_mask(5, 7, g)
    logprobs = poison_padding(-torch.rand(5, 7, generator=g, dtype=DT) * 6, mask, float("-inf"))
    loss, stats = ptx_loss(logprobs, mask)
    selected = [logprobs[b, t].item() for b in range(5) for t in range(7) if mask[b, t]]
    assert loss.item() == pytest.approx(-sum(selected) / len(selected), abs=1e-12)
    assert loss.item() > 0
    assert stats["loss/ptx"].item() == loss.item()


# --------------------------------------------------------------------------- micro-batch accumulation


def _accumulation_case(seed):
    g = torch.Generator().manual_seed(seed)
    mask = ragged_mask(8, 7, g)
    rollout_logprobs = -torch.rand(8, 7, generator=g, dtype=DT) * 3
    logprobs = (rollout_logprobs + torch.randn(8, 7, generator=g, dtype=DT) * 0.3).requires_grad_(True)
    advantages = torch.randn(8, 7, generator=g, dtype=DT)
    rollout_values = torch.randn(8, 7, generator=g, dtype=DT)
    values = (rollout_values + torch.randn(8, 7, generator=g, dtype=DT) * 0.4).requires_grad_(True)
    returns = torch.randn(8, 7, generator=g, dtype=DT)
    return mask, rollout_logprobs, logprobs, advantages, rollout_values, values, returns


def _all_losses(rows, normalizer, case):
    mask, rollout_logprobs, logprobs, advantages, rollout_values, values, returns = case
    pg, _ = policy_loss(logprobs[rows], rollout_logprobs[rows], advantages[rows], mask[rows], normalizer=normalizer)
    vf, _ = value_loss(values[rows], rollout_values[rows], returns[rows], mask[rows], normalizer=normalizer)
    ptx, _ = ptx_loss(logprobs[rows], mask[rows], normalizer=normalizer)
    return pg, vf, ptx


@pytest.mark.parametrize("seed", SEEDS)
def test_micro_batch_accumulation_with_normalizer_equals_full_batch(seed):
    case = _accumulation_case(seed)
    mask, logprobs, values = case[0], case[2], case[5]
    full = _all_losses(slice(None), None, case)
    full_grads = [torch.autograd.grad(loss, (logprobs, values), allow_unused=True) for loss in full]

    token_count = mask.sum()
    micro_batches = [slice(0, 3), slice(3, 4), slice(4, 8)]  # uneven splits with different token counts
    summed = [0, 0, 0]
    for rows in micro_batches:
        for i, loss in enumerate(_all_losses(rows, token_count, case)):
            summed[i] = summed[i] + loss
    for i, (full_loss, micro_loss) in enumerate(zip(full, summed)):
        assert micro_loss.item() == pytest.approx(full_loss.item(), abs=1e-12)
        micro_grads = torch.autograd.grad(micro_loss, (logprobs, values), allow_unused=True)
        for full_grad, micro_grad in zip(full_grads[i], micro_grads):
            if full_grad is None:
                assert micro_grad is None
            else:
                torch.testing.assert_close(micro_grad, full_grad)

    # without the normalizer, averaging micro-batch means is NOT the token mean (uneven token counts)
    naive_average = sum(_all_losses(rows, None, case)[0] for rows in micro_batches) / len(micro_batches)
    assert naive_average.item() != pytest.approx(full[0].item(), abs=1e-6)


def test_normalizer_must_be_positive():
    with pytest.raises(ValueError, match="normalizer"):
        ptx_loss(torch.zeros(2, 3), torch.ones(2, 3), normalizer=0)


def _bf16_head_reference(hidden, weight, labels):
    """log-probs and ∂/∂W of a fresh bf16 cast of the weight as it is now: autocast's own matmul, no kept copy."""
    w = weight.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = hidden @ w.T  # (B, T, V) in bf16
    logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels[..., None])[..., 0]
    logprobs.sum().backward()
    return logprobs.detach(), w.grad


@pytest.mark.parametrize("foreach", [False, True], ids=["fused", "foreach"])
@pytest.mark.parametrize("steps", [1, 3])
def test_fused_lm_head_under_bf16_uses_the_weight_an_optimizer_just_stepped(steps, foreach):
    """Fused and foreach AdamW update parameters in place without bumping their version counter: the bf16
    head must still compute with the current weight, its log-probs and its gradient."""
    g = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(0.1 * torch.randn(512, 32, generator=g))
    hidden = torch.randn(2, 5, 32, generator=g)
    labels = torch.randint(0, 512, (2, 5), generator=g)
    optimizer = torch.optim.AdamW([weight], lr=0.05, fused=not foreach, foreach=foreach)

    def fused_head():
        weight.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = lm_head_logprobs(hidden, weight, labels, vocab_block=128)
        out.sum().backward()
        return out.detach(), weight.grad

    for _ in range(steps):
        fused_head()
        optimizer.step()
    logprobs, grad = fused_head()
    want_logprobs, want_grad = _bf16_head_reference(hidden, weight, labels)
    torch.testing.assert_close(logprobs, want_logprobs, rtol=0, atol=2e-2)  # bf16 rounding of the logits
    torch.testing.assert_close(grad, want_grad, rtol=2e-2, atol=2e-3 * want_grad.abs().max().item())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # the rollout's path: no autograd
        scored = lm_head_logprobs(hidden, weight, labels, vocab_block=128)
    torch.testing.assert_close(scored, want_logprobs, rtol=0, atol=2e-2)
