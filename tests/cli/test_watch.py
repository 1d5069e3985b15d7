"""``patchlab watch FAMILY --dir PATH --once``: a new release directory is registered and upgraded to; the last
seen release is stored, so a second look finds nothing new; the exit status says which."""

from __future__ import annotations

import shutil

from typer.testing import CliRunner

from cli.app import app
from registry import Registry
from tests.upgrade_helpers import MODELS, build_family


def test_watch_dir_once_registers_upgrades_and_never_retriggers(tmp_path):
    reg_dir = build_family(tmp_path / "fam", patches=("task", "strict")).home
    releases = tmp_path / "releases"
    releases.mkdir()
    with Registry(reg_dir) as reg:  # v1 is already known; v2 has not been released yet
        reg.rm("tiny@v2")
    shutil.copytree(MODELS / "v1", releases / "v1")
    run = CliRunner().invoke
    args = ["-R", str(reg_dir), "watch", "tiny", "--dir", str(releases), "--once", "--device", "cpu"]
    r = run(app, args)
    # v1 here is another directory than the registered tiny@v1 -> refused clearly, one line
    assert r.exit_code == 1 and "already registered from" in r.output
    shutil.rmtree(releases / "v1")
    r = run(app, args)
    assert r.exit_code == 0 and "nothing new" in r.output
    shutil.copytree(MODELS / "v2", releases / "v2")
    r = run(app, args)
    assert r.exit_code == 11, r.output  # new release; strict fails its gate by design
    with Registry(reg_dir) as reg:
        assert reg.get_base("tiny@v2").source == str((releases / "v2").resolve())
        assert reg.get_patch("task@latest").ref == "task@2" and reg.get_patch("strict@latest").ref == "strict@1"
        assert reg.watch_seen("tiny", f"dir:{releases.resolve()}")[0] == "v2"
        runs = reg.list_runs()
    r = run(app, args)  # a restart: nothing new, nothing re-run
    assert r.exit_code == 0 and "nothing new" in r.output
    with Registry(reg_dir) as reg:
        assert reg.list_runs() == runs
