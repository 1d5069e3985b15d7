"""Issue 10: never lose a user's data, never give a wrong answer quietly.

One test (or a few) per class of failure the issue lists; each failed on main before the fix. See
docs/safety.md for the promises these tests pin.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cli.app import app
from tests.conftest import no_partial_dirs
from tests.registry.conftest import make_base

MARKER = ".patchlab-output.json"


@pytest.fixture
def run(tmp_path):
    runner = CliRunner()
    home = tmp_path / "home"

    def invoke(*args: str, code: int | None = 0, registry: str | None = None):
        result = runner.invoke(app, ["--registry", registry or str(home), *map(str, args)])
        if code is not None:
            assert result.exit_code == code, (args, result.output)
        return result

    invoke("init")
    return invoke


@pytest.fixture
def family(tmp_path, run):
    for i, n in enumerate(["v1", "v2", "ft"]):
        make_base(tmp_path / n, i)
    run("base", "add", "tiny@v1", tmp_path / "v1")
    run("base", "add", "tiny@v2", tmp_path / "v2")
    run("diff", "tiny@v1", tmp_path / "ft", tmp_path / "p1", "--name", "task")
    return tmp_path


def one_error_line(result) -> str:
    """The failure is one line starting with ``error:``, without a traceback."""
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    return lines[0]


def tree_state(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


# ---- 1. --overwrite replaces only what patchlab wrote --------------------------------------------------------


def test_overwrite_refuses_registry_home_and_keeps_it(family, run):
    home = family / "home"
    before = tree_state(home / "blobs")
    for target in (home, home / "blobs", home / "blobs" / "new", home / "cache", home / "registry.db", family):
        r = run("port", "task", "tiny@v2", target, "--overwrite", code=None)
        assert "registry" in one_error_line(r)
    assert tree_state(home / "blobs") == before and (home / "registry.db").is_file()
    assert not (home / "blobs" / "new").exists()
    run("verify")


def test_overwrite_refuses_registered_base_and_derived_dirs(family, run):
    weights = (family / "v2" / "model.safetensors").read_bytes()
    r = run("port", "task", "tiny@v2", family / "v2", "--overwrite", code=None)
    assert "registered base tiny@v2" in one_error_line(r)
    assert (family / "v2" / "model.safetensors").read_bytes() == weights
    run("port", "task", "tiny@v2", family / "out")
    r = run("port", "task", "tiny@v2", family / "out", "--overwrite", code=None)
    assert "derived:1" in one_error_line(r) and "patchlab rm derived:1" in r.stderr
    # a parent of a registered base is refused too
    r = run("apply", "task", "tiny@v1", family, "--overwrite", code=None)
    one_error_line(r)
    assert (family / "v1" / "model.safetensors").is_file()


def test_overwrite_refuses_cwd_and_its_parents(family, run, monkeypatch):
    work = family / "work"
    work.mkdir()
    (work / "mine.txt").write_text("keep")
    monkeypatch.chdir(work)
    for target in (".", "..", str(work)):
        r = run("apply", "task", "tiny@v1", target, "--overwrite", "--no-register", code=None)
        assert "current directory" in one_error_line(r)
    assert (work / "mine.txt").read_text() == "keep"
    assert not no_partial_dirs(work) and not no_partial_dirs(family)


def test_overwrite_refuses_foreign_and_other_kind_dirs(family, run):
    mine = family / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    r = run("apply", "task", "tiny@v1", mine, "--overwrite", "--no-register", code=None)
    assert "did not write it" in one_error_line(r)
    assert (mine / "thesis.tex").read_text() == "years of work"
    # a patch directory is not a model: --overwrite of one kind never replaces another kind
    r = run("apply", "task", "tiny@v1", family / "p1", "--overwrite", "--no-register", code=None)
    assert "patch output, not a model" in one_error_line(r)
    assert (family / "p1" / "patch.json").is_file()


def test_every_output_has_a_marker_and_overwrite_of_own_output_is_atomic(family, run, monkeypatch):
    out = family / "applied"
    run("apply", "task", "tiny@v1", out, "--no-register")
    m = json.loads((out / MARKER).read_text())
    assert m["kind"] == "model" and m["write_id"]
    assert json.loads((family / "p1" / MARKER).read_text())["kind"] == "patch"
    old = load_file(str(out / "model.safetensors"))
    # the new output fails midway: the old one is still whole
    import patchlab.io.safetensors as sio

    real = sio.ShardWriter.write
    calls = {"n": 0}

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(sio.ShardWriter, "write", flaky)
    r = run("apply", "task", "tiny@v1", out, "--overwrite", "--no-register", "--alpha", "0.5", code=None)
    assert "no space left" in one_error_line(r)
    got = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(got[k], old[k]) for k in old) and not no_partial_dirs(family)
    monkeypatch.setattr(sio.ShardWriter, "write", real)
    run("apply", "task", "tiny@v1", out, "--overwrite", "--no-register", "--alpha", "0.5")
    assert json.loads((out / MARKER).read_text())["write_id"] != m["write_id"]
    assert not no_partial_dirs(family)


# ---- 2. registered bases are re-verified -------------------------------------------------------------------------


def _touch_weights(base: Path, bump: bool) -> None:
    f = base / "model.safetensors"
    sd = load_file(str(f))
    if bump:
        k = next(iter(sd))
        sd[k] = sd[k] + 1.0
    save_file(sd, str(f))
    os.utime(f, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))


def test_changed_base_is_an_error_before_use(family, run):
    _touch_weights(family / "v1", bump=True)
    for args in (
        ("apply", "task", "tiny@v1", family / "a"),
        ("diff", "tiny@v1", family / "ft", family / "p2"),
        ("port", "task", "tiny@v1", family / "b"),
    ):
        line = one_error_line(run(*args, code=None))
        assert "tiny@v1 changed on disk" in line and "patchlab base add tiny@NEW" in line
        assert not (family / args[-1]).exists()
    r = run("verify", code=1)
    assert "changed" in r.stdout and "tiny@v1" in r.stdout
    # the weights really changed: refresh refuses
    line = one_error_line(run("base", "refresh", "tiny@v1", code=None))
    assert "no longer the ones registered" in line


def test_touched_base_is_refreshed_and_verify_bases_rehashes(family, run):
    _touch_weights(family / "v2", bump=False)  # same bytes, new time (a copy, a restore)
    assert "tiny@v2" in run("verify", code=1).stdout
    run("base", "refresh", "tiny@v2")
    assert "all good" in run("verify").stdout
    assert "all good" in run("verify", "--bases").stdout
    # a change that keeps size and time (an in-place edit with the time restored) needs the full re-hash
    f = family / "v2" / "model.safetensors"
    st = f.stat()
    data = bytearray(f.read_bytes())
    data[-1] ^= 0x01
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert "all good" in run("verify").stdout
    r = run("verify", "--bases", code=1)
    assert "tiny@v2" in r.stdout and "weights changed" in r.stdout


# ---- 3. non-finite values ------------------------------------------------------------------------------------


def _poison(path: Path, name: str = "model.layers.0.mlp.up_proj.weight", value: float = float("nan")) -> None:
    sd = load_file(str(path / "model.safetensors"))
    sd[name][1, 2] = value
    save_file(sd, str(path / "model.safetensors"))


def test_nonfinite_base_refused_at_registration_unless_allowed(tmp_path, run):
    make_base(tmp_path / "nan", 5)
    _poison(tmp_path / "nan")
    line = one_error_line(run("base", "add", "tiny@nan", tmp_path / "nan", code=None))
    assert "model.layers.0.mlp.up_proj.weight" in line and "--allow-nonfinite" in line
    run("base", "add", "tiny@nan", tmp_path / "nan", "--allow-nonfinite")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_port_onto_nonfinite_target_refused_with_tensor_name(family, run, bad):
    make_base(family / "v3", 7)
    _poison(family / "v3", value=bad)
    run("base", "add", "tiny@v3", family / "v3", "--allow-nonfinite")
    line = one_error_line(run("port", "task", "tiny@v3", family / "o", code=None))
    assert "model.layers.0.mlp.up_proj.weight" in line and "--allow-nonfinite" in line
    assert not (family / "o").exists() and not no_partial_dirs(family)
    assert run("ls", "--derived", "--json").stdout.strip() == "[]"
    run("port", "task", "tiny@v3", family / "o", "--allow-nonfinite")  # when it is meant
    line = one_error_line(run("apply", "task", family / "v3", family / "o2", "--no-register", code=None))
    assert "NaN/Inf" in line


def test_diagnose_never_calls_a_nan_base_safe(tmp_path):
    import patchlab
    from patchlab.errors import NonFiniteError
    from patchlab.measure.diagnose import diagnose
    from patchlab.measure.verdict import port_verdict
    from tests.factory import make_model

    base = make_model(tmp_path / "b")
    ft = make_model(tmp_path / "ft", from_model=base, noise=0.02, seed=1)
    tgt = make_model(tmp_path / "t", from_model=base, noise=0.001, seed=2)
    p = patchlab.extract(base, ft, tmp_path / "p")
    _poison(tgt, "model.layers.1.mlp.down_proj.weight")
    with pytest.raises(NonFiniteError, match="model.layers.1.mlp.down_proj.weight"):
        diagnose(p.path, tgt)
    from patchlab.kernels.drift import DriftAccumulator

    stats = DriftAccumulator().stats()
    stats = type(stats)(**{**stats.__dict__, "drift_rel_delta": float("nan")})
    assert port_verdict(stats).level != "safe to port"


# ---- 5. ambiguity is an error that lists the candidates ------------------------------------------------------


def test_digest_prefix_of_several_patches_is_refused_by_every_command(family, run):
    run("add", family / "p1", "--name", "other")
    run("add", family / "p1", "--name", "third")
    digest = json.loads(run("show", "task", "--json").stdout)["digest"]
    for args in (("rm", digest[:10]), ("show", digest[:10]), ("log", digest[:10]), ("path", digest[:10])):
        line = one_error_line(run(*args, code=None))
        assert "other@1" in line and "task@1" in line and "third@1" in line
    assert len(json.loads(run("ls", "--json").stdout)) == 3  # rm removed nothing


def test_alias_that_is_also_a_patch_name_is_refused(family, run):
    run("add", family / "p1", "--name", "prod")
    run("diff", "tiny@v2", family / "ft", family / "p3", "--name", "fix")
    run("alias", "set", "prod", "fix@1")
    line = one_error_line(run("rm", "prod", code=None))
    assert "prod@1" in line and "fix@prod" in line
    assert len(json.loads(run("ls", "--json").stdout)) == 3


def test_base_content_prefix_of_several_bases_is_refused(family, run):
    run("base", "add", "other@v1", family / "v1")  # the same weights under another family
    content = json.loads(run("show", "tiny@v1", "--json").stdout)["content"]
    hex_digits = content.removeprefix("blake3:")
    assert hex_digits != content  # a new fingerprint names its algorithm
    for prefix in (hex_digits[:10], "blake3:" + hex_digits[:10]):  # as listings show it, or as recorded
        line = one_error_line(run("show", prefix, "--kind", "base", code=None))
        assert "tiny@v1" in line and "other@v1" in line


# ---- 6. repairs that repair, rows that should not exist ------------------------------------------------------


def test_readding_a_patch_repairs_its_damaged_blobs(family, run):
    blobs = [p for p in (family / "home" / "blobs" / "sha256").rglob("*") if p.is_file()]
    victim = max(blobs, key=lambda p: p.stat().st_size)
    victim.chmod(0o644)
    victim.write_bytes(b"broken")
    assert "damaged" in run("verify", code=1).stdout
    run("add", family / "p1", "--name", "task")  # the repair verify recommends
    assert "all good" in run("verify").stdout


def test_add_refuses_shards_that_disagree_with_the_manifest(family, run):
    shard = next((family / "p1").glob("delta-*.safetensors"))
    sd = load_file(str(shard))
    k = next(iter(sd))
    sd[k] = sd[k][:-1]
    save_file(sd, str(shard))
    line = one_error_line(run("add", family / "p1", "--name", "bad", code=None))
    assert k in line and "manifest" in line
    sd[k] = torch.zeros(3, dtype=torch.int32)
    assert "bad" not in run("ls").stdout


def test_diff_checks_registration_before_writing(family, run):
    make_base(family / "unreg", 9)
    line = one_error_line(run("diff", family / "unreg", family / "ft", family / "pX", code=None))
    assert "not in the registry" in line and "--no-register" in line
    assert not (family / "pX").exists()
    line = one_error_line(run("diff", "tiny@v1", family / "ft", family / "pY", "--parent", "nope@3", code=None))
    assert not (family / "pY").exists()
    line = one_error_line(run("diff", "tiny@v1", family / "ft", family / "pZ", "--name", "bad name", code=None))
    assert not (family / "pZ").exists()


def test_export_peft_records_the_base_it_was_given(tmp_path):
    import patchlab
    from patchlab.methods.compress import compress
    from tests.factory import make_model

    base = make_model(tmp_path / "v1")
    v2 = make_model(tmp_path / "v2", from_model=base, noise=0.01, seed=3)
    ft = make_model(tmp_path / "ft", from_model=base, noise=0.02, seed=1)
    p = patchlab.extract(base, ft, tmp_path / "p")
    lr = compress(p.path, tmp_path / "lr", rank=2)
    r = CliRunner().invoke(app, ["export-peft", str(lr.path), str(tmp_path / "ad"), "--base", str(v2)])
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(v2)


# ---- 8. a read-only registry can still be read ----------------------------------------------------------------


def _read_only(home: Path):
    for p in [home, *home.rglob("*")]:
        p.chmod(p.stat().st_mode & ~0o222)


def _writable(home: Path):
    for p in [home, *home.rglob("*")]:
        p.chmod(p.stat().st_mode | 0o200)


def test_read_only_registry_reads(family, run):
    home = family / "home"
    ro = f"sqlite:///{home / 'registry.db'}?mode=ro"
    _read_only(home)
    try:
        before = tree_state(home)
        assert "task@1" in run("ls", registry=ro).stdout
        assert json.loads(run("show", "task", "--json", registry=ro).stdout)["ref"] == "task@1"
        assert "task@1" in run("log", "task", registry=ro).stdout
        assert "all good" in run("verify", registry=ro).stdout
        line = one_error_line(run("tag", "add", "task", "x", registry=ro, code=None))
        assert "read-only" in line
        assert tree_state(home) == before
    finally:
        _writable(home)


def test_read_only_mount_is_read(family, run):
    """A registry on a real read-only mount (a tmpfs remounted ro in a private mount namespace: root cannot
    write there either): ls, show, log and verify work, a write fails in one line."""
    import shutil
    import subprocess
    import sys

    if not shutil.which("unshare"):
        pytest.skip("needs unshare(1) to mount a read-only file system privately")
    home, mnt = family / "home", family / "mnt"
    mnt.mkdir()
    root = Path(__file__).resolve().parents[2]
    cli = f"{sys.executable} -m cli.app -R {mnt}"
    script = (
        f"mount -t tmpfs tmpfs {mnt} && cp -a {home}/. {mnt}/ && mount -o remount,ro {mnt} || exit 97; "
        f"{cli} ls && {cli} show task --json && {cli} log task && {cli} verify && echo READS-OK; "
        f"{cli} tag add task x; echo write-rc=$?"
    )
    r = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=root, capture_output=True, text=True)
    if r.returncode == 97 or "unshare:" in r.stderr:
        pytest.skip(f"cannot mount a read-only file system here: {r.stderr.strip()[:200]}")
    assert "READS-OK" in r.stdout and "task@1" in r.stdout, r.stdout + r.stderr
    assert "write-rc=1" in r.stdout and "Traceback" not in r.stderr, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "read-only" in errors[0], r.stderr


def test_eval_output_never_replaces_a_users_file(tmp_path):
    """``eval -o`` replaces an earlier result, never a file of the user's own (found hunting class 1)."""
    from fixtures import EVAL, model_path

    task = tmp_path / "task.jsonl"
    task.write_text("\n".join((EVAL / "task.jsonl").read_text().splitlines()[:2]) + "\n")
    mine = tmp_path / "notes.json"
    mine.write_text('{"my": "notes"}')
    r = CliRunner().invoke(app, ["eval", str(model_path("v1")), str(task), "-o", str(mine), "--device", "cpu"])
    assert "not a patchlab evaluation result" in one_error_line(r)
    assert mine.read_text() == '{"my": "notes"}'
    out = tmp_path / "res.json"
    for _ in range(2):  # an earlier result is replaced
        r = CliRunner().invoke(app, ["eval", str(model_path("v1")), str(task), "-o", str(out), "--device", "cpu"])
        assert r.exit_code == 0, r.output


def test_output_whose_registration_failed_is_an_orphan_gc_lists_and_the_rerun_finishes(family, run, monkeypatch):
    import registry.derived as derived

    real = derived.Derived.add_derived

    def down(*a, **k):
        raise OSError(5, "Input/output error", str(family / "home" / "registry.db"))

    monkeypatch.setattr(derived.Derived, "add_derived", down)
    out = family / "ported"
    one_error_line(run("port", "task", "tiny@v2", out, code=None))
    assert out.is_dir()
    assert json.loads(run("gc", "--json").stdout)["orphans"] == [str(out)]
    monkeypatch.setattr(derived.Derived, "add_derived", real)
    assert "recorded derived:1" in run("port", "task", "tiny@v2", out).stdout  # no --overwrite needed
    assert json.loads(run("gc", "--json").stdout)["orphans"] == []
    line = one_error_line(run("port", "task", "tiny@v2", out, code=None))  # now it is registered: refused
    assert "derived:1" in line
