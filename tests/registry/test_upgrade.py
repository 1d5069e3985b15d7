"""The upgrade workflow on the tiny family: three patches on v1 follow v2, gated; bad input and faults give one
clear line, a run failed at the right step, and resume with the same call. Every test runs on SQLite and on
the suite's PostgreSQL server (module-wide ``backend``: each backend builds its family once)."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from sqlalchemy.exc import OperationalError

import patchlab
from registry import UnknownReferenceError
from registry.upgrades import LeaseHeldError
from registry.workflows import upgrade_tasks
from registry.workflows.upgrade import UpgradeError, plan_upgrade, run_upgrade
from tests.registry.conftest import BACKENDS
from tests.upgrade_helpers import (
    MODELS,
    build_family,
    check_end_to_end,
    copy_family,
    differences,
    state,
    strays,
    unordered,
)


def tensors_of(model_dir) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def family(request, backend, tmp_path_factory):
    server = request.getfixturevalue("pg_server") if backend == "postgresql" else None
    return build_family(tmp_path_factory.mktemp("family"), backend=backend, server=server)


@pytest.fixture(scope="module")
def reference(family, tmp_path_factory):
    """One uninterrupted upgrade (module-wide): its registry and final state."""
    fam = copy_family(family, tmp_path_factory.mktemp("reference") / "fam")
    with fam.open() as reg:
        result = run_upgrade(reg, "tiny", "v2", device="cpu")
    return fam, result, state(fam)


def test_end_to_end_pass_fail_lineage_alias_summary(reference, tmp_path):
    fam, result, _ = reference
    check_end_to_end(fam, result)
    with fam.open() as reg:
        run = reg.get_run(result.run.id)
        # no vocabulary change: each NAME@2 is NAME@1's Δ on v2 (shared blobs), ported from the stored patch,
        # and applying it to v2 gives the model the suite evaluated, bit for bit
        assert all(s.outcome.get("carried") for s in run.steps if s.step == "register")
        for name in ("task", "stored", "strict"):
            shared = {dg for _, dg, _ in reg.get_patch(f"{name}@1", detail=True).files}
            assert {dg for n, dg, _ in reg.get_patch(f"{name}@2", detail=True).files if n != "patch.json"} <= shared
            out = tmp_path / name
            patchlab.apply(reg.patch_path(f"{name}@2"), reg.checkpoint_path("tiny@v2"), out, device="cpu")
            evaluated = fam.home / "upgrades" / f"run-{result.run.id}" / "models" / name
            a, b = tensors_of(out), tensors_of(evaluated)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_same_command_again_does_nothing_twice(reference, tmp_path):
    fam, result, before = reference
    with fam.open() as reg:
        again = run_upgrade(reg, "tiny", "v2", device="cpu")
    assert again.already_done and again.run.id == result.run.id
    assert state(fam) == before


def test_dry_run_plans_with_verdicts_and_writes_nothing(family, tmp_path):
    fam = copy_family(family, tmp_path / "fam")
    before = state(fam)
    with fam.open() as reg:
        plan = plan_upgrade(reg, "tiny", "v2", verdicts=True, device="cpu")
    assert [p.source for p in plan.patches] == ["stored@1", "strict@1", "task@1"]
    assert {p.verdict for p in plan.patches} == {"safe to port"}
    assert plan.problems == [] and plan.vocab_change is None and plan.disk_needed > 0
    assert state(fam) == before and not (fam.home / "upgrades").exists()


def test_vocabulary_change_needs_an_explicit_policy(family, tmp_path):
    fam = copy_family(family, tmp_path / "fam")
    with fam.open() as reg:
        reg.add_base("tiny", "v2-vocab", MODELS / "v2-vocab")
        plan = plan_upgrade(reg, "tiny", "v2-vocab")
        assert plan.vocab_change == (320, 328) and "--vocab-policy" in plan.problems[0]
        with pytest.raises(UpgradeError, match="vocabulary changes"):
            run_upgrade(reg, "tiny", "v2-vocab", device="cpu")
        assert reg.list_runs() == []
        ok = plan_upgrade(reg, "tiny", "v2-vocab", vocab_policy="pad-zero")
        assert ok.problems == [] and ok.vocab_policy == "pad-zero"
        # with the policy, rows move: the port is fused from the fine-tune and NAME@2 is re-extracted against
        # the new base (its Δ is not NAME@1's), and it reproduces the evaluated model
        res = run_upgrade(reg, "tiny", "v2-vocab", vocab_policy="pad-zero", patches=["task"], device="cpu")
        steps = {s.step: s for s in reg.get_run(res.run.id).steps if s.patch == "task"}
        assert steps["port"].outcome["fused"] and not steps["register"].outcome.get("carried")
        new = reg.get_patch(steps["register"].outcome["ref"])
        assert new.base == "tiny@v2-vocab" and new.method == "extract"
        out = patchlab.apply(
            reg.patch_path(new.ref), reg.checkpoint_path("tiny@v2-vocab"), tmp_path / "a", device="cpu"
        )
        a, b = tensors_of(out.path), tensors_of(fam.home / "upgrades" / f"run-{res.run.id}" / "models" / "task")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_input_is_one_clear_line(family, tmp_path):
    fam = copy_family(family, tmp_path / "fam")
    with fam.open() as reg:
        with pytest.raises(UpgradeError, match="not newer than tiny@v2"):
            plan_upgrade(reg, "tiny", "v1", from_version="v2")
        with pytest.raises(UnknownReferenceError, match="no base family 'nope'"):
            run_upgrade(reg, "nope", "v2")
        reg.add_base("other", "v1", MODELS / "tied-v1")
        reg.add_base("other", "v2", MODELS / "tied-v2")
        with pytest.raises(UpgradeError, match="has no patches on a release older than v2"):
            plan_upgrade(reg, "other", "v2")
        with pytest.raises(UpgradeError, match="not a release of family other"):
            plan_upgrade(reg, "other", "v2", patches=["task"])
        with pytest.raises(UpgradeError, match="not newer than the releases"):
            plan_upgrade(reg, "tiny", "v1")


def _fault_then_resume(fam, monkeypatch, target, step, match):
    with fam.open() as reg:
        with pytest.raises(UpgradeError, match=match) as e:
            run_upgrade(reg, "tiny", "v2", device="cpu")
        assert "\n" not in str(e.value) and "rerun the same command" in str(e.value)
        run = reg.get_run()
        assert run.state == "failed" and run.failed_step == f"{target}:{step}"
        monkeypatch.undo()
        done = run_upgrade(reg, "tiny", "v2", device="cpu")
        assert done.resumed and done.run.id == run.id and done.run.state == "done"
    return done


def test_disk_full_mid_run_fails_the_step_and_resumes(family, reference, tmp_path, monkeypatch):
    fam = copy_family(family, tmp_path / "fam")
    real = upgrade_tasks.port_task

    def full(**kw):
        if kw["out"].endswith("strict"):
            raise OSError(errno.ENOSPC, "No space left on device", kw["out"])
        return real(**kw)

    monkeypatch.setattr(upgrade_tasks, "port_task", full)
    _fault_then_resume(fam, monkeypatch, "strict", "port", "failed at step port of strict@1: no space left")
    assert not differences(state(fam), reference[2]), differences(state(fam), reference[2]) and strays(fam) == []


def test_a_diagnosis_that_fails_after_its_port_resumes_from_the_ports_sums(family, reference, tmp_path, monkeypatch):
    """The port left its gathered sums (reports/NAME.observed-sums.json); the driver failed finishing the
    diagnosis: the rerun finishes it from that file without porting again, and ends where an uninterrupted run does."""
    from patchlab.measure import diagnose as dg

    fam = copy_family(family, tmp_path / "fam")

    def broken(self, data):
        raise OSError(errno.EIO, "Input/output error", "observed sums")

    monkeypatch.setattr(dg.Diagnosis, "load_observed", broken)
    done = _fault_then_resume(fam, monkeypatch, "stored", "diagnose", "failed at step diagnose of stored@1")
    ports = [s for s in done.run.steps if s.patch == "stored" and s.step == "port"]
    assert [s.attempts for s in ports] == [1]  # not ported twice
    assert not differences(state(fam), reference[2]), differences(state(fam), reference[2])
    assert strays(fam) == []


def test_missing_eval_file_fails_at_evaluate_and_resumes(family, reference, tmp_path, monkeypatch):
    fam = copy_family(family, tmp_path / "fam")
    suite = fam.home.parent / "suite.jsonl"
    text = suite.read_text()
    suite.unlink()

    class Restore:
        def undo(self):
            suite.write_text(text)

    _fault_then_resume(fam, Restore(), "stored", "evaluate", "suite file .*suite.jsonl of patch stored is missing")
    assert not differences(state(fam), reference[2]), differences(state(fam), reference[2])


def test_one_commit_between_two_steps_and_every_end_recorded(family, tmp_path, monkeypatch):
    """The driver records a step's end with the next step's start (one write transaction between two steps),
    and the last step's end on its own: every step row ends done or skipped, timed, attempted once."""
    fam = copy_family(family, tmp_path / "fam")
    from registry.upgrades import Upgrades

    real, calls = Upgrades.step_moved, []

    def spy(self, run_id, patch, *, ended=None, starts=None, **kw):
        calls.append((patch, ended.step if ended is not None else None, starts))
        return real(self, run_id, patch, ended=ended, starts=starts, **kw)

    monkeypatch.setattr(Upgrades, "step_moved", spy)
    with fam.open() as reg:
        res = run_upgrade(reg, "tiny", "v2", patches=["task"], device="cpu")
        steps = [s for s in reg.get_run(res.run.id).steps if s.patch == "task"]
    order = [c[2] for c in calls if c[2] is not None]
    assert sorted(order) == sorted(s.step for s in steps) and len(calls) == len(order) + 1
    assert calls[0][1] is None and calls[-1][2] is None
    # each call but the first ends the step the one before it started
    assert [c[1] for c in calls[1:]] == order
    for s in steps:
        assert s.state in ("done", "skipped") and s.attempts == 1 and s.seconds is not None and s.seconds >= 0, s
        assert s.finished_at >= s.started_at, s


