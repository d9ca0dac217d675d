"""Reward-model over-optimization (Gao, Schulman & Hilton 2022): gold and proxy score against d = √KL.

Optimizing a learned reward model (the proxy) raises the proxy score steadily, while the true (gold)
score first rises and then falls. Gao et al. measure both against the distance from the initial policy

    d = √KL(π ‖ π_init)          (KL in nats; KL behaves like a squared distance)

and fit, with scores recentred so the initial policy scores 0 (R(0) = 0),

    best-of-n:  R_bon(d) = d · (α_bon − β_bon · d)
    RL:         R_RL(d)  = d · (α_RL − β_RL · ln d)

Both forms are linear in (α, β): R = α·x − β·z with x = d and z = d² (BoN) or z = d·ln d (RL), so the
least-squares fit of R itself is a 2 × 2 linear system solved in closed form (no numpy / scipy needed).
d·ln d → 0 as d → 0, so the initial point (d = 0, R = 0) fits exactly and only points with d > 0 inform
the fit. Peaks: BoN at d* = α/(2β), RL at d* = exp(α/β − 1).

Here the RL points are PPO checkpoints (``policy-iter-XXXX`` snapshots): each samples responses to
held-out prompts, KL is the k1 estimate Σ_t [log π(y_t) − log π_ref(y_t)] on those samples (EOS included,
log-probs at the sampling temperature, as PPO computes it) averaged over samples, the gold score is the
world's judgement and the proxy is the reward model's score (``missing_eos_score`` for responses that
never ended, as PPO rewards them). Best-of-n points come from :mod:`instructrl.eval.best_of_n`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from instructrl.data.loading import encode_prompts
from instructrl.errors import UserFacingError
from instructrl.models.causal_lm import disable_dropout, load_causal_lm, load_tokenizer
from instructrl.models.logprobs import response_logits
from instructrl.models.scoring import max_positions
from instructrl.rl.logprobs import logprobs_from_logits
from instructrl.rollout.sampler import HFGenerateBackend, truncate_after_eos
from instructrl.stages.ppo_rollout import left_pad
from instructrl.world import Task, World

# --------------------------------------------------------------------------- fits


@dataclass(frozen=True)
class Fit:
    """Least-squares coefficients of one functional form, with the fit's root-mean-square error."""

    form: str
    """``"rl"``: R = d(α − β ln d); ``"bon"``: R = d(α − β d)."""
    alpha: float
    beta: float
    rmse: float
    n_points: int

    def __call__(self, d: float) -> float:
        return predict(self.form, d, self.alpha, self.beta)

    @property
    def peak_d(self) -> float | None:
        """d* where the curve peaks (None when β ≤ 0: no peak)."""
        if self.beta <= 0:
            return None
        if self.form == "bon":
            return self.alpha / (2 * self.beta)
        return math.exp(self.alpha / self.beta - 1)


def _rl_feature(d: float) -> float:
    return d * math.log(d) if d > 0 else 0.0  # lim_{d→0} d ln d = 0


def predict(form: str, d: float, alpha: float, beta: float) -> float:
    """R(d) of the form ``"rl"`` (d(α − β ln d)) or ``"bon"`` (d(α − β d))."""
    z = d * d if form == "bon" else _rl_feature(d)
    return alpha * d - beta * z


def fit_form(form: str, d: Sequence[float], r: Sequence[float]) -> Fit | None:
    """Least squares of R = α·d − β·z(d) over the points (z = d² for ``"bon"``, d ln d for ``"rl"``).

    Normal equations of min Σ_i (r_i − α x_i − b z_i)² with b = −β:

        [Σxx Σxz] [α]   [Σxr]
        [Σxz Σzz] [b] = [Σzr]

    Returns None when fewer than two points have d > 0 or the system is singular.
    """
    if form not in ("rl", "bon"):
        raise ValueError(f"unknown form {form!r}; expected 'rl' or 'bon'")
    if len(d) != len(r):
        raise ValueError(f"{len(d)} distances but {len(r)} scores")
    xs = [float(v) for v in d]
    zs = [v * v if form == "bon" else _rl_feature(v) for v in xs]
    rs = [float(v) for v in r]
    if sum(1 for v in xs if v > 0) < 2:
        return None
    sxx = sum(x * x for x in xs)
    sxz = sum(x * z for x, z in zip(xs, zs))
    szz = sum(z * z for z in zs)
    sxr = sum(x * y for x, y in zip(xs, rs))
    szr = sum(z * y for z, y in zip(zs, rs))
    det = sxx * szz - sxz * sxz
    if abs(det) <= 1e-12 * max(sxx * szz, 1e-300):
        return None
    alpha = (szz * sxr - sxz * szr) / det
    b = (sxx * szr - sxz * sxr) / det
    residuals = [y - alpha * x - b * z for x, z, y in zip(xs, zs, rs)]
    rmse = math.sqrt(sum(e * e for e in residuals) / len(residuals))
    return Fit(form, alpha, -b, rmse, len(xs))


