"""Bases from the Hub, push and pull (registry.workflows.publish) with the real client against the Hub stand-in."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file

import patchlab
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
from registry import Registry, UnknownReferenceError
from registry.bases import checkpoint_facts
from registry.workflows import publish
from tests.registry.conftest import make_base

pytest_plugins = ["tests.hub_fixtures"]

BASE_REPO = "acme/tiny-base"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """A private Hugging Face cache (the client reads HF_HUB_CACHE at import, so the constant is patched)."""
    import huggingface_hub.constants as hc

    cache = tmp_path / "hfcache"
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def models(tmp_path) -> dict[str, Path]:
    """Tiny checkpoints: v1 and v2 (bases) and ft (a fine-tune of v1)."""
    out = {n: make_base(tmp_path / "models" / n, i, hidden=32) for i, n in enumerate(["v1", "v2"])}
    ft = make_base(tmp_path / "models" / "ft", 0, hidden=32)
    t = load_file(str(ft / "model.safetensors"))
    t = {k: v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(7)) for k, v in t.items()}
    from safetensors.torch import save_file

    save_file(t, str(ft / "model.safetensors"))
    out["ft"] = ft
    return out


@pytest.fixture
def base_on_hub(hub, models) -> str:
    """The v1 checkpoint pushed to the stand-in, with files a checkpoint does not need beside it."""
    folder = models["v1"]
    (folder / "notes.txt").write_text("not part of a checkpoint")
    (folder / "original").mkdir()
    (folder / "original" / "consolidated.safetensors").write_bytes(b"other format")
    sha = hub_io.push_folder(folder, BASE_REPO, commit_message="release v1", endpoint=hub.url).commit_sha
    (folder / "notes.txt").unlink()
    return sha


@pytest.fixture
def reg(tmp_path, hub, hf_cache) -> Registry:
    r = Registry.init(tmp_path / "home")
    r.hub_endpoint = hub.url
    yield r
    r.close()


def _one_line(err: BaseException, *needles: str) -> None:
    text = str(err)
    assert "\n" not in text, text
    for n in needles:
        assert n in text, text


def _downloads(hub) -> list[str]:
    return sorted({r.path.rsplit("/resolve/", 1)[1].split("/", 1)[1] for r in hub.requests_to("/resolve/", "GET")})


# ---- bases from the Hub ---------------------------------------------------------------------------------------


def test_base_add_from_hub_downloads_checkpoint_files_and_fingerprints_like_local(reg, hub, models, base_on_hub):
    b = reg.add_base("tiny", "v1", BASE_REPO)

    assert b.source_kind == "hub" and b.location == f"{BASE_REPO}@{base_on_hub}"
    assert _downloads(hub) == ["config.json", "model.safetensors"]  # no notes.txt, no original/
    local = checkpoint_facts(models["v1"])
    assert (b.content, b.architecture, b.num_parameters) == (
        local["content"],
        local["architecture"],
        local["num_parameters"],
    )
    path = reg.checkpoint_path("tiny@v1")
    assert (
        path.name == base_on_hub
        and (path / "model.safetensors").read_bytes() == (models["v1"] / "model.safetensors").read_bytes()
    )


def test_base_add_no_download_fetches_on_first_use(reg, hub, models, base_on_hub):
    HfApiTag = hub_io._api(hub.url, None)  # noqa: N806
    HfApiTag.create_tag(BASE_REPO, tag="v1.0")
    b = reg.add_base("tiny", "v1", BASE_REPO, revision="v1.0", download=False)

    assert b.revision == base_on_hub and b.content is None  # the tag was resolved to its commit
    assert hub.requests_to("/resolve/") == []
    path = reg.checkpoint_path("tiny@v1")  # first use: downloads and fingerprints
    assert _downloads(hub) == ["config.json", "model.safetensors"]
    assert reg.get_base("tiny@v1").content == checkpoint_facts(models["v1"])["content"]
    n = len(hub.requests)
    assert reg.checkpoint_path("tiny@v1") == path and len(hub.requests) == n  # the cache answers now


def test_offline_uses_the_cache_or_fails_in_one_line(reg, hub, base_on_hub, monkeypatch):
    reg.add_base("tiny", "v1", BASE_REPO)
    reg.add_base("tiny", "lazy", BASE_REPO, revision=base_on_hub, download=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    n = len(hub.requests)

    assert reg.checkpoint_path("tiny@v1").is_dir()
    assert reg.add_base("tiny", "v1-again", BASE_REPO, revision="main").content  # from the cache's refs/main
    assert len(hub.requests) == n

    import shutil

    shutil.rmtree(reg.checkpoint_path("tiny@v1").parents[2])  # the whole repo cache is gone
    with pytest.raises(HubOfflineError) as err:
        reg.checkpoint_path("tiny@lazy")
    _one_line(err.value, BASE_REPO, "HF_HUB_OFFLINE")
    with pytest.raises(HubOfflineError) as err:
        reg.add_base("tiny", "v9", BASE_REPO)
    _one_line(err.value, BASE_REPO, "HF_HUB_OFFLINE")
    assert [b.ref for b in reg.list_bases()] == ["tiny@v1", "tiny@lazy", "tiny@v1-again"]
    assert len(hub.requests) == n


@pytest.mark.parametrize(
    ("fault", "exc", "needle"),
    [
        ({"status": 401}, HubAuthError, "hf auth login"),
        ({"status": 403}, HubAuthError, "403"),
        ({"status": 404, "error_code": "RepoNotFound"}, HubRepoNotFoundError, "not found"),
        ({"status": 500}, HubServerError, "try again"),
    ],
)
def test_base_add_http_errors_are_one_line_and_record_nothing(reg, hub, base_on_hub, fault, exc, needle):
    hub.inject_error(path=r"^/api/models/", method="GET", **fault)
    with pytest.raises(exc) as err:
        reg.add_base("tiny", "v1", BASE_REPO)
    _one_line(err.value, BASE_REPO, needle)
    assert reg.list_bases() == []


def test_base_add_bad_input(reg, hub, base_on_hub, hf_cache, monkeypatch):
    import types

    import huggingface_hub.file_download

    with pytest.raises(InvalidRepoIdError):
        reg.add_base("tiny", "v1", "acme/not a repo")
    with pytest.raises(HubRevisionNotFoundError) as err:
        reg.add_base("tiny", "v1", BASE_REPO, revision="no-such-branch")
    _one_line(err.value, BASE_REPO, "no-such-branch")
    # an interrupted download keeps nothing: no row, no snapshot
    monkeypatch.setattr(huggingface_hub.file_download, "time", types.SimpleNamespace(sleep=lambda s: None))
    hub.inject_drop(path=r"/resolve/.*model\.safetensors$", after_bytes=0, times=None)
    with pytest.raises(HubDownloadError) as err:
        reg.add_base("tiny", "v1", BASE_REPO)
    _one_line(err.value, BASE_REPO, "interrupted")
    snapshots = hf_cache / "models--acme--tiny-base" / "snapshots"
    assert not snapshots.exists() or list(snapshots.iterdir()) == []
    assert reg.list_bases() == []


# ---- push -----------------------------------------------------------------------------------------------------


@pytest.fixture
def chain(reg, models, tmp_path, base_on_hub):
    """tiny@v1 (from the Hub), tiny@v2 (local); task@1 = ft - v1; its port onto v2 (derived:1); task@2 = the
    port's patch, with evaluations of both versions on the same instances."""
    reg.add_base("tiny", "v1", BASE_REPO)
    reg.add_base("tiny", "v2", models["v2"])
    p1 = patchlab.extract(models["v1"], models["ft"], tmp_path / "p1")
    t1 = reg.add_patch(p1.path, name="task", base="tiny@v1")
    ported = patchlab.port(reg.patch_path("task@1"), reg.checkpoint_path("tiny@v2"), tmp_path / "ported")
    d = reg.add_derived("task@1", ported.path, base="tiny@v2", kind="port")
    p2 = patchlab.extract(models["v2"], tmp_path / "ported", tmp_path / "p2")
    t2 = reg.add_patch(p2.path, name="task", base="tiny@v2", parents=["task@1"], relation="port")
    recs = lambda pattern: [{"id": f"q{i}", "correct": c == "1"} for i, c in enumerate(pattern)]  # noqa: E731
    reg.record_evaluation("task@1", "qa", recs("1101"))
    reg.record_evaluation("task@2", "qa", recs("1011"))  # q1 flipped to wrong: NFR 1 of 4
    return t1, t2, d


