"""Streaming weight-space diagnostics of a real patch against real target checkpoints."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

import patchlab
from patchlab.errors import IncompatiblePatchError
from patchlab.kernels.drift import DriftAccumulator, drift_stats
from patchlab.measure.diagnose import PortDiagnostics, diagnose
from patchlab.measure.verdict import CARE, DO_NOT, SAFE
from tests.factory import make_model, state

Q0 = "model.layers.0.self_attn.q_proj.weight"


def variant(src, dst, edit):
    """Copy a checkpoint directory with its tensors passed through ``edit(dict) -> dict``."""
    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        f.unlink()
    sd = {k: v.contiguous() for k, v in edit(state(src)).items()}
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["vocab_size"] = next(v for k, v in sd.items() if k.endswith("embed_tokens.weight")).shape[0]
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("diag")
    base = make_model(root / "base", seed=0)
    g = torch.Generator().manual_seed(5)

    def finetune(sd):
        out = {k: v + 0.0005 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in sd.items()}
        # a strong rank-1 update on one matrix: intruder dimensions there
        w = out[Q0]
        u = torch.randn(w.shape[0], generator=g)
        v = torch.randn(w.shape[1], generator=g)
        out[Q0] = w + 5.0 * torch.outer(u / u.norm(), v / v.norm()) * torch.linalg.matrix_norm(w, 2)
        return out

    ft = variant(base, root / "ft", finetune)
    patch = patchlab.extract(base, ft, root / "ft.patch", device="cpu")
    near = variant(
        base, root / "near", lambda sd: {k: v + 0.0001 * torch.randn(v.shape, generator=g) for k, v in sd.items()}
    )
    far = make_model(root / "far", seed=123)
    return {"root": root, "base": base, "ft": ft, "patch": patch, "near": near, "far": far}


def test_drift_matches_direct_computation(family):
    d = diagnose(family["patch"], family["near"], device="cpu")
    s, t, f = state(family["base"]), state(family["near"]), state(family["ft"])
    total = DriftAccumulator()
    by_name = {x.name: x for x in d.tensors}
    for name in s:
        want = drift_stats(s[name], t[name], f[name].double() - s[name].double())
        got = by_name[name].drift
        assert by_name[name].status == "compared"
        assert got.drift_norm == pytest.approx(want.drift_norm, rel=1e-6)
        assert got.delta_norm == pytest.approx(want.delta_norm, rel=1e-5)
        assert got.cos_drift_delta == pytest.approx(want.cos_drift_delta, abs=1e-5)
        total.update(s[name], t[name], f[name].double() - s[name].double())
    assert d.overall.drift_rel_delta == pytest.approx(total.stats().drift_rel_delta, rel=1e-5)
    assert set(d.per_layer) == {"0", "1", "other"}
    layer1 = DriftAccumulator()
    for name in s:
        if ".layers.1." in name:
            layer1.update(s[name], t[name], f[name].double() - s[name].double())
    assert d.per_layer["1"].drift_norm == pytest.approx(layer1.stats().drift_norm, rel=1e-6)
    assert PortDiagnostics.from_json(json.loads(d.dumps())) == d


def test_intruder_dimensions_on_the_rank_one_matrix_only(family):
    d = diagnose(family["patch"], family["near"], device="cpu")
    by_name = {x.name: x for x in d.tensors}
    assert by_name[Q0].intruders.n_intruders >= 1 and 0 in by_name[Q0].intruders.intruder_indices
    others = [x for x in d.tensors if x.intruders is not None and x.name != Q0]
    assert others and all(x.intruders.n_intruders == 0 for x in others)
    assert by_name["model.embed_tokens.weight"].intruders is None  # embeddings skipped by default
    assert d.intruder_matrices == len(others) + 1
    assert d.intruder_matrix_share == pytest.approx(1 / d.intruder_matrices)


def test_verdicts(family):
    same = diagnose(family["patch"], family["base"], device="cpu", intruders=False)
    assert same.overall.drift_norm == 0.0 and same.verdict.level == SAFE
    near = diagnose(family["patch"], family["near"], device="cpu", intruders=False)
    assert near.overall.drift_rel_delta < 0.5 and near.verdict.level == SAFE
    far = diagnose(family["patch"], family["far"], device="cpu", intruders=False)
    assert far.verdict.level == DO_NOT
    assert any(r.startswith("[do not port]") and "×" in r for r in far.verdict.reasons)


def test_structural_differences(family):
    root = family["root"]
    up = "model.layers.1.mlp.up_proj.weight"

    def edit(sd):
        sd = dict(sd)
        del sd[up]
        sd["model.layers.0.self_attn.q_norm.weight"] = torch.ones(8)
        for k in ("model.embed_tokens.weight", "lm_head.weight"):
            sd[k] = torch.cat([sd[k], torch.zeros(4, sd[k].shape[1])])
        return sd

    tgt = variant(family["base"], root / "struct", edit)
    d = diagnose(family["patch"], tgt, device="cpu", intruders=False)
    by_name = {x.name: x for x in d.tensors}
    assert by_name[up].status == "missing-in-target"
    assert by_name["model.embed_tokens.weight"].status == "rows-compared"
    assert by_name["model.embed_tokens.weight"].drift.drift_norm == 0.0  # shared rows unchanged
    assert d.only_in_target == ["model.layers.0.self_attn.q_norm.weight"]
    n_up = state(family["base"])[up].numel()
    assert d.structural_share == pytest.approx(n_up / patchlab.Patch.open(family["patch"]).num_parameters)
    assert d.verdict.level in (CARE, DO_NOT)
    text = " ".join(d.verdict.reasons)
    assert up in text and "vocabulary rows" in text and "only in the target" in text


def test_wrong_source_base_refused(family, tmp_path):
    other = make_model(tmp_path / "other", seed=0, layers=3)
    with pytest.raises(IncompatiblePatchError, match="not the base this patch was made on"):
        diagnose(family["patch"], family["near"], source_base=other, device="cpu")


def test_prefixed_target_names_are_aligned(family):
    tgt = variant(
        family["base"], family["root"] / "prefixed", lambda sd: {"language_model." + k: v for k, v in sd.items()}
    )
    d = diagnose(family["patch"], tgt, device="cpu", intruders=False)
    assert all(t.status == "compared" for t in d.tensors)
    assert d.overall.drift_norm == 0.0
    assert any("prefix" in r for r in d.verdict.reasons) and d.verdict.level == CARE


def test_huge_finite_drift_is_summed_without_overflow(family):
    # fp32 squares of 1e20 overflow; the chunk is summed again in fp64 instead of being called non-finite
    root = family["root"]
    huge = variant(family["base"], root / "huge", lambda sd: {**sd, Q0: sd[Q0] + 1e20})
    d = diagnose(family["patch"], huge, device="cpu", intruders=False)
    q0 = next(t for t in d.tensors if t.name == Q0)
    want = drift_stats(state(family["base"])[Q0].double(), state(huge)[Q0].double())
    assert q0.drift.drift_norm == pytest.approx(want.drift_norm, rel=1e-6) and q0.drift.drift_norm > 1e20


def test_a_port_feeds_the_diagnosis_the_same_figures_without_a_pass_of_its_own(family, tmp_path, monkeypatch):
    from patchlab.measure.diagnose import Diagnosis

    want = diagnose(family["patch"], family["near"], device="cpu", intruders=False)
    d = Diagnosis(family["patch"], family["near"], device="cpu", intruders=False)
    fed = set()

    def spy(name, r0, r1, target_rows, delta_rows):
        fed.add(name)
        d.observe(name, r0, r1, target_rows, delta_rows)

    patchlab.port(family["patch"], family["near"], tmp_path / "out", device="cpu", observe=spy)
    assert fed == set(d.compared) and all(c.complete for c in d.compared.values())
    monkeypatch.setattr("patchlab.measure.diagnose.run", lambda *a, **k: pytest.fail("measured again"))
    got = d.result()
    assert got.to_json() == want.to_json()


def test_a_bf16_port_feeds_widened_target_rows_and_the_figures_stay_exact(tmp_path, monkeypatch):
    """A port widens each chunk of a 16-bit target to fp32 once and hands the observer those rows: the
    diagnosis still takes the exact-product path (the stored dtypes say so) and gives the standalone figures."""
    from patchlab.measure.diagnose import Diagnosis, base_drift

    base = make_model(tmp_path / "base", seed=0, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(9)

    def nudge(scale):
        return lambda sd: {k: (v.float() + scale * torch.randn(v.shape, generator=g)).bfloat16() for k, v in sd.items()}

    ft, near = variant(base, tmp_path / "ft", nudge(0.01)), variant(base, tmp_path / "near", nudge(0.002))
    patch = patchlab.extract(base, ft, tmp_path / "ft.patch", device="cpu")
    want = diagnose(patch, near, device="cpu", intruders=False)
    pair = base_drift(base, near, list(patchlab.Patch.open(patch).names), device="cpu")
    d = Diagnosis(patch, near, device="cpu", intruders=False, base_pair=pair)
    t = state(near)
    seen = []

    def spy(name, r0, r1, target_rows, delta_rows):
        seen.append(target_rows.dtype)
        assert torch.equal(target_rows, t[name][r0:r1].float())
        d.observe(name, r0, r1, target_rows, delta_rows)

    patchlab.port(patch, near, tmp_path / "out", device="cpu", observe=spy)
    assert set(seen) == {torch.float32} and all(c.narrow for c in d.compared.values())
    monkeypatch.setattr("patchlab.measure.diagnose.run", lambda *a, **k: pytest.fail("measured again"))
    assert d.result().to_json() == want.to_json()


def test_a_diagnosis_fed_in_part_measures_the_rest(family):
    from patchlab.measure.diagnose import Diagnosis

    want = diagnose(family["patch"], family["near"], device="cpu", intruders=False)
    d = Diagnosis(family["patch"], family["near"], device="cpu", intruders=False)
    c = d.compared[Q0]
    rows = state(family["near"])[Q0][:3]
    d.observe(Q0, 0, 3, rows, patchlab.Patch.open(family["patch"]).entry(Q0).rows(0, 3, torch.device("cpu")))
    assert (c.parts or c.tdots) and not c.complete
    assert d.result().to_json() == want.to_json()


# ---- sums recorded at extraction: a port diagnoses its patch without reading the patch's base -------------


def strip_sums(patch_dir, dst):
    """A copy of a patch whose manifest records no drift sums (what patches from before they existed look like)."""
    shutil.copytree(patch_dir, dst)
    m = json.loads((dst / "patch.json").read_text())
    for e in m["tensors"].values():
        e.pop("drift_sums", None)
    (dst / "patch.json").write_text(json.dumps(m))
    return dst


def test_extract_records_the_sums_a_diagnosis_needs(family):
    s = state(family["base"])
    patch = patchlab.Patch.open(family["patch"])
    checked = 0
    for e in patch.entries():
        got = e.drift_sums
        d = e.dense(torch.device("cpu")).double()
        b = s[e.name].double()
        assert got["base_dot"] == pytest.approx(float((b * d).sum()), rel=1e-12, abs=1e-18)
        assert got["delta_sumsq"] == pytest.approx(float((d * d).sum()), rel=1e-12)
        assert got["base_sumsq"] == pytest.approx(float((b * b).sum()), rel=1e-9)
        checked += 1
    assert checked == len(patch.names)


def test_with_the_bases_sums_a_port_diagnoses_without_reading_the_source_base(family, tmp_path, monkeypatch):
    from patchlab.measure.diagnose import Diagnosis, base_drift

    want = diagnose(family["patch"], family["near"], device="cpu", intruders=False)
    # the direct way (a patch without recorded sums reads the source base) gives the same figures
    bare = strip_sums(family["root"] / "ft.patch", tmp_path / "bare.patch")
    old = diagnose(bare, family["near"], device="cpu", intruders=False)
    for a, b in zip(want.tensors, old.tensors, strict=True):
        assert a.drift.cos_drift_delta == pytest.approx(b.drift.cos_drift_delta, rel=1e-5, abs=1e-9), a.name
        assert a.drift.delta_norm == pytest.approx(b.drift.delta_norm, rel=1e-6), a.name
        assert a.drift.drift_norm == b.drift.drift_norm
    pair = base_drift(family["base"], family["near"], list(patchlab.Patch.open(family["patch"]).names), device="cpu")
    d = Diagnosis(family["patch"], family["near"], device="cpu", intruders=False, base_pair=pair)
    assert d.uses_recorded_sums
    monkeypatch.setattr(d.src, "rows", lambda *a, **k: pytest.fail("read the source base"))
    patchlab.port(family["patch"], family["near"], tmp_path / "out", device="cpu", observe=d.observe)
    monkeypatch.setattr("patchlab.measure.diagnose.run", lambda *a, **k: pytest.fail("measured again"))
    assert d.result().to_json() == want.to_json()


def test_with_the_bases_sums_a_diagnosis_of_its_own_reads_only_the_target_and_the_patch(family, monkeypatch):
    """No port to ride on (a dry run's verdicts): with a BaseDrift the pass reads the target and Δ, never the
    source base, and gives the figures of the diagnosis that reads all three."""
    from patchlab.io.checkpoint import Checkpoint
    from patchlab.measure.diagnose import Diagnosis, base_drift

    want = diagnose(family["patch"], family["near"], device="cpu", intruders=False)
    pair = base_drift(family["base"], family["near"], list(patchlab.Patch.open(family["patch"]).names), device="cpu")
    d = Diagnosis(family["patch"], family["near"], device="cpu", intruders=False, base_pair=pair)
    read = []
    rows = Checkpoint.rows
    monkeypatch.setattr(Checkpoint, "rows", lambda self, *a, **k: read.append(self.path) or rows(self, *a, **k))
    assert d.result().to_json() == want.to_json()
    assert read and set(read) == {family["near"].resolve()}


def test_sums_recorded_on_another_base_are_not_used(family, tmp_path):
    # same architecture, other weights: the recorded ⟨base, Δ⟩ would be wrong for it; the diagnosis notices
    # from ‖base‖² and measures those tensors the direct way
    other = variant(family["base"], tmp_path / "other", lambda sd: {k: v * 1.01 for k, v in sd.items()})
    got = diagnose(family["patch"], family["near"], device="cpu", intruders=False, source_base=other)
    bare = strip_sums(family["root"] / "ft.patch", tmp_path / "bare.patch")
    want = diagnose(bare, family["near"], device="cpu", intruders=False, source_base=other)
    assert got.to_json()["tensors"] == {**want.to_json()}["tensors"]


def test_target_sums_are_what_an_extraction_on_the_target_would_record(family, tmp_path):
    from patchlab.measure.diagnose import Diagnosis, base_drift

    names = list(patchlab.Patch.open(family["patch"]).names)
    d = Diagnosis(
        family["patch"],
        family["near"],
        device="cpu",
        intruders=False,
        base_pair=base_drift(family["base"], family["near"], names, device="cpu"),
    )
    patchlab.port(family["patch"], family["near"], tmp_path / "out", device="cpu", observe=d.observe)
    d.result()
    sums = d.target_sums()
    t = state(family["near"])
    assert set(sums) == set(names)
    for e in patchlab.Patch.open(family["patch"]).entries():
        delta, tb = e.dense(torch.device("cpu")).double(), t[e.name].double()
        assert sums[e.name]["base_dot"] == pytest.approx(float((tb * delta).sum()), rel=1e-12, abs=1e-18)
        assert sums[e.name]["base_sumsq"] == pytest.approx(float((tb * tb).sum()), rel=1e-9)
        assert sums[e.name]["delta_sumsq"] == e.drift_sums["delta_sumsq"]


def test_a_port_hands_its_sums_to_another_process_that_finishes_the_diagnosis(family, tmp_path, monkeypatch):
    """The upgrade's split: the port gathers ⟨base_t, Δ⟩ without the bases' sums (measured beside it) and
    without reading the source base; the driver finishes from the JSON once the BaseDrift is there."""
    from patchlab.measure.diagnose import Diagnosis, base_drift

    want = diagnose(family["patch"], family["near"], device="cpu", intruders=False)
    d = Diagnosis(family["patch"], family["near"], device="cpu", intruders=False, pair_later=True)
    monkeypatch.setattr(d.src, "rows", lambda *a, **k: pytest.fail("read the source base"))
    patchlab.port(family["patch"], family["near"], tmp_path / "out", device="cpu", observe=d.observe)
    sent = json.loads(json.dumps(d.observed()))
    pair = base_drift(family["base"], family["near"], list(patchlab.Patch.open(family["patch"]).names), device="cpu")
    done = Diagnosis(family["patch"], family["near"], device="cpu", intruders=False, base_pair=pair)
    done.load_observed(sent)
    monkeypatch.setattr("patchlab.measure.diagnose.run", lambda *a, **k: pytest.fail("measured again"))
    assert done.result().to_json() == want.to_json()
    with pytest.raises(patchlab.errors.PatchlabError, match="not this diagnosis"):
        Diagnosis(family["patch"], family["far"], device="cpu", intruders=False).load_observed(sent)


def test_releasing_the_source_base_changes_no_figure(family, monkeypatch):
    """``release_source`` (an upgrade's once-read old base) asks the kernel to drop each summed range of the
    source, every range exactly once, and the sums are those of a pass that keeps them."""
    from pathlib import Path

    from patchlab.io.safetensors import MappedFile
    from patchlab.measure.diagnose import base_drift

    names = list(patchlab.Patch.open(family["patch"]).names)
    keep = base_drift(family["base"], family["near"], names, device="cpu")
    released: list[tuple[str, str, int, int]] = []
    real = MappedFile.release

    def spy(self, name, r0, r1):
        released.append((self.path.name, name, r0, r1))
        real(self, name, r0, r1)

    monkeypatch.setattr(MappedFile, "release", spy)
    dropped = base_drift(family["base"], family["near"], names, device="cpu", release_source=True)
    assert dropped.dumps() == keep.dumps()
    assert released and len(set(released)) == len(released)
    assert {f for f, *_ in released} <= {p.name for p in Path(family["base"]).glob("*.safetensors")}
