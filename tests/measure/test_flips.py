"""Negative-flip metrics against hand-computed values."""

from __future__ import annotations

import pytest

from patchlab.measure.flips import FlipRecord, FlipReport, ResultsMismatchError, compare, muscle_stats


def mc(doc: str, correct: bool, pred: int, task: str = "mc", **kw) -> FlipRecord:
    return FlipRecord(task=task, doc_id=doc, correct=correct, prediction=pred, kind="multiple_choice", **kw)


def gen(doc: str, score: float, task: str = "gen") -> FlipRecord:
    return FlipRecord(
        task=task, doc_id=doc, correct=score == 1.0, prediction=f"p{score}", score=score, kind="generation"
    )


# Six MC instances covering every quadrant, plus wrong->same-wrong (d) and wrong->other-wrong (e).
OLD_MC = [
    mc("a", True, 0),
    mc("b", True, 1),
    mc("c", False, 1),
    mc("d", False, 1),
    mc("e", False, 1),
    mc("f", True, 3),
]
NEW_MC = [
    mc("a", True, 0),
    mc("b", False, 2),
    mc("c", True, 0),
    mc("d", False, 1),
    mc("e", False, 2),
    mc("f", True, 3),
]
# Generation: D = -0.5, 0, +1.0, +0.4
OLD_GEN = [gen("x", 1.0), gen("y", 0.5), gen("z", 0.0), gen("w", 0.2)]
NEW_GEN = [gen("x", 0.5), gen("y", 0.5), gen("z", 1.0), gen("w", 0.6)]


def test_multiple_choice_hand_values():
    rep = compare(OLD_MC, NEW_MC)
    s = rep.groups["mc"]
    assert s.n == 6
    assert s.accuracy_old == pytest.approx(3 / 6) and s.accuracy_new == pytest.approx(3 / 6)
    assert s.n_negative_flips == 1 and s.nfr == pytest.approx(1 / 6)
    assert s.n_positive_flips == 1 and s.pfr == pytest.approx(1 / 6)
    # b (right -> wrong 2) and e (wrong 1 -> wrong 2); d stays on the same wrong answer.
    assert s.n_negative_flips_mc == 2 and s.nfr_mc == pytest.approx(2 / 6)
    assert s.btc == pytest.approx(2 / 3)  # a, f kept of a, b, f
    assert s.bec == pytest.approx(2 / 3)  # d, e of new mistakes b, d, e
    assert s.both_correct_ids == ["a", "f"]
    assert s.negative_flip_ids == ["b"]
    assert s.positive_flip_ids == ["c"]
    assert s.both_wrong_ids == ["d", "e"]
    assert s.muscle is None


def test_generation_muscle_hand_values():
    rep = compare(OLD_GEN, NEW_GEN)
    m = rep.groups["gen"].muscle
    assert m is not None
    assert m.n == 4 and m.n_gain == 2 and m.n_regression == 1
    assert m.pfr == pytest.approx(0.5) and m.nfr == pytest.approx(0.25)
    assert m.mean_gain == pytest.approx(0.7)
    assert m.mean_regression == pytest.approx(0.5)
    assert m.mean_difference == pytest.approx((-0.5 + 0 + 1.0 + 0.4) / 4)
    assert m.gain_ids == ["w", "z"] and m.regression_ids == ["x"]
    s = rep.groups["gen"]
    assert s.negative_flip_ids == ["x"] and s.positive_flip_ids == ["z"]


def test_muscle_tolerance_drops_small_differences():
    m = muscle_stats([1.0, 0.5, 0.0, 0.2], [0.5, 0.5, 1.0, 0.6], ["x", "y", "z", "w"], tolerance=0.45)
    assert m.n_gain == 1 and m.gain_ids == ["z"] and m.mean_gain == pytest.approx(1.0)
    assert m.n_regression == 1 and m.mean_regression == pytest.approx(0.5)
    with pytest.raises(ValueError):
        muscle_stats([1.0], [0.0], ["a"], tolerance=-1)


