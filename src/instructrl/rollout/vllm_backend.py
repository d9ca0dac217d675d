"""Optional vLLM generation backend for PPO rollouts on GPUs (``pip install 'instructrl[vllm]'``).

Select it with ``generation.backend=vllm``. Each process runs its own vLLM engine (colocated with training on
the same GPU, ``generation.vllm_gpu_memory_utilization`` of its memory) and samples its share of the prompts.
The contract is :class:`instructrl.rollout.sampler.GenerationBackend`'s:

- ``generate`` sends each prompt's unpadded token ids with ``SamplingParams(temperature=T, top_k=-1, top_p=1,
  max_tokens=max_new_tokens, stop_token_ids=[EOS])`` (pure sampling [ppo-details: pure-sampling]) and one
  seed per request drawn from the rollout's generator, so rollouts are reproducible and resumable like the
  other backends'.
- ``sync_weights(policy)`` loads the policy's current weights into the engine after every policy update
  (and after a resume), then drops the engine's prefix cache, whose keys and values belong to the old weights.

PPO recomputes every log-prob with its own forward pass, so the engine's numerics only change which responses
are sampled, never the loss. Status: this module's padding, seeding and EOS helpers are tested on CPU; the
engine calls follow vLLM's offline API (``LLM``, ``SamplingParams``, ``TokensPrompt``, ``collective_rpc``) and
are exercised only by ``tests/test_vllm_backend.py``, which is skipped where vLLM or CUDA is missing — it has
not run on the machines this project is developed and tested on. Weight loading goes through the model's
``load_weights`` (every vLLM model has one), in-process when the engine runs in this process and through
``collective_rpc`` otherwise; internal attribute paths differ between vLLM releases, so a release that moves
them fails loudly in ``sync_weights`` rather than silently sampling from stale weights.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

from instructrl.rollout.sampler import GenerationBackend

IN_PROCESS_MODEL_PATHS = (
    ("llm_engine", "model_executor", "driver_worker", "worker", "model_runner", "model"),
    ("llm_engine", "model_executor", "driver_worker", "model_runner", "model"),
)
"""Where vLLM releases keep the engine's model when it runs in this process (V1 engine without multiprocessing,
then the V0 engine)."""


def unpadded_prompts(prompt_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
    """The real tokens of each left-padded prompt row: (B, Q) -> B lists of ids."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(prompt_ids.cpu(), attention_mask.cpu())]


def request_seeds(generator: torch.Generator | None, n: int) -> list[int] | list[None]:
    """One sampling seed per request, drawn from the rollout's generator (None: vLLM's own randomness)."""
    if generator is None:
        return [None] * n
    return torch.randint(0, 2**31 - 1, (n,), generator=generator, device=generator.device).tolist()


def responses_to_tensor(
    responses: Iterable[tuple[list[int], bool]], max_new_tokens: int, eos_token_id: int, pad_token_id: int
) -> torch.Tensor:
    """Sampled ids, right-padded with PAD: (B, max_new_tokens).

    Each response is ``(token_ids, stopped_at_eos)``. A response that stopped at EOS ends with it (the EOS is
    an action the policy took; engines differ in whether they return the stop token, so it is appended where
    missing and the room allows).
    """
    rows = []
    for token_ids, stopped_at_eos in responses:
        ids = list(token_ids)[:max_new_tokens]
        if stopped_at_eos and (not ids or ids[-1] != eos_token_id) and len(ids) < max_new_tokens:
            ids.append(eos_token_id)
        rows.append(ids + [pad_token_id] * (max_new_tokens - len(ids)))
    return torch.tensor(rows, dtype=torch.long).reshape(len(rows), max_new_tokens)


def _load_weights_on_worker(worker, weights: list[tuple[str, torch.Tensor]]) -> None:
    """Runs inside a vLLM worker (``collective_rpc``): load the named tensors into its model."""
    worker.model_runner.model.load_weights(weights=weights)


class VLLMBackend(GenerationBackend):
    """Samples with a vLLM engine on this process's GPU; see the module docstring."""

    def __init__(
        self,
        model_path: str,
        eos_token_id: int,
        pad_token_id: int,
        gpu_memory_utilization: float = 0.3,
        seed: int = 0,
        under_launcher: bool = False,
    ):
        super().__init__(eos_token_id, pad_token_id)
        if not torch.cuda.is_available():
            raise RuntimeError("generation.backend=vllm needs a CUDA GPU; use generation.backend=cached or hf")
        # keep the engine in this process, so sync_weights can reach its model directly
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            from vllm import LLM
        except ImportError:
            raise RuntimeError(
                "generation.backend=vllm needs vLLM: pip install 'instructrl[vllm]' (GPU machines only)"
            ) from None
        extra = {"distributed_executor_backend": "external_launcher"} if under_launcher else {}
        self.llm = LLM(
            model=str(model_path),
            gpu_memory_utilization=gpu_memory_utilization,
            seed=seed,
            enable_prefix_caching=False,  # prompts repeat rarely, and cached keys/values would outlive a sync
            **extra,
        )

    def _generate(self, prompt_ids, attention_mask, max_new_tokens, temperature, generator) -> torch.Tensor:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = unpadded_prompts(prompt_ids, attention_mask)
        params = [
            SamplingParams(
                n=1,
                temperature=temperature,
                top_k=-1,
                top_p=1.0,
                max_tokens=max_new_tokens,
                stop_token_ids=[self.eos_token_id],
                seed=seed,
            )
            for seed in request_seeds(generator, len(prompts))
        ]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        responses = [(list(o.outputs[0].token_ids), o.outputs[0].finish_reason == "stop") for o in outputs]
        out = responses_to_tensor(responses, max_new_tokens, self.eos_token_id, self.pad_token_id)
        return out.to(prompt_ids.device)

    def sync_weights(self, model: torch.nn.Module) -> None:
        weights = [(name, tensor.detach()) for name, tensor in model.state_dict().items()]
        engine_model = self._in_process_model()
        if engine_model is not None:
            engine_model.load_weights(weights=weights)
        elif hasattr(self.llm, "collective_rpc"):
            self.llm.collective_rpc(_load_weights_on_worker, args=([(n, t.cpu()) for n, t in weights],))
        else:
            raise RuntimeError("this vLLM release exposes neither the engine's model nor collective_rpc")
        if hasattr(self.llm, "reset_prefix_cache"):
            self.llm.reset_prefix_cache()

    def _in_process_model(self):
        for path in IN_PROCESS_MODEL_PATHS:
            node = self.llm
            for attribute in path:
                node = getattr(node, attribute, None)
                if node is None:
                    break
            if node is not None and hasattr(node, "load_weights"):
                return node
        return None
