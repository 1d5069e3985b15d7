"""Registry.add_ported_patch: a patch ported with α = 1 is stored as the same Δ on the new base, sharing blobs,
and applying it there reproduces the port bit for bit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import patchlab
from registry import Registry
from registry.errors import InvalidReferenceError, UnknownReferenceError
from tests.factory import state


def test_ported_patch_reproduces_the_port_and_shares_the_blobs(registry_target, bf16_family, tmp_path):
    f = bf16_family
    with Registry.init(registry_target) as reg:
        reg.add_base("fam", "1", f["v1"])
        reg.add_base("fam", "2", f["v2"])
        old = reg.add_patch(f["patch"], name="task", base="fam@1")
        blobs_before = set(reg.blobs.iter_digests())
        new = reg.add_ported_patch("task@1", base="fam@2", description="ported")
        assert (new.name, new.version, new.base) == ("task", 2, "fam@2")
        assert reg.get_patch(new.ref).parents == (("task@1", "port"),)
        old_files = {n: dg for n, dg, _ in reg.get_patch(old.ref, detail=True).files}
        new_files = {n: dg for n, dg, _ in reg.get_patch(new.ref, detail=True).files}
        assert old_files.keys() == new_files.keys()
        assert {n for n in old_files if old_files[n] != new_files[n]} == {"patch.json"}
        # only the manifest and the file listing are new blobs
        assert len(set(reg.blobs.iter_digests()) - blobs_before) == 2
        ported = patchlab.port(reg.patch_path(old.ref), f["v2"], tmp_path / "ported", device="cpu")
        applied = patchlab.apply(reg.patch_path(new.ref), f["v2"], tmp_path / "applied", device="cpu")
        a, b = state(Path(ported.path)), state(Path(applied.path))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k].view(torch.int16), b[k].view(torch.int16)), k
        prov = patchlab.Patch.open(reg.patch_path(new.ref)).manifest["provenance"]
        assert prov["method"] == "port" and prov["parameters"]["ported_from"]["patch"] == "task@1"
        assert prov["base"]["content"] == reg.get_base("fam@2").content
        # registering it again returns the same version, not a third
        assert reg.add_ported_patch("task@1", base="fam@2").ref == new.ref


def test_ported_patch_refuses_unknown_base_and_patch(registry_target, bf16_family):
    f = bf16_family
    with Registry.init(registry_target) as reg:
        reg.add_base("fam", "1", f["v1"])
        reg.add_patch(f["patch"], name="task", base="fam@1")
        with pytest.raises(UnknownReferenceError):
            reg.add_ported_patch("task@1", base="fam@9")
        with pytest.raises(UnknownReferenceError):
            reg.add_ported_patch("nope@1", base="fam@1")
        with pytest.raises(InvalidReferenceError):
            reg.add_ported_patch("task@1", base="fam@1", name="bad name")
        assert [p.ref for p in reg.list_patches()] == ["task@1"]


def test_what_first_made_the_delta_is_carried_from_release_to_release(registry_target, bf16_family, tmp_path):
    # an edit patch ported twice is still known as an edit patch (the next upgrade re-evaluates its edit set)
    import json
    import shutil

    f = bf16_family
    edited = tmp_path / "edited"
    shutil.copytree(f["patch"], edited)
    manifest = json.loads((edited / "patch.json").read_text())
    manifest["provenance"]["method"] = "locft-bf"
    manifest["provenance"]["parameters"] = {**manifest["provenance"]["parameters"], "edits_file": "facts.jsonl"}
    (edited / "patch.json").write_text(json.dumps(manifest))
    v3 = f["v3"]
    with Registry.init(registry_target) as reg:
        reg.add_base("fam", "1", f["v1"])
        reg.add_base("fam", "2", f["v2"])
        reg.add_base("fam", "3", v3)
        reg.add_patch(edited, name="facts", base="fam@1")
        two = reg.add_ported_patch("facts@1", base="fam@2")
        three = reg.add_ported_patch(two.ref, base="fam@3")
        for ref, came_from in ((two.ref, "facts@1"), (three.ref, "facts@2")):
            info = reg.get_patch(ref)
            assert info.method == "port" and info.parameters["ported_from"]["patch"] == came_from
            assert info.parameters["source_method"] == "locft-bf"
            assert info.parameters["source_parameters"]["edits_file"] == "facts.jsonl"
        assert "source_parameters" not in reg.get_patch(three.ref).parameters["source_parameters"]


def test_a_ported_patch_records_drift_sums_on_its_own_base_only(registry_target, bf16_family, tmp_path):
    """The source's sums belong to its old base and are dropped; sums the port measured on the new base are
    kept, and the next release's diagnosis from them equals the direct one."""
    from patchlab.measure.diagnose import Diagnosis, base_drift, diagnose

    f = bf16_family
    v3 = f["v3"]
    with Registry.init(registry_target) as reg:
        reg.add_base("fam", "1", f["v1"])
        reg.add_base("fam", "2", f["v2"])
        reg.add_patch(f["patch"], name="task", base="fam@1")
        old = patchlab.Patch.open(reg.patch_path("task@1"))
        assert all(e.drift_sums for e in old.entries())
        plain = reg.add_ported_patch("task@1", base="fam@2")
        assert not any(e.drift_sums for e in patchlab.Patch.open(reg.patch_path(plain.ref)).entries())

        d = Diagnosis(
            reg.patch_path("task@1"),
            f["v2"],
            device="cpu",
            intruders=False,
            base_pair=base_drift(f["v1"], f["v2"], list(old.names), device="cpu"),
        )
        patchlab.port(reg.patch_path("task@1"), f["v2"], tmp_path / "ported", device="cpu", observe=d.observe)
        d.result()
        sums = d.target_sums()
        assert set(sums) == set(old.names)
        new = reg.add_ported_patch("task@1", base="fam@2", name="task-b", drift_sums=sums)
        new_dir = reg.patch_path(new.ref)
        assert {e.name: e.drift_sums for e in patchlab.Patch.open(new_dir).entries()} == sums

        got = diagnose(new_dir, v3, device="cpu", intruders=False, source_base=f["v2"])
        bare = tmp_path / "bare"
        shutil.copytree(new_dir, bare)
        m = json.loads((bare / "patch.json").read_text())
        for e in m["tensors"].values():
            e.pop("drift_sums", None)
        (bare / "patch.json").write_text(json.dumps(m))
        want = diagnose(bare, v3, device="cpu", intruders=False, source_base=f["v2"])
        for a, b in zip(got.tensors, want.tensors, strict=True):
            assert a.drift.drift_norm == b.drift.drift_norm, a.name
            assert a.drift.cos_drift_delta == pytest.approx(b.drift.cos_drift_delta, rel=1e-5, abs=1e-9), a.name
