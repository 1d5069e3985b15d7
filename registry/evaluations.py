"""Evaluations: per-instance results and aggregate metrics of a patch, base version or derived model,
stored and given back as ``patchlab.measure.results.EvalResult``."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from registry import refs
from registry.db import retry_locked
from registry.errors import InvalidReferenceError, UnknownReferenceError
from registry.records import EvaluationInfo, fields_dict, timestamp
from registry.rows import EvaluationResultRow, EvaluationRow
from registry.topic import Topic, json_safe, target_label

if TYPE_CHECKING:
    from patchlab.measure.results import EvalResult

RECORD_KEYS = ("id", "prediction", "gold", "correct", "score")


class Evaluations(Topic):
    def record_evaluation(
        self,
        target: str,
        dataset: str,
        records: Iterable[Mapping[str, Any]],
        *,
        metrics: Mapping[str, Any] | None = None,
        model: str | None = None,
        kind: str | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> EvaluationInfo:
        """Store an evaluation of a patch, base version or derived model: per-instance records
        ``{id, prediction, gold, correct, score}`` (other keys of a record are kept as its details) and
        aggregate metrics (accuracy and mean score unless given)."""
        rows: list[dict[str, Any]] = []
        seen: set[str] = set()
        for i, rec in enumerate(records):
            if "id" not in rec:
                raise InvalidReferenceError(f"evaluation record {i} has no 'id'; every record needs a unique id")
            iid = str(rec["id"])
            if iid in seen:
                raise InvalidReferenceError(f"evaluation record id {iid!r} appears twice; ids must be unique")
            seen.add(iid)
            rows.append(
                {
                    "instance_id": iid,
                    "prediction": json_safe(rec.get("prediction"), f"record {iid} prediction"),
                    "gold": json_safe(rec.get("gold"), f"record {iid} gold"),
                    "correct": None if rec.get("correct") is None else bool(rec["correct"]),
                    "score": None if rec.get("score") is None else float(rec["score"]),
                    "details": json_safe({k: v for k, v in rec.items() if k not in RECORD_KEYS}, f"record {iid}")
                    or None,
                    "position": i,
                }
            )
        agg = dict(metrics) if metrics is not None else aggregate(rows)
        json_safe(agg, "metrics")

        def run() -> EvaluationInfo:
            with self.db.write() as s:
                t = refs.resolve_any(s, target, kind)
                ev = EvaluationRow(
                    patch_id=t.id if t.kind == "patch" else None,
                    base_version_id=t.id if t.kind == "base" else None,
                    derived_id=t.id if t.kind == "derived" else None,
                    model=model or t.label,
                    dataset=dataset,
                    metrics=agg,
                    num_instances=len(rows),
                    settings=json_safe(dict(settings), "settings") if settings is not None else None,
                )
                s.add(ev)
                s.flush()
                if rows:
                    s.execute(insert(EvaluationResultRow), [{"evaluation_id": ev.id, **r} for r in rows])
                return EvaluationInfo(
                    ev.id, t.label, ev.model, dataset, agg, len(rows), timestamp(ev.created_at), (), ev.settings
                )

        return retry_locked(run)

    def record_edit_evaluation(
        self,
        target: str,
        evaluation: Any,
        *,
        dataset: str = "wild",
        model: str | None = None,
        kind: str | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> list[EvaluationInfo]:
        """Store the evaluation of an edited model (``patchlab.methods.edit_patch.EditEvaluation``, or a
        ``patchlab.measure.edits.EditScores``) against ``target`` (the edit's patch, or a derived model).

        One evaluation ``dataset`` (default ``wild``) holds the WILD figures as metrics (reliability,
        generalization, locality, counts, the edit set's digest) and one record per edit (its output, target,
        whether it is reliable, and its rephrasing and locality outcomes); the general-ability results, when
        present, are stored as ``record_eval_result`` stores any evaluation (one entry per task).
        """
        wild = getattr(evaluation, "wild", evaluation)
        digest = getattr(evaluation, "edits_sha256", None)
        metrics = {
            "accuracy": wild.reliability,  # the records' share correct, as aggregate() would say: reliability
            "reliability": wild.reliability,
            "generalization": wild.generalization,
            "locality": wild.locality,
            "n_edits": wild.n_edits,
            "n_rephrasings": wild.n_rephrasings,
            "n_locality": wild.n_locality,
            "edits_sha256": digest,
        }
        records = [
            {
                "id": e["id"],
                "prediction": e["output"],
                "gold": e.get("target"),
                "correct": e["reliable"],
                "score": float(e["reliable"]),
                "generalized": e["generalized"],
                "local": e["local"],
            }
            for e in wild.per_edit
        ]
        sett = {"protocol": "WILD", "max_new_tokens": 32, "stop": [".", "\n"], **dict(settings or {})}
        out = [self.record_evaluation(target, dataset, records, metrics=metrics, model=model, kind=kind, settings=sett)]
        general = getattr(evaluation, "general", None)
        if general is not None:
            out += self.record_eval_result(target, general, model=model, kind=kind)
        return out

    def list_evaluations(self, target: str | None = None, *, kind: str | None = None) -> list[EvaluationInfo]:
        with self.db.read() as s:
            return self._evaluations(s, target, kind)

    @staticmethod
    def _evaluations(s: Session, target: str | None, kind: str | None) -> list[EvaluationInfo]:
        q = select(EvaluationRow).order_by(EvaluationRow.id)
        if target is None:
            return [eval_info(s, ev, results=False) for ev in s.execute(q).scalars()]
        t = refs.resolve_any(s, target, kind)
        col = {
            "patch": EvaluationRow.patch_id,
            "base": EvaluationRow.base_version_id,
            "derived": EvaluationRow.derived_id,
        }
        rows = s.execute(q.where(col[t.kind] == t.id)).scalars()
        return [eval_info(s, ev, results=False, label=t.label) for ev in rows]

    def get_evaluation(self, evaluation_id: int) -> EvaluationInfo:
        with self.db.read() as s:
            ev = s.get(EvaluationRow, evaluation_id)
            if ev is None:
                raise UnknownReferenceError(f"no evaluation {evaluation_id} (list them with `patchlab evals ls`)")
            return eval_info(s, ev, results=True)

    def record_eval_result(
        self,
        target: str,
        result: EvalResult | str | os.PathLike[str] | Mapping[str, Any],
        *,
        model: str | None = None,
        kind: str | None = None,
    ) -> list[EvaluationInfo]:
        """Store a ``patchlab.measure.results.EvalResult`` (or its saved JSON file, or its ``to_json()`` dict) as one
        evaluation per task of ``target``; :meth:`eval_result` gives it back."""
        from patchlab.measure.results import EvalResult  # lazy: listing a registry needs no torch

        if isinstance(result, (str, os.PathLike)):
            try:
                result = EvalResult.load(result)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise InvalidReferenceError(
                    f"{os.fspath(result)} is not a readable patchlab evaluation result ({exc}); save one with "
                    "EvalResult.save"
                ) from None
        elif isinstance(result, Mapping):
            result = EvalResult.from_json(dict(result))
        out = []
        for task, summary in result.tasks.items():
            records = [
                {
                    "id": inst.id,
                    "prediction": inst.prediction,
                    "gold": inst.gold,
                    "correct": inst.correct,
                    "score": inst.score,
                    "task": inst.task,
                    "type": inst.type,
                    "truncated": inst.truncated,
                    "prompt_hash": inst.prompt_hash,
                    "details": inst.details,
                }
                for inst in result.instances
                if inst.task == task
            ]
            out.append(
                self.record_evaluation(
                    target,
                    task,
                    records,
                    metrics=fields_dict(summary),
                    model=model or result.model,
                    kind=kind,
                    settings=result.settings,
                )
            )
        return out

    def eval_result(self, target: str, *, kind: str | None = None, tasks: Iterable[str] | None = None) -> EvalResult:
        """The newest stored evaluation of each task (dataset) of ``target``, as a
        ``patchlab.measure.results.EvalResult`` ready for ``patchlab.measure.flips.compare``."""
        wanted = set(tasks) if tasks is not None else None
        with self.db.read() as s:  # one transaction: the newest of each task, then their results
            newest: dict[str, EvaluationInfo] = {}
            for e in self._evaluations(s, target, kind):
                if wanted is None or e.dataset in wanted:
                    newest[e.dataset] = e  # ids ascend: the last one wins
            if not newest:
                raise UnknownReferenceError(
                    f"{target!r} has no stored evaluations"
                    + (f" of {', '.join(sorted(wanted))}" if wanted else "")
                    + "; record one with Registry.record_eval_result"
                )
            fulls = [eval_info(s, s.get(EvaluationRow, e.id), results=True, label=e.target) for e in newest.values()]
        return eval_results(fulls, target)

    def evaluations_result(self, evaluation_ids: Iterable[int]) -> EvalResult:
        """Stored evaluations picked by id (``patchlab evals ls``), merged into one
        ``patchlab.measure.results.EvalResult`` ready for ``patchlab.measure.flips.compare``."""
        ids = list(evaluation_ids)
        if not ids:
            raise InvalidReferenceError("no evaluation ids given; list them with `patchlab evals ls`")
        fulls = [self.get_evaluation(int(i)) for i in ids]
        seen: dict[str, int] = {}
        for e in fulls:
            if e.dataset in seen:
                raise InvalidReferenceError(
                    f"evaluations {seen[e.dataset]} and {e.id} are both of task {e.dataset!r}; pick one per task"
                )
            seen[e.dataset] = e.id
        return eval_results(fulls, fulls[0].target)


def eval_info(s: Session, ev: EvaluationRow, *, results: bool, label: str | None = None) -> EvaluationInfo:
    """The record of one evaluation row (with its per-instance results if asked); ``label``: its target's,
    when the caller resolved it (else looked up)."""
    if label is None:
        d = ev.derived_id
        label = f"derived:{d}" if d is not None else target_label(s, ev.base_version_id, ev.patch_id)
    res: tuple[dict[str, Any], ...] = ()
    if results:
        res = tuple(
            {
                "id": r.instance_id,
                "prediction": r.prediction,
                "gold": r.gold,
                "correct": r.correct,
                "score": r.score,
                **(r.details or {}),
            }
            for r in s.execute(
                select(EvaluationResultRow)
                .where(EvaluationResultRow.evaluation_id == ev.id)
                .order_by(EvaluationResultRow.position, EvaluationResultRow.instance_id)
            ).scalars()
        )
    return EvaluationInfo(
        ev.id, label, ev.model, ev.dataset, ev.metrics, ev.num_instances, timestamp(ev.created_at), res, ev.settings
    )


def eval_results(fulls: Sequence[EvaluationInfo], model: str) -> EvalResult:
    """Per-task stored evaluations (with their results) as one ``EvalResult``."""
    from patchlab.measure.results import EvalResult, InstanceResult, TaskSummary, summarise

    instances: list[InstanceResult] = []
    summaries: dict[str, TaskSummary] = {}
    settings: dict[str, Any] = {}
    for full in fulls:
        task = full.dataset
        model, settings = full.model, full.settings or settings
        for r in full.results:
            instances.append(
                InstanceResult(
                    task=r.get("task", task),
                    id=r["id"],
                    type=r.get("type", "unknown"),
                    prediction=r["prediction"],
                    gold=r["gold"],
                    correct=bool(r["correct"]),
                    score=r["score"] if r["score"] is not None else float("nan"),
                    truncated=r.get("truncated", 0),
                    prompt_hash=r.get("prompt_hash"),
                    details=r.get("details") or {},
                )
            )
        m = full.metrics or {}
        known = {f for f in TaskSummary.__dataclass_fields__}
        if {"task", "n", "n_correct", "accuracy", "mean_score"} <= set(m):
            summaries[task] = TaskSummary(**{k: v for k, v in m.items() if k in known})
        else:
            summaries.update(summarise([i for i in instances if i.task == task]))
    return EvalResult(model=model, tasks=summaries, instances=instances, settings=dict(settings))


def aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Default metrics of stored records: their count, accuracy and mean score (when they have them)."""
    agg: dict[str, Any] = {"n": len(rows)}
    correct = [r["correct"] for r in rows if r["correct"] is not None]
    scores = [r["score"] for r in rows if r["score"] is not None]
    if correct:
        agg["accuracy"] = sum(correct) / len(correct)
    if scores:
        agg["mean_score"] = sum(scores) / len(scores)
    return agg
