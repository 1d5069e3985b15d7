"""Registry API: bases, patches, references, aliases, tags, lineage, rm, gc, verify, evaluations."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from patchlab.errors import PatchlabError
from registry import (
    AlreadyExistsError,
    AmbiguousReferenceError,
    BlobCorruptError,
    BlobNotFoundError,
    DependencyError,
    InvalidReferenceError,
    ManifestError,
    Registry,
    RegistryNotFoundError,
    UnknownReferenceError,
)
from registry.blobs import sha256_file, tree_digest

from .conftest import fake_fingerprint, make_base, make_patch, postgresql_only, sqlite_only


def test_errors_are_patchlab_errors():
    for exc in (UnknownReferenceError, DependencyError, BlobCorruptError, RegistryNotFoundError):
        assert issubclass(exc, PatchlabError)


def test_location_argument_env_and_missing(tmp_path, monkeypatch):
    with pytest.raises(RegistryNotFoundError, match="patchlab init"):
        Registry(tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()
    monkeypatch.setenv("PATCHLAB_HOME", str(tmp_path / "envhome"))
    with Registry.init() as r:
        assert r.home == (tmp_path / "envhome").resolve()
        assert (tmp_path / "envhome" / "registry.db").is_file()
    # a .db path and a sqlite URL name the same registry
    Registry.init(tmp_path / "x" / "reg.db").add_base("fam", "a", "org/model", revision="ab" * 20, download=False)
    with Registry(f"sqlite:///{tmp_path / 'x' / 'reg.db'}") as r2:
        assert [b.ref for b in r2.list_bases()] == ["fam@a"]
        assert r2.home == (tmp_path / "x").resolve()


@sqlite_only
def test_sqlite_pragmas(reg):
    with reg.db.engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert c.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000


def test_add_base_and_resolve(tmp_path, reg):
    b1 = reg.add_base("llama", "v1", make_base(tmp_path / "b1"), content="aa" * 32, fingerprint=False)
    b2 = reg.add_base("llama", "v2", make_base(tmp_path / "b2", 2), content="bb" * 32, fingerprint=False)
    hub = reg.add_base("llama", "v3", "meta/llama-3", revision="de" * 20, download=False)
    assert (b1.release_order, b2.release_order, hub.release_order) == (1, 2, 3)
    assert b1.source == str((tmp_path / "b1").resolve()) and b1.source_kind == "local"
    assert hub.location == "meta/llama-3@" + "de" * 20 and hub.source_kind == "hub"
    assert reg.get_base("llama@v2").id == b2.id
    assert reg.get_base("llama").version == "v3"  # newest release
    assert reg.get_base("bbbbbbbb").ref == "llama@v2"  # content fingerprint prefix
    assert reg.checkpoint_location("llama@v1") == str((tmp_path / "b1").resolve())
    assert reg.checkpoint_location(str(tmp_path / "b2")) == str(tmp_path / "b2")
    with pytest.raises(AlreadyExistsError, match="already registered"):
        reg.add_base("llama", "v1", tmp_path / "b1", fingerprint=False)
    with pytest.raises(UnknownReferenceError, match="did you mean llama"):
        reg.get_base("lama@v1")
    with pytest.raises(UnknownReferenceError, match="versions: v1, v2, v3"):
        reg.get_base("llama@v9")
    with pytest.raises(UnknownReferenceError, match="does not exist"):
        reg.add_base("llama", "v4", tmp_path / "missing-dir")
    from patchlab.errors import InvalidRepoIdError

    with pytest.raises(InvalidRepoIdError, match="not a valid Hub repo id"):  # refused before any request
        reg.add_base("llama", "v4", "meta/llama 4!", revision="ab" * 20, download=False)


def test_add_patch_stores_blobs_and_provenance(tmp_path, populated):
    reg, p1, p2 = populated
    assert (p1.ref, p2.ref) == ("sql@1", "sql@2")
    assert p1.base == "llama@v1" and p2.base == "llama@v2"  # matched by content fingerprint
    assert p1.method == "diff" and p1.encoding == "dense" and p1.num_tensors == 1
    assert p1.finetuned == "/models/ft" and p1.parameters["seed"] == 1
    assert p2.parents == (("sql@1", "port"),)
    full = reg.get_patch("sql@1", detail=True)
    names = {n for n, _, _ in full.files}
    assert names == {"patch.json", "delta-00001.safetensors"}
    listing = {n: d for n, d, _ in full.files}
    assert tree_digest(listing) == full.digest
    for n, d, size in full.files:
        assert sha256_file(reg.blobs.path(d)) == d
        assert size == (tmp_path / "p1" / n).stat().st_size
    assert full.stats["model.layers.0.mlp.up_proj.weight"]["stats"]["changed_frac"] == 1.0
    assert full.totals == {"tensors": 1, "bytes": 512}
    # same content, same name: no new version
    again = reg.add_patch(tmp_path / "p1", name="sql")
    assert again.ref == "sql@1"


def test_dedup_same_content_other_name(tmp_path, populated):
    reg, p1, _ = populated
    n_blobs = len(list(reg.blobs.iter_digests()))
    other = reg.add_patch(tmp_path / "p1", name="sql-copy")
    assert other.digest == p1.digest and other.ref == "sql-copy@1"
    assert len(list(reg.blobs.iter_digests())) == n_blobs


def test_patch_references(tmp_path, populated):
    reg, p1, p2 = populated
    assert reg.get_patch("sql").ref == "sql@2"
    assert reg.get_patch("sql@1").id == p1.id
    assert reg.get_patch(p1.digest[:8]).ref == "sql@1"
    assert reg.get_patch("sha256:" + p2.digest[:10]).ref == "sql@2"
    with pytest.raises(UnknownReferenceError, match="did you mean sql"):
        reg.get_patch("sqk")
    with pytest.raises(UnknownReferenceError, match="versions: 1, 2"):
        reg.get_patch("sql@7")
    with pytest.raises(UnknownReferenceError):
        reg.get_patch(p1.digest[:5])  # too short to be a digest prefix
    reg.set_alias("prod", "sql@1")
    assert reg.get_patch("sql@prod").ref == "sql@1"
    assert reg.get_patch("prod").ref == "sql@1"  # alias used by one patch name only
    reg.set_alias("prod", "sql@2")  # move
    assert reg.get_patch("sql@prod").ref == "sql@2"
    reg.add_patch(make_patch(tmp_path / "other", 9, fake_fingerprint("v1")), name="chat")
    reg.set_alias("prod", "chat")
    with pytest.raises(AmbiguousReferenceError, match="sql@prod"):
        reg.get_patch("prod")


def test_ambiguous_digest_prefix(tmp_path, reg):
    from sqlalchemy import update

    from registry.rows import PatchRow

    content = fake_fingerprint("b")
    reg.add_base("f", "1", make_base(tmp_path / "b"), content=content, fingerprint=False)
    a = reg.add_patch(make_patch(tmp_path / "a", 1, content), name="a")
    b = reg.add_patch(make_patch(tmp_path / "b2", 2, content), name="b")
    # real digests sharing 7 hex digits are too rare to find; give the rows such digests directly
    with reg.db.write() as s:
        s.execute(update(PatchRow).where(PatchRow.id == a.id).values(digest="abcdef1" + "0" * 57))
        s.execute(update(PatchRow).where(PatchRow.id == b.id).values(digest="abcdef1" + "1" * 57))
    with pytest.raises(AmbiguousReferenceError, match="a@1.*b@1|b@1.*a@1"):
        reg.get_patch("abcdef1")
    assert reg.get_patch("abcdef10").ref == "a@1"
    with pytest.raises(UnknownReferenceError):
        reg.get_patch("abcde")  # 5 digits: too short to be read as a digest prefix
    # a patch name that is also a digest prefix of another patch
    c = reg.add_patch(make_patch(tmp_path / "c", 3, content), name="abcdef11")
    with pytest.raises(AmbiguousReferenceError, match="both a patch name and a digest prefix"):
        reg.get_patch("abcdef11")
    assert reg.get_patch("abcdef11@1").id == c.id


def test_plain_paths_and_materialise(tmp_path, populated):
    reg, p1, _ = populated
    assert reg.resolve_patch_path(str(tmp_path / "p1")) == tmp_path / "p1"
    d = reg.resolve_patch_path("sql@1")
    assert d.parent == reg.cache / "patches" and d.name == p1.digest
    assert (d / "patch.json").read_bytes() == (tmp_path / "p1" / "patch.json").read_bytes()
    assert sorted(x.name for x in d.iterdir()) == ["delta-00001.safetensors", "patch.json"]
    assert reg.patch_path("sql@1") == d  # second time reuses the verified cache


def test_materialise_detects_damage(tmp_path, populated):
    reg, p1, _ = populated
    full = reg.get_patch("sql@1", detail=True)
    shard = next(d for n, d, _ in full.files if n.endswith(".safetensors"))
    blob = reg.blobs.path(shard)
    os.chmod(blob, 0o644)
    blob.write_bytes(b"garbage")
    with pytest.raises(BlobCorruptError, match="verify"):
        reg.patch_path("sql@1")
    blob.unlink()
    with pytest.raises(BlobNotFoundError, match="missing"):
        reg.patch_path("sql@1")
    assert not (reg.cache / "patches" / p1.digest).exists()


def test_add_patch_errors(tmp_path, reg):
    with pytest.raises(ManifestError, match="does not exist"):
        reg.add_patch(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="patch.json"):
        reg.add_patch(tmp_path / "empty")
    broken = make_patch(tmp_path / "broken", 0, fake_fingerprint("x"))
    (broken / "delta-00001.safetensors").unlink()
    with pytest.raises(ManifestError, match="missing"):
        reg.add_patch(broken)
    orphan = make_patch(tmp_path / "orphan", 0, fake_fingerprint("unregistered"))
    with pytest.raises(UnknownReferenceError, match="base add"):
        reg.add_patch(orphan)
    assert reg.list_patches() == []
    info = reg.add_patch(orphan, require_base=False)
    assert info.base is None and info.base_content == fake_fingerprint("unregistered")
    assert info.name == "orphan"
    with pytest.raises(InvalidReferenceError, match="not a valid patch name"):
        reg.add_patch(orphan, name="bad name!")


def test_add_patch_explicit_base_must_match(tmp_path, reg):
    reg.add_base("f", "1", make_base(tmp_path / "b"), content=fake_fingerprint("one"), fingerprint=False)
    p = make_patch(tmp_path / "p", 0, fake_fingerprint("two"))
    with pytest.raises(InvalidReferenceError, match="fingerprint"):
        reg.add_patch(p, base="f@1")


def test_list_filters(tmp_path, populated):
    reg, p1, p2 = populated
    reg.add_tag("sql@1", "good")
    assert [p.ref for p in reg.list_patches()] == ["sql@1", "sql@2"]
    assert [p.ref for p in reg.list_patches(base="llama@v2")] == ["sql@2"]
    assert [p.ref for p in reg.list_patches(family="llama")] == ["sql@1", "sql@2"]
    assert [p.ref for p in reg.list_patches(tag="good")] == ["sql@1"]
    assert [p.ref for p in reg.list_patches(all_versions=False)] == ["sql@2"]
    assert reg.list_patches()[0].tags == ("good",)


def test_tags(tmp_path, populated):
    reg, *_ = populated
    assert reg.add_tag("sql@2", "reviewed") == "sql@2"
    reg.add_tag("sql@2", "reviewed")  # idempotent
    reg.add_tag("llama@v1", "deprecated")
    assert reg.get_patch("sql@2").tags == ("reviewed",)
    assert reg.get_base("llama@v1").tags == ("deprecated",)
    reg.remove_tag("sql@2", "reviewed")
    assert reg.get_patch("sql@2").tags == ()
    with pytest.raises(UnknownReferenceError, match="no tag"):
        reg.remove_tag("sql@2", "reviewed")


def test_base_aliases(tmp_path, populated):
    reg, *_ = populated
    a = reg.set_alias("prod", "llama@v1")
    assert (a.scope_kind, a.ref, a.target) == ("family", "llama@prod", "llama@v1")
    assert reg.get_base("llama@prod").version == "v1"
    reg.set_alias("prod", "llama@v2")
    assert reg.get_base("llama@prod").version == "v2"
    assert [x.ref for x in reg.list_aliases()] == ["llama@prod"]
    with pytest.raises(AlreadyExistsError):
        reg.set_alias("v1", "llama@v2")
    reg.remove_alias("llama@prod")
    with pytest.raises(UnknownReferenceError):
        reg.get_base("llama@prod")
    with pytest.raises(UnknownReferenceError, match="no alias"):
        reg.remove_alias("llama@prod")


def test_lineage_across_ports(tmp_path, populated):
    reg, p1, p2 = populated
    c3 = fake_fingerprint("v3")
    reg.add_base("llama", "v3", make_base(tmp_path / "v3", 3), content=c3, fingerprint=False)
    p3 = reg.add_patch(make_patch(tmp_path / "p3", 3, c3), name="sql", parents=["sql@2"])
    other = reg.add_patch(make_patch(tmp_path / "o", 4, c3), name="chat")
    merged = reg.add_patch(
        make_patch(tmp_path / "m", 5, c3), name="merged", parents=[p3.ref, other.ref], relation="merge"
    )
    tree = reg.lineage("merged")
    assert tree.ref == merged.ref and tree.relation is None
    assert [(n.ref, n.relation) for n in tree.parents] == [("sql@3", "merge"), ("chat@1", "merge")]
    chain = []
    node = tree.parents[0]
    while node:
        chain.append((node.ref, node.base))
        node = node.parents[0] if node.parents else None
    assert chain == [("sql@3", "llama@v3"), ("sql@2", "llama@v2"), ("sql@1", "llama@v1")]
    assert tree.to_dict()["parents"][0]["parents"][0]["relation"] == "port"


def test_rm_refuses_dependants_then_cascades(tmp_path, populated):
    reg, p1, p2 = populated
    reg.set_alias("prod", "sql@2")
    d = reg.add_derived("sql@2", tmp_path / "out", base="llama@v2", kind="apply", parameters={"alpha": 1.0})
    assert d.patch == "sql@2" and d.base == "llama@v2" and d.parameters == {"alpha": 1.0}
    with pytest.raises(DependencyError) as ei:
        reg.rm("sql@1")
    msg = str(ei.value)
    assert "patch sql@2" in msg and "derived:" in msg and "sql@prod" in msg and "--cascade" in msg
    with pytest.raises(DependencyError, match="patch sql@1"):
        reg.rm("llama@v1")
    assert len(reg.list_patches()) == 2  # nothing removed
    removed = reg.rm("sql@1", cascade=True)
    assert removed[0] == "sql@1" and "patch sql@2" in removed
    assert reg.list_patches() == [] and reg.list_derived() == [] and reg.list_aliases() == []
    assert [b.ref for b in reg.list_bases()] == ["llama@v1", "llama@v2"]
    assert reg.rm("llama@v1") == ["llama@v1"]


def test_add_derived_with_reuse_gives_back_the_row_of_the_same_patch_and_path(tmp_path, populated):
    reg, p1, p2 = populated
    first = reg.add_derived("sql@2", tmp_path / "out", base="llama@v2", kind="port", parameters={"run": 1})
    again = reg.add_derived("sql@2", tmp_path / "out", base="llama@v2", kind="port", parameters={"run": 2}, reuse=True)
    assert again == first and again.parameters == {"run": 1}
    other_path = reg.add_derived("sql@2", tmp_path / "elsewhere", base="llama@v2", reuse=True)
    other_patch = reg.add_derived("sql@1", tmp_path / "out", base="llama@v2", reuse=True)
    assert len({first.id, other_path.id, other_patch.id}) == 3
    plain = reg.add_derived("sql@2", tmp_path / "out", base="llama@v2")  # without reuse: a row of its own
    assert plain.id != first.id and len(reg.list_derived("sql@2")) == 3


def test_rm_leaf_and_derived(tmp_path, populated):
    reg, p1, p2 = populated
    d = reg.add_derived("sql@2", tmp_path / "out")
    assert reg.rm(d.ref) == [d.ref]
    reg.add_tag("sql@2", "x")
    reg.record_evaluation("sql@2", "task", [{"id": "a", "prediction": "1", "gold": "1", "correct": True}])
    assert reg.rm("sql@2") == ["sql@2"]  # tags and evaluations are owned, not dependants
    assert [p.ref for p in reg.list_patches()] == ["sql@1"]
    assert reg.list_evaluations() == []
    assert reg.add_patch(tmp_path / "p2", name="sql").ref == "sql@2"  # version numbers continue from the max


def test_gc_and_verify(tmp_path, populated):
    reg, p1, p2 = populated
    assert reg.verify().ok
    full = reg.get_patch("sql@2", detail=True)
    reg.patch_path("sql@2")
    reg.rm("sql@2")
    dry = reg.gc(grace_seconds=0, dry_run=True)
    assert dry.dry_run and len(dry.removed) == 3  # two files + the tree listing of sql@2
    assert all(reg.blobs.has(dg) for dg in dry.removed)
    young = reg.gc()  # default grace period keeps just-written blobs
    assert young.removed == () and young.skipped_young == 3
    report = reg.gc(grace_seconds=0)
    assert set(report.removed) == {full.digest} | {d for n, d, _ in full.files if n != "patch.json"} | {
        d for n, d, _ in full.files if n == "patch.json"
    }
    assert report.freed_bytes > 0
    assert not (reg.cache / "patches" / full.digest).exists()
    assert reg.verify().ok and reg.patch_path("sql@1").is_dir()
    # damage one blob of sql@1, delete another
    f1 = reg.get_patch("sql@1", detail=True)
    shard = next(d for n, d, _ in f1.files if n.endswith(".safetensors"))
    manifest = next(d for n, d, _ in f1.files if n == "patch.json")
    os.chmod(reg.blobs.path(shard), 0o644)
    reg.blobs.path(shard).write_bytes(b"x")
    reg.blobs.path(manifest).unlink()
    v = reg.verify()
    assert not v.ok
    assert {(p.digest, p.state, p.patches) for p in v.problems} == {
        (shard, "damaged", ("sql@1",)),
        (manifest, "missing", ("sql@1",)),
    }


def test_verify_reports_vanished_base(tmp_path, populated):
    reg, *_ = populated
    import shutil

    shutil.rmtree(tmp_path / "v1")
    assert reg.verify().missing_bases == ("llama@v1",)


def test_evaluations(tmp_path, populated):
    reg, *_ = populated
    records = [
        {"id": "q1", "prediction": "4", "gold": "4", "correct": True, "score": 1.0},
        {"id": "q2", "prediction": 2, "gold": 1, "correct": False, "score": 0.0},
        {"id": "q3", "prediction": "x", "gold": "x", "correct": True, "score": 0.5},
    ]
    ev = reg.record_evaluation("sql@2", "task.jsonl", records)
    assert ev.target == "sql@2" and ev.num_instances == 3
    assert ev.metrics == {"n": 3, "accuracy": pytest.approx(2 / 3), "mean_score": pytest.approx(0.5)}
    base_ev = reg.record_evaluation("llama@v2", "task.jsonl", records[:1], metrics={"accuracy": 1.0})
    assert base_ev.metrics == {"accuracy": 1.0}
    got = reg.get_evaluation(ev.id)
    assert [r["id"] for r in got.results] == ["q1", "q2", "q3"]
    assert got.results[1] == {"id": "q2", "prediction": 2, "gold": 1, "correct": False, "score": 0.0}
    assert [e.id for e in reg.list_evaluations("sql@2")] == [ev.id]
    assert [e.id for e in reg.list_evaluations("llama@v2")] == [base_ev.id]
    with pytest.raises(InvalidReferenceError, match="twice"):
        reg.record_evaluation("sql@2", "t", [{"id": 1}, {"id": 1}])
    with pytest.raises(InvalidReferenceError, match="no 'id'"):
        reg.record_evaluation("sql@2", "t", [{"prediction": 1}])
    assert len(reg.list_evaluations()) == 2


def test_blob_writes_are_atomic_and_readonly(tmp_path, reg):
    dg = reg.blobs.put_bytes(b"hello")
    p = reg.blobs.path(dg)
    assert p.read_bytes() == b"hello"
    assert not os.access(p, os.W_OK) or os.geteuid() == 0
    assert reg.blobs.put_bytes(b"hello") == dg
    assert list(reg.blobs.tmp.iterdir()) == []
    assert reg.blobs.read_bytes(dg) == b"hello"


def test_row_never_points_at_missing_blob(tmp_path, populated, monkeypatch):
    """If storing a blob fails, no row is written."""
    reg, *_ = populated
    src = make_patch(tmp_path / "new", 42, fake_fingerprint("v2"))

    def boom(self, path):
        raise OSError("disk full")

    monkeypatch.setattr(type(reg.blobs), "put_file", boom)
    with pytest.raises(OSError):
        reg.add_patch(src, name="new")
    assert reg.list_patches(name="new") == []


def test_not_a_registry(tmp_path):
    db = tmp_path / "other.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE foo (x int)")
    con.commit()
    con.close()
    from registry import RegistrySchemaError

    with pytest.raises(RegistrySchemaError, match="not a patchlab registry"):
        Registry(db)


def test_registry_path_with_file(tmp_path):
    r = Registry.init(tmp_path / "h")
    r.close()
    assert Path(tmp_path / "h" / "registry.db").is_file()
    with Registry(tmp_path / "h" / "registry.db") as r2:
        assert r2.home == (tmp_path / "h").resolve()


def test_list_uses_a_fixed_number_of_queries(tmp_path, reg):
    """No N+1: listing 3 or 30 patches issues the same statements."""
    from sqlalchemy import event

    content = fake_fingerprint("b")
    reg.add_base("f", "1", make_base(tmp_path / "b"), content=content, fingerprint=False)
    prev = None
    counts = []
    statements: list[str] = []

    def count(conn, cursor, statement, *args):
        statements.append(statement)

    for n in (3, 30):
        while len(reg.list_patches()) < n:
            i = len(reg.list_patches())
            info = reg.add_patch(
                make_patch(tmp_path / f"p{i}", i, content),
                name=f"p{i % 4}",
                parents=[prev] if prev else [],
                tags=["t"],
            )
            reg.set_alias("prod", info.ref)
            prev = info.ref
        event.listen(reg.db.engine, "before_cursor_execute", count)
        statements.clear()
        listed = reg.list_patches()
        event.remove(reg.db.engine, "before_cursor_execute", count)
        assert len(listed) == n and all(p.tags == ("t",) for p in listed)
        counts.append(len(statements))
    assert counts[0] == counts[1] <= 6


def test_default_location_is_user_data_dir(monkeypatch, tmp_path):
    import platformdirs

    from registry.db import resolve_location

    monkeypatch.delenv("PATCHLAB_HOME", raising=False)
    monkeypatch.setattr(platformdirs, "user_data_dir", lambda name, appauthor=None: str(tmp_path / "data" / name))
    loc = resolve_location()
    assert loc.home == tmp_path / "data" / "patchlab"
    assert loc.url == f"sqlite:///{tmp_path / 'data' / 'patchlab' / 'registry.db'}"
    url = resolve_location("postgresql://u:p@db.example/patchlab")  # plain postgresql:// means psycopg 3
    assert url.url == "postgresql+psycopg://u:p@db.example/patchlab" and url.home == loc.home
    assert url.safe_url == "postgresql+psycopg://u:***@db.example/patchlab"


def test_readding_links_parents_and_tags(tmp_path, populated):
    reg, p1, p2 = populated
    reg.add_patch(make_patch(tmp_path / "p3", 3, fake_fingerprint("v2")), name="other")
    again = reg.add_patch(tmp_path / "p3", name="other", parents=["sql@2"], relation="merge", tags=["x"])
    assert again.ref == "other@1" and again.parents == (("sql@2", "merge"),) and again.tags == ("x",)
    with pytest.raises(InvalidReferenceError, match="own parent"):
        reg.add_patch(tmp_path / "p3", name="other", parents=["other@1"])


def test_checkpoint_path_for_hub_base_uses_the_local_cache_first(tmp_path, reg, monkeypatch):
    from patchlab.errors import HubOfflineError

    rev = "0123456789abcdef0123456789abcdef01234567"
    reg.add_base("org", "v1", "org/tiny", revision=rev, download=False)  # a full sha: recorded lazily, no request
    assert reg.get_base("org@v1").content is None
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hfcache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubOfflineError, match="org/tiny@0123456789ab.*HF_HUB_OFFLINE"):
        reg.checkpoint_path("org@v1")
    snap = tmp_path / "hfcache" / "models--org--tiny" / "snapshots" / rev
    make_base(snap)
    assert reg.checkpoint_path("org@v1") == snap
    assert reg.get_base("org@v1").content is not None  # fingerprinted on first use
    local = reg.add_base("loc", "v1", make_base(tmp_path / "b"), fingerprint=False)
    assert reg.checkpoint_path("loc@v1") == Path(local.source)
    assert reg.checkpoint_path(str(tmp_path / "b")) == tmp_path / "b"


@postgresql_only
def test_postgresql_session_settings(reg):
    with reg.db.engine.connect() as c:
        assert c.exec_driver_sql("SHOW lock_timeout").scalar() == "30s"
        assert c.exec_driver_sql("SELECT current_setting('server_version_num')::int").scalar() >= 120000


@postgresql_only
def test_postgresql_writers_queue_on_the_write_lock(reg, tmp_path):
    """A write transaction holds the registry's advisory lock; another writer waits for it, readers do not."""
    import threading
    import time

    reg.add_base("f", "v1", make_base(tmp_path / "b"), content="aa" * 32, fingerprint=False)
    b2 = make_base(tmp_path / "b2")
    other = Registry(reg.location.url)
    done: list[str] = []
    try:
        with reg.db.write() as s:
            s.connection()  # the session begins (and takes the lock) on first use
            add = lambda: done.append(other.add_base("f", "v2", b2, content="bb" * 32, fingerprint=False).ref)  # noqa: E731
            t = threading.Thread(target=add)
            t.start()
            time.sleep(0.5)
            assert done == [] and t.is_alive()  # queued behind our write transaction
            assert [b.ref for b in other.list_bases()] == ["f@v1"]  # reading is not blocked
        t.join(30)
        assert done == ["f@v2"]
    finally:
        other.close()


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("postgresql://u:secret@127.0.0.1:notaport/db", "is not a database URL"),
        ("nosuchdb://x/y", "does not know"),
        ("postgresql+pg8000://u@127.0.0.1/db", "needs the Python package 'pg8000'"),
    ],
)
def test_bad_database_url_is_one_clear_line(url, match):
    from registry import RegistryConnectionError, RegistryError

    with pytest.raises(RegistryConnectionError, match=match) as err:
        Registry(url)
    assert isinstance(err.value, RegistryError) and "\n" not in str(err.value) and "secret" not in str(err.value)


def test_missing_psycopg_says_which_extra(monkeypatch):
    import sys

    from registry import RegistryConnectionError

    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if psycopg were not installed
    with pytest.raises(RegistryConnectionError, match=r"'psycopg'.*patchlab\[postgres\]"):
        Registry("postgresql://u@127.0.0.1/db")


def test_unreachable_server_is_one_clear_line():
    import socket

    from registry import RegistryConnectionError

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RegistryConnectionError, match=f"cannot connect to the registry database .*:{port}/db") as err:
        Registry(f"postgresql://u:secret@127.0.0.1:{port}/db")
    assert "\n" not in str(err.value) and "secret" not in str(err.value)
