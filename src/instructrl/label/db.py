"""The labeling database: SQLite in WAL mode through SQLAlchemy 2 (ORM models and transaction helpers).

Tables (created by :mod:`instructrl.label.migrations`; the models below mirror them)
    * ``labelers``: people who label (role ``labeler``) or run the project (role ``admin``); each logs in
      with a username and a secret whose salted hash is stored, and the secret expires.
    * ``login_sessions``: server-side browser sessions (hash of the cookie token, CSRF token, expiry).
    * ``prompts``: prompt texts with the task they were loaded for (``demonstration`` or ``comparison``).
    * ``items``: units of labeling work. A ``demonstration`` item asks for a written response to its prompt;
      a ``comparison`` item holds K responses (``item_responses``, canonical positions 0..K-1) to rank.
    * ``assignments``: item x labeler, with a status (``pending`` / ``done`` / ``skipped``) and, for
      comparisons, the random order in which this labeler is shown the responses.
    * ``labels``: the work submitted for an assignment (at most one row per assignment; an edit updates it
      and bumps ``version``); ``response_ratings`` hold the per-response metadata of a ranking.

Transactions
    pysqlite normally opens a transaction only before a write, so two SELECTs of one "read" could see
    different data. :class:`Database` turns that off and emits its own ``BEGIN``: every :meth:`Database.read`
    block is one consistent snapshot (WAL readers never block writers and see the database as of their
    first statement), and every :meth:`Database.write` block starts with ``BEGIN IMMEDIATE``, taking the
    single SQLite write lock up front. Writers therefore queue (``busy_timeout``) instead of failing with
    "database is locked" when a deferred reader tries to upgrade, and a read-check-write sequence inside
    one ``write()`` block cannot interleave with another writer's.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    Engine,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker

from instructrl.errors import UserFacingError
from instructrl.label import migrations

BUSY_TIMEOUT_MS = 30_000
"""How long a writer waits for the write lock before giving up (SQLite ``busy_timeout``)."""

ROLES = ("labeler", "admin")
WORK_KINDS = ("mixed", "demonstration", "comparison")
"""What a labeler's queue offers: both kinds of items alternating, or one kind."""
ITEM_KINDS = ("demonstration", "comparison")
STATUSES = ("pending", "done", "skipped")


def utcnow() -> dt.datetime:
    """Current UTC time as a naive datetime (how every timestamp is stored)."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def sha256_hex(text: str) -> str:
    """SHA-256 hex of ``text``'s UTF-8 bytes: the stored key of a prompt's text (``text_sha256``) and of a
    session token (``token_hash``; a fast hash suffices for a high-entropy random token)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class Base(DeclarativeBase):
    pass


