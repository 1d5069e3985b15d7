"""Evaluation results as plain dataclasses: per-instance records plus per-task aggregates.

No torch here: results round-trip through JSON (``to_json``/``from_json``) so the registry can store them
and :mod:`patchlab.measure.flips` can compare two of them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from patchlab.measure.flips import NO_FILTER, FlipRecord

RESULTS_FORMAT = "patchlab-eval"
RESULTS_FORMAT_VERSION = 1


@dataclass
class InstanceResult:
    """One instance of one task: what the model answered and whether it was right.

    Multiple choice: ``prediction``/``gold`` are choice indices, ``score`` is the summed log-likelihood of
    the predicted choice, ``details`` has ``choice_logprobs``, ``choice_logprobs_norm``,
    ``prediction_norm`` and ``correct_norm``. Generation: ``prediction`` is the generated text (cut at the
    first stop string), ``gold`` the reference answer(s), ``correct`` the normalised exact match and
    ``score`` the SQuAD token F1 (the similarity S of the MUSCLE difference form).
    ``truncated`` counts prompt tokens dropped from the left to fit the context (0 normally).
    """

    task: str
    id: str
    type: str
    prediction: Any
    gold: Any
    correct: bool
    score: float
    truncated: int = 0
    prompt_hash: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_flip_record(self) -> FlipRecord:
        return FlipRecord(
            task=self.task,
            doc_id=self.id,
            filter=NO_FILTER,
            correct=self.correct,
            prediction=self.prediction,
            score=self.score,
            prompt_hash=self.prompt_hash,
            kind=self.type,
        )


@dataclass
class TaskSummary:
    """Aggregate of one task: counts, accuracy, length-normalised accuracy (all-MC tasks) and the mean
    generation score (token F1 over the generation instances; None without any)."""

    task: str
    n: int
    n_correct: int
    accuracy: float
    mean_score: float | None
    accuracy_norm: float | None = None
    n_truncated: int = 0
    types: list[str] = field(default_factory=list)


@dataclass
class EvalResult:
    """All instances and per-task summaries of one evaluation run of one model."""

    model: str
    tasks: dict[str, TaskSummary]
    instances: list[InstanceResult]
    settings: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["format"] = RESULTS_FORMAT
        d["format_version"] = RESULTS_FORMAT_VERSION
        return d

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EvalResult:
        if data.get("format") != RESULTS_FORMAT:
            raise ValueError(f"not a patchlab evaluation result (format={data.get('format')!r})")
        if int(data.get("format_version", 0)) > RESULTS_FORMAT_VERSION:
            raise ValueError(
                f"evaluation result format_version {data['format_version']} is newer than this patchlab "
                f"reads ({RESULTS_FORMAT_VERSION}); upgrade patchlab"
            )
        return cls(
            model=data["model"],
            tasks={k: TaskSummary(**v) for k, v in data["tasks"].items()},
            instances=[InstanceResult(**i) for i in data["instances"]],
            settings=dict(data.get("settings", {})),
        )

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=True)

    def save(self, path: str | Path) -> Path:
        """Write as JSON atomically (temp file then rename)."""
        p = Path(path)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(self.dumps(), encoding="utf-8")
        tmp.replace(p)
        return p

    @classmethod
    def load(cls, path: str | Path) -> EvalResult:
        return cls.from_json(json.loads(Path(path).read_text(encoding="utf-8")))

    def flip_records(self) -> list[FlipRecord]:
        """The instances as records for :func:`patchlab.measure.flips.compare`."""
        return [i.to_flip_record() for i in self.instances]


def summarise(instances: list[InstanceResult]) -> dict[str, TaskSummary]:
    """Per-task aggregates of a list of instances (pure)."""
    by_task: dict[str, list[InstanceResult]] = {}
    for inst in instances:
        by_task.setdefault(inst.task, []).append(inst)
    out: dict[str, TaskSummary] = {}
    for task, items in by_task.items():
        n = len(items)
        n_ok = sum(1 for i in items if i.correct)
        mc = [i for i in items if i.type == "multiple_choice"]
        gen = [i for i in items if i.type == "generation"]
        acc_norm = (
            sum(1 for i in mc if i.details.get("correct_norm")) / len(mc) if mc and len(mc) == n else None
        )
        out[task] = TaskSummary(
            task=task,
            n=n,
            n_correct=n_ok,
            accuracy=n_ok / n,
            mean_score=sum(i.score for i in gen) / len(gen) if gen else None,
            accuracy_norm=acc_norm,
            n_truncated=sum(1 for i in items if i.truncated),
            types=sorted({i.type for i in items}),
        )
    return out


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile of a non-empty sequence, interpolated linearly (numpy's default method)."""
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)
