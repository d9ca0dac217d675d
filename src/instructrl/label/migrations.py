"""Versioned schema migrations for the labeling database (a small, documented alternative to Alembic).

How it works
    * ``MIGRATIONS`` is an append-only tuple of :class:`Migration` objects numbered 1, 2, 3, ...; each holds
      plain SQL statements. A released migration is never edited: a schema change is a *new* migration
      (e.g. ``ALTER TABLE ... ADD COLUMN``), and the ORM models in :mod:`instructrl.label.db` are updated to
      match the schema after the last migration (``tests/test_label_db.py`` checks that they agree).
    * The table ``schema_migrations(version, name, applied_at)`` records what has been applied.
    * :func:`migrate` applies every missing migration in order, each in its own ``BEGIN IMMEDIATE``
      transaction together with its ``schema_migrations`` row. SQLite DDL is transactional, so a failing
      migration leaves the database exactly at the previous version. ``BEGIN IMMEDIATE`` takes the write
      lock before the version is read, so two processes starting at once cannot apply a migration twice.
    * A database whose version is newer than the newest migration this code knows is refused: old code
      writing into a newer schema could corrupt it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence

from sqlalchemy import Engine

from instructrl.errors import UserFacingError


@dataclasses.dataclass(frozen=True)
class Migration:
    """One schema version: the SQL statements that take the schema from ``version - 1`` to ``version``."""

    version: int
    """1-based, consecutive."""
    name: str
    """What the migration does, recorded in ``schema_migrations``."""
    statements: tuple[str, ...]
    """SQL statements, run in order inside one transaction."""


_INITIAL_SCHEMA = (
    """CREATE TABLE settings (
        key VARCHAR(64) NOT NULL PRIMARY KEY,
        value TEXT NOT NULL
    )""",
    """CREATE TABLE labelers (
        id INTEGER NOT NULL PRIMARY KEY,
        username VARCHAR(64) NOT NULL,
        role VARCHAR(16) NOT NULL CHECK (role IN ('labeler', 'admin')),
        secret_hash VARCHAR(256) NOT NULL,
        secret_expires_at DATETIME,
        active BOOLEAN NOT NULL,
        created_at DATETIME NOT NULL,
        UNIQUE (username)
    )""",
    """CREATE TABLE login_sessions (
        id INTEGER NOT NULL PRIMARY KEY,
        token_hash VARCHAR(64) NOT NULL,
        labeler_id INTEGER NOT NULL REFERENCES labelers (id) ON DELETE CASCADE,
        csrf_token VARCHAR(64) NOT NULL,
        created_at DATETIME NOT NULL,
        expires_at DATETIME NOT NULL,
        last_seen_at DATETIME NOT NULL,
        UNIQUE (token_hash)
    )""",
    "CREATE INDEX ix_login_sessions_labeler_id ON login_sessions (labeler_id)",
    """CREATE TABLE prompts (
        id INTEGER NOT NULL PRIMARY KEY,
        text TEXT NOT NULL,
        text_sha256 VARCHAR(64) NOT NULL,
        task VARCHAR(16) NOT NULL CHECK (task IN ('demonstration', 'comparison')),
        user_id VARCHAR(256),
        source VARCHAR(1024),
        meta JSON NOT NULL,
        created_at DATETIME NOT NULL,
        CONSTRAINT uq_prompts_text_task UNIQUE (text_sha256, task)
    )""",
    """CREATE TABLE items (
        id INTEGER NOT NULL PRIMARY KEY,
        kind VARCHAR(16) NOT NULL CHECK (kind IN ('demonstration', 'comparison')),
        prompt_id INTEGER NOT NULL REFERENCES prompts (id),
        created_at DATETIME NOT NULL
    )""",
    "CREATE INDEX ix_items_prompt_id ON items (prompt_id)",
    """CREATE TABLE item_responses (
        item_id INTEGER NOT NULL REFERENCES items (id) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        text TEXT NOT NULL,
        model VARCHAR(1024),
        PRIMARY KEY (item_id, position)
    )""",
    """CREATE TABLE assignments (
        id INTEGER NOT NULL PRIMARY KEY,
        item_id INTEGER NOT NULL REFERENCES items (id),
        labeler_id INTEGER NOT NULL REFERENCES labelers (id),
        status VARCHAR(16) NOT NULL CHECK (status IN ('pending', 'done', 'skipped')),
        display_order JSON,
        skip_reason VARCHAR(32),
        skip_note TEXT,
        created_at DATETIME NOT NULL,
        updated_at DATETIME NOT NULL,
        CONSTRAINT uq_assignments_item_labeler UNIQUE (item_id, labeler_id)
    )""",
    "CREATE INDEX ix_assignments_labeler_status ON assignments (labeler_id, status)",
    """CREATE TABLE labels (
        id INTEGER NOT NULL PRIMARY KEY,
        assignment_id INTEGER NOT NULL REFERENCES assignments (id),
        submission_key VARCHAR(64) NOT NULL,
        response TEXT,
        ranking JSON,
        version INTEGER NOT NULL,
        submitted_at DATETIME NOT NULL,
        updated_at DATETIME NOT NULL,
        UNIQUE (assignment_id),
        UNIQUE (submission_key)
    )""",
    """CREATE TABLE response_ratings (
        label_id INTEGER NOT NULL REFERENCES labels (id) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        quality INTEGER NOT NULL CHECK (quality BETWEEN 1 AND 7),
        fails_instruction BOOLEAN NOT NULL,
        inappropriate_for_customer BOOLEAN NOT NULL,
        hallucination BOOLEAN NOT NULL,
        sexual_content BOOLEAN NOT NULL,
        violent_content BOOLEAN NOT NULL,
        harmful_content BOOLEAN NOT NULL,
        PRIMARY KEY (label_id, position)
    )""",
)

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "initial schema", _INITIAL_SCHEMA),
    Migration(
        2,
        "the kind of work each labeler is given",
        ("ALTER TABLE labelers ADD COLUMN work VARCHAR(16) NOT NULL DEFAULT 'mixed'",),
    ),
)
"""Every migration, oldest first. Append only."""

LATEST_VERSION = MIGRATIONS[-1].version

_VERSION_TABLE = """CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER NOT NULL PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at DATETIME NOT NULL
)"""


def _check_sequence(migrations: Sequence[Migration]) -> None:
    versions = [m.version for m in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise ValueError(f"migration versions must be 1, 2, ..., n in order; got {versions}")


def schema_version(engine: Engine) -> int:
    """The newest applied migration (0 for a new, empty database)."""
    with engine.connect() as conn:
        exists = conn.exec_driver_sql(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
        ).first()
        if exists is None:
            return 0
        return conn.exec_driver_sql("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").scalar_one()


def migrate(engine: Engine, migrations: Sequence[Migration] = MIGRATIONS) -> list[int]:
    """Apply every migration newer than the database's version, oldest first; returns the versions applied.

    ``engine`` must issue ``BEGIN IMMEDIATE`` for its transactions (see :class:`instructrl.label.db.Database`),
    so each migration runs atomically under the write lock.
    """
    _check_sequence(migrations)
    latest = migrations[-1].version if migrations else 0
    applied: list[int] = []
    with engine.begin() as conn:
        conn.exec_driver_sql(_VERSION_TABLE)
    while True:
        with engine.begin() as conn:
            current = conn.exec_driver_sql("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").scalar_one()
            if current > latest:
                raise UserFacingError(
                    f"the labeling database has schema version {current}, newer than the newest this "
                    f"instructrl knows ({latest}); upgrade instructrl to use it"
                )
            if current == latest:
                return applied
            migration = migrations[current]  # version current + 1
            for statement in migration.statements:
                conn.exec_driver_sql(statement)
            conn.exec_driver_sql(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                (migration.version, migration.name, dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")),
            )
            applied.append(migration.version)
