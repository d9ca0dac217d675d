"""Labeling work: prompts, items, assignments and the submission of labels (used by the web app and the CLI).

Every function takes an open SQLAlchemy session; callers choose the transaction (``db.write()`` for changes).

Submissions are idempotent. Each rendered form carries a random ``submission_key``. The first submission
for an assignment creates its one :class:`~instructrl.label.db.Label` (the ``labels.assignment_id`` column
is unique); submitting the same form again (a double click, a retried request) finds the same key and
changes nothing. Editing past work sends the label ``version`` the form was rendered from: the edit is
applied only if nobody changed the label since, and bumps the version. Anything else (a second tab's
create form for an already labeled item, a stale edit) is a :class:`Conflict`, and nothing is written.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import random
from collections.abc import Iterable, Sequence
from typing import Literal

from sqlalchemy import Select, exists, func, select
from sqlalchemy.orm import Session, selectinload

from instructrl.data.records import PromptRecord
from instructrl.label.db import (
    Assignment,
    Item,
    ItemResponse,
    Label,
    Labeler,
    Prompt,
    ResponseRating,
    sha256_hex,
    utcnow,
)
from instructrl.label.forms import FLAGS, RankingInput, SubmissionMeta, is_unprintable

PromptTask = Literal["demonstration", "comparison"]


class Conflict(Exception):
    """A submission that cannot be applied to the current state (shown to the labeler, HTTP 409)."""


@dataclasses.dataclass(frozen=True)
class AddedPrompts:
    added: int
    duplicates: int
    """Prompts already in the database for the same task (skipped; loading a file twice is harmless)."""
    items: int
    """Demonstration items created."""


def add_prompts(
    session: Session, records: Iterable[PromptRecord], task: PromptTask, source: str | None = None
) -> AddedPrompts:
    """Insert prompts for ``task``; a ``demonstration`` prompt also becomes a demonstration item.

    ``comparison`` prompts wait for ``label add-samples`` to attach K responses.
    """
    if task not in ("demonstration", "comparison"):
        raise ValueError(f"task must be 'demonstration' or 'comparison', got {task!r}")
    now = utcnow()
    seen = set(session.scalars(select(Prompt.text_sha256).where(Prompt.task == task)))
    added = duplicates = items = 0
    for record in records:
        digest = sha256_hex(record.prompt)
        if digest in seen:
            duplicates += 1
            continue
        seen.add(digest)
        prompt = Prompt(
            text=record.prompt,
            text_sha256=digest,
            task=task,
            user_id=record.user_id,
            source=source,
            meta=dict(record.meta),
            created_at=now,
        )
        session.add(prompt)
        added += 1
        if task == "demonstration":
            session.add(Item(kind="demonstration", prompt=prompt, created_at=now))
            items += 1
    session.flush()
    return AddedPrompts(added, duplicates, items)


def prompts_needing_samples(session: Session, limit: int = 0, resample: bool = False) -> list[tuple[int, str]]:
    """``(prompt_id, text)`` of comparison prompts without a comparison item yet (all of them with ``resample``)."""
    query = select(Prompt.id, Prompt.text).where(Prompt.task == "comparison").order_by(Prompt.id)
    if not resample:
        query = query.where(~exists().where(Item.prompt_id == Prompt.id, Item.kind == "comparison"))
    if limit > 0:
        query = query.limit(limit)
    return [(pid, text) for pid, text in session.execute(query)]


def add_comparison_item(
    session: Session, prompt_id: int, responses: Sequence[str], models: Sequence[str | None] | None = None
) -> Item:
    """A comparison item for prompt ``prompt_id`` with ``responses`` at canonical positions 0..K-1."""
    if len(responses) < 2:
        raise ValueError(f"a comparison needs at least 2 responses, got {len(responses)}")
    if any(not text.strip() for text in responses):
        # the training loaders refuse empty responses, so they never enter the database
        raise ValueError("a comparison response is empty or whitespace only")
    if any(is_unprintable(c) for text in responses for c in text):
        # held to the labelers' standard (forms.clean_text); add-samples shows such characters visibly
        raise ValueError(
            "a comparison response contains control characters or U+FFFD; clean it with forms.clean_generated_text"
        )
    models = list(models) if models is not None else [None] * len(responses)
    if len(models) != len(responses):
        raise ValueError("models must have one entry per response")
    item = Item(kind="comparison", prompt_id=prompt_id, created_at=utcnow())
    item.responses = [ItemResponse(position=p, text=t, model=m) for p, (t, m) in enumerate(zip(responses, models))]
    session.add(item)
    session.flush()
    return item


def display_order(k: int, rng: random.Random) -> list[int]:
    """A uniformly random order in which one labeler sees the K responses (removes position bias)."""
    order = list(range(k))
    rng.shuffle(order)
    return order


def add_assignment(session: Session, item: Item, labeler: Labeler, rng: random.Random) -> Assignment:
    now = utcnow()
    order = display_order(len(item.responses), rng) if item.kind == "comparison" else None
    assignment = Assignment(
        item=item, labeler=labeler, status="pending", display_order=order, created_at=now, updated_at=now
    )
    session.add(assignment)
    return assignment


# --------------------------------------------------------------------------- the labeler's view


WorkKind = Literal["mixed", "demonstration", "comparison"]
WORK_NAMES: dict[str, str] = {"mixed": "Both, alternating", "demonstration": "Writing", "comparison": "Ranking"}
"""The kinds of work a queue can offer (``Labeler.work``), with the names the queue page shows."""


def _pending(labeler_id: int, kind: WorkKind) -> Select[tuple[Assignment]]:
    """The labeler's pending assignments in queue order.

    ``mixed`` alternates the kinds (the oldest demonstration, the oldest comparison, the next demonstration,
    ...), so that both kinds of work are reached early however many of one kind were loaded first; one kind
    lists only that kind, oldest first.
    """
    query = (
        select(Assignment)
        .join(Item, Assignment.item_id == Item.id)
        .where(Assignment.labeler_id == labeler_id, Assignment.status == "pending")
    )
    if kind != "mixed":
        return query.where(Item.kind == kind).order_by(Assignment.id)
    turn = func.row_number().over(partition_by=Item.kind, order_by=Assignment.id)
    return query.order_by(turn, Item.kind.desc(), Assignment.id)


def queue_for(
    session: Session, labeler_id: int, limit: int | None = None, kind: WorkKind = "mixed"
) -> list[Assignment]:
    """The labeler's pending assignments of ``kind`` in queue order (the first ``limit`` of them)."""
    query = _pending(labeler_id, kind).options(selectinload(Assignment.item).selectinload(Item.prompt))
    return list(session.scalars(query.limit(limit)))


