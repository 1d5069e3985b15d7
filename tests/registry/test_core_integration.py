"""The registry with the real core: fingerprints from Checkpoint, patches from patchlab.extract."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import patchlab
from patchlab import Checkpoint
from registry import ManifestError, UnknownReferenceError

from .conftest import make_base


def test_base_fingerprints_come_from_checkpoint(tmp_path, reg):
    b = reg.add_base("tiny", "v1", make_base(tmp_path / "v1", 1))
    fp = Checkpoint.open(tmp_path / "v1").fingerprint()
    assert (b.architecture, b.content) == (fp.architecture, fp.content)
    assert b.num_parameters == 16 * 8 + 16 * 8 and b.dtype == "float32" and b.vocab_size == 16
    assert fp.content.startswith("blake3:")  # new fingerprints name their algorithm
    assert reg.get_base(fp.content.removeprefix("blake3:")[:8]).ref == "tiny@v1"


def test_extract_register_materialise_apply(tmp_path, reg):
    v1, v2 = make_base(tmp_path / "v1", 1), make_base(tmp_path / "v2", 2)
    ft = make_base(tmp_path / "ft", 3)
    reg.add_base("tiny", "v1", v1)
    reg.add_base("tiny", "v2", v2)
    patchlab.extract(v1, ft, tmp_path / "patch")
    info = reg.add_patch(tmp_path / "patch", name="task")
    assert info.base == "tiny@v1"  # the manifest records the base path and architecture: matched
    assert info.method == "extract" and info.encoding == "dense" and info.finetuned == str(ft.resolve())
    full = reg.get_patch("task", detail=True)
    assert any(n.startswith("finetune/") for n, _, _ in full.files)  # sub-directories are kept
    d = reg.patch_path("task")
    out = patchlab.apply(d, v1, tmp_path / "applied")
    got = load_file(str(out.path / "model.safetensors"))
    want = load_file(str(ft / "model.safetensors"))
    assert all(torch.equal(got[k], want[k]) for k in want)  # exact round trip through the blob store
    derived = reg.add_derived("task", out.path, base="tiny@v1", kind="apply", parameters={"alpha": 1.0})
    assert reg.list_derived("task")[0].path == str(out.path.resolve()) == derived.path
    reg2_patch = patchlab.extract(v2, ft, tmp_path / "patch2")
    p2 = reg.add_patch(reg2_patch.path, name="task", parents=["task@1"])
    assert p2.ref == "task@2" and p2.base == "tiny@v2"


def test_unregistered_base_and_bad_patch(tmp_path, reg):
    v1, ft = make_base(tmp_path / "v1", 1), make_base(tmp_path / "ft", 3)
    patchlab.extract(v1, ft, tmp_path / "patch")
    with pytest.raises(UnknownReferenceError, match="base add"):
        reg.add_patch(tmp_path / "patch")
    mf = tmp_path / "patch" / "patch.json"
    mf.write_text(mf.read_text().replace('"patchlab.io.patch"', '"something-else"'))
    with pytest.raises(ManifestError, match="not a patchlab patch"):
        reg.add_patch(tmp_path / "patch", require_base=False)
    assert reg.list_patches() == []
