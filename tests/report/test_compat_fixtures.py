"""The compatibility tools on the committed fixture family, against the family's own measurements."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import patchlab
from patchlab.measure.diagnose import diagnose
from patchlab.measure.evaluate import evaluate
from patchlab.measure.verdict import CARE, SAFE

ROOT = Path(__file__).resolve().parents[2] / "fixtures"
MODELS = ROOT / "models"
TASKS = [ROOT / "eval" / "task.jsonl", ROOT / "eval" / "general.jsonl"]


@pytest.fixture(scope="module")
def measured() -> dict:
    return json.loads((ROOT / "eval" / "measured.json").read_text())["families"]["untied"]["rows"]


@pytest.fixture(scope="module")
def results() -> dict:
    kw = {"device": "cpu", "batch_size": 16, "max_new_tokens": 8, "stop": ("\n", ".")}
    return {"ft-v1": evaluate(MODELS / "ft-v1", TASKS, **kw)}


def test_runner_reproduces_the_family_measurements(results, measured):
    # fixtures/measure.py is an independent implementation (own greedy loop, own MC scoring)
    for name, res in results.items():
        assert res.tasks["task"].accuracy == pytest.approx(measured[name]["task"], abs=1e-4)
        assert res.tasks["general"].accuracy == pytest.approx(measured[name]["general"], abs=1e-4)


def test_port_verdicts_on_the_family(tmp_path):
    patch = patchlab.extract(MODELS / "v1", MODELS / "ft-v1", tmp_path / "ft-v1.patch", device="cpu")
    d = diagnose(patch, MODELS / "v2", device="cpu", intruders=False)
    assert d.verdict.level == SAFE  # v2 + Δ(v1) nearly matches the ft-v2 oracle (measured.json)
    assert 0.5 < d.overall.drift_rel_delta < 1.1
    grown = diagnose(patch, MODELS / "v2-vocab", device="cpu", intruders=False)
    emb = next(t for t in grown.tensors if t.name == "model.embed_tokens.weight")
    assert emb.status == "rows-compared" and grown.verdict.level in (CARE, "do not port")
    assert any("vocabulary rows" in r for r in grown.verdict.reasons)
