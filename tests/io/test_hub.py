"""patchlab.io.hub with the real huggingface_hub client against the Hub stand-in on 127.0.0.1."""

from __future__ import annotations

import shutil
import socket
import types
from pathlib import Path

import huggingface_hub.file_download
import pytest
from huggingface_hub import HfApi, ModelCard
from safetensors.torch import load_file

from patchlab.errors import (
    HubAuthError,
    HubCardRejectedError,
    HubConnectionError,
    HubDownloadError,
    HubOfflineError,
    HubRepoNotFoundError,
    HubRevisionNotFoundError,
    HubServerError,
    InvalidRepoIdError,
    PatchlabError,
    RemoteHeadMovedError,
)
from patchlab.io import hub as hub_io
from patchlab.io.hub import CardEval
from tests.conftest import no_partial_dirs

pytest_plugins = ["tests.hub_fixtures"]
from tests.hub_fixtures import online  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "models" / "v1"
REPO = "acme/tiny-llama"


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A copy of the tiny llama-like checkpoint (config, generation config, tokenizer, model.safetensors)."""
    out = tmp_path / "model"
    shutil.copytree(FIXTURE, out)
    return out


def _push(hub, folder, **kw):
    kw.setdefault("commit_message", "push tiny llama")
    return hub_io.push_folder(folder, REPO, endpoint=hub.url, **kw)


def _card(**kw) -> ModelCard:
    args = dict(
        name="tiny-llama-task",
        base_model="acme/tiny-llama-base",
        relation="finetune",
        method="port",
        base_label="llama@3.1",
        base_fingerprint="sha256:abc123",
        lineage=["this patch", "port of task@1 on llama@3.0 onto llama@3.1"],
        evals=[CardEval("task", "accuracy", 0.75), CardEval("task", "negative_flip_rate", 0.02, against="task@1")],
        verdict="compatible: 0 tensors changed shape",
    )
    args.update(kw)
    return hub_io.build_model_card(**args)


def _one_line(err: PatchlabError, *needles: str) -> None:
    text = str(err)
    assert "\n" not in text, text
    for needle in needles:
        assert needle in text, text


# -- push --------------------------------------------------------------------------------------------------------


def test_push_creates_repo_in_one_commit_with_the_files(hub, model_dir):
    result = _push(hub, model_dir, card=_card(), private=True)

    assert result.created_commit and result.revision == "main"
    commits = hub.accepted_commits(REPO)
    assert len(commits) == 1 and len(hub.commits_received) == 1
    expected = {p.name for p in model_dir.iterdir()} | {"README.md"}
    assert set(commits[0].files) == expected
    assert commits[0].header["summary"] == "push tiny llama"
    assert commits[0].header["parentCommit"]  # always pushed against the head it compared with
    for name in expected - {"README.md"}:
        assert commits[0].files[name] == (model_dir / name).read_bytes()
    assert hub.head(REPO) == result.commit_sha == commits[0].oid
    assert hub.repos[REPO].private
    # the token from the usual place (HF_TOKEN) was sent
    assert hub.requests_to("/commit/")[0].headers["authorization"] == "Bearer hf_standin_token"


def test_repeated_push_makes_no_commit(hub, model_dir):
    first = _push(hub, model_dir, card=_card())
    second = _push(hub, model_dir, card=_card())

    assert not second.created_commit
    assert second.commit_sha == first.commit_sha == hub.head(REPO)
    assert len(hub.commits_received) == 1
    assert not hub.requests_to("/preupload/")[1:]  # nothing was even offered for upload the second time


def test_push_sends_only_changes_and_deletes_stale_files(hub, model_dir):
    _push(hub, model_dir)
    (model_dir / "config.json").write_text((model_dir / "config.json").read_text().replace("}", ', "x": 1}', 1))
    (model_dir / "generation_config.json").unlink()

    result = _push(hub, model_dir)

    assert result.created_commit
    last = hub.commits_received[-1]
    assert set(last.files) == {"config.json"} and last.deleted == ["generation_config.json"]
    assert set(hub.files(REPO)) == {".gitattributes"} | {p.name for p in model_dir.iterdir()}


def test_push_refuses_when_head_moved_since_parent_commit(hub, model_dir):
    first = _push(hub, model_dir)
    (model_dir / "config.json").write_text("{}")
    second = _push(hub, model_dir, parent_commit=first.commit_sha)
    assert second.created_commit
    (model_dir / "tokenizer_config.json").write_text("{}")

    with pytest.raises(RemoteHeadMovedError) as err:
        _push(hub, model_dir, parent_commit=first.commit_sha[:12])

    _one_line(err.value, REPO, "push again")
    assert len(hub.accepted_commits()) == 2 and hub.head(REPO) == second.commit_sha


def test_push_maps_a_server_side_race_to_head_moved(hub, model_dir):
    _push(hub, model_dir)
    (model_dir / "config.json").write_text("{}")
    hub.inject_error(412, path="/commit/", message="A commit has happened since. Please refresh and try again.")

    with pytest.raises(RemoteHeadMovedError) as err:
        _push(hub, model_dir)
    _one_line(err.value, REPO)


def test_push_with_create_pr_leaves_main_alone(hub, model_dir):
    first = _push(hub, model_dir)
    (model_dir / "config.json").write_text("{}")

    result = _push(hub, model_dir, create_pr=True)

    assert result.created_commit and result.revision == "refs/pr/1"
    assert result.pr_url and result.pr_url.endswith("/discussions/1")
    assert hub.head(REPO) == first.commit_sha
    assert hub.commits_received[-1].create_pr
    assert hub.files(REPO, "refs/pr/1")["config.json"] == b"{}"


def test_push_to_a_new_branch_creates_it_and_refuses_a_tag(hub, model_dir):
    first = _push(hub, model_dir)
    HfApi(endpoint=hub.url).create_tag(REPO, tag="v1")
    (model_dir / "config.json").write_text("{}")

    result = _push(hub, model_dir, revision="exp")
    assert result.created_commit and result.revision == "exp"
    assert hub.head(REPO, "exp") == result.commit_sha and hub.head(REPO) == first.commit_sha

    with pytest.raises(HubRevisionNotFoundError) as err:
        _push(hub, model_dir, revision="v1")
    _one_line(err.value, REPO, "not a branch")


# -- revisions and downloads -------------------------------------------------------------------------------------


def test_resolve_revision_for_branch_tag_and_sha(hub, model_dir):
    first = _push(hub, model_dir)
    api = HfApi(endpoint=hub.url)
    api.create_tag(REPO, tag="v1", revision=first.commit_sha)
    api.create_branch(REPO, branch="stable", revision="v1")
    (model_dir / "config.json").write_text("{}")
    second = _push(hub, model_dir)

    resolve = lambda rev: hub_io.resolve_revision(REPO, rev, endpoint=hub.url)  # noqa: E731
    assert resolve(None) == resolve("main") == second.commit_sha
    assert resolve("v1") == resolve("stable") == first.commit_sha
    assert resolve(first.commit_sha) == resolve(first.commit_sha[:8]) == first.commit_sha
    assert [c.commit_id for c in api.list_repo_commits(REPO)][:2] == [second.commit_sha, first.commit_sha]

    with pytest.raises(HubRevisionNotFoundError) as err:
        resolve("0" * 40)
    _one_line(err.value, REPO, "not found")


def test_download_folder_round_trips_the_checkpoint(hub, model_dir, tmp_path):
    pushed = _push(hub, model_dir, card=_card())
    dest = tmp_path / "pulled"

    pulled = hub_io.download_folder(REPO, "main", dest, endpoint=hub.url, progress=False)

    assert pulled.path == dest and pulled.commit_sha == pushed.commit_sha
    assert {p.name for p in dest.iterdir()} == {p.name for p in model_dir.iterdir()} | {"README.md", ".gitattributes"}
    for p in model_dir.iterdir():
        assert (dest / p.name).read_bytes() == p.read_bytes()
    original, copy = load_file(model_dir / "model.safetensors"), load_file(dest / "model.safetensors")
    assert original.keys() == copy.keys() and all(original[k].equal(copy[k]) for k in original)
    assert not no_partial_dirs(tmp_path)


def test_download_checkpoint_fetches_only_checkpoint_files_and_works_offline(hub, model_dir, tmp_path, monkeypatch):
    (model_dir / "notes.txt").write_text("not part of a checkpoint")
    (model_dir / "original").mkdir()
    (model_dir / "original" / "consolidated.safetensors").write_bytes(b"ignored")
    pushed = _push(hub, model_dir)
    cache = tmp_path / "cache"

    path = hub_io.download_checkpoint(REPO, "main", cache_dir=cache, progress=False, endpoint=hub.url)

    assert path.name == pushed.commit_sha
    want = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"}
    assert {p.name for p in path.iterdir()} == want
    assert (path / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()

    n = len(hub.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_io.download_checkpoint(REPO, "main", cache_dir=cache, progress=False, endpoint=hub.url) == path
    assert len(hub.requests) == n  # the cache alone answered

    with pytest.raises(HubOfflineError) as err:
        hub_io.download_checkpoint(REPO, "main", cache_dir=tmp_path / "empty", progress=False, endpoint=hub.url)
    _one_line(err.value, REPO, "HF_HUB_OFFLINE")


# -- the model card ----------------------------------------------------------------------------------------------


def test_card_front_matter_as_the_hub_received_it(hub, model_dir):
    _push(hub, model_dir, card=_card())

    readme = hub.accepted_commits()[0].files["README.md"].decode()
    assert hub.yaml_validated == [readme]  # checked through the configured endpoint, not the public Hub
    data = ModelCard(readme).data.to_dict()
    assert data["base_model"] == "acme/tiny-llama-base"
    assert data["base_model_relation"] == "finetune"
    assert {"patchlab", "port"} <= set(data["tags"])
    assert data["patchlab"]["base"] == "llama@3.1" and data["patchlab"]["base_fingerprint"] == "sha256:abc123"
    assert data["patchlab"]["verdict"].startswith("compatible")
    metrics = {m["type"]: m["value"] for m in data["model-index"][0]["results"][0]["metrics"]}
    assert metrics == {"accuracy": 0.75, "negative_flip_rate": 0.02}
    assert "## Lineage" in readme and "- port of task@1 on llama@3.0 onto llama@3.1" in readme


def test_adapter_and_merge_cards():
    adapter = hub_io.build_model_card(name="a", base_model="acme/base", relation="adapter", method="peft").data
    assert adapter.library_name == "peft" and adapter.base_model_relation == "adapter" and "lora" in adapter.tags
    merge = hub_io.build_model_card(name="m", base_model=["acme/a", "acme/b"], relation="merge", method="ties").data
    assert merge.base_model == ["acme/a", "acme/b"] and merge.base_model_relation == "merge"
    local = hub_io.build_model_card(name="l", base_model=None, base_label="llama@3", relation="finetune", method="x")
    assert local.data.base_model is None and "llama@3" in local.text


# -- bad input ---------------------------------------------------------------------------------------------------


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_invalid_repo_id_is_refused_before_any_request(hub, model_dir):
    for call in (
        lambda: hub_io.resolve_revision("not a repo!", "main", endpoint=hub.url),
        lambda: hub_io.push_folder(model_dir, "a/b/c", commit_message="x", endpoint=hub.url),
    ):
        with pytest.raises(InvalidRepoIdError) as err:
            call()
        _one_line(err.value, "not a valid Hub repo id")
    assert hub.requests == []


@pytest.mark.parametrize(
    ("status", "exc", "needle"),
    [(401, HubAuthError, "hf auth login"), (403, HubAuthError, "write access"), (500, HubServerError, "try again")],
)
def test_http_errors_map_to_one_line(hub, model_dir, status, exc, needle):
    _push(hub, model_dir)
    hub.inject_error(status, path=r"^/api/models/", method="GET")
    with pytest.raises(exc) as err:
        hub_io.resolve_revision(REPO, "main", endpoint=hub.url)
    _one_line(err.value, REPO, needle)


def test_missing_repo_and_forbidden_commit(hub, model_dir):
    with pytest.raises(HubRepoNotFoundError) as err:
        hub_io.resolve_revision("acme/missing", "main", endpoint=hub.url)
    _one_line(err.value, "acme/missing", "hf auth login")

    hub.inject_error(403, path="/commit/", message="You don't have the rights to create a commit")
    with pytest.raises(HubAuthError) as err:
        _push(hub, model_dir)
    _one_line(err.value, REPO, "403")
    assert hub.accepted_commits() == []


def test_rejected_card_maps_to_card_error(hub, model_dir):
    hub.inject_error(400, path="/api/validate-yaml", body={"errors": [{"message": "base_model: not a model id"}]})
    with pytest.raises(HubCardRejectedError) as err:
        _push(hub, model_dir, card=_card())
    _one_line(err.value, REPO, "base_model: not a model id")
    assert hub.commits_received == []


def test_network_down_maps_to_connection_error(model_dir, monkeypatch):
    online(monkeypatch)
    endpoint = _closed_port()
    with pytest.raises(HubConnectionError) as err:
        hub_io.resolve_revision(REPO, "main", endpoint=endpoint)
    _one_line(err.value, REPO, "HF_ENDPOINT")
    with pytest.raises(HubConnectionError):
        hub_io.push_folder(model_dir, REPO, commit_message="x", endpoint=endpoint)


@pytest.fixture
def no_retry_sleep(monkeypatch):
    """The client sleeps 1 s before each resume of a dropped download; tests do not need to wait."""
    monkeypatch.setattr(huggingface_hub.file_download, "time", types.SimpleNamespace(sleep=lambda s: None))


def test_dropped_connection_resumes_within_the_call(hub, model_dir, tmp_path, no_retry_sleep):
    _push(hub, model_dir)
    hub.inject_drop(path=r"/resolve/.*model\.safetensors$", after_bytes=100_000)

    pulled = hub_io.download_folder(REPO, "main", tmp_path / "pulled", endpoint=hub.url, progress=False)

    assert (pulled.path / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()
    gets = hub.requests_to(r"/resolve/.*model\.safetensors$", method="GET")
    # the client resumes with a Range header from its last 10 MiB chunk boundary: a file this small starts over
    assert len(gets) == 2 and "range" not in gets[1].headers


def test_interrupted_download_leaves_nothing_behind(hub, model_dir, tmp_path, no_retry_sleep):
    _push(hub, model_dir)
    hub.inject_drop(path=r"/resolve/.*model\.safetensors$", after_bytes=100_000)
    hub.inject_drop(path=r"/resolve/.*model\.safetensors$", after_bytes=0, times=None)  # then the network is gone
    dest = tmp_path / "out" / "pulled"
    cache = tmp_path / "cache"

    with pytest.raises(HubDownloadError) as err:
        hub_io.download_folder(REPO, "main", dest, endpoint=hub.url, progress=False)
    _one_line(err.value, REPO, "interrupted")
    assert not dest.exists() and list(dest.parent.iterdir()) == []

    with pytest.raises(HubDownloadError):
        hub_io.download_checkpoint(REPO, "main", cache_dir=cache, progress=False, endpoint=hub.url)
    repo_cache = cache / "models--acme--tiny-llama"
    assert not (repo_cache / "snapshots").exists() or list((repo_cache / "snapshots").iterdir()) == []
    assert [p for p in repo_cache.rglob("*") if p.name.endswith(".incomplete")] == []

    hub.clear_faults()  # the network is back: the completed files come from the cache, the rest downloads
    n_gets = len(hub.requests_to("/resolve/", method="GET"))
    path = hub_io.download_checkpoint(REPO, "main", cache_dir=cache, progress=False, endpoint=hub.url)
    assert (path / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()
    assert len(hub.requests_to("/resolve/", method="GET")) - n_gets == 1
