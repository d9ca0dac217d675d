"""``instructrl label assign``: give unassigned items to labelers, with some overlap for agreement.

Plan (:func:`plan_assignments`, deterministic for a given ``seed`` and database state)
    1. Of the N eligible items (no assignment yet, optionally one kind, optionally the first ``limit``),
       ``round(overlap_fraction · N)`` chosen uniformly at random are *overlap* items, given to
       ``overlap_labelers`` different labelers each (all of them when there are fewer; no overlap with a
       single labeler); every other item goes to one labeler. Overlap items are what inter-labeler
       agreement is measured on (InstructGPT App. B.1).
    2. Items are handed out in id order, each to the labeler(s) with the fewest pending assignments so far
       (existing pending work counts), ties broken at random: queues stay balanced even when labelers
       are added later.
    3. Each comparison assignment gets its own random display order of the K responses (removing position
       bias), drawn from ``Random(f"{seed}:{item_id}:{username}")``.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from sqlalchemy import exists, func, select
from sqlalchemy.orm import selectinload

from instructrl.config import require, require_fraction, require_non_negative
from instructrl.errors import UserFacingError
from instructrl.label.db import Assignment, Item, Labeler, open_database
from instructrl.label.tasks import add_assignment


@dataclasses.dataclass(frozen=True)
class Config:
    """Options of ``instructrl label assign``."""

    db: str
    """Labeling database file (SQLite)."""
    labelers: list[str] = dataclasses.field(default_factory=list)
    """Usernames to assign to; empty = every active labeler with role 'labeler'."""
    kind: Literal["all", "demonstration", "comparison"] = "all"
    """Which unassigned items to assign."""
    overlap_fraction: float = 0.1
    """Fraction of the items given to several labelers (for agreement); 0 = none."""
    overlap_labelers: int = 2
    """How many labelers label each overlap item."""
    limit: int = 0
    """Assign at most this many items (oldest first); 0 = all unassigned items."""
    seed: int = 0
    """Seed for choosing overlap items, breaking ties and the response display orders."""

    def validate(self) -> None:
        require_fraction(self, "overlap_fraction")
        require_non_negative(self, "limit")
        require(self.overlap_labelers >= 2, "overlap_labelers", f"must be >= 2, got {self.overlap_labelers}")


def plan_assignments(
    item_ids: Sequence[int],
    labelers: Sequence[str],
    overlap_fraction: float,
    overlap_labelers: int,
    seed: int,
    pending: Mapping[str, int] | None = None,
) -> list[tuple[int, list[str]]]:
    """``(item_id, labelers)`` for every item, following steps 1-2 of the module docstring."""
    if not labelers:
        raise UserFacingError("no labelers to assign to; create some with 'instructrl label create-labeler'")
    rng = random.Random(seed)
    # with fewer labelers than asked for, an overlap item goes to all of them (none with a single labeler)
    overlap_labelers = min(overlap_labelers, len(labelers))
    n_overlap = round(overlap_fraction * len(item_ids)) if overlap_labelers >= 2 else 0
    overlap = set(rng.sample(list(item_ids), n_overlap))
    load = {name: (pending or {}).get(name, 0) for name in labelers}
    plan = []
    for item_id in item_ids:
        m = overlap_labelers if item_id in overlap else 1
        chosen = sorted(labelers, key=lambda name: (load[name], rng.random()))[:m]
        for name in chosen:
            load[name] += 1
        plan.append((item_id, chosen))
    return plan


def run(cfg: Config) -> dict[str, Any]:
    with open_database(cfg.db, must_exist=True) as db, db.write() as session:
        if cfg.labelers:
            wanted = {name.strip().lower() for name in cfg.labelers}
            found = {lab.username: lab for lab in session.scalars(select(Labeler).where(Labeler.username.in_(wanted)))}
            missing = sorted(wanted - set(found))
            if missing:
                raise UserFacingError(f"unknown labelers: {', '.join(missing)}")
            inactive = sorted(name for name, lab in found.items() if not lab.active)
            if inactive:
                raise UserFacingError(f"inactive labelers: {', '.join(inactive)}")
        else:
            found = {
                lab.username: lab
                for lab in session.scalars(select(Labeler).where(Labeler.role == "labeler", Labeler.active))
            }
        query = (
            select(Item)
            .where(~exists().where(Assignment.item_id == Item.id))
            .options(selectinload(Item.responses))
            .order_by(Item.id)
        )
        if cfg.kind != "all":
            query = query.where(Item.kind == cfg.kind)
        if cfg.limit:
            query = query.limit(cfg.limit)
        items = {item.id: item for item in session.scalars(query)}
        pending = dict(
            session.execute(
                select(Labeler.username, func.count())
                .join(Assignment, Assignment.labeler_id == Labeler.id)
                .where(Assignment.status == "pending")
                .group_by(Labeler.username)
            ).all()
        )
        if not items:
            print("label assign: no unassigned items", flush=True)
            return {"items": 0, "assignments": 0, "overlap_items": 0, "per_labeler": {}}
        plan = plan_assignments(
            list(items), sorted(found), cfg.overlap_fraction, cfg.overlap_labelers, cfg.seed, pending
        )
        per_labeler = dict.fromkeys(sorted(found), 0)
        for item_id, names in plan:
            for name in names:
                add_assignment(session, items[item_id], found[name], random.Random(f"{cfg.seed}:{item_id}:{name}"))
                per_labeler[name] += 1
        n_overlap = sum(len(names) > 1 for _, names in plan)
    n_assignments = sum(per_labeler.values())
    print(
        f"label assign: {len(plan)} items -> {n_assignments} assignments ({n_overlap} items overlap); "
        + ", ".join(f"{name}: {n}" for name, n in per_labeler.items()),
        flush=True,
    )
    return {"items": len(plan), "assignments": n_assignments, "overlap_items": n_overlap, "per_labeler": per_labeler}
