"""merge of 16-bit exact patches (extract's default for a bf16 model): on their own base they contribute their
exact Δ, so a merge of bf16 patches has the bytes of the same merge of fp32 patches and of the checkpoints'
``base + Σ w·(ft − base)`` computed in fp32 (mergekit's formula); elsewhere the stored Δ is merged as before."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import patchlab
from patchlab.engine import executor
from patchlab.io.checkpoint import Checkpoint
from patchlab.io.patch import Patch
from patchlab.kernels.merge import merge_tensor
from tests.methods.test_merge import MODELS, dense, derive, same_bits, tensors

WEIGHTS = [1.0, 0.5, 0.7]


def to_bf16(src: Path, dst: Path) -> Path:
    """A copy of a fixture model with every floating tensor cast to bf16."""
    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    sd = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()}
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def fam16(tmp_path_factory) -> dict[str, Path]:
    """bf16 v1 and three bf16 fine-tunes of it, each extracted with the default dtype (bf16 Δ with residuals)
    and as fp32; one bf16 fine-tune of bf16 v2 (another base)."""
    t = tmp_path_factory.mktemp("merge16")
    base = to_bf16(MODELS / "v1", t / "v1")
    fts = [to_bf16(MODELS / "ft-v1", t / "ft-a"), derive(base, t / "ft-b", 1), derive(base, t / "ft-c", 2, 0.02)]
    v2 = to_bf16(MODELS / "v2", t / "v2")
    ft_v2 = to_bf16(MODELS / "ft-v2", t / "ft-v2")
    p: dict = {"base": base, "fts": fts, "v2": v2, "dir": t}
    p["p16"] = [patchlab.extract(base, f, t / f"{f.name}.16.patch").path for f in fts]
    p["p32"] = [patchlab.extract(base, f, t / f"{f.name}.32.patch", storage_dtype="float32").path for f in fts]
    p["q16"] = patchlab.extract(v2, ft_v2, t / "v2.16.patch").path
    return p


def test_the_patches_are_rounded_with_residuals(fam16):
    for p in fam16["p16"]:
        patch = Patch.open(p)
        assert patch.provenance["parameters"]["exact"] is True
        adds = [e for e in patch.entries() if e.op == "add"]
        assert {e.stored_dtype("delta") for e in adds} == {torch.bfloat16}
        assert sum(1 for e in adds if e.fix) > 10  # the merge has residuals to restore


def reference(base: Path, fts: list[Path], weights: list[float]) -> dict[str, torch.Tensor]:
    """``base + Σ w·(ft − base)``, in fp32 from the checkpoints, cast to the base's dtype: what mergekit
    computes with ``dtype: float32`` (and the order ``disjoint_merge`` sums in)."""
    b = load_file(str(base / "model.safetensors"))
    f = [load_file(str(x / "model.safetensors")) for x in fts]
    out = {}
    for n, bt in b.items():
        b32 = bt.float()
        mixed = None
        for w, ft in zip(weights, f, strict=True):
            d = ft[n].float() - b32
            d = d if w == 1 else d * w
            mixed = d if mixed is None else mixed + d
        out[n] = (mixed + b32).to(bt.dtype)
    return out


def test_task_arithmetic_of_bf16_patches_equals_fp32_patches_and_the_checkpoints(fam16, tmp_path):
    base = fam16["base"]
    want = reference(base, fam16["fts"], WEIGHTS)
    m16 = patchlab.merge(fam16["p16"], tmp_path / "m16", weights=WEIGHTS, onto=base)
    m32 = patchlab.merge(fam16["p32"], tmp_path / "m32", weights=WEIGHTS, onto=base)
    got16, got32 = tensors(m16.path), tensors(m32.path)
    assert got16.keys() == got32.keys() == want.keys()
    for n in want:
        assert got16[n].dtype == torch.bfloat16
        assert same_bits(got32[n], want[n]), n
        assert same_bits(got16[n], want[n]), n
    # the merged patch (no onto: the base's rows are read for the exact Δ) holds the fp32 patches' merge,
    # which is Σ w·(ft − base) in fp32
    d16 = patchlab.merge(fam16["p16"], tmp_path / "d16", weights=WEIGHTS)
    d32 = patchlab.merge(fam16["p32"], tmp_path / "d32", weights=WEIGHTS)
    n_add = 0
    for e in d32.entries():
        if e.op == "add":
            assert same_bits(d16.entry(e.name).dense(), e.dense()), e.name
            n_add += 1
    assert n_add == 39


@pytest.mark.parametrize(
    ("method", "kw"),
    [
        ("ties", {"densities": [0.3, 0.5, 0.2]}),
        ("dare_linear", {"densities": 0.5}),
        ("dare_ties", {"densities": [0.4, 0.6, 0.5]}),
        ("della", {"densities": 0.5, "epsilons": 0.1}),
    ],
)
def test_sparsifying_merges_of_bf16_patches_equal_those_of_fp32_patches(fam16, tmp_path, monkeypatch, method, kw):
    kw = dict(kw, weights=WEIGHTS, method=method, seed=3)
    d16 = patchlab.merge(fam16["p16"], tmp_path / "d16", **kw)
    d32 = patchlab.merge(fam16["p32"], tmp_path / "d32", **kw)
    for e in d32.entries():
        if e.op == "add":
            assert same_bits(d16.entry(e.name).dense(), e.dense()), e.name
            # and that is the in-memory kernel on the exact Δ
            want = merge_tensor([dense(p, e.name, e.shape) for p in fam16["p32"]], name=e.name, **kw)
            assert same_bits(e.dense(), want), e.name
    # onto, in other chunks and with two workers: the same bytes as applying the merged fp32-patch merge
    monkeypatch.setattr(executor, "CHUNK_ELEMS", 333)
    monkeypatch.setenv("PATCHLAB_WORKERS", "2")
    m16 = patchlab.merge(fam16["p16"], tmp_path / "m16", onto=fam16["base"], **kw)
    patchlab.apply(d32, fam16["base"], tmp_path / "applied")
    got, want = tensors(m16.path), tensors(tmp_path / "applied")
    assert got.keys() == want.keys() and all(same_bits(got[n], want[n]) for n in want)


def test_the_base_is_read_only_when_an_exact_delta_needs_it(fam16, tmp_path, monkeypatch):
    base = Checkpoint.open(fam16["base"]).path.resolve()
    reads: list[str] = []
    rows = Checkpoint.rows

    def counting(self, name, *a, **k):
        if self.path.resolve() == base:
            reads.append(name)
        return rows(self, name, *a, **k)

    monkeypatch.setattr(Checkpoint, "rows", counting)
    patchlab.merge(fam16["p32"], tmp_path / "d32", weights=WEIGHTS)
    assert reads == []  # fp32 patches hold their exact Δ already
    patchlab.merge(fam16["p16"], tmp_path / "d16", weights=WEIGHTS)
    assert reads


def test_a_ported_patch_merges_its_stored_delta_an_own_base_patch_its_exact_one(fam16, tmp_path):
    """With port_to, the patch made on port_to contributes its exact Δ and the ported one its stored Δ (there is
    no exact Δ on another base), whichever way round the base is."""
    own, other = fam16["p16"][0], fam16["q16"]
    exact = fam16["p32"][0]
    out = patchlab.merge([own, other], tmp_path / "m", port_to=fam16["base"], method="ties", densities=0.5)
    n = 0
    for e in out.entries():
        if e.op == "add":
            deltas = [dense(exact, e.name, e.shape), dense(other, e.name, e.shape)]
            assert same_bits(e.dense(), merge_tensor(deltas, "ties", densities=0.5, name=e.name)), e.name
            n += 1
    assert n == 39
    # the other way round: port_to v2, where q16 was made (its exact Δ) and the v1 patch is ported (stored Δ)
    out2 = patchlab.merge([own, other], tmp_path / "m2", port_to=fam16["v2"])
    q32 = patchlab.extract(fam16["v2"], fam16["dir"] / "ft-v2", tmp_path / "q32", storage_dtype="float32").path
    for e in out2.entries():
        if e.op == "add":
            deltas = [dense(own, e.name, e.shape), dense(q32, e.name, e.shape)]
            assert same_bits(e.dense(), merge_tensor(deltas, "task_arithmetic", name=e.name)), e.name


def test_inexact_and_encoded_patches_merge_their_stored_delta(fam16, tmp_path):
    """A Δ stored narrower than its fine-tune (fp16 for a bf16 model) is not exact; a low-rank one never was."""
    base, fts = fam16["base"], fam16["fts"]
    f16 = [patchlab.extract(base, f, tmp_path / f"{f.name}.f16", storage_dtype="float16").path for f in fts[:2]]
    assert Patch.open(f16[0]).provenance["parameters"]["exact"] is False
    from patchlab.methods.compress import compress

    lr = compress(fam16["p16"][2], tmp_path / "lr", rank=2).path
    inputs = [*f16, lr]
    out = patchlab.merge(inputs, tmp_path / "m", method="ties", densities=0.5, weights=WEIGHTS)
    for e in out.entries():
        if e.op == "add":
            want = merge_tensor(
                [dense(p, e.name, e.shape) for p in inputs], "ties", WEIGHTS, densities=0.5, name=e.name
            )
            assert same_bits(e.dense(), want), e.name
