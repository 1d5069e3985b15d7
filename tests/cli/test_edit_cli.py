"""CLI: ``patchlab edit`` (registered on its base, WILD figures stored) and ``patchlab eval-edits``; bad input."""

from __future__ import annotations

import io
import json

import pytest
from typer.testing import CliRunner

from cli.app import app
from cli.common import STATE
from fixtures import EVAL, ROOT, model_path
from patchlab import Patch
from registry import Registry
from tests.conftest import no_partial_dirs

EDITS = ROOT / "edits" / "edits.jsonl"
FIXTURE = ["--layer", "2", "--lr", "5e-3", "--batch-size", "4", "--device", "cpu"]
TARGET = "model.layers.2.mlp.down_proj.weight"


def run(*args: str, code: int = 0):
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == code, (args, r.output)
    return r


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("editcli")
    reg = root / "reg"
    run("-R", reg, "init")
    run("-R", reg, "base", "add", "tiny@v1", model_path("v1"))
    run("-R", reg, "base", "add", "tiny@v2", model_path("v2"))
    e16 = root / "e16.jsonl"
    e16.write_text("".join(EDITS.read_text().splitlines(keepends=True)[:16]))
    r = run(
        "-R",
        reg,
        "edit",
        "tiny@v1",
        "--edits",
        e16,
        *FIXTURE,
        "--name",
        "facts",
        "-o",
        root / "facts",
        "--eval",
        "--task",
        EVAL / "general.jsonl",
        "--json",
    )
    return root, reg, e16, json.loads(r.stdout)


def test_edit_registers_the_patch_on_its_base_with_its_figures(world):
    root, reg, e16, out = world
    assert out["patch"]["ref"] == "facts@1" and out["tensor"] == TARGET and out["layer"] == 2
    assert out["evaluation"]["reliability"] == 1.0 and out["evaluation"]["locality"] >= 0.8
    assert Patch.open(root / "facts").names == [TARGET]
    with Registry(reg) as r:
        info = r.get_patch("facts@1")
        assert info.base == "tiny@v1" and info.method == "locft-bf" and info.num_tensors == 1
        assert info.parameters["edits_sha256"] == out["edits_sha256"] and info.parameters["lr"] == 5e-3
        node = r.lineage("facts@1")
        assert node.base == "tiny@v1" and not node.parents  # made on its base, as an extracted patch is
        evs = {e.dataset: e for e in r.list_evaluations("facts@1")}
        assert set(evs) == {"wild", "general"}
        assert evs["wild"].metrics["reliability"] == 1.0 and evs["wild"].metrics["edits_sha256"] == out["edits_sha256"]
        assert evs["wild"].num_instances == 16 and evs["general"].metrics["accuracy"] > 0.7
        full = r.get_evaluation(evs["wild"].id)
        assert [x["id"] for x in full.results] == [f"edit-{i:03d}" for i in range(16)]
        assert all(x["correct"] for x in full.results) and "local" in full.results[0]


def test_port_then_eval_edits_on_the_derived_model_and_the_patch(world):
    root, reg, e16, _ = world
    run("-R", reg, "port", "facts@1", "tiny@v2", root / "v2-facts", "--device", "cpu")
    r = run("-R", reg, "eval-edits", "derived:1", "--edits", e16, "--device", "cpu", "--json")
    got = json.loads(r.stdout)
    # locality against the derived model's own base (v2): measured 0.812 / 0.750 / 0.828
    assert got["reliability"] >= 0.75 and got["locality"] is not None and got["recorded"][0]["target"] == "derived:1"
    r = run(
        "-R",
        reg,
        "eval-edits",
        "facts@1",
        "--edits",
        e16,
        "--device",
        "cpu",
        "--base",
        "tiny@v2",
        "--no-record",
        "--json",
    )
    assert json.loads(r.stdout)["reliability"] == got["reliability"]  # in memory, the same port
    r = run("-R", reg, "eval-edits", model_path("v1"), "--edits", e16, "--device", "cpu")
    assert "reliability" in r.stdout and "not measured" in r.stdout  # a plain directory, no --base
    r = run("-R", reg, "eval-edits", root / "facts", "--edits", e16, "--device", "cpu", code=1)
    assert "pass --base" in r.output


