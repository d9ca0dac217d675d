"""Labeling database: migrations, WAL mode, snapshot reads and the write lock."""

from __future__ import annotations

import sqlite3

import pytest
from sqlalchemy import create_engine, func, inspect, select

from instructrl.errors import UserFacingError
from instructrl.label import migrations
from instructrl.label.db import Base, Database, Labeler, app_secret_key, open_database, utcnow


def _schema(engine) -> dict:
    """Tables -> columns (name, nullable, primary key), types, foreign keys, unique sets, indexes, checks."""
    insp = inspect(engine)
    out = {}
    for table in sorted(insp.get_table_names()):
        if table == "schema_migrations":
            continue
        pk = set(insp.get_pk_constraint(table)["constrained_columns"])
        uniques = {tuple(u["column_names"]) for u in insp.get_unique_constraints(table)}
        indexes = set()
        for ix in insp.get_indexes(table):
            (uniques if ix.get("unique") else indexes).add(tuple(ix["column_names"]))
        out[table] = {
            "columns": sorted((c["name"], c["nullable"] or False, c["name"] in pk) for c in insp.get_columns(table)),
            "types": sorted((c["name"], str(c["type"])) for c in insp.get_columns(table)),
            "fks": sorted(
                (tuple(fk["constrained_columns"]), fk["referred_table"], tuple(fk["referred_columns"]))
                for fk in insp.get_foreign_keys(table)
            ),
            "uniques": sorted(uniques),
            "indexes": sorted(indexes),
            "checks": sorted(" ".join(c["sqltext"].split()) for c in insp.get_check_constraints(table)),
        }
    return out


def test_migrated_schema_matches_the_orm_models(tmp_path):
    db = open_database(tmp_path / "m.sqlite")
    orm_engine = create_engine(f"sqlite:///{tmp_path / 'orm.sqlite'}")
    Base.metadata.create_all(orm_engine)
    assert _schema(db.engine) == _schema(orm_engine)
    db.close()


def test_migrate_records_versions_and_is_idempotent(tmp_path):
    db = Database(tmp_path / "m.sqlite")
    assert db.schema_version() == 0
    assert db.migrate() == [m.version for m in migrations.MIGRATIONS]
    assert db.schema_version() == migrations.LATEST_VERSION
    assert db.migrate() == []
    db.close()


def test_database_is_in_wal_mode_with_foreign_keys(tmp_path):
    with open_database(tmp_path / "w.sqlite") as db, db.read() as s:
        conn = s.connection()
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_new_migration_is_applied_on_top_and_failed_one_rolls_back(tmp_path):
    path = tmp_path / "m.sqlite"
    with open_database(path):
        pass
    extra = migrations.Migration(
        migrations.LATEST_VERSION + 1, "add a column", ("ALTER TABLE labelers ADD COLUMN nickname TEXT",)
    )
    broken = migrations.Migration(
        migrations.LATEST_VERSION + 2,
        "half-broken",
        ("CREATE TABLE half (x INTEGER)", "INSERT INTO no_such_table VALUES (1)"),
    )
    db = Database(path)
    assert migrations.migrate(db._write_engine, (*migrations.MIGRATIONS, extra)) == [extra.version]
    with pytest.raises(Exception, match="no_such_table"):
        migrations.migrate(db._write_engine, (*migrations.MIGRATIONS, extra, broken))
    assert db.schema_version() == extra.version
    tables = set(inspect(db.engine).get_table_names())
    assert "half" not in tables  # the DDL of the failed migration was rolled back too
    assert "nickname" in {c["name"] for c in inspect(db.engine).get_columns("labelers")}
    db.close()


def test_database_newer_than_the_code_is_refused(tmp_path):
    path = tmp_path / "m.sqlite"
    with open_database(path):
        pass
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO schema_migrations VALUES (?, 'from the future', '2030-01-01')", (99,))
    conn.commit()
    conn.close()
    with pytest.raises(UserFacingError, match="schema version 99"):
        open_database(path)


def test_migration_versions_must_be_consecutive():
    with pytest.raises(ValueError, match="1, 2"):
        migrations._check_sequence([migrations.Migration(2, "x", ())])


def test_read_sees_one_snapshot_while_others_write(tmp_path):
    with open_database(tmp_path / "s.sqlite") as db:
        with db.read() as reader:
            before = reader.scalar(select(func.count()).select_from(Labeler))
            with db.write() as writer:
                writer.add(Labeler(username="x1", role="labeler", secret_hash="h", active=True, created_at=utcnow()))
            # the committed row is invisible inside the reader's snapshot...
            assert reader.scalar(select(func.count()).select_from(Labeler)) == before == 0
        with db.read() as fresh:  # ...and visible to a new one
            assert fresh.scalar(select(func.count()).select_from(Labeler)) == 1


def test_write_takes_the_write_lock_at_begin(tmp_path):
    path = tmp_path / "lock.sqlite"
    with open_database(path) as db, db.write() as s:
        s.scalar(select(func.count()).select_from(Labeler))  # a read only: BEGIN IMMEDIATE still holds the lock
        other = sqlite3.connect(path, timeout=0, isolation_level=None)
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("BEGIN IMMEDIATE")
        other.close()


def test_write_rolls_back_on_error(tmp_path):
    with open_database(tmp_path / "r.sqlite") as db:
        with pytest.raises(RuntimeError), db.write() as s:
            s.add(Labeler(username="gone", role="labeler", secret_hash="h", active=True, created_at=utcnow()))
            s.flush()
            raise RuntimeError("boom")
        with db.read() as s:
            assert s.scalar(select(func.count()).select_from(Labeler)) == 0


def test_secret_key_is_created_once_and_kept(tmp_path):
    path = tmp_path / "k.sqlite"
    with open_database(path) as db:
        key = app_secret_key(db)
        assert len(key) == 64 and app_secret_key(db) == key
    with open_database(path) as db:
        assert app_secret_key(db) == key


def test_missing_database_is_reported_when_it_must_exist(tmp_path):
    with pytest.raises(UserFacingError, match="does not exist"):
        open_database(tmp_path / "nope.sqlite", must_exist=True)
    assert not (tmp_path / "nope.sqlite").exists()


def test_database_and_its_side_files_are_readable_by_the_owner_only(tmp_path):
    """The file holds secret hashes, the cookie-signing key and CSRF tokens: mode 0600, whatever the umask."""
    import os
    import stat

    path = tmp_path / "new.sqlite"
    old_umask = os.umask(0o022)
    try:
        with open_database(path) as db:
            app_secret_key(db)  # a write: SQLite creates the -wal and -shm files beside the database
            files = [p for p in tmp_path.iterdir() if p.name.startswith("new.sqlite")]
            assert {p.name for p in files} >= {"new.sqlite", "new.sqlite-wal"}
            assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: 0o600 for p in files}
    finally:
        os.umask(old_umask)
