"""Base drifts (``registry.drifts``): a new release's drift from the older releases that carry patches is measured
by ``base add`` and recorded; upgrades and dry-run verdicts use it and read the old base for nothing."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
from sqlalchemy import func, select, update
from typer.testing import CliRunner

import patchlab
from cli.app import app
from patchlab.io.checkpoint import Checkpoint
from patchlab.measure.diagnose import PortDiagnostics, base_drift, diagnose
from registry import Registry
from registry.errors import AlreadyExistsError
from registry.rows import BaseDriftRow
from registry.workflows.upgrade import plan_upgrade, run_upgrade

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "fixtures" / "models"
TASK = ROOT / "fixtures" / "eval" / "task.jsonl"


def with_patch_then_release(reg: Registry, f: dict[str, Path]) -> Registry:
    """fam@1, the patch on it, then fam@2 (whose drift from fam@1 base add records)."""
    reg.add_base("fam", "1", f["v1"])
    reg.add_patch(f["patch"], name="task", base="fam@1")
    reg.add_base("fam", "2", f["v2"])
    return reg


def drift_rows(reg: Registry) -> int:
    with reg.db.read() as s:
        return s.execute(select(func.count()).select_from(BaseDriftRow)).scalar_one()


def test_a_new_release_records_its_drift_from_the_release_its_patches_are_on(registry_target, bf16_family):
    f = bf16_family
    with Registry.init(registry_target) as reg:
        reg.add_base("fam", "1", f["v1"])
        reg.add_base("other", "1", f["v1"])
        reg.add_base("other", "2", f["v2"])  # no patches on other@1: nothing to measure
        assert drift_rows(reg) == 0
        reg.add_patch(f["patch"], name="task", base="fam@1")
        reg.add_base("fam", "2", f["v2"])
        got = reg.base_drift("fam@1", "fam@2")
        assert got is not None and drift_rows(reg) == 1
        names = [n for n in Checkpoint.open(f["v1"]).names]
        want = base_drift(f["v1"], f["v2"], names, device="cpu")
        assert {k: asdict(v) for k, v in got.tensors.items()} == {k: asdict(v) for k, v in want.tensors.items()}
        assert got.target_sumsq == want.target_sumsq
        assert (Path(got.source), Path(got.target)) == (f["v1"].resolve(), f["v2"].resolve())
        stats = reg.drifts_to("fam@2")
        assert list(stats) == ["fam@1"] and stats["fam@1"].drift_rel_base > 0
        # the patch still lives on fam@1 only: a third release is measured from fam@1, unless told not to
        reg.add_base("fam", "3", f["v3"], drift=False)
        assert reg.base_drift("fam@1", "fam@3") is None and reg.drifts_to("fam@3") == {}


def test_a_recorded_drift_stands_only_for_the_content_it_was_measured_on(registry_target, bf16_family):
    f = bf16_family
    with with_patch_then_release(Registry.init(registry_target), f) as reg:
        assert reg.base_drift("fam@1", "fam@2") is not None
        with reg.db.write() as s:
            s.execute(update(BaseDriftRow).values(source_content="blake3:" + "0" * 64))
        assert reg.base_drift("fam@1", "fam@2") is None and reg.drifts_to("fam@2") == {}


def test_removing_a_release_removes_its_drifts(registry_target, bf16_family, monkeypatch):
    f = bf16_family
    with with_patch_then_release(Registry.init(registry_target), f) as reg:
        assert drift_rows(reg) == 1
        monkeypatch.setattr("registry.drifts.measure_release_drift", lambda *a, **k: pytest.fail("measured"))
        with pytest.raises(AlreadyExistsError):  # refused before any drift is measured
            reg.add_base("fam", "2", f["v3"])
        monkeypatch.undo()
        reg.rm("fam@2")
        assert drift_rows(reg) == 0


def test_recording_adds_tensors_to_what_the_pair_has(registry_target, bf16_family):
    f = bf16_family
    names = sorted(Checkpoint.open(f["v1"]).names)
    with Registry.init(registry_target) as reg:
        reg.add_base("fam", "1", f["v1"])
        reg.add_base("fam", "2", f["v2"])
        reg.record_base_drift("fam@1", "fam@2", base_drift(f["v1"], f["v2"], names[:3], device="cpu"))
        reg.record_base_drift("fam@1", "fam@2", base_drift(f["v1"], f["v2"], names[3:], device="cpu"))
        got = reg.base_drift("fam@1", "fam@2")
        assert sorted(got.tensors) == names and drift_rows(reg) == 1


def test_base_add_says_how_far_the_release_moved(tmp_path, bf16_family):
    f = bf16_family
    runner = CliRunner()

    def cli(*args: str) -> str:
        r = runner.invoke(app, ["--registry", str(tmp_path / "home"), *args])
        assert r.exit_code == 0, (args, r.output)
        return r.output

    cli("init")
    cli("base", "add", "fam@1", str(f["v1"]))
    cli("add", str(f["patch"]), "--name", "task", "--base", "fam@1")
    out = cli("base", "add", "fam@2", str(f["v2"]))
    assert "drift from fam@1" in out and "recorded for upgrades" in out
    got = json.loads(cli("base", "add", "fam@3", str(f["v3"]), "--json"))
    assert set(got["drift_from"]) == {"fam@1"} and got["drift_from"]["fam@1"]["drift_rel_base"] > 0
    got = json.loads(cli("base", "add", "fam@4", str(f["v3"]), "--no-drift", "--json"))
    assert got["drift_from"] == {}


# ---- upgrades on a recorded drift ---------------------------------------------------------------------------


def tiny_family(home: Path, suite: Path, *, drift: bool = True) -> Registry:
    """tiny v1, a patch on it, then v2 (the order a release arrives in), and a family gate."""
    suite.write_text("".join(TASK.read_text().splitlines(keepends=True)[:6]))
    reg = Registry.init(home)
    reg.add_base("tiny", "v1", MODELS / "v1")
    p = patchlab.extract(MODELS / "v1", MODELS / "ft-v1", home.parent / "made" / "task", device="cpu")
    reg.add_patch(p.path, name="task", base="tiny@v1")
    reg.add_base("tiny", "v2", MODELS / "v2", drift=drift)
    reg.set_gate("tiny", family=True, suite=[str(suite)], expressions=["verdict != 'do not port'"])
    return reg


def reads(monkeypatch) -> list[Path]:
    """Every checkpoint whose weights are read from now on (by path)."""
    read: list[Path] = []
    rows = Checkpoint.rows
    monkeypatch.setattr(Checkpoint, "rows", lambda self, *a, **k: read.append(self.path) or rows(self, *a, **k))
    return read


def test_an_upgrade_on_a_recorded_drift_reads_no_old_base(tmp_path, monkeypatch):
    """v2 was registered after the patch: its drift from v1 is recorded, so the upgrade reads v2 and the patch
    (its port) and never v1, and the diagnosis is `patchlab diagnose`'s, figure for figure."""
    with tiny_family(tmp_path / "home", tmp_path / "suite.jsonl") as reg:
        assert reg.base_drift("tiny@v1", "tiny@v2") is not None
        want = diagnose(reg.patch_path("task@1"), MODELS / "v2", intruders=False, device="cpu")
        read = reads(monkeypatch)
        lines: list[str] = []
        res = run_upgrade(reg, "tiny", "v2", device="cpu", log=lines.append)
        assert res.run.state == "done"
        assert (MODELS / "v1").resolve() not in set(read) and (MODELS / "v2").resolve() in set(read)
        assert any("is recorded: neither base is read" in line for line in lines)
        reports = Path(res.run.work_dir) / "reports"
        got = PortDiagnostics.from_json(json.loads((reports / "task.diagnostics.json").read_text()))
        assert got.to_json()["tensors"] == want.to_json()["tensors"]
        assert reg.get_patch("task@2").base == "tiny@v2"