def test_database_gone_mid_run_is_one_line_and_resumable(family, reference, tmp_path, monkeypatch):
    fam = copy_family(family, tmp_path / "fam")
    from registry.upgrades import Upgrades

    real = Upgrades.step_moved

    def flaky(self, run_id, patch, *, ended=None, **kw):
        # the database goes away as the driver records that strict's register step finished
        if patch == "strict" and ended is not None and ended.step == "register":
            raise OperationalError("UPDATE upgrade_steps", {}, Exception("unable to open database file"))
        return real(self, run_id, patch, ended=ended, **kw)

    monkeypatch.setattr(Upgrades, "step_moved", flaky)
    with fam.open() as reg:
        with pytest.raises(UpgradeError, match="failed at step register of strict@1: the registry database") as e:
            run_upgrade(reg, "tiny", "v2", device="cpu")
        assert "\n" not in str(e.value) and "rerun the same command" in str(e.value)
        monkeypatch.undo()
        assert run_upgrade(reg, "tiny", "v2", device="cpu").run.state == "done"
    assert not differences(state(fam), reference[2]), differences(state(fam), reference[2])


def test_second_run_refuses_while_a_live_holder_has_the_lease(family, tmp_path):
    import datetime as dt
    import socket
    import subprocess
    import sys

    from registry.rows import LeaseRow, utcnow

    fam = copy_family(family, tmp_path / "fam")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with fam.open() as reg:
            with reg.db.write() as s:
                s.add(
                    LeaseRow(
                        key="tiny@v2",
                        holder_pid=holder.pid,
                        holder_host=socket.gethostname(),
                        token="x",
                        expires_at=utcnow() + dt.timedelta(seconds=60),
                    )
                )
            with pytest.raises(LeaseHeldError, match=f"already running \\(pid {holder.pid}"):
                run_upgrade(reg, "tiny", "v2", device="cpu")
            assert reg.list_runs() == []
            holder.kill()
            holder.wait()
            # the holder died (kill -9): its lease is taken over at once
            token = reg.acquire_lease("tiny@v2")
            assert reg.lease_holder("tiny@v2")["pid"] != holder.pid
            reg.release_lease("tiny@v2", token)
    finally:
        holder.kill()
        holder.wait()


