"""Gates and suites in the registry: per patch, family defaults, validation (on SQLite and PostgreSQL), and the
0006 migration."""

from __future__ import annotations

import sqlite3

import pytest
from typer.testing import CliRunner

from cli.app import app
from patchlab.errors import GateExpressionError
from registry import InvalidReferenceError, Registry
from registry.db import SCHEMA_HEAD, Database, resolve_location, upgrade_schema


def test_gate_set_and_effective(reg, tmp_path):
    suite = tmp_path / "t.jsonl"
    suite.write_text("")
    reg.set_gate("tiny", family=True, expressions=["nfr <= 0.1"], vocab_policy="pad-zero", suite=[str(suite)])
    reg.set_gate("task", expressions=["nfr <= 0.05", "accuracy >= old - 0.01"], alias="prod")
    eff = reg.effective_gate("task", "tiny")
    assert eff.expressions == ("nfr <= 0.05", "accuracy >= old - 0.01") and eff.alias == "prod"
    assert eff.suite == (str(suite),)
    assert eff.sources == {"suite": "family", "expressions": "patch", "alias": "patch"}
    other = reg.effective_gate("other", "tiny")
    assert other.expressions == ("nfr <= 0.1",) and other.alias == "latest"
    assert reg.family_vocab_policy("tiny") == "pad-zero"
    reg.set_gate("task", alias="stable")  # unset settings are kept
    assert reg.get_gate("task").expressions == ("nfr <= 0.05", "accuracy >= old - 0.01")
    with pytest.raises(GateExpressionError, match="position 7"):
        reg.set_gate("task", expressions=["nfr <= 0.05", "nfr <="])
    assert reg.get_gate("task").expressions == ("nfr <= 0.05", "accuracy >= old - 0.01")  # unchanged
    with pytest.raises(InvalidReferenceError, match="vocabulary policy"):
        reg.set_gate("tiny", family=True, vocab_policy="guess")


def test_registry_at_0003_opens_and_gains_the_upgrade_tables(tmp_path):
    db = Database(resolve_location(tmp_path))
    upgrade_schema(db, "0003")
    db.dispose()
    with Registry(tmp_path) as reg:
        reg.set_gate("task", expressions=["nfr <= 0.05"])
        run = reg.create_run("tiny", "v2", from_version=None, options={}, work_dir=str(tmp_path))
        assert reg.get_run(run.id).state == "running"
    con = sqlite3.connect(tmp_path / "registry.db")
    assert con.execute("SELECT version_num FROM alembic_version").fetchone()[0] == SCHEMA_HEAD
    con.close()


def test_cli_gate_set_show_and_bad_gate(registry_target, tmp_path):
    suite = tmp_path / "t.jsonl"
    suite.write_text("")
    R = registry_target
    run = CliRunner().invoke
    assert run(app, ["-R", R, "init"]).exit_code == 0
    r = run(
        app,
        [
            "-R",
            R,
            "gate",
            "set",
            "task",
            "--suite",
            str(suite),
            "--gate",
            "nfr <= 0.05",
            "--gate",
            "accuracy >= old - 0.01",
            "--gate",
            "verdict != 'do not port'",
        ],
    )
    assert r.exit_code == 0, r.output
    r = run(app, ["-R", R, "gate", "show", "task", "--json"])
    assert r.exit_code == 0 and "accuracy >= old - 0.01" in r.stdout
    r = run(app, ["-R", R, "gate", "set", "task", "--gate", "nfr <="])
    assert r.exit_code == 1 and "does not parse at position 7" in r.output
    assert len(r.output.strip().splitlines()) == 1
    r = run(app, ["-R", R, "gate", "set", "tiny", "--family", "--vocab-policy", "pad-zero"])
    assert r.exit_code == 0, r.output
    r = run(app, ["-R", R, "gate", "show", "nothing"])
    assert r.exit_code == 1 and "no gate set" in r.output
