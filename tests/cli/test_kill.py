"""Issue 10.7: what ``kill -9`` leaves, and how it is cleaned.

Each test runs the real CLI in a subprocess, SIGKILLs it at a chosen moment (polling for the partial
output, the scratch copies, or, through a hook, right after the output appeared and before its registry
row), then checks: ``patchlab gc`` removes every leftover, ``patchlab verify`` is clean, a rerun of the same
command completes (recognising its own orphan), and no ``.partial-``/``.old-`` directory or scratch copy
remains.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.app import app
from tests.conftest import no_partial_dirs

ROOT = Path(__file__).resolve().parents[2]
HOOK = """
import os, signal, sys
import {module} as m
def _killed(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)
setattr(m.{cls}, {meth!r}, _killed)
from cli.app import app
sys.argv = ["patchlab", *sys.argv[1:]]
app()
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tests.factory import make_model

    tmp = tmp_path_factory.mktemp("killmodels")
    v1 = make_model(tmp / "v1", hidden=256, layers=4)
    v2 = make_model(tmp / "v2", from_model=v1, noise=0.001, seed=2, hidden=256, layers=4)
    ft = make_model(tmp / "ft", from_model=v1, noise=0.02, seed=1, hidden=256, layers=4)
    (tmp / "task.jsonl").write_text(
        "".join(
            json.dumps({"id": f"q{i}", "type": "generation", "prompt": f"question {i}", "answer": "x"}) + "\n"
            for i in range(4)
        )
    )
    return {"v1": v1, "v2": v2, "ft": ft, "task": tmp / "task.jsonl"}


@pytest.fixture
def env(tmp_path, models, monkeypatch):
    home = tmp_path / "home"
    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))  # where report's scratch copies go (and gc looks)
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    runner = CliRunner()

    def cli(*args, code: int | None = 0):
        r = runner.invoke(app, ["-R", str(home), *map(str, args)])
        if code is not None:
            assert r.exit_code == code, (args, r.output)
        return r

    cli("init")
    cli("base", "add", "tiny@v1", models["v1"])
    cli("base", "add", "tiny@v2", models["v2"])
    return {"home": home, "cli": cli, "out": tmp_path / "outputs", "scratch": scratch, **models}


