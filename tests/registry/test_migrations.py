"""Schema migrations: old registries upgrade and keep their rows; newer ones are refused.

Each test runs on SQLite and PostgreSQL (``registry_target``) except the one that opens a stored SQLite file.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text

from registry import Registry, RegistrySchemaError
from registry.db import KNOWN_REVISIONS, SCHEMA_HEAD, Database, alembic_config, resolve_location, upgrade_schema
from registry.rows import RowBase

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "registry-v0001.db"


def _revision(db: Path) -> str:
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT version_num FROM alembic_version").fetchone()[0]
    finally:
        con.close()


def _db_revision(target: str) -> str | None:
    """The schema revision recorded in the registry database at ``target``, on any backend."""
    db = Database(resolve_location(target))
    try:
        with db.engine.connect() as c:
            if "alembic_version" not in inspect(c).get_table_names():
                return None
            return c.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
    finally:
        db.dispose()


def test_head_constant_matches_scripts():
    script = ScriptDirectory.from_config(alembic_config())
    assert script.get_current_head() == SCHEMA_HEAD
    assert sorted(r.revision for r in script.walk_revisions()) == sorted(KNOWN_REVISIONS)


def test_models_match_migrations(registry_target):
    """The ORM models and the migrations describe the same schema."""
    with Registry.init(registry_target) as reg, reg.db.engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), RowBase.metadata)
    assert diffs == []


def test_fresh_registry_is_at_head(registry_target):
    assert _db_revision(registry_target) is None
    Registry.init(registry_target).close()
    assert _db_revision(registry_target) == SCHEMA_HEAD


def test_migrations_run_up_from_empty_one_by_one(registry_target):
    """Every revision applies on its own to the one before it, from an empty database, on each backend."""
    db = Database(resolve_location(registry_target))
    try:
        for rev in KNOWN_REVISIONS:
            upgrade_schema(db, rev)
            with db.engine.connect() as c:
                assert c.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == rev
        with db.engine.connect() as c:
            cols = {col["name"] for col in inspect(c).get_columns("evaluation_results")}
        assert {"details", "position"} <= cols
    finally:
        db.dispose()
    with Registry(registry_target) as reg:
        assert reg.list_patches() == []


def test_concurrent_inits_make_one_schema(registry_target):
    """Several processes' first open of one empty database: one migrates, the others wait and find it done."""
    from concurrent.futures import ThreadPoolExecutor

    def init(_):
        with Registry.init(registry_target) as reg:
            return [b.ref for b in reg.list_bases()]

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(init, range(4))) == [[]] * 4
    assert _db_revision(registry_target) == SCHEMA_HEAD


def test_old_registry_upgrades_and_keeps_rows(tmp_path):
    """SQLite only: the old registry is a stored SQLite file (tests/data/registry-v0001.db)."""
    db = tmp_path / "registry.db"
    shutil.copy(FIXTURE, db)
    assert _revision(db) == "0001"
    with Registry(tmp_path) as reg:
        assert _revision(db) == SCHEMA_HEAD
        assert [b.ref for b in reg.list_bases()] == ["llama@v1", "llama@v2"]
        assert reg.get_base("llama@v2").content == "b2" * 32
        patches = reg.list_patches()
        assert [p.ref for p in patches] == ["sql@1", "sql@2"]
        assert patches[1].parents == (("sql@1", "port"),) and patches[1].parameters == {"alpha": 1}
        assert reg.get_patch("sql@prod").ref == "sql@2"
        assert [d.path for d in reg.list_derived()] == ["/out/sql-v2"]
        assert [n.ref for n in reg.lineage("sql@2").parents] == ["sql@1"]
        # what revision 0002 added works on the upgraded registry
        reg.add_tag("sql@2", "legacy")
        ev = reg.record_evaluation("sql@2", "task", [{"id": "a", "correct": True}])
        assert reg.get_patch("sql@2").tags == ("legacy",) and ev.metrics["accuracy"] == 1.0
    with Registry(tmp_path) as again:  # reopening is a no-op
        assert again.get_patch("sql@2").tags == ("legacy",)