def test_an_upgrade_measures_only_what_the_recorded_drift_lacks_and_records_it(tmp_path, monkeypatch):
    import patchlab.measure.diagnose as diag

    with tiny_family(tmp_path / "home", tmp_path / "suite.jsonl", drift=False) as reg:
        names = sorted(patchlab.Patch.open(reg.patch_path("task@1")).names)
        reg.record_base_drift("tiny@v1", "tiny@v2", base_drift(MODELS / "v1", MODELS / "v2", names[:4], device="cpu"))
        asked: list[list[str]] = []
        measure = diag.base_drift
        monkeypatch.setattr(diag, "base_drift", lambda s, t, n, **k: asked.append(list(n)) or measure(s, t, n, **k))
        res = run_upgrade(reg, "tiny", "v2", device="cpu")
        assert res.run.state == "done"
        assert asked == [names[4:]]
        assert sorted(reg.base_drift("tiny@v1", "tiny@v2").tensors) == names
        got = json.loads((Path(res.run.work_dir) / "reports" / "task.diagnostics.json").read_text())
        want = diagnose(reg.patch_path("task@1"), MODELS / "v2", intruders=False, device="cpu")
        assert got["tensors"] == want.to_json()["tensors"]


def test_dry_run_verdicts_on_a_recorded_drift_read_no_old_base(tmp_path, monkeypatch):
    with tiny_family(tmp_path / "home", tmp_path / "suite.jsonl") as reg:
        want = diagnose(reg.patch_path("task@1"), MODELS / "v2", intruders=False, device="cpu")
        read = reads(monkeypatch)
        plan = plan_upgrade(reg, "tiny", "v2", verdicts=True, device="cpu")
        assert (MODELS / "v1").resolve() not in set(read) and read
        assert [(p.verdict, p.reasons) for p in plan.patches] == [(want.verdict.level, list(want.verdict.reasons))]


def test_patchlab_diagnose_on_a_recorded_drift_reads_no_old_base(tmp_path, monkeypatch):
    """`patchlab diagnose task@1 tiny@v2`: the recorded drift spares reading v1; the figures are the direct ones.
    A target given as a directory (nothing recorded to trust) reads v1 as before."""
    home = tmp_path / "home"
    tiny_family(home, tmp_path / "suite.jsonl").close()
    with Registry(home) as reg:
        want = diagnose(reg.patch_path("task@1"), MODELS / "v2", intruders=False, device="cpu").to_json()
    runner = CliRunner()

    def diagnose_json(target: str) -> dict:
        r = runner.invoke(
            app, ["--registry", str(home), "diagnose", "task@1", target, "--no-intruders", "--device", "cpu", "--json"]
        )
        assert r.exit_code == 0, r.output
        return json.loads(r.output)

    read = reads(monkeypatch)
    got = diagnose_json("tiny@v2")
    assert (MODELS / "v1").resolve() not in set(read) and (MODELS / "v2").resolve() in set(read)
    assert got["tensors"] == want["tensors"] and got["verdict"] == want["verdict"]
    read.clear()
    assert diagnose_json(str(MODELS / "v2"))["tensors"] == want["tensors"]
    assert (MODELS / "v1").resolve() in set(read)