def test_locate_prints_its_table_and_quiet_silences_status(world, tmp_path):
    root, reg, e16, _ = world
    four = tmp_path / "e4.jsonl"
    four.write_text("".join(e16.read_text().splitlines(keepends=True)[:4]))
    r = run(
        "-R",
        reg,
        "edit",
        model_path("v1"),
        "--edits",
        four,
        "--locate",
        "--epochs",
        "3",
        "--lr",
        "1e-2",
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "-o",
        tmp_path / "loc",
        "--no-register",
        "--rank",
        "2",
    )
    assert "(chosen)" in r.stdout and "final loss" in r.stdout and "wrote" in r.stdout
    p = Patch.open(tmp_path / "loc")
    assert p.entries()[0].encoding == "lowrank" and "locate" in p.provenance["parameters"]
    r = run(
        "-q",
        "edit",
        model_path("v1"),
        "--edits",
        four,
        "--epochs",
        "1",
        "--device",
        "cpu",
        "-o",
        tmp_path / "q",
        "--no-register",
    )
    assert r.stdout == "" and (tmp_path / "q" / "patch.json").is_file()


def test_progress_bar_shows_epoch_loss_and_fitted():
    from rich.console import Console

    from cli.edit import EpochProgress

    STATE.quiet = False  # as `patchlab` without -q sets it (a previous invocation may have left it on)
    buf = io.StringIO()
    con = Console(file=buf, force_terminal=True, width=120)
    with EpochProgress(3, 16, True, console=con) as progress:
        for epoch in (1, 2, 3):
            progress(epoch, 1.0 / epoch, 5 * epoch)
    text = buf.getvalue()
    assert "3/3" in text and "loss 0.3333" in text and "fitted 15/16" in text
    STATE.quiet = True
    try:
        with EpochProgress(3, 16, True, console=con) as progress:
            assert progress is None
    finally:
        STATE.quiet = False


def _bad(tmp_path, rows):
    p = tmp_path / "bad.jsonl"
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return p


GOOD = {"id": "a", "prompt": "sopu lives in", "target": "rome"}


@pytest.mark.parametrize(
    "case, msg",
    [
        ("malformed", "bad.jsonl:2: not valid JSON"),
        ("empty-target", "the target is empty"),
        ("too-long", "over the model's context of 128"),
        ("layer", "valid layers: 0..3"),
        ("module", "valid modules: "),
        ("non-decoder", "not a causal language model"),
        ("unregistered-base", "not in the registry"),
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(world, tmp_path, case, msg):
    root, reg, _, _ = world
    rows: list = [GOOD]
    base, extra = "tiny@v1", ["--epochs", "1"]
    if case == "malformed":
        rows.append('{"id": "b", "prompt": "x"')
    elif case == "empty-target":
        rows.append({"id": "b", "prompt": "kugu lives in", "target": ""})
    elif case == "too-long":
        rows.append({"id": "c", "prompt": "sopu lives in " * 60, "target": "rome"})
    elif case == "layer":
        extra += ["--layer", "9"]
    elif case == "module":
        extra += ["--module", "mlp.nope"]
    elif case == "non-decoder":
        from transformers import BertConfig, BertForMaskedLM

        BertForMaskedLM(
            BertConfig(vocab_size=320, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
        ).save_pretrained(tmp_path / "bert")
        base = str(tmp_path / "bert")
    elif case == "unregistered-base":  # trained and written, then refused by the registry: rolled back
        base = str(model_path("ft-v1"))
    with Registry(reg) as r:
        before = len(r.list_patches())
    out = tmp_path / "out"
    res = run("-R", reg, "edit", base, "--edits", _bad(tmp_path, rows), "--device", "cpu", "-o", out, *extra, code=1)
    text = res.output.replace("\n", " ")
    assert msg in text and "Traceback" not in res.output and res.output.count("error:") == 1
    assert not out.exists() and not no_partial_dirs(tmp_path)
    with Registry(reg) as r:
        assert len(r.list_patches()) == before
