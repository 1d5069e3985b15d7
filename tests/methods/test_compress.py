"""Low-rank and sparse patches end to end: extract/compress, apply, round trips, budgets, bad requests."""

from __future__ import annotations

import json

import pytest
import torch

import patchlab
from patchlab.errors import PlanError
from patchlab.kernels.lowrank import LowRankError
from patchlab.kernels.sparse import SparseError
from patchlab.methods.compress import compress, extract_encoded, patch_size_report
from tests.factory import make_model, state


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("fam")
    base = make_model(root / "base", seed=0, hidden=64)
    ft = make_model(root / "ft", seed=1, from_model=base, noise=0.01)
    dense = patchlab.extract(base, ft, root / "dense.patch")
    return root, base, ft, dense


def _apply(patch, base, out):
    patchlab.apply(patch, base, out, device="cpu")
    return state(out)


def _close(a: dict, b: dict, atol: float) -> None:
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=atol), k


def test_full_energy_lowrank_round_trip_equals_dense(family, tmp_path):
    root, base, ft, dense = family
    p = compress(dense, tmp_path / "full.patch", energy=1.0, dense_fallback=False, device="cpu")
    q = p.manifest["tensors"]["model.layers.0.self_attn.q_proj.weight"]
    assert q["encoding"] == "lowrank" and q["rank"] == 64 and q["rel_error"] < 1e-5
    assert p.manifest["tensors"]["model.norm.weight"]["encoding"] == "dense"
    assert p.manifest["tensors"]["model.embed_tokens.weight"]["encoding"] == "dense"
    _close(_apply(p, base, tmp_path / "m"), state(ft), atol=1e-5)


def test_sparse_density_one_equals_dense(family, tmp_path):
    root, base, ft, dense = family
    for method in ("topk", "dare"):
        p = compress(dense, tmp_path / f"{method}.patch", density=1.0, method=method, embeddings="encode")
        assert {e.encoding for e in p.entries() if e.op == "add"} == {"sparse"}
        for e in p.entries():
            if e.op == "add":
                assert torch.equal(e.dense(), dense.entry(e.name).dense())
        _close(_apply(p, base, tmp_path / f"m-{method}"), state(ft), atol=1e-6)


def test_diff_at_fixed_rank_records_fidelity_and_applies(family, tmp_path):
    root, base, ft, dense = family
    p = extract_encoded(base, ft, tmp_path / "r4.patch", rank=4, device="cpu")
    t = p.manifest["tensors"]
    q = t["model.layers.1.mlp.down_proj.weight"]
    assert (
        q["encoding"] == "lowrank"
        and q["rank"] == 4
        and q["keys"] == {"A": "model.layers.1.mlp.down_proj.weight::A", "B": "model.layers.1.mlp.down_proj.weight::B"}
    )
    e = p.entry("model.layers.1.mlp.down_proj.weight")
    d = dense.entry("model.layers.1.mlp.down_proj.weight").dense()
    err = float(torch.linalg.norm(d - e.dense()) / torch.linalg.norm(d))
    assert q["rel_error"] == pytest.approx(err, rel=1e-4)
    assert 0 < q["energy"] < 1 and q["energy"] == pytest.approx(1 - err**2, abs=1e-4)
    # statistics are those of the exact Δ
    assert q["stats"]["norm"] == pytest.approx(float(torch.linalg.norm(d)), rel=1e-5)
    assert p.manifest["provenance"]["parameters"]["compression"]["rank"] == 4
    out = _apply(p, base, tmp_path / "m")
    b = state(base)
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.allclose(out[name], b[name] + e.dense(), atol=1e-6)
    assert torch.equal(out["model.embed_tokens.weight"], state(ft)["model.embed_tokens.weight"])
    assert p.nbytes < dense.nbytes / 2


def test_energy_selection_per_tensor(family, tmp_path):
    root, base, ft, dense = family
    p = compress(dense, tmp_path / "e.patch", energy=0.5, device="cpu")
    low = {n: m for n, m in p.manifest["tensors"].items() if m.get("encoding") == "lowrank"}
    assert len(low) == 14  # 7 matrices × 2 layers; embeddings and norms stay dense
    for n, m in low.items():  # the smallest rank reaching the target, judged by the exact spectrum
        s2 = torch.linalg.svdvals(dense.entry(n).dense().double()) ** 2
        cum = torch.cumsum(s2, 0) / s2.sum()
        assert m["rank"] == int(torch.nonzero(cum >= 0.5)[0]) + 1, n
        assert m["energy"] >= 0.5 - 1e-6


def test_budget_is_respected_and_more_budget_means_less_error(family, tmp_path):
    root, base, ft, dense = family
    small = compress(dense, tmp_path / "b1.patch", budget_bytes=200_000)
    big = compress(dense, tmp_path / "b2.patch", budget_bytes=600_000)
    for p, budget in ((small, 200_000), (big, 600_000)):
        assert patch_size_report(p)["bytes"] <= budget
    assert big.manifest["totals"]["rel_error"] < small.manifest["totals"]["rel_error"]
    ranks = {m.get("rank") for m in small.manifest["tensors"].values() if m.get("encoding") == "lowrank"}
    assert len(ranks) > 1  # the allocation is per tensor, not uniform


