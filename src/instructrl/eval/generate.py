"""Batched response generation for evaluation and model selection (sampling lives in ``rollout/``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from instructrl.data.loading import encode_prompts
from instructrl.fast.kernels import few_rows_cpu_lm_head


@dataclass(frozen=True)
class Generated:
    """One decoded response: the text up to (not including) EOS, and whether EOS was emitted."""

    text: str
    stopped: bool
    n_tokens: int


@torch.inference_mode()
def generate_responses(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    batch_size: int = 64,
    seed: int = 0,
) -> list[Generated]:
    """Generate one response per prompt: greedy when ``temperature == 0``, else pure sampling at ``temperature``.

    Prompts are left-padded (transformers derives position ids from the attention mask); output order
    matches ``prompts``. Text after the first EOS is dropped. The model's LM head is switched to
    :func:`~instructrl.fast.kernels.few_rows_cpu_lm_head` (the same products, faster for a decoding step's few
    rows on a CPU; every other call runs ``F.linear`` as before).
    """
    was_training = model.training
    model.eval()
    few_rows_cpu_lm_head(model)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    generator_state = torch.get_rng_state()
    torch.manual_seed(seed)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    out: list[Generated | None] = [None] * len(prompts)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            encoded = encode_prompts(tokenizer, [prompts[i] for i in idx])
            width = max(len(e) for e in encoded)
            input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
            attention_mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, ids in enumerate(encoded):  # left padding
                input_ids[row, width - len(ids) :] = torch.tensor(ids)
                attention_mask[row, width - len(ids) :] = 1
            kwargs = {"do_sample": False} if temperature == 0 else {"do_sample": True, "temperature": temperature}
            seqs = model.generate(
                input_ids=input_ids.to(model.device),
                attention_mask=attention_mask.to(model.device),
                max_new_tokens=max_new_tokens,
                eos_token_id=eos,
                pad_token_id=pad,
                top_k=0,
                top_p=1.0,
                **kwargs,
            )
            for row, i in enumerate(idx):
                response = seqs[row, width:].tolist()
                stopped = eos in response
                if stopped:
                    response = response[: response.index(eos)]
                text = tokenizer.decode(response, skip_special_tokens=True)
                out[i] = Generated(text=text, stopped=stopped, n_tokens=len(response) + int(stopped))
    finally:
        torch.set_rng_state(generator_state)
        model.train(was_training)
    return out  # type: ignore[return-value]
