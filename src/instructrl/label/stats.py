"""``instructrl label stats``: progress per labeler, skip reasons and inter-labeler agreement.

Agreement is the pairwise agreement of :mod:`instructrl.agreement` over comparison items ranked by
two or more labelers (the paper reports 72.6 ± 1.5% between training labelers, InstructGPT App. B.1),
overall, per labeler (against everyone they overlap with) and per labeler pair. The admin page
``/admin/agreement`` shows the same numbers. Everything is read in one database snapshot.
"""

from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from instructrl.agreement import agreement_report
from instructrl.label.db import Assignment, Item, Label, Labeler, Prompt, open_database
from instructrl.label.forms import ranking_to_ranks
from instructrl.utils.io import atomic_write_json


@dataclasses.dataclass(frozen=True)
class Config:
    """Options of ``instructrl label stats``."""

    db: str
    """Labeling database file (SQLite)."""
    output: str | None = None
    """Also write the statistics as JSON to this file."""


def _ranks(ranking: list[Any]) -> list[int]:
    k = sum(len(e) if isinstance(e, list) else 1 for e in ranking)
    return ranking_to_ranks(ranking, k)


def collect_stats(session: Session) -> dict[str, Any]:
    """Counts, per-labeler progress and agreement (call inside one read transaction for a consistent view)."""
    prompts = dict(session.execute(select(Prompt.task, func.count()).group_by(Prompt.task)).all())
    items = dict(session.execute(select(Item.kind, func.count()).group_by(Item.kind)).all())
    statuses = dict(session.execute(select(Assignment.status, func.count()).group_by(Assignment.status)).all())
    per_labeler_status: dict[int, Counter[str]] = defaultdict(Counter)
    for labeler_id, status, n in session.execute(
        select(Assignment.labeler_id, Assignment.status, func.count()).group_by(
            Assignment.labeler_id, Assignment.status
        )
    ):
        per_labeler_status[labeler_id][status] = n
    skip_reasons = dict(
        session.execute(
            select(Assignment.skip_reason, func.count())
            .where(Assignment.status == "skipped")
            .group_by(Assignment.skip_reason)
            .order_by(func.count().desc())
        ).all()
    )
    overlap_items = session.scalar(
        select(func.count()).select_from(
            select(Assignment.item_id).group_by(Assignment.item_id).having(func.count() > 1).subquery()
        )
    )
    ranks_by_item: dict[int, dict[str, list[int]]] = defaultdict(dict)
    all_tied = 0  # rankings that tie every response: confirmed by the labeler, but no pair for the reward model
    for item_id, username, ranking in session.execute(
        select(Assignment.item_id, Labeler.username, Label.ranking)
        .join(Label, Label.assignment_id == Assignment.id)
        .join(Labeler, Labeler.id == Assignment.labeler_id)
        .where(Assignment.status == "done", Label.ranking.is_not(None))
    ):
        ranks_by_item[item_id][username] = _ranks(ranking)
        all_tied += len(ranking) == 1
    report = agreement_report(ranks_by_item)
    labelers = []
    for labeler in session.scalars(select(Labeler).order_by(Labeler.username)):
        counts = per_labeler_status[labeler.id]
        estimate = report.per_labeler.get(labeler.username)
        labelers.append(
            {
                "username": labeler.username,
                "role": labeler.role,
                "active": labeler.active,
                "work": labeler.work,
                "pending": counts["pending"],
                "done": counts["done"],
                "skipped": counts["skipped"],
                "agreement": estimate.as_dict() if estimate is not None else None,
            }
        )
    return {
        "prompts": {task: prompts.get(task, 0) for task in ("demonstration", "comparison")},
        "items": {kind: items.get(kind, 0) for kind in ("demonstration", "comparison")},
        "assignments": {status: statuses.get(status, 0) for status in ("pending", "done", "skipped")},
        "overlap_items": overlap_items or 0,
        "skip_reasons": skip_reasons,
        "all_tied_rankings": all_tied,
        "labelers": labelers,
        "agreement": {
            "overall": report.overall.as_dict(),
            "n_items": report.n_items,
            "pairs": [{"labelers": list(pair), **est.as_dict()} for pair, est in report.per_pair.items()],
        },
    }


def _percent(estimate: dict[str, Any] | None) -> str:
    if not estimate or estimate["agreement"] is None:
        return "n/a"
    text = f"{100 * estimate['agreement']:.1f}%"
    if estimate["stderr"] is not None:
        text += f" ± {100 * estimate['stderr']:.1f}%"
    return text


def format_stats(stats: dict[str, Any]) -> str:
    """A plain-text report of :func:`collect_stats`."""
    p, i, a = stats["prompts"], stats["items"], stats["assignments"]
    lines = [
        f"prompts: {p['demonstration']} for demonstrations, {p['comparison']} for comparisons",
        f"items: {i['demonstration']} demonstrations, {i['comparison']} comparisons "
        f"({stats['overlap_items']} assigned to more than one labeler)",
        f"assignments: {a['pending']} pending, {a['done']} done, {a['skipped']} skipped",
    ]
    if stats["all_tied_rankings"]:
        lines.append(
            f"rankings with every response tied: {stats['all_tied_rankings']} (they give the reward model no pair)"
        )
    if stats["skip_reasons"]:
        lines.append("skip reasons: " + ", ".join(f"{r}: {n}" for r, n in stats["skip_reasons"].items()))
    overall = stats["agreement"]["overall"]
    lines.append(
        f"agreement (pairwise, {stats['agreement']['n_items']} items ranked by 2+ labelers, paper: 72.6 ± 1.5%): "
        f"{_percent(overall)} over {overall['n_pairs']} response pairs"
    )
    if stats["labelers"]:
        width = max(8, *(len(row["username"]) for row in stats["labelers"]))
        lines.append("")
        lines.append(f"{'labeler'.ljust(width)}  role     pending  done  skipped  agreement")
        for row in stats["labelers"]:
            name = row["username"] + ("" if row["active"] else " (inactive)")
            lines.append(
                f"{name.ljust(width)}  {row['role']:<7}  {row['pending']:>7}  {row['done']:>4}  {row['skipped']:>7}  "
                f"{_percent(row['agreement'])}"
            )
    pairs = stats["agreement"]["pairs"]
    if pairs:
        lines.append("")
        lines.append("labeler pair agreement:")
        for pair in pairs:
            lines.append(
                f"  {pair['labelers'][0]} / {pair['labelers'][1]}: {_percent(pair)} ({pair['n_pairs']} pairs)"
            )
    return "\n".join(lines)


def run(cfg: Config) -> dict[str, Any]:
    with open_database(cfg.db, must_exist=True) as db, db.read() as session:
        stats = collect_stats(session)
    print(format_stats(stats), flush=True)
    if cfg.output:
        atomic_write_json(cfg.output, stats, private=True)
        print(f"label stats: wrote {cfg.output}", flush=True)
    return stats
