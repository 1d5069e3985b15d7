"""Blob verification stamps: using a blob re-hashes it only when its file changed since it was last hashed;
``check`` (what ``patchlab verify`` runs) always re-hashes."""

from __future__ import annotations

import hashlib
import os

import pytest

import registry.blobs as blobs_mod
from registry.blobs import BlobStore


@pytest.fixture
def store(tmp_path):
    return BlobStore(tmp_path / "blobs")


@pytest.fixture
def hashes(monkeypatch):
    """Counts the files hashed through ``sha256_file``."""
    seen: list[str] = []
    real = blobs_mod.sha256_file

    def counting(path):
        seen.append(str(path))
        return real(path)

    monkeypatch.setattr(blobs_mod, "sha256_file", counting)
    return seen


def _rewrite_keeping_size(path, data: bytes) -> None:
    os.chmod(path, 0o644)
    path.write_bytes(data)


def test_a_stored_blob_is_used_without_hashing_it_again(store, hashes):
    dg = store.put_bytes(b"x" * 4096)
    assert store.verified(dg) == "ok" and store.open_path(dg) == store.path(dg)
    assert hashes == []  # hashed once, on the way in
    assert list(store.tmp.iterdir()) == []  # the stamp went through blobs/tmp and left nothing there


def test_a_stamp_left_half_written_is_collected_by_gc(store, monkeypatch):
    """A kill between writing a stamp and renaming it leaves the temporary file in blobs/tmp, which gc cleans."""
    dg = store.put_bytes(b"k" * 4096)
    (store.root / "verified" / dg[:2] / dg).unlink()
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("killed")))
    assert store.check(dg) == "ok"  # hashed; its stamp is written but never renamed into place
    monkeypatch.setattr(os, "replace", real_replace)
    left = list(store.tmp.iterdir())
    assert left and all(p.name.startswith("stamp-") for p in left)
    assert store.verified(dg) == "ok"  # no stamp: hashed again, and stamped now
    assert store.clean_tmp(older_than=0) == len(left) and list(store.tmp.iterdir()) == []


def test_a_blob_rewritten_in_place_is_caught(store, hashes):
    dg = store.put_bytes(b"a" * 4096)
    _rewrite_keeping_size(store.path(dg), b"b" * 4096)  # same size: the mtime tells
    assert store.verified(dg) == "damaged"
    assert len(hashes) == 1


def test_a_blob_replaced_by_another_file_is_caught(store, tmp_path):
    dg = store.put_bytes(b"a" * 4096)
    other = tmp_path / "other"
    other.write_bytes(b"c" * 4096)
    st = store.path(dg).stat()
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime, another inode
    os.replace(other, store.path(dg))
    assert store.verified(dg) == "damaged"


def test_check_always_rehashes(store, hashes):
    """``patchlab verify`` finds damage the stamp cannot see (bytes changed, size and mtime put back)."""
    dg = store.put_bytes(b"a" * 4096)
    p = store.path(dg)
    st = p.stat()
    _rewrite_keeping_size(p, b"z" * 4096)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert store.check(dg) == "damaged" and len(hashes) == 1


def test_a_good_check_renews_the_stamp(store, hashes):
    dg = store.put_bytes(b"a" * 4096)
    os.utime(store.path(dg), ns=(1, 1))  # touched, same bytes
    assert store.verified(dg) == "ok" and len(hashes) == 1
    assert store.verified(dg) == "ok" and len(hashes) == 1  # the re-hash renewed the stamp


def test_removing_a_blob_removes_its_stamp(store):
    dg = store.put_bytes(b"a" * 4096)
    stamp = store.root / "verified" / dg[:2] / dg
    assert stamp.is_file()
    store.remove(dg)
    assert not stamp.exists() and store.verified(dg) == "missing"


def test_a_read_only_store_writes_no_stamp(tmp_path, hashes):
    rw = BlobStore(tmp_path / "blobs")
    data = b"q" * 4096
    dg = hashlib.sha256(data).hexdigest()
    rw.put_bytes(data)
    (rw.root / "verified" / dg[:2] / dg).unlink()
    ro = BlobStore(tmp_path / "blobs", stamps=False)
    assert ro.verified(dg) == "ok" and ro.verified(dg) == "ok"
    assert len(hashes) == 2 and not (ro.root / "verified" / dg[:2] / dg).exists()


def test_materialising_a_patch_twice_hashes_nothing(tmp_path, hashes, populated):
    reg, p1, _ = populated
    hashes.clear()
    first = reg.patch_path("sql@1")
    assert reg.patch_path("sql@1") == first
    assert hashes == []
