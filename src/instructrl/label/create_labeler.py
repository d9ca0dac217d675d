"""``instructrl label create-labeler``: add a labeler or admin, or change one (role, active, new secret).

A new account gets a random secret, printed once: give it to the person, who logs in with their username
and that secret. Only a salted hash is stored, so a lost secret cannot be recovered; issue a new one with
``--set rotate=true`` (this also ends the person's open sessions). ``--set active=false`` disables an
account without deleting its work. The database file is created if it does not exist.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from instructrl.config import require_non_negative
from instructrl.label.auth import create_or_update_labeler
from instructrl.label.db import open_database


@dataclasses.dataclass(frozen=True)
class Config:
    """Options of ``instructrl label create-labeler``."""

    db: str
    """Labeling database file (SQLite; created if missing)."""
    username: str
    """Login name: 2-64 characters, lower-case letters, digits, '_', '.', '-'."""
    role: Literal["labeler", "admin"] | None = None
    """'labeler' labels items; 'admin' also sees the progress and agreement pages. Unset: 'labeler' for a new
    account, unchanged for an existing one."""
    secret: str | None = None
    """The login secret (12-256 characters); unset = generate a random one (recommended: a secret given
    here is also printed in the resolved config)."""
    secret_days: int = 90
    """Days until the secret expires (0 = never)."""
    rotate: bool = False
    """For an existing account: replace its secret (ends its sessions)."""
    work: Literal["mixed", "demonstration", "comparison"] | None = None
    """The kind of work the labeler's queue offers: 'mixed' (writing and ranking alternate), 'demonstration' or
    'comparison' only. The labeler can change it on the queue page. Unset: 'mixed' for a new account, unchanged
    for an existing one."""
    active: bool | None = None
    """false disables the account (its sessions end; its work stays and is exported), true enables it again.
    Unset: a new account is active, an existing one unchanged."""

    def validate(self) -> None:
        require_non_negative(self, "secret_days")


def run(cfg: Config) -> dict[str, Any]:
    with open_database(cfg.db) as db, db.write() as session:
        result = create_or_update_labeler(
            session,
            cfg.username,
            role=cfg.role,
            secret=cfg.secret,
            secret_days=cfg.secret_days,
            rotate=cfg.rotate,
            active=cfg.active,
            work=cfg.work,
        )
    action = "created" if result.created else "updated"
    print(
        f"label create-labeler: {action} {result.role} {result.username!r}" + ("" if result.active else " (inactive)")
    )
    if result.secret is not None:
        expires = f", expires {result.secret_expires_at:%Y-%m-%d}" if result.secret_expires_at else ""
        print(f"  secret (shown once{expires}): {result.secret}", flush=True)
    return {
        "username": result.username,
        "role": result.role,
        "created": result.created,
        "active": result.active,
        "work": result.work,
        "secret": result.secret,
        "secret_expires_at": result.secret_expires_at,
    }
