"""patchlab.merge on the fixture family: streamed through the engine, equal to the in-memory kernels bit for
bit, whatever the chunking and the number of workers; low-rank concatenation; --onto; --port-to; bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import patchlab
from patchlab.errors import (
    IncompatiblePatchError,
    MergeConfigError,
    NonFiniteDeltaError,
    OutputExistsError,
    PatchlabError,
)
from patchlab.io.patch import Patch
from patchlab.kernels.merge import merge_tensor
from patchlab.methods.compress import compress
from tests.conftest import no_partial_dirs
from tests.factory import make_model

MODELS = Path(__file__).resolve().parents[2] / "fixtures" / "models"

METHODS = {
    "task_arithmetic": {},
    "ties": {"densities": [0.3, 0.5, 0.2]},
    "dare_linear": {"densities": 0.5},
    "dare_ties": {"densities": [0.4, 0.6, 0.5]},
    "breadcrumbs": {"densities": 0.5, "gammas": 0.05},
    "breadcrumbs_ties": {"densities": 0.3, "gammas": [0.01, 0.1, 0.0]},
    "della": {"densities": 0.5, "epsilons": 0.1},
    "della_linear": {"densities": 0.4, "epsilons": 0.2},
}
WEIGHTS = [1.0, 0.5, 0.7]


def derive(src: Path, dst: Path, seed: int, scale: float = 0.01, only: str | None = None) -> Path:
    """A fine-tune of ``src``: the same files, every (or every ``only``-matching) tensor plus seeded noise."""
    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    sd = {
        k: (v + torch.randn(v.shape, generator=g) * scale).to(v.dtype) if only is None or only in k else v
        for k, v in sd.items()
    }
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def drop_entries(patch: Path, dst: Path, keep) -> Path:
    """A copy of ``patch`` whose manifest lists only the tensors ``keep(name)`` accepts (one-sided keys)."""
    shutil.copytree(patch, dst)
    m = json.loads((dst / "patch.json").read_text())
    m["tensors"] = {n: e for n, e in m["tensors"].items() if keep(n)}
    (dst / "patch.json").write_text(json.dumps(m))
    return dst


@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> dict[str, Path]:
    """Three patches on fixtures/models/v1 (one with layer 1 missing), two on tied-v1, one on v2."""
    t = tmp_path_factory.mktemp("merge")
    derive(MODELS / "v1", t / "ft-b", 1)
    derive(MODELS / "v1", t / "ft-c", 2, 0.02)
    derive(MODELS / "tied-v1", t / "tied-ft-b", 3)
    p = {
        "a": patchlab.extract(MODELS / "v1", MODELS / "ft-v1", t / "a.patch").path,
        "b": patchlab.extract(MODELS / "v1", t / "ft-b", t / "b.patch").path,
        "ta": patchlab.extract(MODELS / "tied-v1", MODELS / "tied-ft-v1", t / "ta.patch").path,
        "tb": patchlab.extract(MODELS / "tied-v1", t / "tied-ft-b", t / "tb.patch").path,
        "v2": patchlab.extract(MODELS / "v2", MODELS / "ft-v2", t / "v2.patch").path,
    }
    full_c = patchlab.extract(MODELS / "v1", t / "ft-c", t / "c-full.patch").path
    p["c"] = drop_entries(full_c, t / "c.patch", lambda n: ".layers.1." not in n)
    p["dir"] = t
    return p


def dense(patch: Path | Patch, name: str, shape) -> torch.Tensor:
    """An entry's ΔW, read in the row chunks the engine uses under tests/conftest.py (1000 elements): a
    low-rank entry's rows are ``B[rows] @ A``, and a matmul may round the last bit differently for another
    number of rows."""
    p = Patch.open(patch)
    if name not in p:
        return torch.zeros(shape)
    e = p.entry(name)
    if e.encoding == "dense" or len(e.shape) < 2:
        return e.dense()
    step = max(1, 1000 // math.prod(e.shape[1:]))
    return torch.cat([e.rows(r0, min(r0 + step, e.shape[0])) for r0 in range(0, e.shape[0], step)])


def tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def assert_equals_kernels(out: Patch, inputs: list[Path], method: str, seed: int = 0, **kw) -> None:
    n_add = 0
    for e in out.entries():
        if e.op != "add":
            continue
        deltas = [dense(p, e.name, e.shape) for p in inputs]
        want = merge_tensor(deltas, method, seed=seed, name=e.name, **kw)
        assert same_bits(e.dense(), want), e.name
        n_add += 1
    assert n_add == 39


@pytest.mark.parametrize("method", list(METHODS))
def test_streamed_merge_equals_in_memory_kernels_for_every_method(fam, tmp_path, method):
    inputs = [fam["a"], fam["b"], fam["c"]]
    kw = dict(METHODS[method], weights=WEIGHTS)
    out = patchlab.merge(inputs, tmp_path / "m", method=method, seed=7, **kw)
    assert_equals_kernels(out, inputs, method, seed=7, **kw)
    prov = out.provenance
    assert prov["method"] == "merge" and prov["parameters"]["method"] == method
    assert prov["parameters"]["weights"] == WEIGHTS and prov["parameters"]["seed"] == 7
    assert [i["path"] for i in prov["inputs"]] == [str(p.resolve()) for p in inputs]
    assert all(len(i["digest"]) == 64 for i in prov["inputs"])
    assert prov["base"]["path"] == str((MODELS / "v1").resolve())
    assert all(e.encoding == "dense" for e in out.entries())
    # patch c lacks layer 1: those tensors merge a and b with c contributing zero
    assert "model.layers.1.mlp.up_proj.weight" in out


@pytest.mark.parametrize("method", ["ties", "della", "dare_linear", "breadcrumbs_ties"])
def test_global_overrides_equal_kernels(fam, tmp_path, method):
    inputs = [fam["a"], fam["b"]]
    kw = {"densities": 0.3, "weights": [1.0, -0.4], "lambda_": 1.5, "rescale": "inverse-density"}
    kw.update({"sign_election": "count", "normalize": True} if "ties" in method or method == "della" else {})
    out = patchlab.merge(inputs, tmp_path / "m", method=method, **kw)
    assert_equals_kernels(out, inputs, method, **kw)


def _run(fam, out, method, monkeypatch, chunk, workers):
    import patchlab.engine.executor

    monkeypatch.setattr(patchlab.engine.executor, "CHUNK_ELEMS", chunk)
    monkeypatch.setenv("PATCHLAB_WORKERS", str(workers))
    patchlab.merge([fam["a"], fam["b"], fam["c"]], out, method=method, **METHODS[method])
    return tensors(out)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "della"])
def test_chunks_and_workers_give_the_same_bytes(fam, tmp_path, monkeypatch, method):
    ref = _run(fam, tmp_path / "one", method, monkeypatch, 1 << 22, 1)
    for k, (chunk, workers) in enumerate([(1000, 1), (333, 2)]):
        got = _run(fam, tmp_path / f"o{k}", method, monkeypatch, chunk, workers)
        assert got.keys() == ref.keys()
        assert all(same_bits(got[n], ref[n]) for n in ref), (chunk, workers)


def test_lowrank_task_arithmetic_concatenates_factors_exactly(fam, tmp_path):
    la = compress(fam["a"], tmp_path / "la", rank=4)
    lb = compress(fam["b"], tmp_path / "lb", rank=3)
    out = patchlab.merge([la.path, lb.path], tmp_path / "m", weights=[1.0, 0.5], lambda_=2.0)
    lowrank = [e for e in out.entries() if e.encoding == "lowrank"]
    assert lowrank, "two low-rank inputs stay low-rank"
    for e in out.entries():
        want = merge_tensor([dense(la, e.name, ()), dense(lb, e.name, ())], "task_arithmetic", [1.0, 0.5], lambda_=2.0)
        got = e.dense()
        if e.encoding == "lowrank":
            assert la.entry(e.name).encoding == lb.entry(e.name).encoding == "lowrank"
            assert e.meta["rank"] == la.entry(e.name).meta["rank"] + lb.entry(e.name).meta["rank"]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        else:  # an input kept dense: merged on dense ΔW
            assert same_bits(got, want), e.name
    # any other method merges dense ΔW per tensor (never A and B separately)
    ties = patchlab.merge([la.path, lb.path], tmp_path / "t", method="ties", densities=0.3)
    assert {e.encoding for e in ties.entries()} == {"dense"}
    assert_equals_kernels(ties, [la.path, lb.path], "ties", densities=0.3)


def test_reencode_with_rank_reports_energy(fam, tmp_path):
    out = patchlab.merge([fam["a"], fam["b"]], tmp_path / "m", method="ties", densities=0.5, rank=4)
    enc = {e.encoding for e in out.entries()}
    assert "lowrank" in enc
    energy = out.manifest["totals"]["energy"]
    assert 0 < energy < 1
    assert out.provenance["parameters"]["compression"]["rank"] == 4
    assert out.provenance["method"] == "merge"
    with pytest.raises(MergeConfigError, match="onto"):
        patchlab.merge([fam["a"], fam["b"]], tmp_path / "x", rank=4, onto=MODELS / "v1")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(("method", "lowrank"), [("ties", False), ("della", False), ("task_arithmetic", True)])
def test_onto_equals_apply_of_the_merged_patch(fam, tmp_path, method, lowrank):
    inputs = [fam["a"], fam["b"], fam["c"]]
    if lowrank:
        inputs = [compress(p, tmp_path / f"lr{i}", rank=4).path for i, p in enumerate(inputs)]
    kw = dict(METHODS[method], weights=WEIGHTS)
    merged = patchlab.merge(inputs, tmp_path / "m.patch", method=method, **kw)
    patchlab.apply(merged, MODELS / "v1", tmp_path / "applied")
    model = patchlab.merge(inputs, tmp_path / "model", method=method, onto=MODELS / "v1", **kw)
    got, want = tensors(model.path), tensors(tmp_path / "applied")
    assert got.keys() == want.keys()
    for n in want:
        if merged.entry(n).encoding == "lowrank":  # B @ A: the matmul's rounding is not fixed across calls
            torch.testing.assert_close(got[n], want[n], rtol=1e-6, atol=1e-7)
        else:
            assert same_bits(got[n], want[n]), n
    assert (model.path / "config.json").exists() and (model.path / "tokenizer.json").exists()


def test_tied_family(fam, tmp_path):
    inputs = [fam["ta"], fam["tb"]]
    out = patchlab.merge(inputs, tmp_path / "m", method="ties", densities=0.4)
    assert "lm_head.weight" not in out
    n = sum(1 for e in out.entries() if e.op == "add")
    for e in out.entries():
        want = merge_tensor([dense(p, e.name, e.shape) for p in inputs], "ties", densities=0.4, name=e.name)
        assert same_bits(e.dense(), want)
    assert n == len([x for x in Patch.open(fam["ta"]).entries() if x.op == "add"])
    model = patchlab.merge(inputs, tmp_path / "model", method="ties", densities=0.4, onto=MODELS / "tied-v1")
    patchlab.apply(out, MODELS / "tied-v1", tmp_path / "applied")
    got, want = tensors(model.path), tensors(tmp_path / "applied")
    assert "lm_head.weight" not in got and all(same_bits(got[k], want[k]) for k in want)


def test_tied_patch_merged_onto_an_untied_base_feeds_lm_head(fam, tmp_path):
    """Reconciled as a port: a tied fine-tune's embedding Δ is its lm_head Δ on an untied target."""
    plan = patchlab.merge([fam["a"], fam["ta"]], tmp_path / "m", port_to=MODELS / "v1", dry_run=True)
    step = next(s for s in plan.steps if s.name == "lm_head.weight")
    assert step.sources == {"p0": "lm_head.weight", "p1": "model.embed_tokens.weight"}