def test_several_tasks_pooled():
    rep = compare(OLD_MC + OLD_GEN, NEW_MC + NEW_GEN)
    assert set(rep.groups) == {"mc", "gen"}
    o = rep.overall
    assert o.n == 10
    assert o.n_old_correct == 4 and o.n_new_correct == 4
    assert o.nfr == pytest.approx(2 / 10) and o.pfr == pytest.approx(2 / 10)
    assert sorted(o.negative_flip_ids) == ["gen:x", "mc:b"]
    # The pooled MUSCLE block covers the generative group only.
    assert o.muscle is not None and o.muscle.n == 4 and o.muscle.nfr == pytest.approx(0.25)
    # NFR_mc pooled: generation predictions count too: b, e, x (p1.0 -> p0.5), w (p0.2 -> p0.6);
    # y stays on the same wrong text p0.5.
    assert o.n_negative_flips_mc == 4


def test_order_does_not_matter_and_identical_duplicates_collapse():
    rep1 = compare(OLD_MC, NEW_MC)
    rep2 = compare(list(reversed(OLD_MC)) + OLD_MC[:2], NEW_MC[::-1])
    assert rep1.to_json() == rep2.to_json()


def test_duplicates_with_missing_scores_collapse():
    a = FlipRecord("t", "1", True, score=float("nan"))
    rep = compare([a, FlipRecord("t", "1", True, score=float("nan"))], [FlipRecord("t", "1", True)])
    assert rep.groups["t"].n == 1


def test_conflicting_duplicates_refused():
    with pytest.raises(ResultsMismatchError, match="two different rows"):
        compare(OLD_MC + [mc("a", False, 2)], NEW_MC)


def test_missing_instances_error_by_default_and_reported_when_allowed():
    old = OLD_MC + [mc("g", True, 0)]
    new = NEW_MC[1:]  # drop a
    with pytest.raises(ResultsMismatchError, match="1 only in old .*mc:a.*0 only in new|2 only in old"):
        compare(old, new)
    rep = compare(old, new, allow_missing=True)
    s = rep.groups["mc"]
    assert s.n == 5
    assert s.n_only_old == 2 and sorted(s.only_old_ids) == ["a", "g"]
    assert s.n_only_new == 0
    assert rep.overall.n_only_old == 2
    # Hand values on the intersection b..f: old correct b, f; new correct c, f.
    assert s.nfr == pytest.approx(1 / 5) and s.btc == pytest.approx(1 / 2)


def test_prompt_hash_mismatch_refused():
    old = [mc("a", True, 0, prompt_hash="h1")]
    new = [mc("a", True, 0, prompt_hash="h2")]
    with pytest.raises(ResultsMismatchError, match="prompts differ"):
        compare(old, new)
    # One side without a hash cannot be checked and is accepted.
    assert compare(old, [mc("a", True, 0)]).groups["mc"].n == 1


def test_filters_are_separate_groups():
    old = [FlipRecord("t", "1", True, filter="strict"), FlipRecord("t", "1", True, filter="flex")]
    new = [FlipRecord("t", "1", False, filter="strict"), FlipRecord("t", "1", True, filter="flex")]
    rep = compare(old, new)
    assert rep.groups["t[strict]"].n_negative_flips == 1
    assert rep.groups["t[flex]"].n_negative_flips == 0
    # no predictions -> NFR_mc cannot be computed
    assert rep.groups["t[flex]"].nfr_mc is None


def test_empty_and_degenerate_inputs():
    with pytest.raises(ResultsMismatchError, match="nothing to compare"):
        compare([], NEW_MC)
    rep = compare([mc("a", False, 1)], [mc("a", False, 1)])
    s = rep.groups["mc"]
    assert s.btc is None  # no old-correct instance: undefined, not 0
    assert s.bec == 1.0


def test_kind_mismatch_refused():
    with pytest.raises(ResultsMismatchError, match="not the same task"):
        compare([mc("x", True, 0, task="gen")], [gen("x", 1.0)])


def test_report_json_round_trip():
    rep = compare(OLD_MC + OLD_GEN, NEW_MC + NEW_GEN)
    again = FlipReport.from_json(rep.to_json())
    assert again == rep
    assert '"nfr"' in rep.dumps()
