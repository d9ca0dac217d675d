"""Our KV-cache sampling loop, PPO's default rollout sampler (``generation.backend=cached``).

It samples the distribution of :class:`instructrl.rollout.HFGenerateBackend` (transformers' ``generate``) with
less per-step overhead, and can sample the two halves of a batch at once on two CPU threads.
"""

from __future__ import annotations

from functools import partial

import torch

from instructrl.rollout.sampler import GenerationBackend, sampling_mode


def sample_inverse_cdf(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row by inversion (:func:`inverse_cdf_index`) with one uniform per row from ``generator``.

    An exact draw from ``probs`` with one uniform per row instead of :func:`sample_multinomial`'s V
    exponentials. (B, V) -> (B,)."""
    u = torch.rand(probs.shape[0], generator=generator, dtype=torch.float64, device=probs.device)  # (B,)
    return inverse_cdf_index(probs, u)


def inverse_cdf_index(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The first v with F(v) > u · F(V), F the cumulative sum of ``probs`` over the last dimension.

    With u uniform on [0, 1) this draws token v with probability p_v / F(V): v is chosen iff u·F(V) ∈
    [F(v − 1), F(v)), an interval of that length. The sum runs in float64 so that rounding cannot shift the
    interval bounds measurably. Zero-probability tokens have empty intervals and are never drawn.
    (B, V) probabilities and (B,) float64 uniforms -> (B,) token ids."""
    cdf = probs.to(torch.float64).cumsum(dim=-1)  # (B, V)
    index = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True).squeeze(1)  # (B,)
    return index.clamp_(max=probs.shape[1] - 1)  # u·F(V) rounding up to F(V) itself (p ≈ 2^-53)


