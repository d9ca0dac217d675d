"""``instructrl label export``: submitted labels as SFT demonstrations or K-way comparisons (JSONL).

Formats (each line one object; the loaders in :mod:`instructrl.data.loading` read both, extra fields land
in the record's ``meta``)

* ``demonstrations``: ``{"prompt", "response", "labeler_id", "item_id", "prompt_id", "labeled_at"}``,
  ready for ``instructrl sft --set data=FILE``.
* ``comparisons``: ``{"prompt", "responses", "ranking", "labeler_id", "item_id", "prompt_id", "ratings",
  "models", "labeled_at"}`` where ``responses`` are in canonical order (not the random order a labeler
  saw), ``ranking`` lists response indices best first with a nested list for a tie group, and
  ``ratings[i]`` holds response i's 1-7 ``quality`` and metadata flags. Ready for
  ``instructrl rm --set comparisons=FILE``.

An item labeled by several labelers (overlap) gives one record per labeler, each with its ``labeler_id``
(the reward model trains on every ranking; ``rm --set heldout_labelers=[...]`` can hold some out).
Skipped and pending assignments are not exported.

Consistency: the whole export is read in one SQLite snapshot, so labels submitted while it runs are either
entirely in it or entirely absent, and the file is written atomically (readers never see half of it).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from instructrl.config import require
from instructrl.label.db import Assignment, Item, Label, Labeler, open_database
from instructrl.label.forms import FLAGS
from instructrl.utils.io import atomic_write_jsonl

ExportKind = Literal["demonstrations", "comparisons"]


@dataclasses.dataclass(frozen=True)
class Config:
    """Options of ``instructrl label export``."""

    db: str
    """Labeling database file (SQLite)."""
    kind: ExportKind
    """What to export: 'demonstrations' (for sft) or 'comparisons' (for rm)."""
    output: str
    """JSONL file to write (replaced atomically; readable by its owner only, mode 0600)."""

    def validate(self) -> None:
        require(bool(self.output.strip()), "output", "must name a file")


def _done_labels(session: Session, kind: str) -> list[Label]:
    query = (
        select(Label)
        .join(Assignment, Label.assignment_id == Assignment.id)
        .join(Item, Assignment.item_id == Item.id)
        .join(Labeler, Assignment.labeler_id == Labeler.id)
        .where(Item.kind == kind, Assignment.status == "done")
        .options(
            selectinload(Label.assignment).selectinload(Assignment.labeler),
            selectinload(Label.assignment).selectinload(Assignment.item).selectinload(Item.prompt),
            selectinload(Label.assignment).selectinload(Assignment.item).selectinload(Item.responses),
            selectinload(Label.ratings),
        )
        .order_by(Item.id, Labeler.username)
    )
    return list(session.scalars(query))


def _timestamp(label: Label) -> str:
    return label.updated_at.replace(microsecond=0).isoformat() + "Z"


def demonstration_records(session: Session) -> list[dict[str, Any]]:
    """Every submitted demonstration as an SFT record."""
    out = []
    for label in _done_labels(session, "demonstration"):
        assignment = label.assignment
        out.append(
            {
                "prompt": assignment.item.prompt.text,
                "response": label.response,
                "labeler_id": assignment.labeler.username,
                "item_id": assignment.item_id,
                "prompt_id": assignment.item.prompt_id,
                "labeled_at": _timestamp(label),
            }
        )
    return out


def comparison_records(session: Session) -> list[dict[str, Any]]:
    """Every submitted ranking as a K-way comparison record."""
    out = []
    for label in _done_labels(session, "comparison"):
        assignment = label.assignment
        responses = assignment.item.responses
        out.append(
            {
                "prompt": assignment.item.prompt.text,
                "responses": [r.text for r in responses],
                "ranking": label.ranking,
                "labeler_id": assignment.labeler.username,
                "item_id": assignment.item_id,
                "prompt_id": assignment.item.prompt_id,
                "ratings": [
                    {"quality": r.quality, **{flag: bool(getattr(r, flag)) for flag in FLAGS}} for r in label.ratings
                ],
                "models": [r.model for r in responses],
                "labeled_at": _timestamp(label),
            }
        )
    return out


def export_records(session: Session, kind: ExportKind) -> list[dict[str, Any]]:
    if kind == "demonstrations":
        return demonstration_records(session)
    if kind == "comparisons":
        return comparison_records(session)
    raise ValueError(f"kind must be 'demonstrations' or 'comparisons', got {kind!r}")


def run(cfg: Config) -> dict[str, Any]:
    with open_database(cfg.db, must_exist=True) as db:
        with db.read() as session:  # one snapshot for every query of the export
            records = export_records(session, cfg.kind)
        n = atomic_write_jsonl(cfg.output, records, private=True)  # labelers' work and names: owner only
    labelers = sorted({r["labeler_id"] for r in records})
    print(f"label export: wrote {n} {cfg.kind} from {len(labelers)} labeler(s) to {cfg.output}", flush=True)
    return {"kind": cfg.kind, "records": n, "labelers": labelers, "output": cfg.output}
