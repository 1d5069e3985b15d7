"""Registry test fixtures: every registry test runs on each backend (SQLite and a throwaway PostgreSQL
server, see ``tests/pgserver.py``), plus small real directories: HF-layout bases and patch directories.

``registry_target`` is what to open a fresh registry with: a directory (SQLite) or a database URL whose
blob home is the test's ``tmp_path / "home"`` (PostgreSQL). A test bound to one backend says so with
``@sqlite_only`` / ``@postgresql_only``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from registry import Registry
from tests.pgserver import pg_database_url, pg_server, pg_server_alone  # noqa: F401  (fixtures)

BACKENDS = ("sqlite", "postgresql")
sqlite_only = pytest.mark.parametrize("backend", ["sqlite"])
postgresql_only = pytest.mark.parametrize("backend", ["postgresql"])


def pytest_collection_modifyitems(items):
    """Mark the PostgreSQL runs, so ``-m "not postgresql"`` leaves them out."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("backend") == "postgresql":
            item.add_marker(pytest.mark.postgresql)


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


def _location(request, backend: str, tmp_path: Path, monkeypatch, pg_fixture: str) -> str:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    if backend == "sqlite":
        return str(home)
    monkeypatch.setenv("PATCHLAB_HOME", str(home))  # a URL's home comes from PATCHLAB_HOME (spawned workers too)
    return request.getfixturevalue(pg_fixture)


@pytest.fixture
def registry_target(request, backend: str, tmp_path: Path, monkeypatch) -> str:
    """An empty location on ``backend`` (no registry yet); its blob home is ``tmp_path / "home"`` (made, empty)."""
    return _location(request, backend, tmp_path, monkeypatch, "pg_database_url")


@pytest.fixture(scope="session")
def pg_registry_template(request) -> str:
    """A database holding an empty registry at the newest schema, for tests to copy (copying is several
    times faster than running the migrations again; the migration tests start from empty databases)."""
    from registry.db import open_database, resolve_location

    server = request.getfixturevalue("pg_server")
    name = server.create_database()
    open_database(resolve_location(server.url(name)), create=True).dispose()  # no connection may stay open
    return name


@pytest.fixture
def pg_registry_url(request, pg_registry_template: str):
    """A fresh database holding an empty registry (a copy of the template), dropped after the test."""
    server = request.getfixturevalue("pg_server")
    name = server.create_database(template=pg_registry_template)
    yield server.url(name)
    server.drop_database(name)


def make_base(path: Path, seed: int = 0, hidden: int = 8) -> Path:
    """A tiny HF-layout checkpoint: config.json + model.safetensors."""
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "model.embed_tokens.weight": torch.randn(16, hidden, generator=g),
        "model.layers.0.mlp.up_proj.weight": torch.randn(hidden * 2, hidden, generator=g),
    }
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": hidden, "vocab_size": 16})
    )
    return path


def fake_fingerprint(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


def make_patch(
    path: Path,
    seed: int = 0,
    base_content: str | None = None,
    *,
    encoding: str = "dense",
    finetuned: str = "/models/ft",
) -> Path:
    """A patch directory as the core writes it: patch.json manifest + a safetensors shard of deltas."""
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    delta = torch.randn(16, 8, generator=g) * 0.01
    save_file({"model.layers.0.mlp.up_proj.weight": delta}, str(path / "delta-00001.safetensors"))
    manifest = {
        "format": "patchlab.io.patch",
        "format_version": 1,
        "patchlab_version": "0.1.0",
        "created": "2026-11-25T00:00:00Z",
        "provenance": {
            "base": {
                "path": "/models/base",
                "architecture": fake_fingerprint("arch"),
                "content": base_content,
                "dtype": "float32",
                "vocab_size": 16,
            },
            "finetuned": {"path": finetuned},
            "method": "diff",
            "parameters": {"storage_dtype": "float32", "seed": seed},
        },
        "tensors": {
            "model.layers.0.mlp.up_proj.weight": {
                "op": "add",
                "encoding": encoding,
                "shape": [16, 8],
                "dtype": "float32",
                "keys": {"delta": "model.layers.0.mlp.up_proj.weight"},
                "file": "delta-00001.safetensors",
                "stats": {
                    "norm": float(delta.norm()),
                    "rel_norm": 0.01,
                    "max_abs": float(delta.abs().max()),
                    "changed_frac": 1.0,
                },
            }
        },
        "totals": {"tensors": 1, "bytes": 512},
    }
    (path / "patch.json").write_text(json.dumps(manifest, indent=1))
    return path


@pytest.fixture
def reg(request, backend: str, tmp_path: Path, monkeypatch) -> Registry:
    """A new, empty registry on ``backend``, blob home ``tmp_path / "home"``."""
    r = Registry.init(_location(request, backend, tmp_path, monkeypatch, "pg_registry_url"))
    yield r
    r.close()


@pytest.fixture
def populated(tmp_path: Path, reg: Registry):
    """A registry with family llama (v1, v2) and a patch chain sql@1 (on v1) -> sql@2 ported onto v2."""
    c1, c2 = fake_fingerprint("v1"), fake_fingerprint("v2")
    reg.add_base("llama", "v1", make_base(tmp_path / "v1", 1), content=c1, fingerprint=False)
    reg.add_base("llama", "v2", make_base(tmp_path / "v2", 2), content=c2, fingerprint=False)
    p1 = reg.add_patch(make_patch(tmp_path / "p1", 1, c1), name="sql")
    p2 = reg.add_patch(make_patch(tmp_path / "p2", 2, c2), name="sql", parents=[p1.ref], relation="port")
    return reg, p1, p2


@pytest.fixture(scope="session")
def bf16_family(tmp_path_factory) -> dict[str, Path]:
    """A bf16 base, a fine-tune of it (its patch: a bf16 Δ needs residuals to stay exact) and two later
    releases, each moved a little from the one before."""
    import patchlab
    from tests.factory import make_model

    d = tmp_path_factory.mktemp("bf16-family")
    v1 = make_model(d / "v1", dtype=torch.bfloat16)
    ft = make_model(d / "ft", from_model=v1, noise=0.02, seed=1, dtype=torch.bfloat16)
    v2 = make_model(d / "v2", from_model=v1, noise=0.01, seed=2, dtype=torch.bfloat16)
    v3 = make_model(d / "v3", from_model=v2, noise=0.01, seed=3, dtype=torch.bfloat16)
    patch = patchlab.extract(v1, ft, d / "patch", device="cpu")
    assert patch.manifest["totals"].get("fixups"), "the family must exercise residuals"
    return {"v1": v1, "ft": ft, "v2": v2, "v3": v3, "patch": Path(patch.path)}
