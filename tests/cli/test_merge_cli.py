"""``patchlab merge`` through typer's CliRunner: options and YAML paths, lineage in the registry, and every
bad input as one line, a non-zero exit and nothing written (no output, no partial dirs, no registry row)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from cli.app import app
from patchlab.io.patch import Patch
from patchlab.kernels.merge import merge_tensor
from tests.conftest import no_partial_dirs
from tests.factory import make_model
from tests.methods.test_merge import MODELS, derive, nan_patch, same_bits


@pytest.fixture
def run(tmp_path):
    runner = CliRunner()
    home = tmp_path / "home"

    def invoke(*args: str, code: int = 0):
        result = runner.invoke(app, ["--registry", str(home), *args])
        assert result.exit_code == code, (args, result.output)
        return result

    invoke("init")
    return invoke


@pytest.fixture
def reg(tmp_path, run):
    """fam@v1 and fam@v2 registered; sql@1 and tone@1 on v1, sql2@1 on v2."""
    run("base", "add", "fam", "v1", str(MODELS / "v1"))
    run("base", "add", "fam", "v2", str(MODELS / "v2"))
    derive(MODELS / "v1", tmp_path / "ft-b", 1)
    run("diff", "fam@v1", str(MODELS / "ft-v1"), str(tmp_path / "sql"), "--name", "sql")
    run("diff", "fam@v1", str(tmp_path / "ft-b"), str(tmp_path / "tone"), "--name", "tone")
    run("diff", "fam@v2", str(MODELS / "ft-v2"), str(tmp_path / "sql2"), "--name", "sql2")
    return tmp_path


def patches(run) -> list[dict]:
    return json.loads(run("ls", "--json").stdout)


def test_merge_registers_every_input_as_parent_and_log_draws_the_tree(reg, run):
    t = reg
    r = run("merge", "sql", "tone", "--method", "ties", "--density", "0.3", "--weights", "1,0.5", "-o", str(t / "m"))
    assert "registered" in r.stdout and "merge of sql@1, tone@1" in r.stdout
    info = json.loads(run("show", "m", "--json").stdout)
    assert info["method"] == "merge" and info["base"] == "fam@v1"
    assert info["parameters"]["method"] == "ties" and info["parameters"]["densities"] == [0.3, 0.3]
    assert info["parents"] == [{"ref": "sql@1", "relation": "merge"}, {"ref": "tone@1", "relation": "merge"}]
    tree = json.loads(run("log", "m", "--json").stdout)
    assert [p["ref"] for p in tree["parents"]] == ["sql@1", "tone@1"]
    assert run("log", "m").stdout.count("merge of") == 2
    merged = Patch.open(t / "m")
    for e in merged.entries():
        deltas = [Patch.open(t / p).entry(e.name).dense() for p in ("sql", "tone")]
        want = merge_tensor(deltas, "ties", [1.0, 0.5], 0.3, name=e.name)
        assert same_bits(e.dense(), want)


def test_paths_are_recorded_as_parents_too(reg, run):
    t = reg
    run("merge", str(t / "sql"), str(t / "tone"), "-o", str(t / "m2"), "--name", "both")
    info = json.loads(run("show", "both", "--json").stdout)
    assert [p["ref"] for p in info["parents"]] == ["sql@1", "tone@1"]


def test_yaml_config(reg, run):
    t = reg
    (t / "merge.yml").write_text(
        "merge_method: dare_ties\n"
        "models:\n"
        "  - model: sql\n"
        "    parameters: {weight: 1.0, density: 0.6}\n"
        "  - model: tone@1\n"
        "    parameters: {weight: 0.5}\n"
        "parameters: {density: 0.4, lambda: 1.2, normalize: true}\n"
        "seed: 3\n"
    )
    run("merge", "--config", str(t / "merge.yml"), "-o", str(t / "y"), "--name", "yaml-merge")
    info = json.loads(run("show", "yaml-merge", "--json").stdout)
    p = info["parameters"]
    assert p["method"] == "dare_ties" and p["densities"] == [0.6, 0.4] and p["lambda"] == 1.2 and p["seed"] == 3
    assert p["normalize"] is True
    assert [x["ref"] for x in info["parents"]] == ["sql@1", "tone@1"]
    merged = Patch.open(t / "y")
    e = merged.entry("model.layers.1.self_attn.q_proj.weight")
    deltas = [Patch.open(t / x).entry(e.name).dense() for x in ("sql", "tone")]
    want = merge_tensor(deltas, "dare_ties", [1.0, 0.5], [0.6, 0.4], lambda_=1.2, normalize=True, seed=3, name=e.name)
    assert same_bits(e.dense(), want)


def test_onto_port_to_and_dry_run(reg, run):
    t = reg
    out = run("merge", "sql", "tone", "--dry-run").stdout
    assert "merge plan" in out and not (t / "sql-tone").exists()
    run("merge", "sql", "tone", "--onto", "fam@v1", "-o", str(t / "model"))
    assert (t / "model" / "model.safetensors").exists() and (t / "model" / "config.json").exists()
    assert len(patches(run)) == 3  # a model is not a patch: nothing registered
    run("merge", "sql", "sql2", "--port-to", "fam@v2", "-o", str(t / "ported"), "--name", "ported")
    info = json.loads(run("show", "ported", "--json").stdout)
    assert info["base"] == "fam@v2" and [x["ref"] for x in info["parents"]] == ["sql@1", "sql2@1"]


def test_rank_reports_energy(reg, run):
    t = reg
    r = run("merge", "sql", "tone", "--method", "ties", "--density", "0.5", "--rank", "4", "-o", str(t / "lr"))
    assert "energy kept 0." in r.stdout


BAD = [
    (["sql", "tone", "--method", "tie"], "did you mean 'ties'"),
    (["sql", "tone", "--method", "ties", "--density", "0.2,0.3,0.4"], "3 densities given for 2 patches"),
    (["sql", "tone", "--weights", "1"], None),  # one number is for every patch: fine (checked below)
    (["sql", "tone", "--weights", "1,2,3"], "3 weights given for 2 patches"),
    (["sql", "tone", "--method", "ties", "--density", "1.5"], "must be in (0, 1]"),
    (["sql", "tone", "--method", "ties", "--density", "0"], "must be in (0, 1]"),
    (["sql", "tone", "--density", "0.5"], "does not apply to task_arithmetic"),
    (["sql", "tone", "--method", "ties", "--sign-election", "vote"], "did you mean"),
    (["sql", "tone", "--weights", "1,x"], "cannot read --weights"),
    (["sql", "sql"], "again"),
    (["sql", "sql@1"], "again"),
    (["sql", "sql2"], "--port-to"),
    (["sql", "nosuch"], "no patch 'nosuch'"),
    (["sql", "tone", "--onto", "fam@v2"], "--port-to"),
]


def test_bad_input_one_line_nothing_written(reg, run):
    t = reg
    before = patches(run)
    out = t / "out"
    for args, message in BAD:
        if message is None:
            run("merge", *args, "-o", str(out), "--no-register")
            shutil.rmtree(out)
            continue
        r = run("merge", *args, "-o", str(out), code=1)
        assert message in r.stderr, (args, r.stderr)
        assert r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) <= 2, r.stderr
        assert "Traceback" not in r.output
        assert not out.exists() and no_partial_dirs(t) == []
    assert patches(run) == before


def test_bad_input_from_files(reg, run):
    t = reg
    before = patches(run)
    cases = []
    (t / "a.yml").write_text("merge_method: ties\nmodels:\n  - model: sql\n    parameters: {weight: 1, densty: 0.2}\n")
    cases.append((["--config", str(t / "a.yml")], "unknown parameter 'densty' for ties; did you mean 'density'"))
    (t / "b.yml").write_text("merge_method: ties\nmodels: [sql, tone]\nparameters: {lamda: 2}\n")
    cases.append((["--config", str(t / "b.yml")], "did you mean 'lambda'"))
    (t / "c.yml").write_text("merge_metod: ties\nmodels: [sql, tone]\n")
    cases.append((["--config", str(t / "c.yml")], "did you mean 'merge_method'"))
    (t / "d.yml").write_text("merge_method: ties\nmodels: [sql, tone\n")
    cases.append((["--config", str(t / "d.yml")], "not valid YAML"))
    cases.append((["sql", "--config", str(t / "b.yml")], "not both"))
    small = make_model(t / "small", seed=0)
    make_model(t / "small-ft", from_model=small, noise=0.01)
    run("diff", str(small), str(t / "small-ft"), str(t / "other"), "--no-register")
    cases.append((["sql", str(t / "other")], "different architectures"))
    nan_patch(t / "tone", t / "nan")
    cases.append((["sql", str(t / "nan"), "--no-register"], "NaN"))
    (t / "exists").mkdir()
    for args, message in cases:
        r = run("merge", *args, "-o", str(t / "out"), code=1)
        assert message in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) <= 2 and "Traceback" not in r.output
        assert not (t / "out").exists() and no_partial_dirs(t) == []
    r = run("merge", "sql", "tone", "-o", str(t / "exists"), code=1)
    assert "already exists" in r.stderr and list((t / "exists").iterdir()) == []
    assert patches(run) == before
    assert torch.is_tensor(Patch.open(t / "sql").entry("lm_head.weight").dense())