def history_for(session: Session, labeler_id: int, limit: int | None = None) -> list[Assignment]:
    """The labeler's submitted and skipped assignments, most recently changed first."""
    return list(
        session.scalars(
            select(Assignment)
            .where(Assignment.labeler_id == labeler_id, Assignment.status != "pending")
            .options(selectinload(Assignment.item).selectinload(Item.prompt), selectinload(Assignment.label))
            .order_by(Assignment.updated_at.desc(), Assignment.id.desc())
            .limit(limit)
        )
    )


def status_counts(session: Session, labeler_id: int) -> dict[str, int]:
    """How many of the labeler's assignments are pending, done and skipped."""
    rows = session.execute(
        select(Assignment.status, func.count()).where(Assignment.labeler_id == labeler_id).group_by(Assignment.status)
    )
    counts = dict.fromkeys(("pending", "done", "skipped"), 0)
    counts.update(dict(rows.all()))
    return counts


def owned_assignment(session: Session, labeler_id: int, assignment_id: int) -> Assignment | None:
    """Assignment ``assignment_id`` if it belongs to ``labeler_id``, else None (others' work is invisible)."""
    return session.scalar(
        select(Assignment)
        .where(Assignment.id == assignment_id, Assignment.labeler_id == labeler_id)
        .options(
            selectinload(Assignment.item).selectinload(Item.prompt),
            selectinload(Assignment.item).selectinload(Item.responses),
            selectinload(Assignment.label).selectinload(Label.ratings),
        )
    )


