"""The end-to-end compatibility report on tiny real checkpoints."""

from __future__ import annotations

import json

import pytest

from patchlab.measure.evaluate import evaluate
from patchlab.measure.flips import compare
from patchlab.report.compat import compatibility_report
from patchlab.report.render import render
from tests.factory import make_model

ROWS = [
    {"id": "m1", "type": "multiple_choice", "prompt": "w1 w2 w3", "choices": [" w4", " w5", " w6"], "gold": 0},
    {"id": "m2", "type": "multiple_choice", "prompt": "w7 w8", "choices": [" w9", " w10"], "gold": 1},
    {"id": "m3", "type": "multiple_choice", "prompt": "w11", "choices": [" w12 w13", " w14"], "gold": 0},
    {"id": "g1", "type": "generation", "prompt": "w20 w21 w22", "answer": "w23", "max_new_tokens": 3},
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import patchlab

    root = tmp_path_factory.mktemp("compat")
    base = make_model(root / "v1", seed=0)
    ft = make_model(root / "ft-v1", from_model=base, noise=0.02, seed=1)
    v2 = make_model(root / "v2", from_model=base, noise=0.002, seed=2)
    patch = patchlab.extract(base, ft, root / "ft.patch", device="cpu")
    task = root / "task.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return {"root": root, "base": base, "ft": ft, "v2": v2, "patch": patch, "task": task}


def test_full_report(setup, tmp_path):
    rep = compatibility_report(
        setup["patch"],
        setup["v2"],
        tasks=[setup["task"]],
        prompts=["w1 w2", "w3 w4 w5"],
        device="cpu",
        work_dir=tmp_path,
    )
    # v2 = v1 + noise 0.002 and the fine-tune = v1 + noise 0.02: the bases drift by ~0.1x the patch norm (well
    # under the thresholds), but a patch of random noise is all new directions: intruders make it "with care".
    verdict = rep["diagnostics"]["verdict"]
    assert verdict["level"] == "port with care"
    assert len(verdict["reasons"]) == 1 and "intruder dimensions" in verdict["reasons"][0]
    assert rep["diagnostics"]["overall"]["drift_rel_delta"] == pytest.approx(0.1, abs=0.02)
    assert rep["flips"]["groups"]["task"]["n"] == 4
    assert list(rep["evaluations"]) == ["old fine-tune", "new base", "ported"]
    assert rep["plan"]["tensors"]  # the port's plan summary (dry run)
    assert [r["id"] for r in rep["tuco"]["results"]] == ["0", "1"]
    assert all(0.0 <= r["tuco"] <= 1.0 for r in rep["tuco"]["results"])
    assert list(tmp_path.iterdir()) == []  # the temporary models are gone
    # the old side is the patch re-applied to v1, i.e. the fine-tune itself: same answers as evaluating it
    direct = evaluate(setup["ft"], setup["task"], device="cpu")
    old = rep["evaluations"]["old fine-tune"]["tasks"]["task"]
    assert old["accuracy"] == pytest.approx(direct.tasks["task"].accuracy)
    for fmt in ("md", "html", "json"):
        assert render(rep, fmt)


def test_given_models_and_flips_match_direct_comparison(setup):
    import patchlab

    ported = setup["root"] / "ported"
    patchlab.port(setup["patch"], setup["v2"], ported, device="cpu")
    rep = compatibility_report(
        setup["patch"],
        setup["v2"],
        tasks=[setup["task"]],
        old_model=setup["ft"],
        ported=ported,
        intruders=False,
        device="cpu",
    )
    old = evaluate(setup["ft"], setup["task"], device="cpu")
    new = evaluate(ported, setup["task"], device="cpu")
    want = compare(old.flip_records(), new.flip_records()).to_json()
    assert rep["flips"] == want
    assert rep["tuco"] is None


def test_diagnostics_only(setup):
    rep = compatibility_report(setup["patch"], setup["v2"], device="cpu", intruders=False)
    assert rep["flips"] is None and rep["evaluations"] is None and rep["tuco"] is None
    assert any("diagnostics only" in n for n in rep["notes"])
