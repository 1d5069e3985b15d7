"""Schema migrations: old registries upgrade and keep their rows; newer ones are refused."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from registry import Registry, RegistrySchemaError
from registry.db import KNOWN_REVISIONS, SCHEMA_HEAD, alembic_config
from registry.models import Base

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "registry-v0001.db"


def _revision(db: Path) -> str:
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT version_num FROM alembic_version").fetchone()[0]
    finally:
        con.close()


def test_head_constant_matches_scripts():
    script = ScriptDirectory.from_config(alembic_config())
    assert script.get_current_head() == SCHEMA_HEAD
    assert sorted(r.revision for r in script.walk_revisions()) == sorted(KNOWN_REVISIONS)


def test_models_match_migrations(tmp_path):
    """The ORM models and the migrations describe the same schema."""
    with Registry.init(tmp_path) as reg, reg.db.engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diffs == []


def test_fresh_registry_is_at_head(tmp_path):
    Registry.init(tmp_path).close()
    assert _revision(tmp_path / "registry.db") == SCHEMA_HEAD


def test_old_registry_upgrades_and_keeps_rows(tmp_path):
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


def test_newer_registry_is_refused(tmp_path):
    db = tmp_path / "registry.db"
    Registry.init(tmp_path).close()
    con = sqlite3.connect(db)
    con.execute("UPDATE alembic_version SET version_num = '0099_from_the_future'")
    con.commit()
    con.close()
    before = db.read_bytes()
    with pytest.raises(RegistrySchemaError, match="newer patchlab"):
        Registry(tmp_path)
    assert _revision(db) == "0099_from_the_future"
    assert db.read_bytes() == before


def test_0002_registry_with_evaluations_upgrades(tmp_path):
    """0003 adds columns to the evaluation tables; rows recorded at 0002 survive and read back."""
    from sqlalchemy import text

    from registry.db import Database, resolve_location, upgrade_schema

    db = Database(resolve_location(tmp_path))
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
        c.execute(text("INSERT INTO evaluation_results VALUES (1, 'a', '\"x\"', '\"x\"', 1, 1.0)"))
        c.execute(text("INSERT INTO evaluation_results VALUES (1, 'b', '\"y\"', '\"z\"', 0, 0.0)"))
    db.dispose()
    assert _revision(tmp_path / "registry.db") == "0002"
    with Registry(tmp_path) as reg:
        assert _revision(tmp_path / "registry.db") == SCHEMA_HEAD
        ev = reg.get_evaluation(1)
        assert ev.target == "f@v1" and ev.metrics == {"accuracy": 0.5} and ev.settings is None
        assert ev.results == (
            {"id": "a", "prediction": "x", "gold": "x", "correct": True, "score": 1.0},
            {"id": "b", "prediction": "y", "gold": "z", "correct": False, "score": 0.0},
        )