def test_push_patch_one_commit_idempotent_and_recorded(reg, hub, chain):
    t1, t2, _ = chain
    out = publish.push(reg, "task@2", "acme/task")

    commits = hub.accepted_commits("acme/task")
    assert out.result.created_commit and len(commits) == 1
    stored = {n for n, _, _ in reg.get_patch("task@2", detail=True).files}
    assert set(hub.files("acme/task")) == stored | {"README.md", ".gitattributes"}
    assert out.push is not None and out.push.commit_sha == hub.head("acme/task") and out.push.kind == "patch"

    again = publish.push(reg, "task@2", "acme/task")
    assert not again.result.created_commit and again.push is None
    assert len(hub.accepted_commits("acme/task")) == 1
    assert [p.repo_id for p in reg.list_pushes("task@2")] == ["acme/task"]


def test_card_front_matter_as_the_hub_received_it(reg, hub, chain, tmp_path):
    report = tmp_path / "report"
    report.mkdir()
    (report / "report.json").write_text(
        '{"diagnostics": {"verdict": {"level": "port with care", "reasons": ["[care] drift 0.1x the patch"]}}}'
    )
    publish.push(reg, "task@2", "acme/task", report=report)

    readme = hub.accepted_commits("acme/task")[0].files["README.md"].decode()
    assert readme in hub.yaml_validated
    data = ModelCard(readme).data.to_dict()
    # task@2 is on tiny@v2, a local base: no Hub id, so family@version and fingerprint go in the body
    assert "base_model" not in data and data["patchlab"]["base"] == "tiny@v2"
    assert data["patchlab"]["base_fingerprint"] == reg.get_base("tiny@v2").content
    assert data["patchlab"]["verdict"] == "port with care: [care] drift 0.1x the patch"
    assert {"patchlab", "extract", "patch"} <= set(data["tags"])
    metrics = {(m["type"], m.get("name")): m["value"] for m in data["model-index"][0]["results"][0]["metrics"]}
    assert metrics[("accuracy", "accuracy")] == 0.75
    assert metrics[("negative_flip_rate", "negative_flip_rate vs task@1")] == 0.25
    assert "- task@2 (this patch) on tiny@v2" in readme and "- <- port of task@1 on tiny@v1" in readme

    publish.push(reg, "task@1", "acme/task-v1")  # on the Hub base: base_model is its repo id
    data = ModelCard(hub.files("acme/task-v1")["README.md"].decode()).data.to_dict()
    assert data["base_model"] == BASE_REPO and data["base_model_relation"] == "finetune"


