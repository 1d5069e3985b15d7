"""Negative flips and update compatibility between two sets of per-instance results.

Pure functions over :class:`FlipRecord` values: no model, no I/O. Records come from patchlab's own
evaluation results (:func:`records_from_eval`) or from lm-evaluation-harness ``--log_samples`` files
(:mod:`patchlab.measure.lmeval`). Definitions (ALGORITHMS.md section 5), over the N instances both sides have:

- negative flip (NF): old correct, new wrong; ``NFR = #NF / N``.
- positive flip (PF): old wrong, new correct; ``PFR = #PF / N``.
- ``NFR_mc``: new wrong and new prediction differs from the old one (counts wrong -> other wrong), over N.
- ``BTC``: share of old-correct instances the new model keeps correct.
- ``BEC``: share of new-model mistakes the old model also made.
- Scored generative tasks (MUSCLE): ``D_i = S_new − S_old``; ``PFR_D = #(D > tol) / N``,
  ``NFR_D = #(D < −tol) / N``, ``m_g`` / ``m_r`` = mean gain / mean regression magnitude (both ≥ 0).

Missing instances: by default both sides must hold the same instance keys, else
:class:`ResultsMismatchError`. With ``allow_missing=True`` the rates are computed on the intersection
and every group reports ``n_only_old`` / ``n_only_new`` and the keys, so nothing leaves the
denominator unreported.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from patchlab.errors import ResultsMismatchError

NO_FILTER = "none"



@dataclass(frozen=True)
class FlipRecord:
    """One scored instance of one model: the unit negative-flip metrics compare.

    ``kind`` is ``"multiple_choice"`` or ``"generation"`` (or None when unknown); ``score`` is the
    similarity S used by the MUSCLE difference form (only generation records need it).
    """

    task: str
    doc_id: str
    correct: bool
    filter: str = NO_FILTER
    prediction: Any = None
    score: float | None = None
    prompt_hash: str | None = None
    kind: str | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.task, self.doc_id, self.filter)

    @property
    def group(self) -> str:
        return group_name(self.task, self.filter)


def group_name(task: str, filter: str) -> str:
    """Name of a (task, filter) group in reports: the task, plus ``[filter]`` unless no filter."""
    return task if filter == NO_FILTER else f"{task}[{filter}]"


@dataclass
class MuscleStats:
    """MUSCLE difference form over a scored generative group: ``D = S_new − S_old``."""

    n: int
    tolerance: float
    n_gain: int
    n_regression: int
    pfr: float
    nfr: float
    mean_gain: float | None
    mean_regression: float | None
    mean_difference: float
    gain_ids: list[str] = field(default_factory=list)
    regression_ids: list[str] = field(default_factory=list)


@dataclass
class FlipStats:
    """Negative/positive flip statistics of one group (or of all groups pooled)."""

    n: int
    n_old_correct: int
    n_new_correct: int
    accuracy_old: float | None
    accuracy_new: float | None
    n_negative_flips: int
    n_positive_flips: int
    nfr: float | None
    pfr: float | None
    n_negative_flips_mc: int | None
    nfr_mc: float | None
    btc: float | None
    bec: float | None
    both_correct_ids: list[str] = field(default_factory=list)
    negative_flip_ids: list[str] = field(default_factory=list)
    positive_flip_ids: list[str] = field(default_factory=list)
    both_wrong_ids: list[str] = field(default_factory=list)
    muscle: MuscleStats | None = None
    n_only_old: int = 0
    n_only_new: int = 0
    only_old_ids: list[str] = field(default_factory=list)
    only_new_ids: list[str] = field(default_factory=list)


@dataclass
class FlipReport:
    """Per-group statistics plus all groups pooled; ``groups`` keys are ``task`` or ``task[filter]``."""

    groups: dict[str, FlipStats]
    overall: FlipStats
    allow_missing: bool
    tolerance: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FlipReport:
        def stats(d: dict[str, Any]) -> FlipStats:
            d = dict(d)
            m = d.pop("muscle", None)
            return FlipStats(**d, muscle=MuscleStats(**m) if m is not None else None)

        return cls(
            groups={k: stats(v) for k, v in data["groups"].items()},
            overall=stats(data["overall"]),
            allow_missing=bool(data["allow_missing"]),
            tolerance=float(data["tolerance"]),
        )

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=True)


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def _id_of(rec: FlipRecord, pooled: bool) -> str:
    """Instance label inside a report: doc_id in a group, ``group:doc_id`` when groups are pooled."""
    return f"{rec.group}:{rec.doc_id}" if pooled else rec.doc_id


def _same(a: FlipRecord, b: FlipRecord) -> bool:
    """Equal records, where two NaN scores count as equal (a stored result without a score)."""
    if a == b:
        return True
    nan = a.score is not None and b.score is not None and math.isnan(a.score) and math.isnan(b.score)
    return nan and replace(a, score=None) == replace(b, score=None)


def index_records(records: Iterable[FlipRecord], side: str) -> dict[tuple[str, str, str], FlipRecord]:
    """Key records by (task, doc_id, filter); identical duplicates collapse, conflicting ones raise."""
    out: dict[tuple[str, str, str], FlipRecord] = {}
    for rec in records:
        prev = out.get(rec.key)
        if prev is None:
            out[rec.key] = rec
        elif not _same(prev, rec):
            raise ResultsMismatchError(
                f"{side} results hold two different rows for task {rec.task!r}, doc_id {rec.doc_id!r}, "
                f"filter {rec.filter!r} (correct {prev.correct} vs {rec.correct}, prediction "
                f"{prev.prediction!r} vs {rec.prediction!r}); keep one run per file or pass the files "
                "of one run only."
            )
    return out


def muscle_stats(
    old_scores: Sequence[float], new_scores: Sequence[float], ids: Sequence[str], tolerance: float = 0.0
) -> MuscleStats:
    """MUSCLE difference form over paired scores: counts and mean magnitudes of gains and regressions."""
    if not (len(old_scores) == len(new_scores) == len(ids)):
        raise ValueError("old_scores, new_scores and ids must have the same length")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    diffs = [float(b) - float(a) for a, b in zip(old_scores, new_scores, strict=True)]
    for i, d in zip(ids, diffs, strict=True):
        if not math.isfinite(d):
            raise ResultsMismatchError(f"instance {i!r} has a non-finite score; fix the scores first")
    gains = [(i, d) for i, d in zip(ids, diffs, strict=True) if d > tolerance]
    regs = [(i, d) for i, d in zip(ids, diffs, strict=True) if d < -tolerance]
    n = len(diffs)
    return MuscleStats(
        n=n,
        tolerance=tolerance,
        n_gain=len(gains),
        n_regression=len(regs),
        pfr=len(gains) / n if n else 0.0,
        nfr=len(regs) / n if n else 0.0,
        mean_gain=sum(d for _, d in gains) / len(gains) if gains else None,
        mean_regression=sum(-d for _, d in regs) / len(regs) if regs else None,
        mean_difference=sum(diffs) / n if n else 0.0,
        gain_ids=[i for i, _ in gains],
        regression_ids=[i for i, _ in regs],
    )


def flip_stats(
    pairs: Sequence[tuple[FlipRecord, FlipRecord]], *, tolerance: float = 0.0, pooled: bool = False
) -> FlipStats:
    """Flip statistics over already matched (old, new) pairs.

    ``NFR_mc`` is given only when every pair has both predictions. The MUSCLE block is given when
    every pair is a generation instance with a score on both sides.
    """
    n = len(pairs)
    both_ok, nf, pf, both_bad = [], [], [], []
    for old, new in pairs:
        label = _id_of(old, pooled)
        if old.correct and new.correct:
            both_ok.append(label)
        elif old.correct:
            nf.append(label)
        elif new.correct:
            pf.append(label)
        else:
            both_bad.append(label)
    n_old_ok = len(both_ok) + len(nf)
    n_new_ok = len(both_ok) + len(pf)
    n_new_wrong = len(nf) + len(both_bad)

    have_preds = n > 0 and all(o.prediction is not None and w.prediction is not None for o, w in pairs)
    nf_mc = sum(1 for o, w in pairs if not w.correct and w.prediction != o.prediction) if have_preds else None

    muscle = None
    scored = n > 0 and all(
        o.kind == "generation" and w.kind == "generation" and o.score is not None and w.score is not None
        for o, w in pairs
    )
    if scored:
        muscle = muscle_stats(
            [o.score for o, _ in pairs],  # type: ignore[misc]
            [w.score for _, w in pairs],  # type: ignore[misc]
            [_id_of(o, pooled) for o, _ in pairs],
            tolerance,
        )
    return FlipStats(
        n=n,
        n_old_correct=n_old_ok,
        n_new_correct=n_new_ok,
        accuracy_old=_ratio(n_old_ok, n),
        accuracy_new=_ratio(n_new_ok, n),
        n_negative_flips=len(nf),
        n_positive_flips=len(pf),
        nfr=_ratio(len(nf), n),
        pfr=_ratio(len(pf), n),
        n_negative_flips_mc=nf_mc,
        nfr_mc=_ratio(nf_mc, n) if nf_mc is not None else None,
        btc=_ratio(len(both_ok), n_old_ok),
        bec=_ratio(len(both_bad), n_new_wrong),
        both_correct_ids=both_ok,
        negative_flip_ids=nf,
        positive_flip_ids=pf,
        both_wrong_ids=both_bad,
        muscle=muscle,
    )


def compare(
    old: Iterable[FlipRecord],
    new: Iterable[FlipRecord],
    *,
    allow_missing: bool = False,
    tolerance: float = 0.0,
) -> FlipReport:
    """Match old and new records by (task, doc_id, filter) and compute flips per group and pooled.

    Raises :class:`ResultsMismatchError` when a matched pair's prompt hashes differ (both present),
    when kinds disagree, or, unless ``allow_missing``, when either side has instances the other lacks.
    """
    old_ix = index_records(old, "old")
    new_ix = index_records(new, "new")
    if not old_ix or not new_ix:
        raise ResultsMismatchError(
            f"nothing to compare: old has {len(old_ix)} instances, new has {len(new_ix)}; "
            "check the task names and files"
        )
    only_old = sorted(k for k in old_ix if k not in new_ix)
    only_new = sorted(k for k in new_ix if k not in old_ix)
    if (only_old or only_new) and not allow_missing:

        def show(keys: list[tuple[str, str, str]]) -> str:
            s = ", ".join(f"{group_name(t, f)}:{d}" for t, d, f in keys[:5])
            return s + (" ..." if len(keys) > 5 else "")

        raise ResultsMismatchError(
            f"the result sets hold different instances: {len(only_old)} only in old ({show(only_old)}), "
            f"{len(only_new)} only in new ({show(only_new)}). Evaluate both models on the same tasks, "
            "or pass allow_missing=True to compare on the intersection (missing counts are reported)."
        )

    pairs_by_group: dict[str, list[tuple[FlipRecord, FlipRecord]]] = {}
    for key in sorted(k for k in old_ix if k in new_ix):
        o, w = old_ix[key], new_ix[key]
        if o.prompt_hash and w.prompt_hash and o.prompt_hash != w.prompt_hash:
            raise ResultsMismatchError(
                f"task {o.task!r} doc_id {o.doc_id!r} filter {o.filter!r}: the prompts differ "
                f"(prompt_hash {o.prompt_hash} vs {w.prompt_hash}); both models must be evaluated with the "
                "same prompts (same task version, few-shot setting and chat template)"
            )
        if o.kind and w.kind and o.kind != w.kind:
            raise ResultsMismatchError(
                f"task {o.task!r} doc_id {o.doc_id!r}: old is {o.kind}, new is {w.kind}; not the same task"
            )
        pairs_by_group.setdefault(o.group, []).append((o, w))

    groups: dict[str, FlipStats] = {}
    all_groups = set(pairs_by_group) | {group_name(t, f) for t, _, f in only_old + only_new}
    for g in sorted(all_groups):
        st = flip_stats(pairs_by_group.get(g, []), tolerance=tolerance)
        st.only_old_ids = [d for t, d, f in only_old if group_name(t, f) == g]
        st.only_new_ids = [d for t, d, f in only_new if group_name(t, f) == g]
        st.n_only_old, st.n_only_new = len(st.only_old_ids), len(st.only_new_ids)
        groups[g] = st

    pooled_pairs = [p for g in sorted(pairs_by_group) for p in pairs_by_group[g]]
    overall = flip_stats(pooled_pairs, tolerance=tolerance, pooled=True)
    # The pooled MUSCLE block covers only the scored generative groups.
    scored_pairs = [p for g in sorted(pairs_by_group) if groups[g].muscle for p in pairs_by_group[g]]
    overall.muscle = (
        flip_stats(scored_pairs, tolerance=tolerance, pooled=True).muscle if scored_pairs else None
    )
    overall.only_old_ids = [f"{group_name(t, f)}:{d}" for t, d, f in only_old]
    overall.only_new_ids = [f"{group_name(t, f)}:{d}" for t, d, f in only_new]
    overall.n_only_old, overall.n_only_new = len(only_old), len(only_new)
    return FlipReport(groups=groups, overall=overall, allow_missing=allow_missing, tolerance=tolerance)
