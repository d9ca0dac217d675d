"""Base causal LM construction and loading (any Hugging Face causal LM; the sandbox builds a tiny one)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from instructrl.config import require, require_positive
from instructrl.errors import UserFacingError


@dataclass
class ModelSpec:
    """Architecture of a freshly initialized base model (used by ``pretrain``)."""

    arch: Literal["llama", "gpt2"] = "llama"
    """Transformers architecture family: 'llama' (RoPE, RMSNorm, SwiGLU) or 'gpt2' (learned positions)."""
    d_model: int = 128
    """Hidden width."""
    n_layers: int = 4
    """Number of transformer blocks."""
    n_heads: int = 4
    """Attention heads (must divide d_model)."""
    d_ff: int = 0
    """MLP inner width; 0 means 4 × d_model for gpt2 and 8/3 × d_model (rounded to 32) for llama."""
    max_seq_len: int = 256
    """Longest sequence (prompt + response) the model supports."""
    tie_embeddings: bool = True
    """Share input embedding and unembedding weights (saves parameters at small sizes)."""

    def validate(self) -> None:
        require_positive(self, "d_model", "n_layers", "n_heads", "max_seq_len")
        require(self.d_model % self.n_heads == 0, "model.n_heads", f"must divide d_model={self.d_model}")
        require(self.d_ff >= 0, "model.d_ff", "must be >= 0")


def build_causal_lm(spec: ModelSpec, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A randomly initialized causal LM of ``spec`` whose special-token ids match ``tokenizer``."""
    ids = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }
    if spec.arch == "llama":
        d_ff = spec.d_ff or int(round(spec.d_model * 8 / 3 / 32) * 32)
        config = LlamaConfig(
            hidden_size=spec.d_model,
            intermediate_size=d_ff,
            num_hidden_layers=spec.n_layers,
            num_attention_heads=spec.n_heads,
            num_key_value_heads=spec.n_heads,
            max_position_embeddings=spec.max_seq_len,
            tie_word_embeddings=spec.tie_embeddings,
            **ids,
        )
        model = LlamaForCausalLM(config)
    else:
        config = GPT2Config(
            n_embd=spec.d_model,
            n_inner=spec.d_ff or 4 * spec.d_model,
            n_layer=spec.n_layers,
            n_head=spec.n_heads,
            n_positions=spec.max_seq_len,
            tie_word_embeddings=spec.tie_embeddings,
            # no built-in dropout: stages add exactly the dropout they want (SFT: residual dropout)
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **ids,
        )
        model = GPT2LMHeadModel(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer and make sure it has a PAD token distinct from EOS (added if missing)."""
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise UserFacingError(f"could not load a tokenizer from {path}: {e}") from None
    if tok.eos_token is None:
        raise UserFacingError(f"tokenizer at {path} has no EOS token; set one before training")
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        tok.add_special_tokens({"pad_token": "<pad>"})
    return tok


def load_causal_lm(
    path: str | Path, tokenizer: PreTrainedTokenizerBase | None = None, dtype: torch.dtype = torch.float32
) -> PreTrainedModel:
    """Load a causal LM from a local directory (or hub name); resizes embeddings if a PAD was added."""
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except (OSError, ValueError) as e:
        raise UserFacingError(f"could not load a causal LM from {path}: {e}") from None
    if tokenizer is not None:
        if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))
        model.config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability to 0 [ppo-details: dropout-off]: log-probs become deterministic, the first PPO
    ratio is exactly 1 and the KL estimate is exact."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):  # Llama-style attention keeps a float
            module.attention_dropout = 0.0
    cfg = getattr(model, "config", None)
    if cfg is not None:
        for name in ("attention_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "hidden_dropout", "dropout"):
            if hasattr(cfg, name) and isinstance(getattr(cfg, name), float):
                setattr(cfg, name, 0.0)