def test_push_refuses_when_head_moved_unless_forced(reg, hub, chain, tmp_path):
    first = publish.push(reg, "task@1", "acme/task")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.md").write_text("someone else")
    hub_io.push_folder(other, "acme/task", commit_message="theirs", delete_extra=False, endpoint=hub.url)
    moved = hub.head("acme/task")

    with pytest.raises(RemoteHeadMovedError) as err:
        publish.push(reg, "task@2", "acme/task")
    _one_line(err.value, "acme/task", first.result.commit_sha[:12], "--force")
    assert hub.head("acme/task") == moved and len(reg.list_pushes()) == 1

    forced = publish.push(reg, "task@2", "acme/task", force=True)
    assert forced.result.created_commit and hub.head("acme/task") == forced.result.commit_sha
    assert "notes.md" not in hub.files("acme/task")


def test_push_to_branch_and_pr(reg, hub, chain):
    publish.push(reg, "task@1", "acme/task")
    on_branch = publish.push(reg, "task@2", "acme/task", revision="v2")
    assert on_branch.result.revision == "v2" and hub.head("acme/task", "v2") == on_branch.result.commit_sha
    pr = publish.push(reg, "task@2", "acme/task", create_pr=True)
    assert pr.result.revision == "refs/pr/1" and pr.push is not None and pr.push.revision == "refs/pr/1"
    assert publish.push(reg, "task@1", "acme/task").result.created_commit is False  # main is still task@1


