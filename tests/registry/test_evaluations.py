"""Evaluations in the registry round-trip patchlab.measure.results.EvalResult, so flips can be computed from them."""

from __future__ import annotations

import pytest

from patchlab.measure.flips import compare
from patchlab.measure.results import EvalResult, InstanceResult, summarise
from registry import InvalidReferenceError, UnknownReferenceError


def _result(model: str, correct: list[bool]) -> EvalResult:
    inst = [
        InstanceResult(
            task="general",
            id=f"mc{i}",
            type="multiple_choice",
            prediction=0 if ok else 1,
            gold=0,
            correct=ok,
            score=-1.5 - i,
            prompt_hash=f"h{i}",
            details={"choice_logprobs": [-1.5 - i, -2.0]},
        )
        for i, ok in enumerate(correct)
    ]
    inst.append(
        InstanceResult(
            task="task",
            id="g0",
            type="generation",
            prediction="4",
            gold=["4", "four"],
            correct=True,
            score=1.0,
            truncated=2,
            prompt_hash="hg",
        )
    )
    return EvalResult(model=model, tasks=summarise(inst), instances=inst, settings={"batch_size": 4})


def test_eval_result_round_trip_and_flips(tmp_path, populated):
    reg, p1, p2 = populated
    old = _result("llama@v1+sql", [True, True, False, True])
    new = _result("llama@v2+sql", [True, False, True, True])
    infos = reg.record_eval_result("sql@1", old)
    assert sorted(e.dataset for e in infos) == ["general", "task"]
    path = new.save(tmp_path / "new.eval.json")
    reg.record_eval_result("sql@2", path)
    back_old, back_new = reg.eval_result("sql@1"), reg.eval_result("sql@2")
    assert back_old.to_json() == old.to_json()  # lossless: details, hashes, truncation, order, settings
    assert back_new.to_json() == new.to_json()
    report = compare(back_old.flip_records(), back_new.flip_records())
    assert (report.overall.n_negative_flips, report.overall.n_positive_flips) == (1, 1)
    assert report.overall.negative_flip_ids == ["general:mc1"]
    only = reg.eval_result("sql@1", tasks=["task"])
    assert list(only.tasks) == ["task"] and [i.id for i in only.instances] == ["g0"]


def test_newest_evaluation_wins_and_errors(tmp_path, populated):
    reg, *_ = populated
    reg.record_eval_result("sql@1", _result("m", [False, False]))
    reg.record_eval_result("sql@1", _result("m", [True, True]))
    assert reg.eval_result("sql@1").tasks["general"].accuracy == 1.0
    with pytest.raises(UnknownReferenceError, match="no stored evaluations"):
        reg.eval_result("sql@2")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(InvalidReferenceError, match="not a readable patchlab evaluation"):
        reg.record_eval_result("sql@1", tmp_path / "bad.json")


def test_plain_records_keep_extra_keys_and_order(populated):
    reg, *_ = populated
    ev = reg.record_evaluation("llama@v1", "d", [{"id": "b", "correct": True, "note": "x"}, {"id": "a"}])
    got = reg.get_evaluation(ev.id).results
    assert [r["id"] for r in got] == ["b", "a"] and got[0]["note"] == "x"


def test_non_finite_values_round_trip(populated):
    """NaN and infinities (e.g. the log-probability of an impossible choice) come back as stored, on
    PostgreSQL too, whose json type has no token for them."""
    import math

    reg, _, _ = populated
    ev = reg.record_evaluation(
        "sql@1",
        "task",
        [{"id": "a", "correct": True, "logprobs": [-math.inf, -0.5], "margin": math.inf, "text": "NaN"}],
        metrics={"accuracy": 1.0, "spread": math.nan, "nested": {"x": [math.nan]}},
    )
    full = reg.get_evaluation(ev.id)
    assert full.metrics["accuracy"] == 1.0 and math.isnan(full.metrics["spread"])
    assert math.isnan(full.metrics["nested"]["x"][0])
    (r,) = full.results
    assert r["logprobs"] == [-math.inf, -0.5] and r["margin"] == math.inf and r["text"] == "NaN"
