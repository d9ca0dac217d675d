"""Response generation for PPO rollouts: a small backend interface, two samplers, EOS truncation.

A rollout samples y ~ π_φ(·|x) for a batch of left-padded prompts x with **pure sampling** at temperature
T (top_k = 0, top_p = 1, no repetition penalty) [ppo-details: pure-sampling]: anything else would sample from
a different distribution than the one PPO's log-probs describe.

Backends
    :class:`GenerationBackend`, the base class of every backend, is the whole contract between the PPO loop and
    the sampler:

    - ``generate(prompt_ids, attention_mask, max_new_tokens, temperature, generator=None)`` returns the
      sampled response token ids, shape (B, max_new_tokens). Positions after a row's first EOS may hold
      anything (the samplers here fill them with PAD); :func:`truncate_after_eos` cleans them up.
    - ``sync_weights(model)`` is called after every policy update, before the next rollout.

    :class:`instructrl.fast.sampler.CachedSampler` (PPO's default, ``generation.backend=cached``) is a plain
    KV-cache loop on the live policy; :class:`HFGenerateBackend` (``hf``) runs ``model.generate`` on it. Both
    sample from the training model object itself, so syncing is free. An inference engine plugs in here too:
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
from collections.abc import Iterator

import torch
from transformers import GenerationConfig


class GenerationBackend:
    """Samples responses from the current policy; see the module docstring for the contract.

    The base of every backend: it holds the EOS and PAD ids (which must differ) and checks the temperature;
    a backend implements :meth:`_generate` and :meth:`sync_weights`.
    """

    def __init__(self, eos_token_id: int, pad_token_id: int):
        if eos_token_id == pad_token_id:
            # [ppo-details: pad-not-eos]
            raise ValueError("EOS and PAD must be different tokens: masking PAD would mask EOS too")
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id

    def generate(
        self,
        prompt_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int,
        temperature: float,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """(B, Q) left-padded prompts and their mask -> (B, max_new_tokens) sampled response ids, drawn with
        ``generator`` (None: the global RNG) at ``temperature`` > 0."""
        require_sampling_temperature(temperature)
        return self._generate(prompt_ids, attention_mask, max_new_tokens, temperature, generator)

    def _generate(self, prompt_ids, attention_mask, max_new_tokens, temperature, generator) -> torch.Tensor:
        """:meth:`generate` with its arguments checked."""
        raise NotImplementedError

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the next ``generate`` sample from ``model``'s current weights."""
        raise NotImplementedError


class HFGenerateBackend(GenerationBackend):
    """Pure sampling with ``transformers``' ``generate`` (KV cache) on the live policy model.

    ``generate`` stops early once every row has emitted EOS and pads finished rows with PAD; the output
    is right-padded with PAD to exactly ``max_new_tokens`` columns so every backend returns one shape.
    Position ids are derived from the attention mask by ``generate`` itself (never pass them:
    [ppo-details: left-pad-position-ids]).
    """

    def __init__(self, model: torch.nn.Module, eos_token_id: int, pad_token_id: int):
        super().__init__(eos_token_id, pad_token_id)
        self.model = model

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

    def _generate(self, prompt_ids, attention_mask, max_new_tokens, temperature, generator) -> torch.Tensor:
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
