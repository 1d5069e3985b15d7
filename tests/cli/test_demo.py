"""`patchlab demo` walks the main job on the bundled family and reports what the port recovers."""

import json

from typer.testing import CliRunner

from cli.app import app


def test_demo_ports_the_finetune_and_recovers_most_of_its_gain(tmp_path):
    r = CliRunner().invoke(app, ["demo", "--work", str(tmp_path / "demo"), "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    acc = out["task_accuracy"]
    assert acc["v2"] < 0.1 and acc["ft-v2 (oracle)"] > 0.4  # the task needs fine-tuning
    assert out["recovered"] > 0.7  # measured 0.93 on the bundled family
    assert out["lineage"]["parents"][0]["ref"] == "task@1"
    assert (tmp_path / "demo" / "models" / "task-on-v2" / "config.json").exists()
    r = CliRunner().invoke(app, ["-R", str(tmp_path / "demo" / "registry"), "log", "prod"])
    assert r.exit_code == 0 and "task@1" in r.output


def test_demo_without_fixtures_is_one_clear_line(tmp_path):
    r = CliRunner().invoke(app, ["demo", "--fixtures", str(tmp_path), "--work", str(tmp_path / "w")])
    assert r.exit_code != 0
    assert "bundled model family was not found" in r.output
