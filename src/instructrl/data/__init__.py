"""Record types and streaming loaders for demonstrations, comparisons, prompts and pretraining texts."""

from instructrl.data.loading import (
    LoadStats,
    iter_records,
    load_comparisons,
    load_demonstrations,
    load_prompts,
    load_texts,
    render_chat_prompt,
)
from instructrl.data.records import Comparison, Demonstration, PromptRecord, TextRecord

__all__ = [
    "Comparison",
    "Demonstration",
    "LoadStats",
    "PromptRecord",
    "TextRecord",
    "iter_records",
    "load_comparisons",
    "load_demonstrations",
    "load_prompts",
    "load_texts",
    "render_chat_prompt",
]
