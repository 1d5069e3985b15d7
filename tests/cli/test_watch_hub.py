"""``patchlab watch FAMILY --hub org/repo [--branch B | --tags GLOB] --once`` and ``patchlab upgrade --push ORG``
against the Hub stand-in: a new tag (or a new commit on the branch) is registered as the next base version
(``add_base`` with the repo and the commit sha) and upgraded to; restarts never re-trigger; each patch that
passes its gate is pushed to ORG/NAME, the one that fails is not."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from cli.app import app
from patchlab.io import hub as hub_io
from tests.upgrade_helpers import MODELS, build_family

pytest_plugins = ["tests.hub_fixtures"]

REPO = "acme/tiny"


@pytest.fixture
def env(tmp_path, hub, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hfcache"))
    fam = build_family(tmp_path / "fam", patches=("task", "strict"))
    with fam.open() as reg:  # v1 is known (a local directory); v2 is released on the Hub later
        reg.rm("tiny@v2")
    return fam


def _release(hub, tag: str | None = None, branch: str = "main") -> str:
    res = hub_io.push_folder(MODELS / "v2", REPO, commit_message="release", revision=branch, endpoint=hub.url)
    if tag:
        hub_io._api(hub.url, None).create_tag(REPO, tag=tag, revision=res.commit_sha)
    return res.commit_sha


def test_watch_hub_tags_registers_upgrades_pushes_and_never_retriggers(env, hub):
    fam = env
    run = CliRunner().invoke
    args = ["-R", fam.target, "watch", "tiny", "--hub", REPO, "--tags", "v*", "--once", "--device", "cpu"]
    hub_io.push_folder(MODELS / "v1", REPO, commit_message="no tag yet", endpoint=hub.url)
    r = run(app, args)
    assert r.exit_code == 0 and f"nothing new for tiny in {REPO} (tags v*)" in r.output, r.output
    sha = _release(hub, tag="v2")
    r = run(app, [*args, "--push", "acme"])
    assert r.exit_code == 11, r.output  # a new release; strict fails its gate by design
    with fam.open() as reg:
        v2 = reg.get_base("tiny@v2")
        assert (v2.source_kind, v2.source, v2.revision) == ("hub", REPO, sha)
        assert reg.get_patch("task@latest").ref == "task@2" and reg.get_patch("strict@latest").ref == "strict@1"
        assert reg.watch_seen("tiny", f"hub:{REPO}#tags=v*") == ("v2", ["v2"])
        runs = reg.list_runs()
        steps = {(s.patch, s.step): s for s in reg.get_run(runs[-1].id).steps}
    # the passing patch went to acme/task, the failing one nowhere
    assert "patch.json" in hub.files("acme/task") and "acme/strict" not in hub.repos
    assert steps[("task", "push")].outcome["repo"] == "acme/task"
    assert steps[("strict", "push")].state == "skipped"
    r = run(app, args)  # a restart: nothing new, nothing re-run
    assert r.exit_code == 0 and "nothing new" in r.output
    hub_io._api(hub.url, None).create_tag(REPO, tag="nightly", revision=sha)  # not matching the glob
    assert run(app, args).exit_code == 0
    with fam.open() as reg:
        assert reg.list_runs() == runs


def test_watch_hub_branch_new_commit_is_a_release(env, hub):
    fam = env
    run = CliRunner().invoke
    args = ["-R", fam.target, "watch", "tiny", "--hub", REPO, "--branch", "main", "--once", "--device", "cpu"]
    sha = _release(hub)
    r = run(app, args)
    assert r.exit_code == 11, r.output
    with fam.open() as reg:
        base = reg.get_base(f"tiny@{sha[:12]}")
        assert base.revision == sha and reg.get_patch("task@2").base == base.ref
    r = run(app, args)
    assert r.exit_code == 0 and "nothing new" in r.output


def test_watch_needs_one_source(env):
    r = CliRunner().invoke(app, ["-R", env.target, "watch", "tiny", "--once", "--tags", "v*"])
    assert r.exit_code == 1 and "--dir PATH or --hub" in r.output


def test_upgrade_push_pushes_each_passing_patch(tmp_path, hub, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    fam = build_family(tmp_path / "fam", patches=("task", "strict"))
    args = ["-R", fam.target, "upgrade", "tiny", "--to", "v2", "--push", "acme", "--device", "cpu"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 4, r.output  # strict fails its gate: not pushed
    assert set(hub.repos) == {"acme/task"} and len(hub.accepted_commits("acme/task")) == 1
    r = CliRunner().invoke(app, args)  # the same command again: nothing pushed twice
    assert r.exit_code == 4 and len(hub.accepted_commits("acme/task")) == 1
