"""The patchlab CLI through typer's CliRunner, on a real registry and real tiny checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from cli.app import app
from tests.registry.conftest import make_base


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
def family(tmp_path, run):
    for i, n in enumerate(["v1", "v2", "ft"]):
        make_base(tmp_path / n, i)
    run("base", "add", "tiny", "v1", str(tmp_path / "v1"))
    run("base", "add", "tiny@v2", str(tmp_path / "v2"))  # the FAMILY@VERSION form
    return tmp_path


def _json(result) -> object:
    return json.loads(result.stdout)


def test_init_creates_and_reports(tmp_path):
    r = CliRunner().invoke(app, ["init", "--registry", str(tmp_path / "r"), "--json"])
    assert r.exit_code == 0, r.output
    assert _json(r)["home"] == str((tmp_path / "r").resolve())
    assert (tmp_path / "r" / "registry.db").is_file()


def test_missing_registry_is_one_line_error(tmp_path):
    r = CliRunner().invoke(app, ["--registry", str(tmp_path / "none"), "ls"])
    assert r.exit_code == 1
    assert r.stderr.startswith("error: no registry at") and "patchlab init" in r.stderr
    assert "Traceback" not in r.output and len(r.stderr.strip().splitlines()) <= 2


def test_diff_registers_ls_show_log(family, run):
    tmp = family
    run("diff", "tiny@v1", str(tmp / "ft"), str(tmp / "p1"), "--name", "task")
    run("port", "task", "tiny@v2", str(tmp / "out2"))
    run("diff", "tiny@v2", str(tmp / "out2"), str(tmp / "p2"), "--name", "task", "--parent", "task@1")
    patches = _json(run("ls", "--json"))
    assert [(p["ref"], p["base"]) for p in patches] == [("task@1", "tiny@v1"), ("task@2", "tiny@v2")]
    assert patches[1]["parents"] == [{"ref": "task@1", "relation": "port"}]
    table = run("ls").stdout
    assert "task@1" in table and "tiny@v2" in table
    assert [b["ref"] for b in _json(run("ls", "--bases", "--json"))] == ["tiny@v1", "tiny@v2"]
    derived = _json(run("ls", "--derived", "--json"))
    assert [(d["patch"], d["base"], d["kind"]) for d in derived] == [("task@1", "tiny@v2", "port")]
    shown = _json(run("show", "task@1", "--json"))
    assert shown["kind"] == "patch" and shown["method"] == "extract" and len(shown["stats"]) == 2
    assert _json(run("show", "tiny@v2", "--json"))["kind"] == "base"
    assert "model.embed_tokens.weight" in run("show", "task@1").stdout
    tree = _json(run("log", "task", "--json"))
    assert tree["ref"] == "task@2" and tree["parents"][0]["ref"] == "task@1"
    assert "port of" in run("log", "task").stdout
    # the registered patch, materialised from the blob store, applies exactly
    d = Path(run("path", "task@1").stdout.strip())
    run("apply", str(d), "tiny@v1", str(tmp / "applied"), "--no-register")
    got, want = load_file(str(tmp / "applied" / "model.safetensors")), load_file(str(tmp / "ft" / "model.safetensors"))
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert "plan" in run("apply", "task", "tiny@v1", str(tmp / "dry"), "--dry-run").stdout
    assert not (tmp / "dry").exists()


def test_add_alias_tag_rm_gc_verify(family, run):
    tmp = family
    run("diff", str(tmp / "v1"), str(tmp / "ft"), str(tmp / "p1"), "--no-register")
    assert _json(run("ls", "--json")) == []
    added = _json(run("add", str(tmp / "p1"), "--name", "fix", "--tag", "new", "--json"))
    assert added["ref"] == "fix@1" and added["base"] == "tiny@v1" and added["tags"] == ["new"]
    run("alias", "set", "prod", "fix@1")
    run("alias", "set", "prod", "tiny@v1")
    assert {a["ref"]: a["target"] for a in _json(run("alias", "ls", "--json"))} == {
        "tiny@prod": "tiny@v1",
        "fix@prod": "fix@1",
    }
    assert _json(run("show", "fix@prod", "--json"))["ref"] == "fix@1"
    run("tag", "add", "fix", "reviewed", "good")
    run("tag", "rm", "fix", "new")
    assert _json(run("ls", "--tag", "good", "--json"))[0]["tags"] == ["good", "reviewed"]
    err = run("rm", "fix", code=1)
    assert "fix@prod" in err.stderr and "--cascade" in err.stderr
    run("alias", "rm", "fix@prod")
    assert _json(run("rm", "fix", "--json")) == {"removed": ["fix@1"]}
    gc = _json(run("gc", "--grace", "0", "--json"))
    assert len(gc["removed"]) >= 4 and gc["freed_bytes"] > 0
    assert _json(run("verify", "--json"))["ok"] is True


def test_verify_exit_code_on_damage(family, run):
    tmp = family
    run("diff", "tiny@v1", str(tmp / "ft"), str(tmp / "p1"), "--name", "task")
    blobs = [p for p in (tmp / "home" / "blobs" / "sha256").rglob("*") if p.is_file()]
    victim = max(blobs, key=lambda p: p.stat().st_size)
    victim.chmod(0o644)
    victim.write_bytes(b"broken")
    r = run("verify", code=1)
    assert "damaged" in r.stdout and "task@1" in r.stdout


def test_user_mistakes_exit_nonzero_without_traceback(family, run):
    r = run("show", "tsak", code=1)
    assert "error:" in r.stderr and "Traceback" not in r.output
    r = run("base", "add", "tiny", "v1", str(family / "v1"), code=1)
    assert "already registered" in r.stderr
    r = run("add", str(family / "nowhere"), code=1)
    assert "does not exist" in r.stderr
    r = run("diff", "tiny@v9", str(family / "ft"), str(family / "x"), code=1)
    assert "versions: v1, v2" in r.stderr
    r = CliRunner().invoke(app, ["-v", "--registry", str(family / "home"), "show", "tsak"])
    assert r.exit_code == 1 and "UnknownReferenceError" in r.output


def test_evals_add_ls_show(family, run):
    from patchlab.measure.results import EvalResult, InstanceResult, summarise

    tmp = family
    inst = [
        InstanceResult(
            task="task",
            id=f"q{i}",
            type="generation",
            prediction=str(i),
            gold=["1"],
            correct=i == 1,
            score=float(i == 1),
        )
        for i in range(3)
    ]
    EvalResult(model="tiny@v1", tasks=summarise(inst), instances=inst).save(tmp / "r.json")
    added = _json(run("evals", "add", "tiny@v1", str(tmp / "r.json"), "--json"))
    assert [(e["target"], e["dataset"], e["num_instances"]) for e in added] == [("tiny@v1", "task", 3)]
    listed = _json(run("evals", "ls", "tiny@v1", "--json"))
    assert [e["id"] for e in listed] == [added[0]["id"]]
    assert "0.3333" in run("evals", "ls").stdout
    shown = _json(run("evals", "show", str(added[0]["id"]), "--json"))
    assert [r["id"] for r in shown["results"]] == ["q0", "q1", "q2"] and shown["results"][1]["correct"] is True
    assert "q2" in run("evals", "show", str(added[0]["id"])).stdout
    r = run("evals", "add", "tiny@v1", str(tmp / "missing.json"), code=1)
    assert "not a readable patchlab evaluation" in r.stderr


def test_base_add_with_wrong_arity_is_a_usage_error(run, tmp_path):
    r = run("base", "add", "tiny@v1", "a", "b", code=2)
    assert "FAMILY@VERSION SOURCE" in r.output


def test_quiet_silences_status_lines(family, run, tmp_path):
    r = run("-q", "diff", "tiny@v1", str(family / "ft"), str(tmp_path / "p"), "--name", "quiet")
    assert r.stdout.strip() == ""
    r = run("diff", "tiny@v1", str(family / "ft"), str(tmp_path / "p2"), "--name", "loud")
    assert "registered" in r.stdout


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    return load_file(str(d / "model.safetensors"))


def test_fused_port_cli_equals_two_step_port(family, run, monkeypatch):
    """``port --from-finetune FT --source BASE TARGET OUT`` writes what ``diff`` then ``port`` writes."""
    tmp = family
    run("diff", str(tmp / "v1"), str(tmp / "ft"), str(tmp / "p"), "--no-register", "--workers", "2")
    run("port", str(tmp / "p"), str(tmp / "v2"), str(tmp / "two-step"), "--no-register")
    run(
        "--workers",
        "1",
        "port",
        "--from-finetune",
        str(tmp / "ft"),
        "--source",
        "tiny@v1",
        "tiny@v2",
        str(tmp / "fused"),
    )
    a, b = _tensors(tmp / "two-step"), _tensors(tmp / "fused")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "PATCHLAB_WORKERS" not in __import__("os").environ  # --workers is restored after the command
    r = run("port", "--from-finetune", str(tmp / "ft"), str(tmp / "v2"), str(tmp / "x"), code=1)
    assert "--source" in r.stderr
    r = run(
        "port", "--from-finetune", str(tmp / "ft"), "--source", "tiny@v1", "tiny@v2", str(tmp / "x"), "extra", code=1
    )
    assert "TARGET OUT" in r.stderr
    r = run("port", str(tmp / "p"), str(tmp / "v2"), code=1)
    assert "missing OUT" in r.stderr


def test_port_between_directories_needs_no_registry(family, tmp_path):
    """A port of a patch directory onto a directory never opens the registry (none exists here)."""
    tmp = family
    ok = CliRunner().invoke(
        app, ["-R", str(tmp_path / "home"), "diff", str(tmp / "v1"), str(tmp / "ft"), str(tmp / "p"), "--no-register"]
    )
    assert ok.exit_code == 0, ok.output
    r = CliRunner().invoke(
        app, ["-R", str(tmp_path / "nowhere"), "port", str(tmp / "p"), str(tmp / "v2"), str(tmp / "o")]
    )
    assert r.exit_code == 0, r.output


def test_alpha_by_pattern_cli(family, run):
    tmp = family
    run("diff", str(tmp / "v1"), str(tmp / "ft"), str(tmp / "p"), "--no-register")
    run(
        "apply",
        str(tmp / "p"),
        str(tmp / "v1"),
        str(tmp / "o"),
        "--no-register",
        "--alpha-by-pattern",
        "*embed_tokens*=0",
        "--alpha-by-pattern",
        "*=1",
    )
    got, base, ft = _tensors(tmp / "o"), _tensors(tmp / "v1"), _tensors(tmp / "ft")
    emb = "model.embed_tokens.weight"
    assert torch.equal(got[emb], base[emb])  # α = 0 there
    others = [k for k in ft if k != emb and ft[k].is_floating_point() and not torch.equal(ft[k], base[k])]
    assert others and all(torch.equal(got[k], ft[k]) for k in others)
    r = run("apply", str(tmp / "p"), str(tmp / "v1"), str(tmp / "o2"), "--alpha-by-pattern", "nope", code=1)
    assert "GLOB=ALPHA" in r.stderr