def test_different_bases_refused_with_the_port_command_then_port_to_merges(fam, tmp_path):
    inputs = [fam["a"], fam["v2"]]
    with pytest.raises(IncompatiblePatchError) as e:
        patchlab.merge(inputs, tmp_path / "m", method="ties", densities=0.3)
    msg = str(e.value)
    assert "--port-to" in msg and "patchlab port" in msg and "\n" not in msg
    assert not (tmp_path / "m").exists()
    kw = {"method": "ties", "densities": 0.3}
    merged = patchlab.merge(inputs, tmp_path / "m", port_to=MODELS / "v2", **kw)
    assert merged.provenance["base"]["path"] == str((MODELS / "v2").resolve())
    assert merged.provenance["parameters"]["port_to"] == str((MODELS / "v2").resolve())
    assert_equals_kernels(merged, inputs, "ties", densities=0.3)
    model = patchlab.merge(inputs, tmp_path / "model", port_to=MODELS / "v2", onto=MODELS / "v2", **kw)
    patchlab.apply(merged, MODELS / "v2", tmp_path / "applied")
    got, want = tensors(model.path), tensors(tmp_path / "applied")
    assert all(same_bits(got[k], want[k]) for k in want)


def test_port_to_a_grown_vocabulary_pads_rows(fam, tmp_path):
    inputs = [fam["a"], fam["b"]]
    with pytest.raises(PatchlabError, match="vocab-policy"):
        patchlab.merge(inputs, tmp_path / "m", port_to=MODELS / "v2-vocab", dry_run=True)
    out = patchlab.merge(inputs, tmp_path / "m", port_to=MODELS / "v2-vocab", vocab_policy="pad-zero")
    e = out.entry("model.embed_tokens.weight")
    rows = e.shape[0]
    assert rows > 320
    want = merge_tensor(
        [torch.cat([dense(p, e.name, ()), torch.zeros(rows - 320, 64)]) for p in inputs], "task_arithmetic"
    )
    assert same_bits(e.dense(), want)


