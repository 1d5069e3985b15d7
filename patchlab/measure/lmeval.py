"""Read lm-evaluation-harness ``--log_samples`` files into :class:`~patchlab.measure.flips.FlipRecord` values.

A samples file (``samples_<task>_<date>.jsonl``) holds one JSON object per (doc_id, filter): ``doc_id``,
``filter`` (absent in old versions: ``"none"``), ``metrics`` (names, absent in old versions), the metric
values as top-level keys, ``arguments``/``resps``/``filtered_resps`` and ``doc_hash``/``prompt_hash``/
``target_hash``. Row order is not trusted; the task name comes from the file name unless given.

Correctness comes from one metric (``acc``, ``exact_match``, ... : the first known one the row has, or the
one you name); the generation score S for the MUSCLE form comes from ``score_metric`` (default: the
correctness metric). Predictions: the argmax choice for log-likelihood rows (length-normalised by the
choice's characters for ``acc_norm``, as lm-eval does), the filtered response for generation rows.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from patchlab.errors import LMEvalFormatError
from patchlab.measure.flips import NO_FILTER, FlipRecord

# Correctness metrics tried in this order when none is named.
CORRECTNESS_METRICS = ("acc", "exact_match", "acc_norm", "em", "pass@1", "f1")
_SAMPLES_NAME = re.compile(r"^samples_(?P<task>.+)_(?P<date>\d{4}-\d{2}-\d{2}T[\d\-.:]+)\.jsonl$")



def task_from_filename(path: str | Path) -> str:
    """Task name of ``samples_<task>_<date>.jsonl``; the whole stem after ``samples_`` if no date."""
    name = Path(path).name
    m = _SAMPLES_NAME.match(name)
    if m:
        return m.group("task")
    if name.startswith("samples_") and name.endswith(".jsonl"):
        return name[len("samples_") : -len(".jsonl")]
    raise LMEvalFormatError(
        f"{path}: not an lm-eval samples file name (expected samples_<task>_<date>.jsonl); "
        "pass task= (--task NAME) to name the task explicitly"
    )


def _loglik(entry: Any) -> float | None:
    """Log-likelihood of one MC response: ``[ll, is_greedy]`` as numbers or, as lm-eval >= 0.4 writes them
    (``sanitize_list``), as strings; None if the entry is neither."""
    if isinstance(entry, (list, tuple)) and len(entry) == 2:
        entry = entry[0]
    if isinstance(entry, bool):
        return None
    if isinstance(entry, (int, float)):
        return float(entry)
    if isinstance(entry, str):
        try:
            return float(entry)
        except ValueError:
            return None
    return None


def _continuations(arguments: Any, n: int) -> list[str] | None:
    """Continuation string of each of the n requests: ``arguments`` is a list of [context, continuation]
    (older lm-eval) or ``{"gen_args_i": {"arg_0": context, "arg_1": continuation}}`` (lm-eval >= 0.4)."""
    if isinstance(arguments, dict):
        items = [arguments.get(f"gen_args_{i}") for i in range(n)]
        conts = [a.get("arg_1") if isinstance(a, dict) else None for a in items]
    elif isinstance(arguments, list) and len(arguments) == n:
        conts = [a[1] if isinstance(a, (list, tuple)) and len(a) >= 2 else None for a in arguments]
    else:
        return None
    return conts if all(isinstance(c, str) for c in conts) else None  # type: ignore[return-value]


def _is_mc_entry(entry: Any) -> bool:
    return (
        isinstance(entry, (list, tuple))
        and len(entry) == 2
        and _loglik(entry) is not None
        and (isinstance(entry[1], bool) or entry[1] in ("True", "False"))
    )


def _mc_prediction(row: dict[str, Any], normalise: bool) -> int | None:
    resps = row.get("filtered_resps")
    if not isinstance(resps, list) or not resps:
        return None
    lls = [_loglik(r) for r in resps]
    if any(v is None for v in lls):
        return None
    if normalise:
        conts = _continuations(row.get("arguments"), len(lls))
        if conts is None:
            return None
        # lm-eval divides by the choice's length, without the target delimiter the request prepends
        lls = [ll / max(len(c.lstrip()), 1) for ll, c in zip(lls, conts, strict=True)]
    return max(range(len(lls)), key=lambda i: lls[i])


def _kind(row: dict[str, Any]) -> str | None:
    resps = row.get("filtered_resps")
    if isinstance(resps, list) and resps:
        if all(_is_mc_entry(r) for r in resps):
            return "multiple_choice"
        if isinstance(resps[0], str):
            return "generation"
    return None


def _generation_prediction(row: dict[str, Any]) -> str | None:
    resps = row.get("filtered_resps")
    if isinstance(resps, list) and resps and isinstance(resps[0], str):
        return resps[0]
    if isinstance(resps, str):
        return resps
    return None


def _metric_value(row: dict[str, Any], metric: str, where: str) -> float:
    v = row.get(metric)
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)) and math.isfinite(float(v)):
        return float(v)
    raise LMEvalFormatError(
        f"{where}: metric {metric!r} is {v!r}, not a finite number; pick another metric with metric=..."
    )


def records_from_rows(
    rows: Iterable[dict[str, Any]],
    task: str,
    *,
    metric: str | None = None,
    score_metric: str | None = None,
    filters: Iterable[str] | None = None,
    source: str = "<rows>",
) -> list[FlipRecord]:
    """Turn parsed samples rows of one task into records (see the module docstring for the rules)."""
    keep = set(filters) if filters is not None else None
    out: list[FlipRecord] = []
    for n, row in enumerate(rows, 1):
        where = f"{source} row {n}"
        if not isinstance(row, dict) or "doc_id" not in row:
            raise LMEvalFormatError(f"{where}: not a samples row (no doc_id); is this a --log_samples file?")
        flt = str(row.get("filter", NO_FILTER))
        if keep is not None and flt not in keep:
            continue
        names = row.get("metrics")
        if metric is not None:
            m = metric
        else:
            candidates = [c for c in CORRECTNESS_METRICS if c in row]
            if isinstance(names, list):
                candidates = [c for c in CORRECTNESS_METRICS if c in names and c in row] or candidates
            if not candidates:
                raise LMEvalFormatError(
                    f"{where}: none of the known correctness metrics {CORRECTNESS_METRICS} is present "
                    f"(row metrics: {names}); name one with metric=..."
                )
            m = candidates[0]
        if m not in row:
            raise LMEvalFormatError(f"{where}: metric {m!r} is not in the row (row metrics: {names})")
        value = _metric_value(row, m, where)
        kind = _kind(row)
        if kind == "multiple_choice":
            pred: Any = _mc_prediction(row, normalise=m == "acc_norm")
        elif kind == "generation":
            pred = _generation_prediction(row)
        else:
            pred = None
        score = None
        if kind == "generation":
            sm = score_metric or m
            if sm in row:
                score = _metric_value(row, sm, where)
        out.append(
            FlipRecord(
                task=task,
                doc_id=str(row["doc_id"]),
                filter=flt,
                correct=value >= 1.0,
                prediction=pred,
                score=score,
                prompt_hash=row.get("prompt_hash"),
                kind=kind,
            )
        )
    return out


def read_samples(
    path: str | Path,
    *,
    task: str | None = None,
    metric: str | None = None,
    score_metric: str | None = None,
    filters: Iterable[str] | None = None,
) -> list[FlipRecord]:
    """Read one ``samples_<task>_<date>.jsonl`` file into records."""
    p = Path(path)
    if not p.is_file():
        raise LMEvalFormatError(f"{p}: no such file; pass the samples_<task>_<date>.jsonl written by --log_samples")
    name = task or task_from_filename(p)
    rows = []
    with p.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise LMEvalFormatError(f"{p} line {n}: not valid JSON ({e.msg}); the file may be truncated") from e
    return records_from_rows(rows, name, metric=metric, score_metric=score_metric, filters=filters, source=str(p))


def read_samples_dir(
    path: str | Path,
    *,
    tasks: Iterable[str] | None = None,
    metric: str | None = None,
    score_metric: str | None = None,
    filters: Iterable[str] | None = None,
) -> list[FlipRecord]:
    """Read every samples file of one model's lm-eval output directory (found recursively), several tasks
    at once.

    When a task has several samples files (re-runs at different dates), only the newest date is read,
    so a re-run does not double the task.
    """
    root = Path(path)
    if root.is_file():
        return read_samples(root, metric=metric, score_metric=score_metric, filters=filters)
    files = sorted(root.rglob("samples_*.jsonl"))
    if not files:
        raise LMEvalFormatError(f"{root}: no samples_*.jsonl files; run lm_eval with --log_samples --output_path")
    parents = sorted({str(f.parent) for f in files})
    if len(parents) > 1:
        raise LMEvalFormatError(
            f"{root}: samples files sit in {len(parents)} directories ({', '.join(parents[:3])}); lm-eval writes "
            "one directory per model, so pass one model's directory"
        )
    newest: dict[str, Path] = {}
    for f in files:
        t = task_from_filename(f)
        if t not in newest or f.name > newest[t].name:
            newest[t] = f
    wanted = set(tasks) if tasks is not None else None
    if wanted is not None and (absent := wanted - set(newest)):
        raise LMEvalFormatError(f"{root}: no samples file for task(s) {sorted(absent)}; found {sorted(newest)}")
    out: list[FlipRecord] = []
    for t in sorted(newest):
        if wanted is None or t in wanted:
            out.extend(read_samples(newest[t], task=t, metric=metric, score_metric=score_metric, filters=filters))
    return out
