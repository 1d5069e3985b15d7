"""Edit sets on disk: JSONL files of fact edits (prompt, target, rephrasings, locality prompts).

Read and validated here, before any model is touched; the format is documented in ``fixtures/edits/README.md``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from patchlab.errors import EditFormatError, EmptyTargetError

EDIT_KINDS = ("counterfactual", "new")


@dataclass(frozen=True)
class Edit:
    """One fact edit: train ``prompt`` → ``target``; ``rephrasings``/``locality`` are for evaluation."""

    id: str
    prompt: str
    target: str
    rephrasings: tuple[str, ...] = ()
    locality: tuple[str, ...] = ()
    kind: str = "counterfactual"

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "prompt": self.prompt,
            "target": self.target,
            "rephrasings": list(self.rephrasings),
            "locality": list(self.locality),
            "kind": self.kind,
        }


def _str_list(obj: dict, key: str, where: str) -> tuple[str, ...]:
    value = obj.get(key, [])
    if not isinstance(value, list) or not all(isinstance(s, str) and s.strip() for s in value):
        raise EditFormatError(f'{where}: "{key}" must be a list of non-empty strings, got {value!r}')
    return tuple(value)


def parse_edit(obj: Any, where: str) -> Edit:
    """Validate one decoded JSON object (or an :class:`Edit`); ``where`` names it in error messages."""
    if isinstance(obj, Edit):
        obj = obj.to_dict()
    if not isinstance(obj, dict):
        raise EditFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in ("id", "prompt", "target") if k not in obj]
    if missing:
        raise EditFormatError(f"{where}: missing field(s) {missing}; every edit needs id, prompt and target")
    eid, prompt, target = obj["id"], obj["prompt"], obj["target"]
    if isinstance(eid, bool) or not isinstance(eid, (str, int)) or str(eid) == "":
        raise EditFormatError(f'{where}: "id" must be a non-empty string, got {eid!r}')
    if not isinstance(prompt, str) or not prompt.strip():
        raise EditFormatError(f'{where}: "prompt" must be a non-empty string, got {prompt!r}')
    if not isinstance(target, str):
        raise EditFormatError(f'{where}: "target" must be a string, got {type(target).__name__}')
    if not target.strip():
        raise EmptyTargetError(f"{where} (id {eid!r}): the target is empty; give the answer the edit should teach")
    kind = obj.get("kind", "counterfactual")
    if kind not in EDIT_KINDS:
        raise EditFormatError(f'{where}: "kind" must be one of {list(EDIT_KINDS)}, got {kind!r}')
    return Edit(
        id=str(eid),
        prompt=prompt,
        target=target,
        rephrasings=_str_list(obj, "rephrasings", where),
        locality=_str_list(obj, "locality", where),
        kind=kind,
    )


def _unique_ids(edits: list[Edit], wheres: list[str]) -> list[Edit]:
    seen: dict[str, str] = {}
    for e, where in zip(edits, wheres, strict=True):
        if e.id in seen:
            raise EditFormatError(f"{where}: duplicate id {e.id!r} (first at {seen[e.id]})")
        seen[e.id] = where
    if not edits:
        raise EditFormatError("no edits given; an edit set needs at least one edit")
    return edits


def load_edits(path: str | Path) -> list[Edit]:
    """Read and validate a JSONL edit file; errors name the file and the 1-based line number."""
    p = Path(path)
    if not p.is_file():
        raise EditFormatError(f"{p}: edit file not found")
    edits, wheres = [], []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{p}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise EditFormatError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        edits.append(parse_edit(obj, where))
        wheres.append(where)
    if not edits:
        raise EditFormatError(f"{p}: the edit file holds no edits")
    return _unique_ids(edits, wheres)


def as_edits(edits: str | Path | Iterable[Edit | dict]) -> list[Edit]:
    """A path (JSONL) or a sequence of :class:`Edit`/dicts, validated, as a list of edits."""
    if isinstance(edits, (str, Path)):
        return load_edits(edits)
    items = list(edits)
    wheres = [f"edit #{i}" for i in range(len(items))]
    return _unique_ids([parse_edit(o, w) for o, w in zip(items, wheres, strict=True)], wheres)


def edits_digest(edits: Sequence[Edit]) -> str:
    """sha256 of the ordered edit set (canonical JSON of each edit's fields); order matters to training."""
    h = hashlib.sha256()
    for e in edits:
        h.update(json.dumps(e.to_dict(), sort_keys=True, ensure_ascii=False).encode("utf-8") + b"\n")
    return h.hexdigest()


# ---- The model: architecture and the weight to train ------------------------------------------------------