def next_pending(session: Session, labeler_id: int, kind: WorkKind = "mixed") -> int | None:
    """The id of the labeler's first pending assignment of ``kind`` in queue order (None when there is none)."""
    return session.scalar(_pending(labeler_id, kind).with_only_columns(Assignment.id).limit(1))


# --------------------------------------------------------------------------- submissions

SubmitOutcome = Literal["created", "updated", "unchanged"]


def _store_label(
    session: Session, assignment: Assignment, meta: SubmissionMeta, now: dt.datetime
) -> tuple[Label, SubmitOutcome]:
    """Find or create the label to write, enforcing the idempotency and edit rules of the module docstring."""
    label = assignment.label
    if label is not None and label.submission_key == meta.key:
        return label, "unchanged"
    if session.scalar(select(Label.id).where(Label.submission_key == meta.key)) is not None:
        raise Conflict("This form was already used for other work. Reload the page and submit again.")
    if label is None:
        label = Label(assignment=assignment, submission_key=meta.key, version=1, submitted_at=now, updated_at=now)
        session.add(label)
        return label, "created"
    if meta.expected_version is None:
        raise Conflict("This item was already submitted (perhaps in another tab). Open it from History to edit it.")
    if meta.expected_version != label.version:
        raise Conflict("This label was changed since you opened it. Reload the page to see the current version.")
    label.submission_key = meta.key
    label.version += 1
    label.updated_at = now
    return label, "updated"


def _mark_done(assignment: Assignment, now: dt.datetime) -> None:
    assignment.status = "done"
    assignment.skip_reason = assignment.skip_note = None
    assignment.updated_at = now


def submit_demonstration(
    session: Session, assignment: Assignment, response: str, meta: SubmissionMeta
) -> SubmitOutcome:
    if assignment.item.kind != "demonstration":
        raise Conflict("This item is not a demonstration.")
    now = utcnow()
    label, outcome = _store_label(session, assignment, meta, now)
    if outcome != "unchanged":
        label.response = response
        _mark_done(assignment, now)
    session.flush()
    return outcome


def submit_ranking(
    session: Session, assignment: Assignment, data: RankingInput, meta: SubmissionMeta
) -> SubmitOutcome:
    item = assignment.item
    if item.kind != "comparison":
        raise Conflict("This item is not a comparison.")
    if len(data.ratings) != len(item.responses):
        raise Conflict("The form does not match this item. Reload the page.")
    now = utcnow()
    label, outcome = _store_label(session, assignment, meta, now)
    if outcome == "unchanged":
        return outcome
    label.ranking = [list(e) if isinstance(e, tuple) else e for e in data.ranking]
    existing = {r.position: r for r in label.ratings}
    for position, rating in enumerate(data.ratings):
        row = existing.get(position)
        if row is None:  # positions are fixed per item, so an edit updates rows in place
            row = ResponseRating(position=position)
            label.ratings.append(row)
        row.quality = rating.quality
        for flag in FLAGS:
            setattr(row, flag, flag in rating.flags)
    _mark_done(assignment, now)
    session.flush()
    return outcome


def skip_assignment(session: Session, assignment: Assignment, reason: str, note: str) -> None:
    """Mark a pending (or already skipped) assignment as skipped; submitted work is edited, not skipped."""
    if assignment.status == "done":
        raise Conflict("This item was already submitted; edit it from History instead of skipping it.")
    assignment.status = "skipped"
    assignment.skip_reason, assignment.skip_note = reason, note or None
    assignment.updated_at = utcnow()
    session.flush()
