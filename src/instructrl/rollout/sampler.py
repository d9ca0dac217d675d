"""Response generation for PPO rollouts: a small backend interface, two samplers, EOS truncation.

A rollout samples y ~ π_φ(·|x) for a batch of left-padded prompts x with **pure sampling** at temperature
T (top_k = 0, top_p = 1, no repetition penalty) [ppo-details: pure-sampling]: anything else would sample from
a different distribution than the one PPO's log-probs describe.

Backends
    :class:`GenerationBackend` is the whole contract between the PPO loop and the sampler:

    - ``generate(prompt_ids, attention_mask, max_new_tokens, temperature, generator=None)`` returns the
      sampled response token ids, shape (B, max_new_tokens). Positions after a row's first EOS may hold
      anything (the samplers here fill them with PAD); :func:`truncate_after_eos` cleans them up.
    - ``sync_weights(model)`` is called after every policy update, before the next rollout.
    - Optionally ``takes_runner = True``: then a rollout also passes ``generate`` its ``runner=``
      (:mod:`instructrl.utils.overlap`), with which :class:`CachedSampler` samples two halves of the batch at once.

    :class:`CachedSampler` (PPO's default, ``generation.backend=cached``) is a plain KV-cache loop on the live
    policy; :class:`HFGenerateBackend` (``hf``) runs ``model.generate`` on it. Both sample from the training
    model object itself, so syncing is free. An inference engine plugs in here too:
    :class:`instructrl.rollout.vllm_backend.VLLMBackend` (``vllm``) sends the prompt token ids to a vLLM
    engine and loads the policy's weights into it in ``sync_weights``. The PPO loop re-computes every
    log-prob with its own forward pass, so an engine with slightly different numerics changes nothing but
    the samples.

EOS handling [ppo-details: eos-trick]: everything after the first EOS is replaced by PAD and masked; the
response mask includes the EOS token itself, because emitting EOS is an action the policy took and the RM
reads its score there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from functools import partial
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from transformers import GenerationConfig

if TYPE_CHECKING:
    from instructrl.utils.overlap import OverlapRunner, SequentialRunner


@runtime_checkable
class GenerationBackend(Protocol):
    """Samples responses from the current policy; see the module docstring for the contract."""

    def generate(
        self,
        prompt_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int,
        temperature: float,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """(B, Q) left-padded prompts and their mask -> (B, max_new_tokens) sampled response ids."""
        ...

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the next ``generate`` sample from ``model``'s current weights."""
        ...


