"""The merge fixtures (``ft-card-*``, ``ft-verify-*``: further tasks on the same world) and what a merge of
two task patches keeps (issue 11, item 6; the full table is ``bench/merge_measure.py``'s, in the README)."""

from __future__ import annotations

from pathlib import Path

import pytest

import patchlab
from fixtures import EVAL, model_path
from patchlab.measure.evaluate import evaluate
from patchlab.measure.tasks import load_task

# Measured (bench/merge_measure.py, README): ties density 0.5 of the qa and card patches keeps 0.471 of
# ft-v1's 0.510 on qa (92 %) and 0.538 of ft-card-v1's 0.481 on card (112 %); the weakest qa+card merge that
# is not over-scaled (ties d=0.2) keeps 77 % of qa. 80 % leaves room for a few items of numeric drift
# (one item is 1 % of a task) while failing a merge that loses a task (single fine-tunes score 7-13 % on
# the other task).
KEEP = 0.8


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _scores(model: Path) -> dict[str, float]:
    tasks = [load_task(EVAL / "task.jsonl", name="qa"), load_task(EVAL / "card.jsonl", name="card")]
    res = evaluate(model, tasks, batch_size=64, device="cpu", max_new_tokens=8, stop=("\n", "."))
    return {t: s.accuracy for t, s in res.tasks.items()}


def _accuracy(model: Path, file: str) -> tuple[float, list[str]]:
    res = evaluate(model, [load_task(EVAL / file)], batch_size=64, device="cpu", max_new_tokens=8, stop=("\n", "."))
    return next(iter(res.tasks.values())).accuracy, [i.prediction for i in res.instances]


@pytest.mark.parametrize(("base", "ft"), [("v1", "ft-card-v1"), ("v2", "ft-card-v2")])
def test_card_finetune_learnt_the_task_its_base_lacks(base: str, ft: str) -> None:
    b, _ = _accuracy(model_path(base), "card.jsonl")
    f, _ = _accuracy(model_path(ft), "card.jsonl")
    assert b < 0.05 and f > 0.4, (b, f)


@pytest.mark.parametrize("ft", ["ft-verify-v1", "ft-verify-v2"])
def test_verify_finetune_answers_in_the_format(ft: str) -> None:
    """The verify fine-tunes learn the format (true/false) and most of their training items, not the check
    itself: held-out accuracy is near chance (documented in docs/fixtures.md)."""
    acc, preds = _accuracy(model_path(ft), "verify.jsonl")
    assert sum(p in ("true", "false") for p in preds) >= 0.95 * len(preds)
    assert 0.4 <= acc <= 0.7, acc
    train_acc, _ = _accuracy(model_path(ft), "verify-train.jsonl")
    assert train_acc >= 0.85, train_acc  # measured: 1.000 (v1), 0.875 (v2)


def test_merge_of_two_task_patches_keeps_most_of_each_task(tmp_path: Path) -> None:
    v1 = model_path("v1")
    qa = patchlab.extract(v1, model_path("ft-v1"), tmp_path / "qa.patch")
    card = patchlab.extract(v1, model_path("ft-card-v1"), tmp_path / "card.patch")
    merged = tmp_path / "merged"
    patchlab.merge([qa.path, card.path], merged, method="ties", densities=0.5, onto=v1, device="cpu")
    single_qa, single_card, got = _scores(model_path("ft-v1")), _scores(model_path("ft-card-v1")), _scores(merged)
    assert got["qa"] >= KEEP * single_qa["qa"], (got, single_qa)
    assert got["card"] >= KEEP * single_card["card"], (got, single_card)
    # a merge, not one of the two: each task far above what the other task's fine-tune scores on it
    assert got["qa"] > single_card["qa"] + 0.2 and got["card"] > single_qa["card"] + 0.2, (got, single_qa, single_card)
