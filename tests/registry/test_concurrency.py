"""Two processes writing one registry at once lose no row (on SQLite and on PostgreSQL)."""

from __future__ import annotations

import multiprocessing as mp

from registry import Registry

from ._workers import add_many
from .conftest import fake_fingerprint, make_base, make_patch

PER_WORKER = 12


def test_two_writers_lose_nothing(tmp_path, registry_target):
    content = fake_fingerprint("base")
    with Registry.init(registry_target) as reg:
        reg.add_base("fam", "v1", make_base(tmp_path / "base"), content=content, fingerprint=False)
    dirs = {
        w: [
            str(make_patch(tmp_path / f"{w}-{i}", seed=100 * (w == "b") + i, base_content=content))
            for i in range(PER_WORKER)
        ]
        for w in ("a", "b")
    }
    ctx = mp.get_context("spawn")
    start = ctx.Manager().Event()
    with ctx.Pool(2) as pool:
        results = [pool.apply_async(add_many, (registry_target, dirs[w], w, start)) for w in ("a", "b")]
        start.set()
        counts = [r.get(timeout=120) for r in results]
    assert counts == [PER_WORKER, PER_WORKER]
    with Registry(registry_target) as reg:
        shared = reg.list_patches(name="shared")
        assert [p.version for p in shared] == list(range(1, 2 * PER_WORKER + 1))
        assert len({p.digest for p in shared}) == 2 * PER_WORKER
        assert sorted(t for p in shared for t in p.tags).count("a") == PER_WORKER
        for w in ("a", "b"):
            assert [p.version for p in reg.list_patches(name=f"own-{w}")] == list(range(1, PER_WORKER + 1))
        assert len(reg.list_evaluations()) == 2 * PER_WORKER
        assert reg.verify().ok