def test_newer_registry_is_refused(registry_target, backend, tmp_path):
    Registry.init(registry_target).close()
    db = Database(resolve_location(registry_target))
    with db.engine.execution_options(write_lock=True).begin() as c:
        c.execute(text("UPDATE alembic_version SET version_num = '0099_from_the_future'"))
    with db.engine.connect() as c:
        tables = sorted(inspect(c).get_table_names())
    db.dispose()
    db_file = tmp_path / "home" / "registry.db"
    before = db_file.read_bytes() if backend == "sqlite" else None
    with pytest.raises(RegistrySchemaError, match="newer patchlab"):
        Registry(registry_target)
    assert _db_revision(registry_target) == "0099_from_the_future"
    if backend == "sqlite":
        assert db_file.read_bytes() == before
    db = Database(resolve_location(registry_target))
    with db.engine.connect() as c:
        assert sorted(inspect(c).get_table_names()) == tables
    db.dispose()


def test_0002_registry_with_evaluations_upgrades(registry_target):
    """0003 adds columns to the evaluation tables; rows recorded at 0002 survive and read back."""
    db = Database(resolve_location(registry_target))
    upgrade_schema(db, "0002")
    with db.engine.execution_options(write_lock=True).begin() as c:
        c.execute(text("INSERT INTO families VALUES (1, 'f', '2026-01-01 00:00:00')"))
        c.execute(
            text(
                "INSERT INTO base_versions (id, family_id, version, source_kind, source, release_order, created_at)"
                " VALUES (1, 1, 'v1', 'hub', 'org/m', 1, '2026-01-01 00:00:00')"
            )
        )
        c.execute(
            text(
                "INSERT INTO evaluations (id, base_version_id, model, dataset, metrics, num_instances, created_at)"
                " VALUES (1, 1, 'f@v1', 'task', '{\"accuracy\": 0.5}', 2, '2026-01-01 00:00:00')"
            )
        )
        results = text("INSERT INTO evaluation_results VALUES (1, :id, :p, :g, :ok, :score)")
        c.execute(results, {"id": "a", "p": '"x"', "g": '"x"', "ok": True, "score": 1.0})
        c.execute(results, {"id": "b", "p": '"y"', "g": '"z"', "ok": False, "score": 0.0})
    db.dispose()
    assert _db_revision(registry_target) == "0002"
    with Registry(registry_target) as reg:
        assert _db_revision(registry_target) == SCHEMA_HEAD
        ev = reg.get_evaluation(1)
        assert ev.target == "f@v1" and ev.metrics == {"accuracy": 0.5} and ev.settings is None
        assert ev.results == (
            {"id": "a", "prediction": "x", "gold": "x", "correct": True, "score": 1.0},
            {"id": "b", "prediction": "y", "gold": "z", "correct": False, "score": 0.0},
        )


def test_registry_of_the_previous_schema_opens_and_gains_pushes(tmp_path):
    """A registry made at revision 0003 (before pushes were recorded) opens, keeps its rows and records pushes."""
    from registry.db import Database, resolve_location, upgrade_schema

    db = Database(resolve_location(tmp_path))
    upgrade_schema(db, "0003")
    with db.engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO families (id, name, created_at) VALUES (1, 'llama', '2026-01-01 00:00:00')")
        conn.exec_driver_sql(
            "INSERT INTO base_versions (id, family_id, version, source_kind, source, revision, release_order, "
            "created_at) VALUES (1, 1, 'v1', 'hub', 'meta/llama', 'deadbeef', 1, '2026-01-01 00:00:00')"
        )
        conn.exec_driver_sql(
            "INSERT INTO patches (id, name, version, digest, size, base_version_id, num_tensors, created_at) "
            "VALUES (1, 'sql', 1, 'ab', 0, 1, 0, '2026-01-01 00:00:00')"
        )
    db.dispose()
    assert _revision(tmp_path / "registry.db") == "0003"
    with Registry(tmp_path) as reg:
        assert _revision(tmp_path / "registry.db") == SCHEMA_HEAD
        assert reg.get_base("llama@v1").location == "meta/llama@deadbeef" and reg.list_pushes() == []
        p = reg.record_push(
            "sql@1", endpoint="https://hub", repo_id="o/r", revision="main", branch="main",
            commit_sha="c" * 40, kind="patch", created_commit=True,
        )  # fmt: skip
        assert reg.last_push("https://hub/", "o/r", "main") == p and reg.list_pushes("sql@1") == [p]