def test_push_model_and_peft(reg, hub, chain, models, tmp_path):
    _, _, d = chain
    out = publish.push(reg, d.ref, "acme/task-model")
    assert out.kind == "model" and len(hub.accepted_commits("acme/task-model")) == 1
    files = hub.files("acme/task-model")
    assert files["model.safetensors"] == (Path(d.path) / "model.safetensors").read_bytes()
    data = ModelCard(files["README.md"].decode()).data.to_dict()
    assert (
        data["patchlab"]["kind"] == "model"
        and "- derived:1: port of task@1 onto tiny@v2" in files["README.md"].decode()
    )

    from patchlab.methods.compress import extract_encoded

    lr = extract_encoded(models["v1"], models["ft"], tmp_path / "lr", rank=2, embeddings="encode")
    reg.add_patch(lr.path, name="task-lora", base="tiny@v1")
    out = publish.push(reg, "task-lora", "acme/task-lora", as_="peft")
    files = hub.files("acme/task-lora")
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(files)
    data = ModelCard(files["README.md"].decode()).data.to_dict()
    assert data["library_name"] == "peft" and data["base_model_relation"] == "adapter"
    assert data["base_model"] == BASE_REPO

    with pytest.raises(PatchlabError) as err:  # a dense patch is not an adapter
        publish.push(reg, "task@1", "acme/nope", as_="peft")
    _one_line(err.value, "low-rank")
    assert "acme/nope" not in hub.repos


def test_push_bad_input_records_nothing(reg, hub, chain, monkeypatch):
    with pytest.raises(InvalidRepoIdError):
        publish.push(reg, "task@1", "acme/bad repo")
    hub.inject_error(400, path="/api/validate-yaml", body={"errors": [{"message": "tags: must be a list"}]})
    with pytest.raises(HubCardRejectedError) as err:
        publish.push(reg, "task@1", "acme/task")
    _one_line(err.value, "acme/task", "tags: must be a list")
    hub.inject_error(403, path="/commit/", message="no write access")
    with pytest.raises(HubAuthError) as err:
        publish.push(reg, "task@1", "acme/task")
    _one_line(err.value, "acme/task", "403")
    assert reg.list_pushes() == [] and all(c.repo_id == BASE_REPO for c in hub.accepted_commits())
    assert list((reg.cache / "tmp").iterdir()) == []


# ---- pull -----------------------------------------------------------------------------------------------------


@pytest.fixture
def other(tmp_path, hub, hf_cache) -> Registry:
    r = Registry.init(tmp_path / "other-home")
    r.hub_endpoint = hub.url
    yield r
    r.close()


