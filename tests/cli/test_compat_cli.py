"""`patchlab eval / flips / tuco / diagnose / report` through typer's CliRunner on the bundled tiny family.

Eval sets are 8-instance slices of fixtures/eval so the file stays fast; one registry is shared by the module.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.app import app
from fixtures import EVAL, model_path
from patchlab.measure.flips import compare
from patchlab.measure.results import EvalResult
from tests.measure.test_lmeval import mc_row, write

N = 8
FAST = ["--device", "cpu", "--max-new-tokens", "8"]


def _invoke(*args: str, code: int = 0):
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == code, (args, r.output)
    return r


def _one_line_error(r, *needles: str) -> None:
    assert r.exit_code != 0
    assert r.stderr.startswith("error: ") and "Traceback" not in r.output, r.output
    assert len(r.stderr.strip().splitlines()) <= 3, r.stderr
    for n in needles:
        assert n in r.stderr.replace("\n", " "), r.stderr


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("compatcli")
    for name in ("task", "general"):
        lines = (EVAL / f"{name}.jsonl").read_text().splitlines()[:N]
        (root / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    (root / "prompts.txt").write_text("question: where does nopi live?\nanswer:\n\nthe capital of france is\n")
    reg = root / "reg"
    _invoke("-R", reg, "init")
    _invoke("-R", reg, "base", "add", "tiny@v1", model_path("v1"))
    _invoke("-R", reg, "base", "add", "tiny@v2", model_path("v2"))
    _invoke("-R", reg, "diff", "tiny@v1", model_path("ft-v1"), root / "ft.patch", "--name", "task", "--device", "cpu")
    _invoke("-R", reg, "port", "task", "tiny@v2", root / "ported", "--device", "cpu")  # derived:1
    return {"root": root, "reg": str(reg), "task": root / "task.jsonl", "general": root / "general.jsonl"}


@pytest.fixture(scope="module")
def old_result(env):
    """ft-v1 evaluated from its directory, saved with -o (nothing recorded: no registry involved)."""
    out = env["root"] / "ft-v1.json"
    r = _invoke("eval", model_path("ft-v1"), env["task"], env["general"], "-o", out, "--json", *FAST)
    return out, json.loads(r.stdout)


def test_eval_directory_prints_accuracy_and_saves_every_instance(env, old_result):
    out, js = old_result
    saved = EvalResult.load(out)
    assert len(saved.instances) == 2 * N and set(saved.tasks) == {"task", "general"}
    assert js["recorded"] == [] and js["output"] == str(out)
    for t, s in saved.tasks.items():
        assert js["tasks"][t]["accuracy"] == s.accuracy == s.n_correct / N
    assert saved.tasks["task"].accuracy > 0.4  # the fine-tune solves the task; the base cannot (below)
    table = _invoke("eval", model_path("v2"), env["task"], *FAST).stdout
    assert "task" in table and "accuracy" in table and "0.0%" in table


def test_eval_of_registry_references_records_against_the_model(env):
    reg = env["reg"]
    r = _invoke("-R", reg, "eval", "derived:1", env["task"], env["general"], "--json", *FAST)
    js = json.loads(r.stdout)
    assert js["model"] == "derived:1" and sorted(e["dataset"] for e in js["recorded"]) == ["general", "task"]
    listed = json.loads(_invoke("-R", reg, "evals", "ls", "derived:1", "--json").stdout)
    assert {e["dataset"]: e["metrics"]["accuracy"] for e in listed} == {
        t: s["accuracy"] for t, s in js["tasks"].items()
    }
    # a directory with --record stores against the named base
    r = _invoke("-R", reg, "eval", model_path("v2"), env["task"], "--record", "tiny@v2", "--json", *FAST)
    assert [e["target"] for e in json.loads(r.stdout)["recorded"]] == ["tiny@v2"]
    # --no-record keeps a reference's evaluation out of the registry
    before = len(json.loads(_invoke("-R", reg, "evals", "ls", "--json").stdout))
    _invoke("-R", reg, "eval", "tiny@v1", env["task"], "--no-record", *FAST)
    assert len(json.loads(_invoke("-R", reg, "evals", "ls", "--json").stdout)) == before


def test_eval_user_mistakes_are_one_line(env):
    reg = env["reg"]
    _one_line_error(_invoke("-R", reg, "eval", "task@1", env["task"], code=1), "is a patch, not a model")
    _one_line_error(_invoke("eval", model_path("v1"), env["root"] / "nope.jsonl", code=1), "task file not found")
    bad = env["root"] / "bad.jsonl"
    bad.write_text('{"id": "x", "type": "essay", "prompt": "p"}\n')
    _one_line_error(_invoke("eval", model_path("v1"), bad, code=1), "bad.jsonl line 1")
    _one_line_error(_invoke("-R", reg, "eval", "tiny@v9", env["task"], code=1), "tiny")
    nodir = env["root"] / "no-such-dir" / "r.json"
    _one_line_error(_invoke("eval", model_path("v1"), env["task"], "-o", nodir, code=1), "does not exist")


def test_flips_between_a_results_file_and_registry_evaluations(env, old_result):
    reg, (old_file, _) = env["reg"], old_result
    r = _invoke("-R", reg, "flips", old_file, "eval:derived:1", "--json")
    js = json.loads(r.stdout)
    new = json.loads(_invoke("-R", reg, "evals", "ls", "derived:1", "--json").stdout)
    ids = ",".join(str(e["id"]) for e in new)
    # the same numbers as the library on the same two result sets
    from registry import Registry

    with Registry(reg) as rg:
        expect = compare(EvalResult.load(old_file).flip_records(), rg.eval_result("derived:1").flip_records())
    for g in ("task", "general"):
        for k in ("nfr", "pfr", "nfr_mc", "btc", "bec", "accuracy_old", "accuracy_new"):
            assert js["groups"][g][k] == getattr(expect.groups[g], k), (g, k)
    assert js["groups"]["task"]["muscle"]["n"] == N and js["groups"]["general"]["muscle"] is None
    # eval:ID,ID picks the stored evaluations by id: same report
    by_id = json.loads(_invoke("-R", reg, "flips", old_file, f"eval:{ids}", "--json").stdout)
    assert by_id["groups"] == js["groups"]
    text = _invoke("-R", reg, "flips", old_file, "eval:derived:1", "--task", "task").stdout
    assert "NFR_mc" in text and "MUSCLE" in text and "general" not in text.split("negative flips (old")[1]


def test_flips_refuses_different_instances_unless_allowed(env, old_result, tmp_path):
    old_file, _ = old_result
    lines = env["task"].read_text().splitlines()[:5]
    short = tmp_path / "task.jsonl"
    short.write_text("\n".join(lines) + "\n")
    new_file = tmp_path / "short.json"
    _invoke("eval", model_path("v2"), short, "-o", new_file, *FAST)
    _one_line_error(_invoke("flips", old_file, new_file, "--task", "task", code=1), "allow_missing")
    js = json.loads(_invoke("flips", old_file, new_file, "--task", "task", "--allow-missing", "--json").stdout)
    assert js["groups"]["task"]["n"] == 5 and js["groups"]["task"]["n_only_old"] == N - 5


def test_flips_reads_lm_eval_samples_and_reports_bad_sides(env, tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir(), new.mkdir()
    write(old / "samples_arc_2024-01-01T00-00-00.jsonl", [mc_row(0, [-1.0, -2.0], 1, 1), mc_row(1, [-1, -2], 1, 1)])
    write(new / "samples_arc_2024-02-01T00-00-00.jsonl", [mc_row(0, [-3.0, -2.0], 0, 0), mc_row(1, [-1, -2], 1, 1)])
    js = json.loads(_invoke("flips", old, new, "--json").stdout)
    assert js["groups"]["arc"]["nfr"] == 0.5 and js["groups"]["arc"]["negative_flip_ids"] == ["0"]
    _one_line_error(_invoke("flips", tmp_path / "missing", new, code=1), "no such file or directory", "eval:ID")
    _one_line_error(_invoke("-R", env["reg"], "flips", "eval:99999", new, code=1), "no evaluation 99999")
    _one_line_error(_invoke("-R", env["reg"], "flips", "eval:", new, code=1), "eval:ID")
    other = tmp_path / "other.json"
    other.write_text('{"format": "something-else"}')
    _one_line_error(_invoke("flips", other, new, code=1), "not a patchlab evaluation result")


def test_tuco_summary_and_alpha(env):
    args = ("tuco", model_path("v1"), model_path("ft-v1"), "--prompts", env["root"] / "prompts.txt", "--device", "cpu")
    js = json.loads(_invoke(*args, "--json").stdout)
    vals = [r["tuco"] for r in js["results"]]
    assert [r["id"] for r in js["results"]] == ["1", "2", "4"]  # line numbers; the blank line is skipped
    s = js["summary"]
    assert s["n"] == 3 and s["mean"] == pytest.approx(sum(vals) / 3) and s["min"] <= s["p50"] <= s["max"]
    assert all(0 < v < 1 for v in vals)
    # α scales the fine-tuning component: α = 0 is the base's own trajectory (TuCo 0), α = 2 weighs it more
    zero = json.loads(_invoke(*args, "--alpha", "0", "--json").stdout)
    assert all(r["tuco"] == 0.0 for r in zero["results"])
    two = json.loads(_invoke(*args, "--alpha", "2", "--json").stdout)
    assert all(b > a for a, b in zip(vals, (r["tuco"] for r in two["results"]), strict=True))
    assert "median" in _invoke(*args).stdout
    missing = env["task"].with_name("x.txt")
    r = _invoke("tuco", model_path("v1"), model_path("ft-v1"), "--prompts", missing, code=1)
    _one_line_error(r, "prompts file not found")


def test_diagnose_gives_the_verdict_with_reasons(env):
    js = json.loads(_invoke("-R", env["reg"], "diagnose", "task", "tiny@v2", "--device", "cpu", "--json").stdout)
    assert js["verdict"]["level"] == "safe to port" and js["verdict"]["reasons"]
    assert js["overall"]["drift_rel_delta"] == pytest.approx(0.784, abs=0.01)  # docs/compat.md, λ = 0
    text = _invoke("diagnose", env["root"] / "ft.patch", model_path("v2"), "--device", "cpu", "--no-intruders").stdout
    assert "verdict: safe to port" in text and "per layer" in text
    _one_line_error(_invoke("diagnose", env["root"] / "nope.patch", model_path("v2"), code=1))


@pytest.fixture(scope="module")
def report_dir(env):
    out = env["root"] / "report"
    r = _invoke(
        "report", env["root"] / "ft.patch", model_path("v2"), "--eval", env["task"], "--eval", env["general"],
        "--prompts", env["root"] / "prompts.txt", "-o", out, "--json", *FAST,
    )  # fmt: skip
    return out, json.loads(r.stdout)


def test_report_writes_every_format(report_dir):
    out, js = report_dir
    assert sorted(p.name for p in out.iterdir()) == [".patchlab-output.json", "report.html", "report.json", "report.md"]
    rep = js["report"]
    assert js["verdict"] == rep["diagnostics"]["verdict"]["level"] == "safe to port"
    assert list(rep["evaluations"]) == ["old fine-tune", "new base", "ported"]
    assert rep["evaluations"]["new base"]["tasks"]["task"]["accuracy"] == 0.0  # v2 alone cannot do the task
    assert rep["flips"]["groups"]["task"]["n"] == N and len(rep["tuco"]["results"]) == 3
    assert rep["plan"]["tensors"] == {"add": 39}
    md = (out / "report.md").read_text()
    for heading in ("## Verdict", "## Port plan", "## Accuracy", "## Negative flips", "## TuCo per prompt"):
        assert heading in md
    assert json.loads((out / "report.json").read_text()) == rep
    assert (out / "report.html").read_text().count("<svg") == 3


def test_report_format_choice_and_mistakes(env, tmp_path):
    _invoke("-R", env["reg"], "report", "task", "tiny@v2", "-o", tmp_path / "r", "--format", "md",
            "--no-intruders", "--device", "cpu")  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [".patchlab-output.json", "report.md"]
    md = (tmp_path / "r" / "report.md").read_text()
    assert md.startswith("# Porting task onto tiny@v2") and "**target reference**: tiny@v2" in md
    assert "## Verdict: **safe to port**" in md and "## Accuracy" not in md  # no --eval: weights only
    _one_line_error(_invoke("report", "x", "y", "--format", "pdf", "-o", tmp_path / "q", code=1), "--format")
    f = tmp_path / "file"
    f.write_text("")
    _one_line_error(_invoke("report", "x", "y", "-o", f, code=1), "not a directory")
    _one_line_error(_invoke("report", env["root"] / "ft.patch", model_path("v2"), "--eval", tmp_path / "no.jsonl",
                            "-o", tmp_path / "z", code=1), "task file not found")  # fmt: skip
    assert not (tmp_path / "z").exists()


def _render_bench():
    spec = importlib.util.spec_from_file_location("render_report", Path(__file__).parents[2] / "bench/render_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed (CI does not install it)")
def test_html_report_renders_in_headless_chromium(report_dir):
    out, js = report_dir
    bench = _render_bench()
    png = bench.screenshot(out / "report.html", out / "report.png")
    stats = bench.screenshot_stats(png, js["verdict"])
    assert (stats["width"], stats["height"]) == bench.WINDOW
    assert stats["non_background_share"] > 0.03  # text, tables and charts; a blank page is ~0
    assert stats["verdict_box_pixels"] > 10_000  # the coloured verdict box rendered
    assert stats["bar_pixels"] > 500  # the SVG bar charts rendered
