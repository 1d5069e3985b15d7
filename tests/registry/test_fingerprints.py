"""Content fingerprints in the registry: new bases get blake3 ones, bases recorded with the old sha256 scheme
keep verifying with it, and a fingerprint of either algorithm finds the base whose weights it describes."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from patchlab.digests import BLAKE3, LEGACY, content_algorithm, hex_part
from patchlab.io.checkpoint import Checkpoint
from registry.bases import checkpoint_facts
from registry.errors import BaseChangedError, UnknownReferenceError

from .conftest import fake_fingerprint, make_base, make_patch, sqlite_only


def _legacy(path: Path) -> str:
    return Checkpoint.open(path).scan(LEGACY, check_finite=False).digest


def _flip_keeping_size_and_time(path: Path) -> None:
    f = path / "model.safetensors"
    st = f.stat()
    data = bytearray(f.read_bytes())
    data[-1] ^= 0x01
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))


@sqlite_only
def test_new_bases_record_blake3_and_old_sha256_bases_keep_verifying(tmp_path, reg):
    new = reg.add_base("f", "new", make_base(tmp_path / "new"))
    assert content_algorithm(new.content) == BLAKE3 and new.content == Checkpoint.open(tmp_path / "new").content_digest
    old_dir = make_base(tmp_path / "old", 1)
    old = reg.add_base("f", "old", old_dir, content=_legacy(old_dir))  # what an older patchlab recorded
    assert content_algorithm(old.content) == LEGACY
    assert reg.verify_bases(full=True) == []
    os.utime(old_dir / "model.safetensors", ns=(1, 10**18))  # touched, same bytes
    assert reg.refresh_base("f@old").content == old.content  # re-hashed with sha256: still the same weights
    assert reg.verify_bases(full=True) == []
    _flip_keeping_size_and_time(old_dir)
    problems = reg.verify_bases(full=True)
    assert [b for b, _ in problems] == ["f@old"] and "weights changed" in problems[0][1]
    with pytest.raises(BaseChangedError, match="no longer the ones registered"):
        reg.refresh_base("f@old")
    _flip_keeping_size_and_time(tmp_path / "new")
    assert [b for b, _ in reg.verify_bases(full=True)] == ["f@new", "f@old"]


@sqlite_only
def test_a_fingerprint_of_either_algorithm_finds_its_base(tmp_path, reg):
    a, b = make_base(tmp_path / "a"), make_base(tmp_path / "b", 1)
    ba = reg.add_base("f", "a", a)  # blake3
    bb = reg.add_base("f", "b", b, content=_legacy(b))  # sha256, as an older registry holds it
    assert reg.find_base_by_content(_legacy(a)).ref == ba.ref  # an old patch's fingerprint, a new base
    assert reg.find_base_by_content(Checkpoint.open(b).content_digest).ref == bb.ref  # and the other way
    assert reg.find_base_by_content(fake_fingerprint("elsewhere")) is None
    assert reg.content_matches(ba, _legacy(b)) is False and reg.content_matches(bb, _legacy(b)) is True
    assert reg.content_matches(ba, "sha512:00") is None  # unknown format: cannot tell
    _flip_keeping_size_and_time(a)  # size and time kept: re-hashed, the weights are not the registered ones
    assert reg.find_base_by_content(_legacy(tmp_path / "a")) is None


@sqlite_only
def test_patch_registration_finds_a_copy_of_a_base_under_either_algorithm(tmp_path, reg):
    a, b = make_base(tmp_path / "a"), make_base(tmp_path / "b", 1)
    reg.add_base("f", "a", a)
    reg.add_base("f", "b", b, content=_legacy(b))
    for src in (a, b):  # the same weights at another path: found by content, whatever the recorded algorithm
        shutil.copytree(src, tmp_path / f"copy-{src.name}")
        reg.check_patch_registration(tmp_path / "out", name="p", base_path=tmp_path / f"copy-{src.name}")
    with pytest.raises(UnknownReferenceError, match="not in the registry"):
        reg.check_patch_registration(tmp_path / "out", name="p", base_path=make_base(tmp_path / "c", 2))


@sqlite_only
def test_an_explicit_base_is_not_refused_for_a_fingerprint_of_the_other_algorithm(tmp_path, reg):
    b = make_base(tmp_path / "b")
    reg.add_base("f", "v1", b)  # blake3
    src = make_patch(tmp_path / "p", 0, _legacy(b))  # made by an older patchlab
    manifest = json.loads((src / "patch.json").read_text())
    manifest["provenance"]["base"]["architecture"] = Checkpoint.open(b).architecture_digest
    (src / "patch.json").write_text(json.dumps(manifest))
    p = reg.add_patch(src, name="p", base="f@v1")
    assert p.base == "f@v1"


def test_content_prefix_of_a_blake3_fingerprint_resolves_with_or_without_its_prefix(tmp_path, reg):
    info = reg.add_base("f", "v1", make_base(tmp_path / "b"))
    h = hex_part(info.content)
    assert reg.get_base(h[:8]).ref == "f@v1" == reg.get_base("blake3:" + h[:8]).ref
    assert checkpoint_facts(tmp_path / "b")["content"] == info.content