_TAKER = """
import sys, time
from registry import Registry
from registry.upgrades import LeaseHeldError
reg = Registry(sys.argv[1])
while time.time() < float(sys.argv[2]):
    pass
try:
    token = reg.acquire_lease("tiny@v2", seconds=60)
    print("got", flush=True)
    time.sleep(float(sys.argv[3]))
    reg.release_lease("tiny@v2", token)
except LeaseHeldError:
    print("held", flush=True)
"""


def _takers(fam, n, start_in, hold):
    import subprocess
    import sys
    import time

    from tests.upgrade_helpers import ROOT

    env = {**os.environ, **fam.env(), "PYTHONPATH": str(ROOT)}
    at = str(time.time() + start_in)
    return [
        subprocess.Popen(
            [sys.executable, "-c", _TAKER, fam.target, at, str(hold)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(n)
    ]


def test_concurrent_lease_takers_exactly_one_wins(family, tmp_path):
    """Processes racing for one family+version's lease at the same instant: one holds it, the rest refuse."""
    fam = copy_family(family, tmp_path / "fam")
    procs = _takers(fam, 4, start_in=4.0, hold=1.0)
    outs = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert [p.returncode for p in procs] == [0] * 4
    assert outs == ["got", "held", "held", "held"], outs


def test_second_run_waits_for_the_first_with_wait(family, tmp_path):
    """``--wait``: the second run of one family+version waits until the holder lets go, then runs once."""
    fam = copy_family(family, tmp_path / "fam")
    (holder,) = _takers(fam, 1, start_in=0.0, hold=4.0)
    assert holder.stdout.readline().strip() == "got"
    logs: list[str] = []
    with fam.open() as reg:
        res = run_upgrade(reg, "tiny", "v2", device="cpu", patches=["task"], wait=True, log=logs.append)
        assert res.run.state == "done" and len(reg.list_runs()) == 1
        assert reg.lease_holder("tiny@v2") is None
    holder.communicate(timeout=60)
    assert any(line.startswith("waiting: the upgrade of tiny@v2 is already running") for line in logs), logs


def _chromium() -> str | None:
    import shutil

    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_summary_html_renders_in_headless_chromium(reference, tmp_path):
    """The self-contained summary page, loaded by a real browser: the table is there, row by row."""
    import os
    import subprocess

    exe = _chromium()
    if exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is missing (.ci/run installs it)")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    fam, result, _ = reference
    page = fam.home / "upgrades" / f"run-{result.run.id}" / "summary.html"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(
        [exe, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert '<table id="summary">' in dom
    for name, gate in (("task", "PASS"), ("stored", "PASS"), ("strict", "FAIL")):
        row = dom.split(f'data-patch="{name}"', 1)[1].split("</tr>", 1)[0]
        assert f"<td>{gate}</td>" in row and f'href="reports/{name}.html"' in row
    assert dom.count("<svg") == 2
    shot = tmp_path / "summary.png"
    subprocess.run(
        [exe, *flags, f"--screenshot={shot}", "--window-size=1200,900", page.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 5000


def test_two_jobs_give_the_same_result(family, reference, tmp_path):
    """``--jobs 2`` (local threads): the same registry as one job, and no stray outputs."""
    fam = copy_family(family, tmp_path / "fam")
    with fam.open() as reg:
        res = run_upgrade(reg, "tiny", "v2", device="cpu", jobs=2)
        assert res.run.state == "done"

    assert unordered(state(fam)) == unordered(reference[2])
    assert strays(fam) == []


def test_the_bases_are_measured_once_and_each_diagnosis_comes_from_its_port(reference, tmp_path, monkeypatch):
    """Patches that record their drift sums are diagnosed on their ports' reads of v2 and Δ; v1 is read once per
    run (one base-drift file), the figures are those of `patchlab diagnose`, and NAME@2 records its sums on v2."""
    import patchlab.engine.executor
    from patchlab.measure.diagnose import PortDiagnostics, diagnose

    # the module-wide run used the default chunks (set up before the per-test small ones): the same sums need them
    monkeypatch.setattr(patchlab.engine.executor, "CHUNK_ELEMS", 1 << 19)
    fam, result, _ = reference
    reports = fam.home / "upgrades" / f"run-{result.run.id}" / "reports"
    assert [p.name for p in reports.glob("base-drift-*.json")] == ["base-drift-tiny@v1.json"]
    with fam.open() as reg:
        for name in ("task", "stored", "strict"):
            old = patchlab.Patch.open(reg.patch_path(f"{name}@1"))
            assert all(e.drift_sums for e in old.entries()), name
            got = PortDiagnostics.from_json(json.loads((reports / f"{name}.diagnostics.json").read_text()))
            want = diagnose(old.path, reg.checkpoint_path("tiny@v2"), intruders=False, device="cpu")
            assert got.to_json()["tensors"] == want.to_json()["tensors"], name
            new = patchlab.Patch.open(reg.patch_path(f"{name}@2"))
            assert {e.name for e in new.entries() if e.drift_sums} == set(new.names), name
