"""CLI: diff --rank/--energy/--density/--budget, compress, import-peft and export-peft (thin shells)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cli.app import app
from patchlab import Patch
from tests.factory import make_model


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("clifam")
    base = make_model(root / "base", seed=0, hidden=64)
    ft = make_model(root / "ft", seed=1, from_model=base, noise=0.01)
    return root, base, ft


def _run(*args: str, code: int = 0):
    r = CliRunner().invoke(app, list(args))
    assert r.exit_code == code, (args, r.output)
    return r


def test_diff_rank_then_compress_then_export(fam, tmp_path):
    root, base, ft = fam
    r = _run("diff", str(base), str(ft), str(tmp_path / "r8"), "--rank", "8", "--no-register", "--device", "cpu")
    p = Patch.open(tmp_path / "r8")
    assert p.manifest["tensors"]["model.layers.0.mlp.up_proj.weight"]["rank"] == 8
    r = _run("compress", str(tmp_path / "r8"), str(tmp_path / "r2"), "--rank", "2", "--json")
    s = json.loads(r.stdout)
    assert s["encodings"]["lowrank"] == 14 and 0 < s["energy"] < 1
    _run("diff", str(base), str(ft), str(tmp_path / "sp"), "--density", "0.1", "--method", "dare", "--no-register")
    assert Patch.open(tmp_path / "sp").manifest["tensors"]["model.layers.0.mlp.up_proj.weight"]["method"] == "dare"
    _run("diff", str(base), str(ft), str(tmp_path / "bud"), "--budget", "0.4MB", "--no-register")
    assert Patch.open(tmp_path / "bud").manifest["totals"]["bytes"] <= 400_000
    r = _run("export-peft", str(tmp_path / "r2"), str(tmp_path / "ad"), code=1)
    assert "error:" in r.output and "modules_to_save" in r.output
    _run("export-peft", str(tmp_path / "r2"), str(tmp_path / "ad"), "--base", str(base))
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["r"] == 2
    _run("import-peft", str(tmp_path / "ad"), str(base), str(tmp_path / "back"))
    assert Patch.open(tmp_path / "back").entry("model.layers.0.mlp.up_proj.weight").encoding == "lowrank"


@pytest.mark.parametrize(
    "args, msg",
    [
        (["--energy", "1.5"], "energy must be in (0, 1]"),
        (["--rank", "4", "--density", "0.5"], "exactly one"),
        (["--budget", "lots"], "cannot read size budget"),
        (["--rank", "500"], "rank 500 is larger"),
    ],
)
def test_bad_requests_are_one_line_errors(fam, tmp_path, args, msg):
    root, base, ft = fam
    r = _run("diff", str(base), str(ft), str(tmp_path / "x"), "--no-register", *args, code=1)
    assert msg in r.output.replace("\n", " ") and "Traceback" not in r.output
    assert not (tmp_path / "x").exists()