def fit_rl(d: Sequence[float], r: Sequence[float]) -> Fit | None:
    """Gao et al.'s RL form R_RL(d) = d(α − β ln d), least squares (see :func:`fit_form`)."""
    return fit_form("rl", d, r)


def fit_bon(d: Sequence[float], r: Sequence[float]) -> Fit | None:
    """Gao et al.'s best-of-n form R_bon(d) = d(α − β d), least squares (see :func:`fit_form`)."""
    return fit_form("bon", d, r)


# --------------------------------------------------------------------------- curves


@dataclass(frozen=True)
class OverOptPoint:
    """One optimized policy: its distance from the initial policy and its scores relative to it."""

    method: str
    """``"rl"`` (a PPO checkpoint) or ``"bon"`` (best-of-n)."""
    run: str
    label: str
    """``iter-0040`` for a checkpoint, ``n=16`` for best-of-n."""
    step: int
    """PPO iteration, or n."""
    kl: float
    """KL(π ‖ π_init) in nats (measured for RL, log n − (n−1)/n for best-of-n)."""
    d: float
    """√KL."""
    gold: float
    """Mean gold score minus the initial policy's."""
    proxy: float
    """Mean reward-model score minus the initial policy's."""
    gold_raw: float
    proxy_raw: float


@dataclass
class OverOptCurve:
    """The points of one optimization run and the fits of gold and proxy score against d."""

    method: str
    run: str
    points: list[OverOptPoint]
    gold_fit: Fit | None = None
    proxy_fit: Fit | None = None

    @classmethod
    def fitted(cls, method: str, run: str, points: list[OverOptPoint]) -> OverOptCurve:
        """A curve with both fits computed in the form of ``method``."""
        ds = [p.d for p in points]
        return cls(
            method,
            run,
            points,
            fit_form(method, ds, [p.gold for p in points]),
            fit_form(method, ds, [p.proxy for p in points]),
        )


def relative_points(method: str, run: str, raw: Sequence[tuple[str, int, float, float, float]]) -> list[OverOptPoint]:
    """Points from raw ``(label, step, kl, gold, proxy)`` rows; the first row is the initial policy whose
    scores are subtracted (Gao et al. recentre so the initial policy scores 0)."""
    if not raw:
        return []
    _, _, _, gold0, proxy0 = raw[0]
    return [
        OverOptPoint(method, run, label, step, kl, math.sqrt(max(kl, 0.0)), gold - gold0, proxy - proxy0, gold, proxy)
        for label, step, kl, gold, proxy in raw
    ]


# --------------------------------------------------------------------------- sampling with token ids


@dataclass
class Samples:
    """Sampled responses as token ids (EOS removed) and text, with the per-sample KL to a reference."""

    prompt_index: list[int]
    """Which prompt each sample answers."""
    response_ids: list[list[int]]
    stopped: list[bool]
    """Whether the sample emitted EOS."""
    texts: list[str]
    kl: list[float] | None = field(default=None)
    """Σ_t [log π(y_t) − log π_ref(y_t)] over the response (EOS included); None without a reference."""


def fit_prompt(ids: list[int], limit: int | None, max_new_tokens: int) -> list[int]:
    """Keep a prompt's last tokens so that it and ``max_new_tokens`` fit the model's context."""
    if limit is None or len(ids) + max_new_tokens <= limit:
        return ids
    keep = limit - max_new_tokens
    if keep <= 0:
        raise UserFacingError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in {limit} positions")
    return ids[-keep:]


