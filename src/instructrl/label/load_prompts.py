"""``instructrl label load-prompts``: load prompts (e.g. a split written by ``instructrl data prepare``).

Each line is ``{"prompt", "user_id"?, ...}`` (:func:`instructrl.data.loading.load_prompts`); other fields
(such as ``type``) are kept with the prompt. ``task`` says what labelers do with them:

* ``demonstration``: every new prompt becomes an item on which a labeler writes the ideal response.
* ``comparison``: the prompts wait for ``instructrl label add-samples`` to attach K model responses.

A prompt already loaded for the same task is skipped, so loading a file twice adds nothing. The database
file is created if it does not exist.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from instructrl.config import require_path_exists, require_positive
from instructrl.data.loading import load_prompts
from instructrl.errors import DataError
from instructrl.label.db import open_database
from instructrl.label.tasks import add_prompts


@dataclasses.dataclass(frozen=True)
class Config:
    """Options of ``instructrl label load-prompts``."""

    db: str
    """Labeling database file (SQLite; created if missing)."""
    prompts: str
    """Prompt file: .jsonl / .jsonl.gz of {"prompt", "user_id"?, ...} objects (data prepare's train/valid/test)."""
    task: Literal["demonstration", "comparison"] = "demonstration"
    """'demonstration': labelers write responses; 'comparison': labelers rank responses from add-samples."""
    skip_bad: bool = False
    """Skip (and count) malformed or over-long prompts instead of stopping at the first one."""
    max_prompt_chars: int = 20_000
    """Longest prompt accepted, in characters."""

    def validate(self) -> None:
        require_path_exists(self, "prompts")
        require_positive(self, "max_prompt_chars")


def run(cfg: Config) -> dict[str, Any]:
    records, stats = load_prompts(cfg.prompts, skip_bad=cfg.skip_bad)
    kept = []
    too_long = 0
    for number, record in enumerate(records, start=1):
        if len(record.prompt) > cfg.max_prompt_chars:
            if not cfg.skip_bad:
                raise DataError(
                    f"prompt number {number} is {len(record.prompt)} characters long, over "
                    f"max_prompt_chars={cfg.max_prompt_chars} (or use --set skip_bad=true)",
                    path=cfg.prompts,
                    field="prompt",
                )
            too_long += 1
            continue
        kept.append(record)
    with open_database(cfg.db) as db, db.write() as session:
        result = add_prompts(session, kept, cfg.task, source=str(cfg.prompts))
    print(
        f"label load-prompts: {stats.summary()}; added {result.added} {cfg.task} prompts, "
        f"{result.duplicates} already loaded, {too_long} over {cfg.max_prompt_chars} characters skipped; "
        f"{result.items} demonstration items created",
        flush=True,
    )
    return {
        "added": result.added,
        "duplicates": result.duplicates,
        "items": result.items,
        "skipped_bad": stats.n_skipped,
        "skipped_too_long": too_long,
    }