def test_dare_is_reproducible(family, tmp_path):
    root, base, ft, dense = family
    a = compress(dense, tmp_path / "d1.patch", density=0.3, method="dare", seed=3)
    b = compress(dense, tmp_path / "d2.patch", density=0.3, method="dare", seed=3)
    c = compress(dense, tmp_path / "d3.patch", density=0.3, method="dare", seed=4)
    n = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(a.entry(n).dense(), b.entry(n).dense())
    assert not torch.equal(a.entry(n).dense(), c.entry(n).dense())
    m = a.manifest["tensors"][n]
    assert m["method"] == "dare" and m["seed"] == 3 and abs(m["nnz"] / (128 * 64) - 0.3) < 0.05


def test_lowrank_patch_ports_onto_a_newer_base(family, tmp_path):
    root, base, ft, dense = family
    v2 = make_model(root / "v2", seed=2, from_model=base, noise=0.001)
    p = compress(dense, tmp_path / "r8.patch", rank=8)
    patchlab.port(p, v2, tmp_path / "ported", device="cpu")
    out, tgt = state(tmp_path / "ported"), state(v2)
    n = "model.layers.0.self_attn.o_proj.weight"
    assert torch.allclose(out[n], tgt[n] + p.entry(n).dense(), atol=1e-6)


@pytest.mark.parametrize(
    "kw, err, match",
    [
        ({"energy": 1.5}, LowRankError, r"energy must be in \(0, 1\]"),
        ({"energy": 0.0}, LowRankError, r"energy must be in \(0, 1\]"),
        ({"rank": 1000}, LowRankError, "rank 1000 is larger than the matrices allow"),
        ({"rank": 0}, LowRankError, "rank must be a positive integer"),
        ({"density": 0.0}, SparseError, r"density must be in \(0, 1\]"),
        ({"density": 2}, SparseError, r"density must be in \(0, 1\]"),
        ({"rank": 4, "density": 0.5}, PlanError, "exactly one"),
        ({"budget_bytes": 1000}, LowRankError, "below the minimum"),
        ({"density": 0.5, "method": "magic"}, PlanError, "unknown sparse method"),
    ],
)
def test_bad_requests_fail_before_writing(family, tmp_path, kw, err, match):
    root, base, ft, dense = family
    with pytest.raises(err, match=match):
        compress(dense, tmp_path / "bad.patch", **kw)
    with pytest.raises(err, match=match):
        extract_encoded(base, ft, tmp_path / "bad2.patch", **kw)
    assert list(tmp_path.iterdir()) == []


def test_rank_too_large_without_fallback(family, tmp_path):
    root, base, ft, dense = family
    with pytest.raises(LowRankError, match=r"k_proj.weight is 32×64, at most 32"):
        compress(dense, tmp_path / "x.patch", rank=40, dense_fallback=False)
    assert list(tmp_path.iterdir()) == []
    p = compress(dense, tmp_path / "y.patch", rank=40)  # with the fallback those matrices stay dense
    k = p.manifest["tensors"]["model.layers.0.self_attn.k_proj.weight"]
    assert k["encoding"] == "dense" and "exceeds" in k["encoding_note"]
    json.dumps(p.manifest)


def test_diagnostics_read_any_encoding(family, tmp_path):
    """Statistics consume patches tensor by tensor through rows(): sparse at density 1 gives the dense result."""
    from dataclasses import asdict

    from patchlab.measure.diagnose import diagnose

    root, base, ft, dense = family
    v2 = make_model(root / "v2d", seed=3, from_model=base, noise=0.001)
    full = compress(dense, tmp_path / "s.patch", density=1.0, embeddings="encode")
    low = compress(dense, tmp_path / "r4.patch", rank=4)
    a = asdict(diagnose(dense, v2, device="cpu", intruders=False).overall)
    b = asdict(diagnose(full, v2, device="cpu", intruders=False).overall)
    c = asdict(diagnose(low, v2, device="cpu", intruders=False).overall)
    for k, v in a.items():
        if isinstance(v, float):
            assert b[k] == pytest.approx(v, rel=1e-5, abs=1e-8), k
    assert a != c  # the low-rank patch is a different Δ, and is diagnosed as one


def test_encoded_extract_refuses_non_finite_delta_and_writes_nothing(tmp_path):
    from safetensors.torch import save_file

    from patchlab.errors import NonFiniteDeltaError

    base = make_model(tmp_path / "base", hidden=32)
    ft = make_model(tmp_path / "ft", from_model=base, noise=0.02, seed=1)
    sd = state(ft)
    sd["model.layers.0.mlp.up_proj.weight"][2, 3] = float("nan")
    save_file(sd, str(ft / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(NonFiniteDeltaError, match="model.layers.0.mlp.up_proj.weight"):
        extract_encoded(base, ft, tmp_path / "out", rank=4)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_compressed_patch_reports_the_fixups_it_stores(tmp_path):
    """Tensors kept dense keep their exact-reconstruction residuals, and the totals count them (not 0)."""
    from pathlib import Path

    from patchlab.methods.extract import extract

    models = Path(__file__).resolve().parents[2] / "fixtures" / "models"
    full = extract(models / "v1", models / "ft-v1", tmp_path / "full")
    assert full.manifest["totals"]["fixups"] > 0
    small = compress(full, tmp_path / "r4", rank=4)
    stored = sum(e.fix["count"] for e in small.entries() if e.fix)
    assert stored > 0
    assert small.manifest["totals"]["fixups"] == stored
