"""Checkpoint fingerprints: the two content algorithms, and the NaN/Inf test made in the same read."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from patchlab.digests import BLAKE3, CONTENT_ALGORITHM, LEGACY, content_algorithm
from patchlab.io.checkpoint import Checkpoint
from tests.factory import make_model


def _legacy(ck: Checkpoint) -> str:
    """``sha256-of-sorted-tensor-sha256`` written out from its definition, with hashlib alone."""
    per = {n: hashlib.sha256(ck._files[f].raw(n)).hexdigest() for n, f in ck.weight_map.items()}
    h = hashlib.sha256()
    for n in sorted(per):
        h.update(f"{n}\0{per[n]}\n".encode())
    return h.hexdigest()


def _blake3(ck: Checkpoint) -> str:
    """``blake3-of-sorted-tensor-blake3`` written out from its definition (docs/registry.md)."""
    from blake3 import blake3

    h = blake3()
    for n in sorted(ck.weight_map):
        i = ck.info(n)
        per = blake3(bytes(ck._files[ck.weight_map[n]].raw(n))).hexdigest()
        h.update(f"{n}\0{str(i.dtype).removeprefix('torch.')}\0{','.join(map(str, i.shape))}\0{per}\n".encode())
    return "blake3:" + h.hexdigest()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """One model saved whole, sharded, and in bf16 (the dtype enters the blake3 digest)."""
    root = tmp_path_factory.mktemp("ck")
    return {
        "whole": make_model(root / "whole"),
        "sharded": make_model(root / "sharded", shard_size="20KB"),
        "bf16": make_model(root / "bf16", dtype=torch.bfloat16),
    }


@pytest.mark.parametrize("workers", ["1", "3"])
@pytest.mark.parametrize("block", [1 << 20, 96])  # one block a tensor, and many (a tensor split mid-row)
def test_both_algorithms_match_their_definitions_whatever_the_workers(models, monkeypatch, workers, block):
    monkeypatch.setenv("PATCHLAB_WORKERS", workers)
    monkeypatch.setattr("patchlab.io.checkpoint._HASH_BLOCK", block)
    ck = Checkpoint.open(models["sharded"])
    assert ck.content_digest == _blake3(ck) and content_algorithm(ck.content_digest) == BLAKE3 == CONTENT_ALGORITHM
    legacy = _legacy(ck)
    assert ck.scan(LEGACY).digest == legacy and content_algorithm(legacy) == LEGACY
    assert Checkpoint.open(models["sharded"]).content_digest_like(legacy) == legacy  # an old record re-verifies


def test_content_digest_ignores_sharding_and_metadata(models, tmp_path):
    whole, sharded = Checkpoint.open(models["whole"]), Checkpoint.open(models["sharded"])
    assert len(sharded.weight_files()) > 2
    for algorithm in (BLAKE3, LEGACY):
        assert whole.scan(algorithm).digest == sharded.scan(algorithm).digest
    # the same tensors, other metadata
    sd = load_file(str(models["whole"] / "model.safetensors"))
    (tmp_path / "rev").mkdir()
    shutil.copy(models["whole"] / "config.json", tmp_path / "rev")
    save_file(dict(reversed(sd.items())), str(tmp_path / "rev" / "model.safetensors"), metadata={"x": "y"})
    assert Checkpoint.open(tmp_path / "rev").content_digest == whole.content_digest


def test_blake3_digest_covers_dtype_and_shape_where_sha256_did_not(tmp_path):
    t = torch.arange(16, dtype=torch.int16)
    for name, tensor in (("a", t), ("b", t.view(4, 4)), ("c", t.view(torch.float16))):  # same bytes each time
        (tmp_path / name).mkdir()
        save_file({"w": tensor}, str(tmp_path / name / "model.safetensors"))
    cks = [Checkpoint.open(tmp_path / n) for n in "abc"]
    assert len({ck.scan(LEGACY).digest for ck in cks}) == 1
    assert len({ck.content_digest for ck in cks}) == 3


def test_one_flipped_byte_changes_both_digests(models, tmp_path):
    src = models["bf16"]
    dst = tmp_path / "flipped"
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01  # a low mantissa bit, in the data region: still finite
    f.write_bytes(bytes(data))
    a, b = Checkpoint.open(src), Checkpoint.open(dst)
    assert b.nonfinite() == []
    for algorithm in (BLAKE3, LEGACY):
        assert a.scan(algorithm).digest != b.scan(algorithm).digest


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_found_in_the_hashing_read(tmp_path, monkeypatch, dtype, value):
    """Every poisoned tensor is named (file order), wherever the bad element sits among the read blocks."""
    monkeypatch.setattr("patchlab.io.checkpoint._HASH_BLOCK", 64)
    path = make_model(tmp_path / "m", dtype=dtype)
    sd = load_file(str(path / "model.safetensors"))
    clean = Checkpoint.open(path).scan()
    assert clean.nonfinite == () and clean.finite_checked
    poisoned = ["model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight", "model.norm.weight"]
    for k, name in enumerate(poisoned):
        flat = sd[name].view(-1)
        flat[[0, flat.numel() // 2 + k, -1][k]] = value  # first, middle, last element
    save_file(sd, str(path / "model.safetensors"))
    ck = Checkpoint.open(path)
    order = ck.names
    assert ck.scan(check_finite=False).nonfinite == ()  # not looked for: not found
    scan = ck.scan()
    assert list(scan.nonfinite) == sorted(poisoned, key=order.index)
    assert scan.digest == ck.scan(check_finite=False).digest != clean.digest
    assert ck.nonfinite(limit=1) == [sorted(poisoned, key=order.index)[0]]


def test_integer_tensors_are_hashed_not_tested(tmp_path):
    (tmp_path / "m").mkdir()
    save_file(
        {"ids": torch.full((4,), -1, dtype=torch.int16), "w": torch.ones(3)}, str(tmp_path / "m" / "model.safetensors")
    )  # 0xFFFF would be a NaN were it read as a half
    assert Checkpoint.open(tmp_path / "m").scan().nonfinite == ()
