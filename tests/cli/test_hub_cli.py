"""``patchlab base add`` from the Hub, ``push``, ``pull`` and ``show``'s pushes, through typer's CliRunner with the
real huggingface_hub client against the Hub stand-in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cli.app import app
from patchlab.io import hub as hub_io
from tests.registry.conftest import make_base

pytest_plugins = ["tests.hub_fixtures"]

ROOT = Path(__file__).resolve().parents[2]
BASE_REPO = "acme/tiny-base"


@pytest.fixture
def env(tmp_path, hub, monkeypatch):
    """The stand-in as the endpoint (HF_ENDPOINT, as a user would set it), a private
    Hugging Face cache, two registries and a tiny family: v1 on the Hub (tag v1), v2 on the Hub (branch v2)."""
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_ENDPOINT", hub.url)  # patchlab.io.hub reads it at call time, the client only at import
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hfcache"))
    models = {n: make_base(tmp_path / "models" / n, i) for i, n in enumerate(["v1", "v2", "ft"])}
    t = load_file(str(models["ft"] / "model.safetensors"))
    save_file({k: v * 1.01 for k, v in t.items()}, str(models["ft"] / "model.safetensors"))
    v1 = hub_io.push_folder(models["v1"], BASE_REPO, commit_message="v1", endpoint=hub.url)
    api = hub_io._api(hub.url, None)
    api.create_tag(BASE_REPO, tag="v1", revision=v1.commit_sha)
    hub_io.push_folder(models["v2"], BASE_REPO, commit_message="v2", revision="v2", endpoint=hub.url)
    return tmp_path, models


@pytest.fixture
def run(tmp_path):
    runner = CliRunner()

    def invoke(*args: str, code: int = 0, home: str = "home"):
        result = runner.invoke(app, ["--registry", str(tmp_path / home), *args])
        assert result.exit_code == code, (args, result.output)
        if code:
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, lines
        return result

    invoke("init")
    invoke("init", home="other")
    return invoke


def test_base_add_from_hub_eager_lazy_and_offline(env, run, hub, monkeypatch):
    tmp, models = env
    added = json.loads(run("base", "add", "tiny@v1", BASE_REPO, "--revision", "v1", "--json").stdout)
    assert added["source_kind"] == "hub" and added["source"] == BASE_REPO
    assert added["revision"] == hub.repos[BASE_REPO].tags["v1"]  # the tag, recorded as its commit
    local = json.loads(run("base", "add", "loc@v1", str(models["v1"]), "--json").stdout)
    assert added["content"] == local["content"]  # the same fingerprint as the local copy

    out = run("base", "add", "tiny@v2", BASE_REPO, "--revision", "v2", "--no-download").stdout
    assert "not downloaded" in out and f"{BASE_REPO}@{hub.head(BASE_REPO, 'v2')}" in out
    assert json.loads(run("show", "tiny@v2", "--json").stdout).get("content") is None
    # the first command that needs it downloads it (and fingerprints it)
    run("diff", "tiny@v2", str(models["ft"]), str(tmp / "p"), "--name", "task")
    assert json.loads(run("show", "tiny@v2", "--json").stdout)["content"]

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run("apply", "task", "tiny@v2", str(tmp / "offline"))  # from the cache
    r = run("base", "add", "tiny@v3", "acme/never-downloaded", code=1)
    assert "acme/never-downloaded" in r.stderr and "HF_HUB_OFFLINE" in r.stderr
    assert "tiny@v3" not in run("ls", "--bases").stdout


def test_push_show_pull_round_trip(env, run, hub):
    tmp, models = env
    run("base", "add", "tiny@v1", BASE_REPO, "--revision", "v1")
    run("diff", "tiny@v1", str(models["ft"]), str(tmp / "p1"), "--name", "task")

    out = run("push", "task@1", "acme/task").stdout
    assert "pushed task@1 as patch to acme/task@main" in out and len(hub.accepted_commits("acme/task")) == 1
    again = run("push", "task@1", "acme/task").stdout
    assert "already up to date: no commit" in again and len(hub.accepted_commits("acme/task")) == 1
    card = ModelCard(hub.files("acme/task")["README.md"].decode()).data.to_dict()
    assert card["base_model"] == BASE_REPO and card["base_model_relation"] == "finetune"
    shown = json.loads(run("show", "task@1", "--json").stdout)
    assert [(p["repo_id"], p["commit_sha"]) for p in shown["pushes"]] == [("acme/task", hub.head("acme/task"))]
    assert "acme/task" in run("show", "task@1").stdout

    # someone else pushes: refused, then forced
    other = tmp / "theirs"
    other.mkdir()
    (other / "x.txt").write_text("x")
    hub_io.push_folder(other, "acme/task", commit_message="theirs", delete_extra=False, endpoint=hub.url)
    run("diff", "tiny@v1", str(models["v2"]), str(tmp / "p2"), "--name", "task")
    r = run("push", "task@2", "acme/task", code=1)
    assert "acme/task" in r.stderr and "--force" in r.stderr
    assert "pushed task@2" in run("push", "task@2", "acme/task", "--force").stdout

    # pull the first push into another registry: refused until its base is there, then bit for bit
    r = run("pull", f"acme/task@{shown['pushes'][0]['commit_sha']}", code=1, home="other")
    assert f"patchlab base add tiny@v1 {BASE_REPO}" in r.stderr
    assert json.loads(run("ls", "--json", home="other").stdout) == []
    run("base", "add", "tiny@v1", BASE_REPO, "--revision", "v1", home="other")
    pulled = json.loads(run("pull", f"acme/task@{shown['pushes'][0]['commit_sha']}", "--json", home="other").stdout)
    assert pulled["patch"]["ref"] == "task@1" and pulled["patch"]["base"] == "tiny@v1"
    run("apply", "task@1", "tiny@v1", str(tmp / "applied"), home="other")
    got = load_file(str(tmp / "applied" / "model.safetensors"))
    want = load_file(str(models["ft"] / "model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_bad_input_is_one_line_with_no_row(env, run, hub):
    tmp, models = env
    run("base", "add", "tiny@v1", BASE_REPO, "--revision", "v1")
    run("diff", "tiny@v1", str(models["ft"]), str(tmp / "p1"), "--name", "task")

    assert "not a valid Hub repo id" in run("push", "task", "acme/bad repo", code=1).stderr
    assert "not a valid Hub repo id" in run("base", "add", "x@1", "acme/bad repo!", code=1).stderr
    assert "'nope' not found" in run("base", "add", "x@1", BASE_REPO, "--revision", "nope", code=1).stderr
    assert "give a revision" in run("pull", "acme/task@", code=1).stderr
    assert "hf auth login" in run("pull", "acme/missing", code=1).stderr
    hub.inject_error(401, path="/api/repos/create")
    assert "hf auth login" in run("push", "task", "acme/task", code=1).stderr
    hub.inject_error(400, path="/api/validate-yaml", body={"errors": [{"message": "license: unknown"}]})
    r = run("push", "task", "acme/task", code=1)
    assert "acme/task" in r.stderr and "model card" in r.stderr and "license: unknown" in r.stderr
    assert json.loads(run("show", "task", "--json").stdout)["pushes"] == []
    assert [b["ref"] for b in json.loads(run("ls", "--bases", "--json").stdout)] == ["tiny@v1"]


def test_no_hint_names_the_removed_huggingface_cli():
    for pkg in ("patchlab", "registry", "cli"):
        for f in (ROOT / pkg).rglob("*.py"):
            assert "huggingface-cli" not in f.read_text(encoding="utf-8"), f
