"""Checkpoint fingerprints."""


def test_content_digest_is_the_historical_sha256_whatever_the_workers(tmp_path, monkeypatch):
    """Hashing in parallel with pread gives the digest the registry has always recorded (old ones verify)."""
    import hashlib

    from patchlab.io.checkpoint import Checkpoint
    from tests.factory import make_model

    path = make_model(tmp_path / "m", shard_size="20KB")
    ck = Checkpoint.open(path)
    per = {n: hashlib.sha256(ck._files[f].raw(n)).hexdigest() for n, f in ck.weight_map.items()}
    h = hashlib.sha256()
    for n in sorted(per):
        h.update(f"{n}\0{per[n]}\n".encode())
    for workers in ("1", "3"):
        monkeypatch.setenv("PATCHLAB_WORKERS", workers)
        assert Checkpoint.open(path).content_digest == h.hexdigest()