# ---- bad input: one clear error, nothing written, nothing read --------------------------------------------


@pytest.fixture
def no_reads(monkeypatch):
    """Fail the test if any tensor byte is read (header reads are fine)."""
    import patchlab.io.safetensors as st

    def boom(*a, **k):
        raise AssertionError("a tensor was read before validation finished")

    monkeypatch.setattr(st.MappedFile, "rows", boom)
    monkeypatch.setattr(st.MappedFile, "tensor", boom)


def nan_patch(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    f = next(dst.glob("delta-*.safetensors"))
    sd = load_file(str(f))
    name = "model.layers.2.mlp.down_proj.weight"
    sd[name][3, 5] = float("nan")
    save_file(sd, str(f), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"method": "tie"}, MergeConfigError, "did you mean 'ties'"),
        ({"method": "ties", "densities": [0.2, 0.3, 0.4]}, MergeConfigError, "3 densities given for 2 patches"),
        ({"weights": [1.0]}, MergeConfigError, "1 weights given for 2 patches"),
        ({"method": "ties", "densities": 1.5}, MergeConfigError, r"must be in \(0, 1\]"),
        ({"method": "ties", "densities": 0.0}, MergeConfigError, r"must be in \(0, 1\]"),
        ({"densities": 0.5}, MergeConfigError, "does not apply to task_arithmetic"),
        ({"method": "della", "densities": 0.5, "epsilons": 0.6}, MergeConfigError, "leaves"),
        ({"method": "ties", "rescale": "l2"}, MergeConfigError, "did you mean 'l1'"),
        ({"seed": 1.5}, MergeConfigError, "seed"),
    ],
)
def test_bad_parameters(fam, tmp_path, no_reads, kwargs, error, message):
    with pytest.raises(error, match=message):
        patchlab.merge([fam["a"], fam["b"]], tmp_path / "out", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_bad_inputs_refused_before_a_tensor_is_read(fam, tmp_path, no_reads):
    out = tmp_path / "out"
    with pytest.raises(MergeConfigError, match="again"):
        patchlab.merge([fam["a"], fam["b"], fam["a"]], out)
    copy = shutil.copytree(fam["a"], tmp_path / "copy-of-a")
    with pytest.raises(MergeConfigError, match="patch 2 .* is patch 1 again"):
        patchlab.merge([fam["a"], copy], out)
    with pytest.raises(PatchlabError, match="does not exist"):
        patchlab.merge([fam["a"], tmp_path / "nope"], out)
    with pytest.raises(IncompatiblePatchError, match="different bases|--port-to"):
        patchlab.merge([fam["a"], fam["v2"]], out)
    assert not out.exists() and no_partial_dirs(tmp_path) == []


def test_different_architectures_refused(fam, tmp_path):
    small = make_model(tmp_path / "small", seed=0)
    small_ft = make_model(tmp_path / "small-ft", from_model=small, noise=0.01)
    other = patchlab.extract(small, small_ft, tmp_path / "other.patch").path
    with pytest.raises(IncompatiblePatchError, match="different architectures"):
        patchlab.merge([fam["a"], other], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_nan_input_names_the_tensor_and_writes_nothing(fam, tmp_path):
    bad = nan_patch(fam["b"], tmp_path / "bad.patch")
    # statistics pass (ties 0.3), merged-rows check (task_arithmetic, ties at density 1), per-input check (DARE
    # without a rescale: a dropped NaN never reaches the merged rows)
    cases = [
        ("task_arithmetic", {}),
        ("ties", {"densities": 0.3}),
        ("ties", {"densities": 1.0}),
        ("dare_linear", {"densities": 0.3, "rescale": "none"}),
    ]
    for method, kw in cases:
        with pytest.raises(NonFiniteDeltaError, match="model.layers.2.mlp.down_proj.weight"):
            patchlab.merge([fam["a"], bad], tmp_path / "out", method=method, **kw)
        with pytest.raises(NonFiniteDeltaError):
            patchlab.merge([fam["a"], bad], tmp_path / "model", method=method, onto=MODELS / "v1", **kw)
    assert not (tmp_path / "out").exists() and not (tmp_path / "model").exists()
    assert no_partial_dirs(tmp_path) == []


def test_output_exists(fam, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        patchlab.merge([fam["a"], fam["b"]], tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep"]
    # --overwrite replaces only what patchlab wrote: a directory of the user's own is refused (issue 10)
    with pytest.raises(OutputExistsError, match="did not write it"):
        patchlab.merge([fam["a"], fam["b"]], tmp_path / "out", overwrite=True)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep"]
    patchlab.merge([fam["a"], fam["b"]], tmp_path / "own")
    out = patchlab.merge([fam["a"], fam["b"]], tmp_path / "own", overwrite=True)
    assert (out.path / "patch.json").exists()


def test_dry_run_plans_and_writes_nothing(fam, tmp_path):
    plan = patchlab.merge([fam["a"], fam["c"]], tmp_path / "out", method="ties", densities=0.2, dry_run=True)
    assert plan.operation == "merge" and not (tmp_path / "out").exists()
    up1 = next(s for s in plan.steps if s.name == "model.layers.1.mlp.up_proj.weight")
    assert up1.sources == {"p0": "model.layers.1.mlp.up_proj.weight"}  # c lacks it: it contributes zero
    assert plan.options["method"] == "ties" and plan.options["densities"] == [0.2, 0.2]
    assert "merge plan" in plan.render()