def test_pull_registers_and_applies_bit_for_bit(reg, other, hub, chain, models, tmp_path):
    publish.push(reg, "task@1", "acme/task")
    with pytest.raises(UnknownReferenceError) as err:  # its base is not registered here yet
        publish.pull(other, "acme/task")
    _one_line(err.value, "acme/task", f"patchlab base add tiny@v1 {BASE_REPO} --revision")
    assert other.list_patches() == [] and list((other.cache / "tmp").iterdir()) == []

    other.add_base("tiny", "v1", BASE_REPO, download=False)  # lazy: pull fingerprints it to match
    out = publish.pull(other, "acme/task")

    p = out.patch
    assert (p.ref, p.base, out.kind) == ("task@1", "tiny@v1", "patch")
    assert p.digest == reg.get_patch("task@1").digest  # the very same stored patch, provenance included
    assert p.finetuned == reg.get_patch("task@1").finetuned and p.description.startswith("pulled from acme/task@")
    applied = patchlab.apply(other.patch_path("task@1"), other.checkpoint_path("tiny@v1"), tmp_path / "applied")
    got, want = load_file(str(applied.path / "model.safetensors")), load_file(str(models["ft"] / "model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert list((other.cache / "tmp").iterdir()) == []


def test_pull_peft_adapter(reg, other, hub, chain, models, tmp_path):
    from patchlab.methods.compress import extract_encoded

    lr = extract_encoded(models["v1"], models["ft"], tmp_path / "lr", rank=2, embeddings="encode")
    reg.add_patch(lr.path, name="task-lora", base="tiny@v1")
    publish.push(reg, "task-lora", "acme/task-lora", as_="peft")
    other.add_base("tiny", "v1", BASE_REPO)

    out = publish.pull(other, "acme/task-lora", name="lora")

    assert out.kind == "peft" and out.patch.ref == "lora@1" and out.patch.base == "tiny@v1"
    assert out.patch.method == "import-peft" and out.patch.encoding == "lowrank"
    assert out.patch.finetuned.startswith("acme/task-lora@")
    a = patchlab.apply(other.patch_path("lora"), other.checkpoint_path("tiny@v1"), tmp_path / "a")
    b = patchlab.apply(reg.patch_path("task-lora"), reg.checkpoint_path("tiny@v1"), tmp_path / "b")
    ga, gb = load_file(str(a.path / "model.safetensors")), load_file(str(b.path / "model.safetensors"))
    assert all(torch.allclose(ga[k], gb[k], atol=1e-6) for k in gb)


def test_pull_bad_input_leaves_nothing(reg, other, hub, chain, monkeypatch, tmp_path):
    import types

    import huggingface_hub.file_download

    publish.push(reg, "task@1", "acme/task")
    other.add_base("tiny", "v1", BASE_REPO)

    def n_rows() -> tuple[int, int]:
        scratch = other.cache / "tmp"
        return len(other.list_patches()), len(list(scratch.iterdir())) if scratch.exists() else 0

    cases = [
        ("acme/bad repo", InvalidRepoIdError, "not a valid Hub repo id"),
        ("acme/task@", PatchlabError, "give a revision"),
        ("acme/task@nope", HubRevisionNotFoundError, "'nope' not found"),
        ("acme/missing", HubRepoNotFoundError, "hf auth login"),
        (BASE_REPO, PatchlabError, "neither a patchlab patch"),
    ]
    for spec, exc, needle in cases:
        with pytest.raises(exc) as err:
            publish.pull(other, spec)
        _one_line(err.value, needle)
        assert n_rows() == (0, 0), spec
    for status, exc in ((401, HubAuthError), (403, HubAuthError)):
        hub.inject_error(status, path=r"^/api/models/acme/task", method="GET")
        with pytest.raises(exc) as err:
            publish.pull(other, "acme/task")
        _one_line(err.value, "acme/task", str(status) if status == 403 else "hf auth login")
    monkeypatch.setattr(huggingface_hub.file_download, "time", types.SimpleNamespace(sleep=lambda s: None))
    hub.inject_drop(path=r"/resolve/.*\.safetensors$", after_bytes=0, times=None)
    with pytest.raises(HubDownloadError) as err:
        publish.pull(other, "acme/task")
    _one_line(err.value, "acme/task", "interrupted")
    assert n_rows() == (0, 0)
    hub.clear_faults()
    import socket

    with socket.socket() as sock:  # the network is gone: nothing listens where the Hub was
        sock.bind(("127.0.0.1", 0))
        other.hub_endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with pytest.raises(HubConnectionError) as err:
        publish.pull(other, "acme/task")
    _one_line(err.value, "acme/task")
    assert n_rows() == (0, 0)


# ---- the real Hub (opt-in) ------------------------------------------------------------------------------------


@pytest.mark.skipif(not os.environ.get("HF_TOKEN_REAL"), reason="set HF_TOKEN_REAL (and HF_REAL_REPO) to run")
def test_real_hub_push_pull_round_trip(tmp_path, models, monkeypatch):  # pragma: no cover - opt-in
    """Against huggingface.co: push a patch to a private repo of the token's owner, pull it back."""
    monkeypatch.setenv("HF_TOKEN", os.environ["HF_TOKEN_REAL"])
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    from huggingface_hub import HfApi

    api = HfApi(endpoint="https://huggingface.co")
    repo = os.environ.get("HF_REAL_REPO") or f"{api.whoami()['name']}/patchlab-test-{os.getpid()}"
    home = Registry.init(tmp_path / "home")
    home.hub_endpoint = "https://huggingface.co"
    home.add_base("tiny", "v1", models["v1"])
    home.add_patch(patchlab.extract(models["v1"], models["ft"], tmp_path / "p").path, name="task", base="tiny@v1")
    try:
        out = publish.push(home, "task", repo, private=True)
        assert out.result.created_commit
        assert not publish.push(home, "task", repo, private=True).result.created_commit
        again = Registry.init(tmp_path / "again")
        again.hub_endpoint = "https://huggingface.co"
        again.add_base("tiny", "v1", models["v1"])
        assert publish.pull(again, repo).patch.digest == home.get_patch("task").digest
    finally:
        if not os.environ.get("HF_REAL_REPO"):
            api.delete_repo(repo, missing_ok=True)