class CachedSampler(GenerationBackend):
    """Pure sampling with a KV cache in a plain loop: the distribution of :class:`HFGenerateBackend`, faster.

    Each step draws one token per row from ``softmax(float32 logits / T)``, writes PAD into rows that have
    already emitted EOS, and the loop stops once every row has. With ``draw=sample_multinomial`` it returns
    exactly what ``model.generate`` returns for the same generator state (tested); the default
    :func:`sample_inverse_cdf` draws from the same distribution with one uniform per row (also tested), which
    on CPU is most of the saving at a 32k vocabulary. What the loop leaves out is ``generate``'s per-step
    machinery (generation-config resolution, logits-processor and stopping-criteria lists, input
    re-preparation from the whole sequence so far); the random draws come from ``generator`` directly
    instead of a forked global RNG.

    With the default draw, the uniforms of all steps are drawn up front, (steps × rows) in the order a
    step-by-step loop would draw them, so a row's tokens do not depend on the rows it is sampled with. That
    lets a concurrent ``runner`` (:mod:`instructrl.fast.overlap`, given at construction: PPO passes the
    ``overlap_models`` runner) sample the two halves of the batch at once on two threads: a decoding step
    on a CPU is a few small products and many small ops, which two threads split poorly, and one thread runs
    its half's Python while the other runs kernels (measurements: benchmarks/RESULTS.md). The tokens are the
    same either way up to float rounding of the logits.

    Position ids skip the left padding [ppo-details: left-pad-position-ids]: prompt positions are
    ``cumsum(mask) − 1`` and every new token takes the next position of its row.
    """

    def __init__(
        self, model: torch.nn.Module, eos_token_id: int, pad_token_id: int, draw=None, runner=None, stop=None
    ):
        super().__init__(eos_token_id, pad_token_id)
        self.stop = stop or all_finished
        """``stop(unfinished (B,) bool) -> bool``: whether sampling ends (default: no row left); a sharded
        policy's ranks agree on it (:meth:`instructrl.utils.distributed.Runtime.all_finished`)."""
        self.model = model
        self.draw = draw or sample_inverse_cdf
        """``draw(probs (B, V), generator) -> (B,)`` token ids: :func:`sample_inverse_cdf` (default) or
        :func:`sample_multinomial` (``generate``'s draw: then the tokens equal ``generate``'s exactly)."""
        self.runner = runner
        """Runs two tasks (:mod:`instructrl.fast.overlap`); when it runs them at once, the two halves of a batch are
        sampled at once. None: one after the other."""

    def sync_weights(self, model: torch.nn.Module) -> None:
        """The sampler runs the training model object itself, so there is nothing to copy."""
        self.model = model

    def _generate(self, prompt_ids, attention_mask, max_new_tokens, temperature, generator) -> torch.Tensor:
        """As :meth:`instructrl.rollout.GenerationBackend.generate`; with a concurrent runner the two halves of the
        batch are sampled at once (with the default draw; the same tokens up to float rounding of the logits)."""
        attention_mask = attention_mask.long()
        device_type = prompt_ids.device.type
        batch, device = prompt_ids.shape[0], prompt_ids.device
        runner = self.runner
        if self.draw is sample_inverse_cdf:
            uniforms = torch.rand(max_new_tokens, batch, generator=generator, dtype=torch.float64, device=device)

            def draw(probs: torch.Tensor, step: int, rows: slice) -> torch.Tensor:
                return inverse_cdf_index(probs, uniforms[step, rows])

        else:  # another draw takes the generator step by step, so its rows cannot be sampled apart
            draw = lambda probs, step, rows: self.draw(probs, generator)  # noqa: E731
            runner = None
        if runner is None or not runner.concurrent or batch < 2:
            with sampling_mode(device_type):
                return self._sample(prompt_ids, attention_mask, max_new_tokens, temperature, draw)
        halves = (slice(0, batch // 2), slice(batch // 2, batch))
        tasks = [
            partial(self._sample, prompt_ids[rows], attention_mask[rows], max_new_tokens, temperature, draw, rows)
            for rows in halves
        ]
        with sampling_mode(device_type):  # the runner's workers take on this thread's modes
            return torch.cat(runner.run(*tasks), dim=0)

    def _sample(
        self, prompt_ids, attention_mask, max_new_tokens, temperature, draw, rows: slice = slice(None)
    ) -> torch.Tensor:
        """Sample rows ``rows`` of the batch (given as ``prompt_ids``); ``draw(probs, step, rows)`` picks tokens."""
        from transformers import DynamicCache

        cache_name = kv_cache_argument()
        batch = prompt_ids.shape[0]
        responses = torch.full((batch, max_new_tokens), self.pad_token_id, dtype=torch.long, device=prompt_ids.device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, Q)
        next_position = position_ids[:, -1:] + 1  # (B, 1)
        unfinished = torch.ones(batch, dtype=torch.bool, device=prompt_ids.device)
        out = self.model(
            input_ids=prompt_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
            **{cache_name: DynamicCache(config=self.model.config)},
        )
        for step in range(max_new_tokens):
            logits = out.logits[:, -1].float()  # (B, V), as generate: float32 before the temperature
            if temperature != 1.0:
                logits = logits / temperature
            tokens = draw(torch.softmax(logits, dim=-1), step, rows)  # (B,)
            tokens = torch.where(unfinished, tokens, self.pad_token_id)
            responses[:, step] = tokens
            unfinished &= tokens != self.eos_token_id
            if step == max_new_tokens - 1 or self.stop(unfinished):
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((batch, 1))], dim=1)
            out = self.model(
                input_ids=tokens.unsqueeze(1),
                attention_mask=attention_mask,
                position_ids=next_position,
                use_cache=True,
                **{cache_name: getattr(out, cache_name)},
            )
            next_position = next_position + 1
        return responses  # (B, max_new_tokens)


def all_finished(unfinished: torch.Tensor) -> bool:
    return not bool(unfinished.any())


def kv_cache_argument() -> str:
    """The name of the KV-cache argument and output field of ``transformers`` models: ``cache`` from 5.x (where
    ``past_key_values`` is deprecated, to be removed in 5.40), ``past_key_values`` before."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