@torch.inference_mode()
def sample_responses(
    model,
    tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    samples_per_prompt: int = 1,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    ref_model=None,
) -> Samples:
    """Pure sampling (top_k 0, top_p 1) of ``samples_per_prompt`` responses per prompt, prompt-major order.

    With ``ref_model``, each sample's KL Σ_t [log π(y_t) − log π_ref(y_t)] is computed exactly as PPO does:
    one forward pass per model over left-padded prompt ⊕ response, log-probs of logits / T.
    """
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    backend = HFGenerateBackend(model, eos, pad)
    device = next(model.parameters()).device
    limit = max_positions(model)
    generator = torch.Generator(device=device).manual_seed(seed)  # generate() samples on the model's device
    rows = [i for i in range(len(prompt_ids)) for _ in range(samples_per_prompt)]
    out = Samples([], [], [], [], [] if ref_model is not None else None)
    for start in range(0, len(rows), batch_size):
        index = rows[start : start + batch_size]
        query, query_mask = left_pad([fit_prompt(list(prompt_ids[i]), limit, max_new_tokens) for i in index], pad)
        query, query_mask = query.to(device), query_mask.to(device)
        raw = backend.generate(query, query_mask, max_new_tokens, temperature, generator)  # (b, max_new_tokens)
        response, mask, has_eos = truncate_after_eos(raw, eos, pad)  # mask includes the EOS
        width = max(1, int(mask.sum(dim=1).max()))
        response, mask = response[:, :width], mask[:, :width]  # (b, R)
        if ref_model is not None:
            input_ids = torch.cat([query, response], dim=1)  # (b, Q + R)
            attention_mask = torch.cat([query_mask, mask.long()], dim=1)
            logprobs = logprobs_from_logits(
                response_logits(model, input_ids, attention_mask, width), response, temperature
            )
            ref_logprobs = logprobs_from_logits(
                response_logits(ref_model, input_ids, attention_mask, width), response, temperature
            )  # (b, R)
            out.kl.extend(((logprobs - ref_logprobs) * mask).sum(dim=1).tolist())  # type: ignore[union-attr]
        for row, prompt in enumerate(index):
            length = int(mask[row].sum()) - int(has_eos[row])  # tokens before the EOS
            ids = response[row, :length].tolist()
            out.prompt_index.append(prompt)
            out.response_ids.append(ids)
            out.stopped.append(bool(has_eos[row]))
            out.texts.append(tokenizer.decode(ids, skip_special_tokens=True))
    return out


def proxy_scores(
    scorer, prompt_ids: Sequence[Sequence[int]], samples: Samples, missing_eos_score: float | None
) -> list[float]:
    """Reward-model score of each sample (its prompt ⊕ response ⊕ EOS); samples that never emitted EOS get
    ``missing_eos_score`` when it is set, as PPO rewards them."""
    scores = scorer.score_ids([prompt_ids[i] for i in samples.prompt_index], samples.response_ids).tolist()
    if missing_eos_score is None:
        return scores
    return [s if stopped else missing_eos_score for s, stopped in zip(scores, samples.stopped)]


def gold_scores(world: World, tasks: Sequence[Task], samples: Samples) -> list[float]:
    return [world.gold_score(tasks[i], text) for i, text in zip(samples.prompt_index, samples.texts)]


# --------------------------------------------------------------------------- PPO checkpoints


_SNAPSHOT = re.compile(r"^policy-iter-(\d+)$")


def policy_snapshots(ppo_dir: str | Path) -> list[tuple[int, Path]]:
    """``(iteration, path)`` of every ``policy-iter-XXXX`` snapshot in a PPO output folder, by iteration."""
    root = Path(ppo_dir)
    found = []
    for child in root.iterdir() if root.is_dir() else ():
        m = _SNAPSHOT.match(child.name)
        if m and child.is_dir():
            found.append((int(m.group(1)), child))
    return sorted(found)


def load_policy(path: str | Path, device: torch.device):
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path, tokenizer)
    disable_dropout(model)
    return model.to(device).eval(), tokenizer


def rl_curve(
    run: str,
    ppo_dir: str | Path,
    reference_dir: str | Path,
    world: World,
    tasks: Sequence[Task],
    scorer,
    samples_per_prompt: int = 1,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    missing_eos_score: float | None = -1.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> OverOptCurve:
    """Gold and proxy score against d over a PPO run's snapshots, with the RL-form fits.

    The reference policy (PPO's KL reference and starting point) is the d = 0 point; every snapshot
    samples responses to the same ``tasks`` with the same seed.
    """
    snapshots = policy_snapshots(ppo_dir)
    if not snapshots:
        raise UserFacingError(
            f"{ppo_dir} has no policy-iter-XXXX snapshots; train with --set save_policy_every=N to measure "
            "over-optimization"
        )
    device = torch.device(device)
    ref_model, tokenizer = load_policy(reference_dir, device)
    prompt_ids = encode_prompts(tokenizer, [t.prompt for t in tasks])
    raw = []
    for label, step, path in [("reference", 0, None)] + [(f"iter-{i:04d}", i, p) for i, p in snapshots]:
        model = ref_model if path is None else load_policy(path, device)[0]
        samples = sample_responses(
            model, tokenizer, prompt_ids, samples_per_prompt, max_new_tokens, temperature, seed, ref_model=ref_model
        )
        kl = sum(samples.kl) / len(samples.kl)  # type: ignore[arg-type]
        gold = gold_scores(world, tasks, samples)
        proxy = proxy_scores(scorer, prompt_ids, samples, missing_eos_score)
        raw.append((label, step, kl, sum(gold) / len(gold), sum(proxy) / len(proxy)))
        print(f"  over-optimization {run} {label}: KL {kl:.3f}, gold {raw[-1][3]:+.3f}, proxy {raw[-1][4]:+.3f}")
    return OverOptCurve.fitted("rl", run, relative_points("rl", run, raw))
