"""Evaluation task files: JSONL, one instance per line, validated before any model is loaded.

Two instance types (a file may mix them):

- ``{"id": str, "type": "multiple_choice", "prompt": str, "choices": [str, ...], "gold": int}``
- ``{"id": str, "type": "generation", "prompt": str, "answer": str | [str, ...],
  "stop": [str, ...] (optional), "max_new_tokens": int (optional)}``

The task name is the file's stem unless given. Also the SQuAD-style answer normalisation and scores
used to judge generations (pure string functions).
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patchlab.errors import TaskFormatError

TASK_TYPES = ("multiple_choice", "generation")



@dataclass(frozen=True)
class Instance:
    """One evaluation instance; ``choices``/``gold`` for multiple choice, ``answers`` for generation."""

    id: str
    type: str
    prompt: str
    choices: tuple[str, ...] = ()
    gold: int | None = None
    answers: tuple[str, ...] = ()
    stop: tuple[str, ...] | None = None
    max_new_tokens: int | None = None

    @property
    def gold_value(self) -> Any:
        """What the result record stores as gold: the index (MC) or the answer(s) (generation)."""
        if self.type == "multiple_choice":
            return self.gold
        return self.answers[0] if len(self.answers) == 1 else list(self.answers)


@dataclass
class Task:
    name: str
    instances: list[Instance]
    source: str = ""
    types: list[str] = field(default_factory=list)


def _fail(where: str, msg: str) -> TaskFormatError:
    return TaskFormatError(f"{where}: {msg}")


def parse_instance(obj: Any, where: str) -> Instance:
    """Validate one decoded JSON object as an instance; ``where`` names it in error messages."""
    if not isinstance(obj, dict):
        raise _fail(where, f"expected a JSON object, got {type(obj).__name__}")
    kind = obj.get("type")
    if kind not in TASK_TYPES:
        raise _fail(
            where,
            f'unknown task type {kind!r}; patchlab evaluates {list(TASK_TYPES)} (set "type" on every line)',
        )
    iid = obj.get("id")
    if isinstance(iid, bool) or not isinstance(iid, (str, int)) or str(iid) == "":
        raise _fail(where, f'"id" must be a non-empty string, got {iid!r}')
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise _fail(where, '"prompt" must be a non-empty string')
    if kind == "multiple_choice":
        choices = obj.get("choices")
        if (
            not isinstance(choices, list)
            or len(choices) < 2
            or not all(isinstance(c, str) and c for c in choices)
        ):
            raise _fail(where, '"choices" must be a list of at least two non-empty strings')
        gold = obj.get("gold")
        if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise _fail(where, f'"gold" must be a choice index in 0..{len(choices) - 1}, got {gold!r}')
        return Instance(id=str(iid), type=kind, prompt=prompt, choices=tuple(choices), gold=gold)
    answer = obj.get("answer")
    answers = [answer] if isinstance(answer, str) else answer
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise _fail(where, '"answer" must be a string or a non-empty list of strings')
    stop = obj.get("stop")
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop)):
        raise _fail(where, '"stop" must be a list of non-empty strings')
    mnt = obj.get("max_new_tokens")
    if mnt is not None and (isinstance(mnt, bool) or not isinstance(mnt, int) or mnt < 1):
        raise _fail(where, f'"max_new_tokens" must be a positive integer, got {mnt!r}')
    return Instance(
        id=str(iid),
        type=kind,
        prompt=prompt,
        answers=tuple(answers),
        stop=tuple(stop) if stop is not None else None,
        max_new_tokens=mnt,
    )


def load_task(path: str | Path, name: str | None = None) -> Task:
    """Read and validate a JSONL task file; every problem names the file and line."""
    p = Path(path)
    if not p.is_file():
        raise TaskFormatError(f"{p}: task file not found")
    if p.suffix not in (".jsonl", ".json"):
        raise TaskFormatError(
            f"{p}: unknown task file format {p.suffix!r}; give a .jsonl file, one instance per line"
        )
    instances: list[Instance] = []
    seen: dict[str, int] = {}
    with p.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{p} line {n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise _fail(
                    where, f"not valid JSON ({e.msg}); task files are JSONL, one object per line"
                ) from e
            inst = parse_instance(obj, where)
            if inst.id in seen:
                raise _fail(
                    where, f"duplicate id {inst.id!r} (first on line {seen[inst.id]}); ids must be unique"
                )
            seen[inst.id] = n
            instances.append(inst)
    if not instances:
        raise TaskFormatError(f"{p}: no instances; the file is empty")
    return Task(
        name=name or p.stem,
        instances=instances,
        source=str(p),
        types=sorted({i.type for i in instances}),
    )


def load_prompts(path: str | Path) -> tuple[list[str], list[str]]:
    """Prompts for TuCo, as ``(ids, prompts)``: a ``.jsonl``/``.json`` file of objects with ``"prompt"``
    (and optionally ``"id"``; task files qualify), or any other file as plain text, one prompt per line
    (ids are line numbers). Blank lines are skipped; the file must hold at least one prompt."""
    p = Path(path)
    if not p.is_file():
        raise TaskFormatError(f"{p}: prompts file not found")
    ids: list[str] = []
    prompts: list[str] = []
    jsonl = p.suffix in (".jsonl", ".json")
    with p.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            if not jsonl:
                ids.append(str(n))
                prompts.append(line.rstrip("\r\n"))
                continue
            where = f"{p} line {n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise _fail(where, f"not valid JSON ({e.msg}); use one object per line, or a .txt file") from e
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"]:
                raise _fail(where, 'needs a non-empty "prompt" string, e.g. {"id": "p1", "prompt": "..."}')
            ids.append(str(obj.get("id", n)))
            prompts.append(obj["prompt"])
    if not prompts:
        raise TaskFormatError(f"{p}: no prompts; the file is empty")
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise TaskFormatError(f"{p}: duplicate prompt id {dup!r}; ids must be unique")
    return ids, prompts


# ---- SQuAD-style answer normalisation and scores ---------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower case, drop punctuation and the articles a/an/the, collapse whitespace (SQuAD v1.1)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: str, answers: tuple[str, ...] | list[str]) -> bool:
    """Normalised exact match against any of the reference answers."""
    p = normalize_answer(prediction)
    return any(p == normalize_answer(a) for a in answers)


def token_f1(prediction: str, answers: tuple[str, ...] | list[str]) -> float:
    """SQuAD token-overlap F1, the best over the reference answers."""
    pred = normalize_answer(prediction).split()
    best = 0.0
    for a in answers:
        gold = normalize_answer(a).split()
        if not pred or not gold:
            best = max(best, float(pred == gold))
            continue
        common = Counter(pred) & Counter(gold)
        same = sum(common.values())
        if same == 0:
            continue
        precision, recall = same / len(pred), same / len(gold)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


def cut_at_stop(text: str, stop: tuple[str, ...] | list[str] | None) -> str:
    """Text up to (not including) the earliest stop string."""
    if not stop:
        return text
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]