class Setting(Base):
    """Key-value settings of this database (e.g. the web app's signing key)."""

    __tablename__ = "settings"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Labeler(Base):
    __tablename__ = "labelers"
    __table_args__ = (CheckConstraint("role IN ('labeler', 'admin')"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    secret_hash: Mapped[str] = mapped_column(String(256))
    secret_expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    active: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)
    work: Mapped[str] = mapped_column(String(16), default="mixed", server_default="mixed")
    """The kind of work the queue offers (:data:`WORK_KINDS`): set by an admin, changed by the labeler."""

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


class LoginSession(Base):
    __tablename__ = "login_sessions"
    __table_args__ = (Index("ix_login_sessions_labeler_id", "labeler_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    labeler_id: Mapped[int] = mapped_column(ForeignKey("labelers.id", ondelete="CASCADE"))
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime)
    last_seen_at: Mapped[dt.datetime] = mapped_column(DateTime)
    labeler: Mapped[Labeler] = relationship()


class Prompt(Base):
    __tablename__ = "prompts"
    __table_args__ = (
        UniqueConstraint("text_sha256", "task", name="uq_prompts_text_task"),
        CheckConstraint("task IN ('demonstration', 'comparison')"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    text: Mapped[str] = mapped_column(Text)
    text_sha256: Mapped[str] = mapped_column(String(64))
    task: Mapped[str] = mapped_column(String(16))
    user_id: Mapped[str | None] = mapped_column(String(256))
    source: Mapped[str | None] = mapped_column(String(1024))
    meta: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)


class Item(Base):
    __tablename__ = "items"
    __table_args__ = (
        Index("ix_items_prompt_id", "prompt_id"),
        CheckConstraint("kind IN ('demonstration', 'comparison')"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)
    prompt: Mapped[Prompt] = relationship()
    responses: Mapped[list[ItemResponse]] = relationship(
        order_by="ItemResponse.position", cascade="all, delete-orphan", back_populates="item"
    )


class ItemResponse(Base):
    __tablename__ = "item_responses"
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    """Canonical index of the response: rankings and exports refer to it."""
    text: Mapped[str] = mapped_column(Text)
    model: Mapped[str | None] = mapped_column(String(1024))
    item: Mapped[Item] = relationship(back_populates="responses")


class Assignment(Base):
    __tablename__ = "assignments"
    __table_args__ = (
        UniqueConstraint("item_id", "labeler_id", name="uq_assignments_item_labeler"),
        Index("ix_assignments_labeler_status", "labeler_id", "status"),
        CheckConstraint("status IN ('pending', 'done', 'skipped')"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"))
    labeler_id: Mapped[int] = mapped_column(ForeignKey("labelers.id"))
    status: Mapped[str] = mapped_column(String(16))
    display_order: Mapped[list[int] | None] = mapped_column(JSON)
    """For comparisons: canonical response positions in the order this labeler sees them."""
    skip_reason: Mapped[str | None] = mapped_column(String(32))
    skip_note: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime)
    item: Mapped[Item] = relationship()
    labeler: Mapped[Labeler] = relationship()
    label: Mapped[Label | None] = relationship(back_populates="assignment")


class Label(Base):
    __tablename__ = "labels"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    assignment_id: Mapped[int] = mapped_column(ForeignKey("assignments.id"), unique=True)
    submission_key: Mapped[str] = mapped_column(String(64), unique=True)
    """Random key of the form that produced the current content; a resubmitted form is recognized by it."""
    response: Mapped[str | None] = mapped_column(Text)
    """Demonstrations: the written response."""
    ranking: Mapped[list[Any] | None] = mapped_column(JSON)
    """Comparisons: canonical positions best first, a nested list is a tie group."""
    version: Mapped[int] = mapped_column(Integer)
    submitted_at: Mapped[dt.datetime] = mapped_column(DateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime)
    assignment: Mapped[Assignment] = relationship(back_populates="label")
    ratings: Mapped[list[ResponseRating]] = relationship(
        order_by="ResponseRating.position", cascade="all, delete-orphan", back_populates="label"
    )


class ResponseRating(Base):
    """The paper's per-output metadata (Ouyang et al. 2022, App. B, Table 3) for one ranked response."""

    __tablename__ = "response_ratings"
    __table_args__ = (CheckConstraint("quality BETWEEN 1 AND 7"),)
    label_id: Mapped[int] = mapped_column(ForeignKey("labels.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    quality: Mapped[int] = mapped_column(Integer)
    """Overall quality on the 1-7 Likert scale."""
    fails_instruction: Mapped[bool] = mapped_column(Boolean)
    inappropriate_for_customer: Mapped[bool] = mapped_column(Boolean)
    hallucination: Mapped[bool] = mapped_column(Boolean)
    sexual_content: Mapped[bool] = mapped_column(Boolean)
    violent_content: Mapped[bool] = mapped_column(Boolean)
    harmful_content: Mapped[bool] = mapped_column(Boolean)
    label: Mapped[Label] = relationship(back_populates="ratings")


# --------------------------------------------------------------------------- engine and transactions


def _make_engine(path: Path) -> Engine:
    engine = create_engine(
        f"sqlite:///{path}",
        # one connection per thread of the web server; SQLite serializes writers itself
        connect_args={"check_same_thread": False, "timeout": BUSY_TIMEOUT_MS / 1000},
        pool_size=32,
        max_overflow=64,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Stop pysqlite from issuing its own BEGIN (only before writes); _on_begin below issues ours.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        # WAL + NORMAL: a commit survives an application crash; only an OS crash may lose the last commits.
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


class Database:
    """One labeling database file: engines, schema migration and transaction scopes.

    ``with db.read() as s:`` gives a :class:`Session` whose queries all see one snapshot (rolled back at
    the end); ``with db.write() as s:`` gives one that holds the write lock and commits on success.
    """

    def __init__(self, path: str | Path, *, must_exist: bool = False):
        self.path = Path(path)
        if must_exist and not self.path.is_file():
            raise UserFacingError(
                f"labeling database {self.path} does not exist (a typo in --db?); create it with "
                "'instructrl label create-labeler' or 'instructrl label load-prompts'"
            )
        if self.path.is_dir():
            raise UserFacingError(f"labeling database path {self.path} is a directory; give a file name")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            # Owner-only: the file holds secret hashes, the cookie-signing key and CSRF tokens. SQLite gives
            # its -wal, -shm and -journal side files the database file's permissions.
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        self.engine = _make_engine(self.path)
        self._write_engine = self.engine.execution_options(sqlite_begin="IMMEDIATE")
        self._read_sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._write_sessions = sessionmaker(self._write_engine, expire_on_commit=False)

    def migrate(self) -> list[int]:
        """Bring the schema to the newest version; returns the migration versions applied."""
        return migrations.migrate(self._write_engine)

    def schema_version(self) -> int:
        return migrations.schema_version(self.engine)

    @contextlib.contextmanager
    def read(self) -> Iterator[Session]:
        # Closing the session ends the transaction (the pool rolls the connection back) and detaches the
        # loaded objects without expiring them, so they stay readable after the block.
        with self._read_sessions() as session:
            yield session

    @contextlib.contextmanager
    def write(self) -> Iterator[Session]:
        with self._write_sessions() as session, session.begin():
            yield session

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_database(path: str | Path, *, must_exist: bool = False) -> Database:
    """Open (creating if allowed) the database at ``path`` and migrate it to the newest schema."""
    db = Database(path, must_exist=must_exist)
    try:
        db.migrate()
    except BaseException:
        db.close()
        raise
    return db


def get_or_create_setting(session: Session, key: str, make_value: Any) -> str:
    """The value of setting ``key``, created with ``make_value()`` the first time (inside a write session)."""
    row = session.get(Setting, key)
    if row is None:
        row = Setting(key=key, value=make_value())
        session.add(row)
        session.flush()
    return row.value


def app_secret_key(db: Database) -> str:
    """The web app's cookie-signing key, generated once per database so sessions survive restarts."""
    with db.write() as session:
        return get_or_create_setting(session, "secret_key", lambda: secrets.token_hex(32))