def spawn(env, *args, hook: tuple[str, str, str] | None = None) -> subprocess.Popen:
    argv = ["-R", str(env["home"]), *map(str, args)]
    e = {**os.environ, "TMPDIR": str(env["scratch"]), "PATCHLAB_WORKERS": "1"}
    if hook is None:
        cmd = [sys.executable, "-m", "cli.app", *argv]
    else:
        module, cls, meth = hook
        cmd = [sys.executable, "-c", HOOK.format(module=module, cls=cls, meth=meth), *argv]
    return subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def kill_when(proc: subprocess.Popen, ready, timeout: float = 120.0) -> bool:
    """SIGKILL ``proc`` as soon as ``ready()``; False if it ended first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            return False
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.002)
    proc.kill()
    raise AssertionError("timed out waiting for the moment to kill")


def partials(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if ".partial-" in p.name] if parent.is_dir() else []


def partial_with_bytes(parent: Path, at_least: int):
    def ready() -> bool:
        for p in partials(parent):
            try:
                if sum(f.stat().st_size for f in p.iterdir() if f.suffix == ".safetensors") >= at_least:
                    return True
            except OSError:
                pass
        return False

    return ready


def assert_clean_after_gc_and_rerun(env, rerun: tuple, out: Path, kind: str) -> None:
    cli = env["cli"]
    gc = json.loads(cli("gc", "--json").stdout)
    assert not no_partial_dirs(out.parent), gc
    assert not [p for p in env["scratch"].iterdir() if p.name.startswith("patchlab-")], gc
    cli("verify")
    derived_before = json.loads(cli("ls", "--derived", "--json").stdout)
    registered = kind == "derived" and any(Path(d["path"]) == out.resolve() for d in derived_before)
    r = cli(*rerun, code=None)
    if registered:  # the kill came after the row: the rerun refuses to replace a registered model
        assert r.exit_code == 1 and "derived:" in r.stderr
    else:
        assert r.exit_code == 0, r.output
    assert not no_partial_dirs(out.parent)
    cli("verify")
    gc = json.loads(cli("gc", "--json").stdout)
    assert not gc["leftovers"] and not gc["orphans"], gc
    assert not list((env["home"] / "journal").glob("*.json")) if (env["home"] / "journal").exists() else True
    if kind == "derived":
        rows = [d for d in json.loads(cli("ls", "--derived", "--json").stdout) if Path(d["path"]) == out.resolve()]
        assert len(rows) == 1, rows


def _diff(env, out: Path) -> tuple:
    return ("diff", "tiny@v1", env["ft"], out, "--name", "task")


def test_kill_port_while_writing(env):
    env["cli"](*_diff(env, env["out"] / "patch"))
    out = env["out"] / "ported"
    args = ("port", "task", "tiny@v2", out)
    kills = 0
    for moment in (partials, partial_with_bytes(out.parent, 1 << 20)):
        p = spawn(env, *args)
        ready = (
            (lambda: any((d / ".patchlab-output.json").is_file() for d in partials(out.parent)))
            if (moment is partials)
            else moment
        )
        if kill_when(p, ready):
            kills += 1
            assert not out.exists() and partials(out.parent)  # what a kill leaves
            gc = json.loads(env["cli"]("gc", "--dry-run", "--json").stdout)
            assert any(".partial-" in x for x in gc["leftovers"]), gc
    assert kills, "the port always finished before it could be killed"
    assert_clean_after_gc_and_rerun(env, args, out, "derived")


def test_kill_port_between_output_and_row_rerun_finishes(env):
    env["cli"](*_diff(env, env["out"] / "patch"))
    out = env["out"] / "ported"
    args = ("port", "task", "tiny@v2", out)
    p = spawn(env, *args, hook=("registry.derived", "Derived", "add_derived"))
    p.wait()
    assert p.returncode == -signal.SIGKILL
    assert out.is_dir() and json.loads(env["cli"]("ls", "--derived", "--json").stdout) == []
    gc = json.loads(env["cli"]("gc", "--json").stdout)
    assert gc["orphans"] == [str(out)]  # listed, not removed: the rerun finishes the job
    r = env["cli"](*args)
    assert "recorded derived:1" in r.stdout
    assert_clean_after_gc_and_rerun(env, args, out, "derived")


def test_kill_registered_diff(env):
    out = env["out"] / "patch"
    args = _diff(env, out)
    p = spawn(env, *args)
    assert kill_when(p, partial_with_bytes(out.parent, 1 << 20)), "the diff finished before it could be killed"
    assert not out.exists()
    assert_clean_after_gc_and_rerun(env, args, out, "patch")
    assert [x["ref"] for x in json.loads(env["cli"]("ls", "--json").stdout)] == ["task@1"]
    # killed after the patch directory appeared, before its row: the rerun registers it
    out2 = env["out"] / "patch2"
    args2 = ("diff", "tiny@v2", env["ft"], out2, "--name", "other")
    p = spawn(env, *args2, hook=("registry.patches", "Patches", "add_patch"))
    p.wait()
    assert out2.is_dir() and "other" not in env["cli"]("ls").stdout
    assert_clean_after_gc_and_rerun(env, args2, out2, "patch")
    assert "other@1" in env["cli"]("ls").stdout


def test_kill_report_leaves_nothing_after_gc(env):
    env["cli"](*_diff(env, env["out"] / "patch"))
    out = env["out"] / "report"
    args = ("report", "task", "tiny@v2", "--eval", env["task"], "-o", out, "--device", "cpu", "--no-intruders")

    def copies(min_files: int):
        def ready() -> bool:
            for d in env["scratch"].glob("patchlab-compat-*"):
                if sum(1 for f in d.rglob("*.safetensors")) >= min_files:
                    return True
            return False

        return ready

    kills = 0
    for moment in (copies(1), copies(2)):  # while the first model copy is written; once both exist
        p = spawn(env, *args)
        if kill_when(p, moment, timeout=300):
            kills += 1
            assert list(env["scratch"].glob("patchlab-compat-*"))  # the copies a killed report leaves
            gc = json.loads(env["cli"]("gc", "--dry-run", "--json").stdout)
            assert any("scratch copy" in x for x in gc["leftovers"]), gc
    assert kills == 2
    env["cli"]("gc")
    assert not list(env["scratch"].glob("patchlab-compat-*"))
    env["cli"]("verify")
    r = env["cli"](*args)
    assert (out / "report.md").is_file() and "verdict" in r.stdout
    assert not list(env["scratch"].glob("patchlab-compat-*")) and not no_partial_dirs(out.parent)


def test_kill_merge_while_writing_and_before_its_row(env):
    """A merge killed mid-write leaves only a partial directory gc removes; killed after its output appeared
    and before its registry row, the rerun registers it."""
    env["cli"](*_diff(env, env["out"] / "patch"))
    env["cli"]("diff", "tiny@v1", env["v2"], env["out"] / "drift", "--name", "drift")
    out = env["out"] / "merged"
    args = ("merge", "task", "drift", "--method", "ties", "--density", "0.5", "-o", out, "--name", "blend")
    p = spawn(env, *args)
    # as for port: once the partial directory carries its marker (a kill between mkdir and the marker leaves a
    # directory gc cannot tell from a user's, and keeps)
    if kill_when(p, lambda: any((d / ".patchlab-output.json").is_file() for d in partials(out.parent))):
        assert not out.exists()
    assert_clean_after_gc_and_rerun(env, args, out, "patch")
    assert "blend@1" in env["cli"]("ls").stdout
    out2 = env["out"] / "merged2"
    args2 = ("merge", "task", "drift", "-o", out2, "--name", "blend2")
    p = spawn(env, *args2, hook=("registry.patches", "Patches", "add_patch"))
    p.wait()
    assert p.returncode == -signal.SIGKILL
    assert out2.is_dir() and "blend2" not in env["cli"]("ls").stdout
    assert_clean_after_gc_and_rerun(env, args2, out2, "patch")
    assert "blend2@1" in env["cli"]("ls").stdout