class HFGenerateBackend:
    """Pure sampling with ``transformers``' ``generate`` (KV cache) on the live policy model.

    ``generate`` stops early once every row has emitted EOS and pads finished rows with PAD; the output
    is right-padded with PAD to exactly ``max_new_tokens`` columns so every backend returns one shape.
    Position ids are derived from the attention mask by ``generate`` itself (never pass them:
    [ppo-details: left-pad-position-ids]).
    """

    def __init__(self, model: torch.nn.Module, eos_token_id: int, pad_token_id: int):
        if eos_token_id == pad_token_id:
            # [ppo-details: pad-not-eos]
            raise ValueError("EOS and PAD must be different tokens: masking PAD would mask EOS too")
        self.model = model
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id

    def sync_weights(self, model: torch.nn.Module) -> None:
        """The backend samples from the training model object itself, so there is nothing to copy."""
        self.model = model

    def generation_config(self, max_new_tokens: int, temperature: float) -> GenerationConfig:
        """Pure sampling at ``temperature``: every other logits processor explicitly switched off."""
        return GenerationConfig(
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            min_p=None,
            typical_p=1.0,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            max_new_tokens=max_new_tokens,
            min_new_tokens=0,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            use_cache=True,
        )

    def generate(
        self,
        prompt_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int,
        temperature: float,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        require_sampling_temperature(temperature)
        config = self.generation_config(max_new_tokens, temperature)

        def sample() -> torch.Tensor:
            with sampling_mode(prompt_ids.device.type):
                return self.model.generate(
                    input_ids=prompt_ids, attention_mask=attention_mask, generation_config=config
                )

        sequences = run_with_generator(sample, generator)  # (B, Q + n), n <= max_new_tokens
        responses = sequences[:, prompt_ids.shape[1] :]
        missing = max_new_tokens - responses.shape[1]
        if missing > 0:
            responses = torch.nn.functional.pad(responses, (0, missing), value=self.pad_token_id)
        return responses  # (B, max_new_tokens)


@contextlib.contextmanager
def sampling_mode(device_type: str) -> Iterator[None]:
    """No autograd while sampling: ``torch.inference_mode``, or, when autocast is on for ``device_type``,
    ``torch.no_grad`` with inference mode switched off, and autocast's cast cache cleared on the way out.

    Autocast keeps the low-precision copy of each float32 weight it casts until its region ends, but only
    outside inference mode; inside it every call casts again. A sampling loop calls every weight once per
    token, so under inference mode bf16 sampling would re-cast the whole model at every step, which for a
    large LM head on few rows costs as much as the product itself (see benchmarks/RESULTS.md). Clearing the
    cache at the end frees those copies before the scoring forwards (and drops any cast an enclosing region
    cached).
    """
    if not torch.is_autocast_enabled(device_type):
        with torch.inference_mode():
            yield
        return
    try:
        with torch.inference_mode(False), torch.no_grad():
            yield
    finally:
        torch.clear_autocast_cache()


def require_sampling_temperature(temperature: float) -> None:
    """Every backend samples, so a temperature of 0 (greedy) or below is an error, not a mode."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")


def sample_multinomial(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row, ``torch.multinomial(probs, 1)``: what ``generate`` draws. (B, V) -> (B,).

    On CPU this draws V exponential variates per row (an exponential race): costly at a large vocabulary."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


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


class CachedSampler:
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
    lets ``generate(..., runner=...)`` (:mod:`instructrl.utils.overlap`; PPO rollouts pass the ``overlap_models``
    runner) sample the two halves of the batch at once on two threads when that runner is concurrent: a decoding step
    on a CPU is a few small products and many small ops, which two threads split poorly, and one thread runs
    its half's Python while the other runs kernels (measurements: benchmarks/RESULTS.md). The tokens are the
    same either way up to float rounding of the logits.

    Position ids skip the left padding [ppo-details: left-pad-position-ids]: prompt positions are
    ``cumsum(mask) − 1`` and every new token takes the next position of its row.
    """

    takes_runner = True
    """``generate`` accepts ``runner=``: a rollout passes its runner to every backend that says so."""

    def __init__(self, model: torch.nn.Module, eos_token_id: int, pad_token_id: int, draw=None):
        if eos_token_id == pad_token_id:
            # [ppo-details: pad-not-eos]
            raise ValueError("EOS and PAD must be different tokens: masking PAD would mask EOS too")
        self.model = model
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.draw = draw or sample_inverse_cdf
        """``draw(probs (B, V), generator) -> (B,)`` token ids: :func:`sample_inverse_cdf` (default) or
        :func:`sample_multinomial` (``generate``'s draw: then the tokens equal ``generate``'s exactly)."""

    def sync_weights(self, model: torch.nn.Module) -> None:
        """The sampler runs the training model object itself, so there is nothing to copy."""
        self.model = model

    def generate(
        self,
        prompt_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int,
        temperature: float,
        generator: torch.Generator | None = None,
        runner: SequentialRunner | OverlapRunner | None = None,
    ) -> torch.Tensor:
        """As :meth:`GenerationBackend.generate`; a concurrent ``runner`` samples the two halves of the batch at
        once (with the default draw; the tokens are the same up to float rounding of the logits)."""
        require_sampling_temperature(temperature)
        attention_mask = attention_mask.long()
        device_type = prompt_ids.device.type
        batch, device = prompt_ids.shape[0], prompt_ids.device
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
        return torch.cat(runner.run(*tasks, context=_same_modes_as_here(device_type)), dim=0)

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
            if step == max_new_tokens - 1 or not bool(unfinished.any()):
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


def _same_modes_as_here(device_type: str) -> Callable[[], contextlib.AbstractContextManager]:
    """A context factory for worker threads: the caller's autocast (thread-local, so not inherited) and
    :func:`sampling_mode`."""
    autocast = torch.is_autocast_enabled(device_type)
    dtype = torch.get_autocast_dtype(device_type)

    def context() -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        if autocast:
            stack.enter_context(torch.autocast(device_type, dtype=dtype))
        stack.enter_context(sampling_mode(device_type))
        return stack

    return context


def kv_cache_argument() -> str:
    """The name of the KV-cache argument and output field of ``transformers`` models: ``cache`` from 5.x (where
    ``past_key_values`` is deprecated, to be removed in 5.40), ``past_key_values`` before."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def run_with_generator(fn, generator: torch.Generator | None):
    """Run ``fn`` with the global RNG of ``generator``'s device temporarily replaced by ``generator``'s state.

    ``transformers``' ``generate`` samples from the global RNG and takes no generator. Forking the global
    state, loading the generator's state into it and copying it back afterwards gives sampling its own
    reproducible stream (saved in checkpoints for exact resume) and leaves the global RNG untouched.
    """
    if generator is None:
        return fn()
    device = generator.device
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.random.fork_rng(devices=[index]):
            torch.cuda.set_rng_state(generator.get_state(), index)
            out = fn()
            generator.set_state(torch.cuda.get_rng_state(index))
        return out
    if device.type != "cpu":
        raise ValueError(f"generators on {device.type} are not supported; use a CPU or CUDA generator")
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(generator.get_state())
        out = fn()
        generator.set_state(torch.get_rng_state())
    return out


def truncate_after_eos(
    responses: torch.Tensor, eos_token_id: int, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut each response at its first EOS: later tokens become PAD and are masked out.

    Args:
        responses: (B, R) sampled token ids.
        eos_token_id: the EOS id.
        pad_token_id: the PAD id written after EOS.

    Returns:
        ``(responses, response_mask, has_eos)``: (B, R) ids with PAD after the first EOS; (B, R) bool mask,
        True up to and including the first EOS (the whole row when there is none); (B,) bool, whether the
        row emitted EOS at all.
    """
    is_eos = responses == eos_token_id  # (B, R)
    has_eos = is_eos.any(dim=1)  # (B,)
    positions = torch.arange(responses.shape[1], device=responses.device)  # (R,)
    no_eos_index = torch.full_like(has_eos, responses.shape[1], dtype=torch.long)
    first_eos = torch.where(has_eos, is_eos.long().argmax(dim=1), no_eos_index)  # (B,)
    response_mask = positions.unsqueeze(0) <= first_eos.unsqueeze(1)  # (B, R); includes the EOS
    truncated = torch.where(response_mask, responses, torch.full_like(responses, pad_token_id))
    return truncated, response_mask, has_eos
