"""``kill -9`` of ``patchlab upgrade`` at several moments, then the same command again: the final registry equals
an uninterrupted run's, ``patchlab verify`` is clean and no partial output is left. Real processes, real signals;
on SQLite and on the suite's PostgreSQL server."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from registry.workflows.upgrade import run_upgrade
from tests.pgserver import pg_server  # noqa: F401  (fixture)
from tests.upgrade_helpers import ROOT, Fam, build_family, copy_family, differences, state, strays

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TRANSFORMERS_VERBOSITY": "error"}


def cli(fam: Fam, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "cli.app", "-q", "-R", fam.target, *args],
        cwd=ROOT,
        env={**ENV, **fam.env()},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def step_state(fam: Fam, patch: str, step: str) -> str | None:
    if fam.url:
        import psycopg

        try:
            with psycopg.connect(fam.url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as con:
                row = con.execute(
                    "SELECT state FROM upgrade_steps WHERE patch = %s AND step = %s", (patch, step)
                ).fetchone()
        except psycopg.Error:
            return None
        return row[0] if row else None
    try:
        con = sqlite3.connect(f"file:{Path(fam.home) / 'registry.db'}?mode=ro", uri=True, timeout=5)
        try:
            row = con.execute("SELECT state FROM upgrade_steps WHERE patch = ? AND step = ?", (patch, step)).fetchone()
        finally:
            con.close()
    except sqlite3.Error:
        return None
    return row[0] if row else None


@pytest.fixture(scope="module", params=("sqlite", "postgresql"))
def backend(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def family(request, backend, tmp_path_factory):
    server = request.getfixturevalue("pg_server") if backend == "postgresql" else None
    return build_family(tmp_path_factory.mktemp("family"), patches=("task", "strict"), backend=backend, server=server)


@pytest.fixture(scope="module")
def reference(family, tmp_path_factory):
    fam = copy_family(family, tmp_path_factory.mktemp("reference") / "fam")
    with fam.open() as reg:
        run_upgrade(reg, "tiny", "v2", device="cpu")
    return state(fam)


@pytest.mark.parametrize(
    "patch, step, when",
    [
        ("strict", "port", "running"),  # the first patch's port under way
        ("strict", "register", "done"),  # NAME@2 registered, evaluation next
        ("task", "evaluate", "running"),  # the second patch mid-evaluation
    ],
)
def test_kill_9_then_rerun_gives_the_uninterrupted_result(family, reference, tmp_path, patch, step, when):
    fam = copy_family(family, tmp_path / "fam")
    args = ("upgrade", "tiny", "--to", "v2", "--device", "cpu")
    proc = cli(fam, *args)
    deadline = time.time() + 120
    try:
        while step_state(fam, patch, step) not in ((when, "done") if when == "running" else (when,)):
            assert proc.poll() is None, f"the run ended before {patch}:{step} was {when}: {proc.stderr.read()}"
            assert time.time() < deadline, "timed out waiting for the moment to kill"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with fam.open() as reg:
        assert reg.get_run().state == "running"  # as it was left: the rerun takes its lease over at once
    again = cli(fam, *args)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 4, err  # one gate fails by design (strict)
    after = state(fam)
    assert not differences(after, reference), differences(after, reference)
    assert strays(fam) == []
    with fam.open() as reg:  # what `patchlab verify` checks
        assert reg.verify().ok and not reg.verify().missing_bases
