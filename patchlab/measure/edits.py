"""Measure fact edits with the WILD protocol (as in the LocFT-BF paper).

Greedy generation of up to 32 new tokens, stopped at ".", newline or EOS; an answer is right when it equals
the target after SQuAD normalisation. Three figures:

- reliability: share of edit prompts answered with the target;
- generalization: share of rephrased prompts answered with the target;
- locality: share of unrelated prompts whose output is unchanged (same text) against the unedited model.

Generation and normalisation are :func:`patchlab.measure.evaluate.greedy_generate` and
:func:`patchlab.measure.tasks.exact_match`; a prompt asked by several edits is generated once.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from patchlab.errors import EditTooLongError, PatchlabError
from patchlab.io.edits import Edit, as_edits
from patchlab.measure.evaluate import context_length, greedy_generate
from patchlab.measure.tasks import cut_at_stop, exact_match

MAX_NEW_TOKENS = 32
STOP = (".", "\n")


def wild_outputs(
    model: Any,
    tokenizer: Any,
    prompts: Iterable[str],
    *,
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = 32,
) -> dict[str, str]:
    """Greedy output of each distinct prompt, cut at the first stop string, stripped: ``{prompt: output}``."""
    uniq = list(dict.fromkeys(prompts))
    ids = _encode_prompts(model, tokenizer, uniq, max_new_tokens)
    was_training = model.training
    model.eval()
    try:
        gen = greedy_generate(model, tokenizer, ids, max_new_tokens, stop=STOP, batch_size=batch_size)
    finally:
        model.train(was_training)
    return {p: cut_at_stop(tokenizer.decode(g, skip_special_tokens=True), STOP).strip()
            for p, g in zip(uniq, gen, strict=True)}


def _encode_prompts(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int) -> list[list[int]]:
    ctx = context_length(model)
    ids = []
    for p in prompts:
        enc = tokenizer(p)["input_ids"]
        if ctx is not None and len(enc) + max_new_tokens > ctx:
            raise EditTooLongError(
                f"prompt {p[:60]!r}: {len(enc)} tokens + {max_new_tokens} new tokens exceed the model's "
                f"context of {ctx}; shorten it"
            )
        ids.append(enc)
    return ids


def check_context(
    model: Any, tokenizer: Any, edits: str | Path | Iterable[Edit | dict], *, max_new_tokens: int = MAX_NEW_TOKENS
) -> None:
    """Raise :class:`EditTooLongError` unless every prompt the WILD evaluation of ``edits`` asks (edit prompts,
    rephrasings, locality prompts) leaves room for ``max_new_tokens`` in the model's context."""
    edit_list = as_edits(edits)
    prompts = [p for e in edit_list for p in (e.prompt, *e.rephrasings, *e.locality)]
    _encode_prompts(model, tokenizer, list(dict.fromkeys(prompts)), max_new_tokens)


def locality_baseline(
    model: Any, tokenizer: Any, edits: str | Path | Iterable[Edit | dict], *, batch_size: int = 32
) -> dict[str, str]:
    """Outputs of the *unedited* model on every locality prompt: the reference locality compares against."""
    edit_list = as_edits(edits)
    return wild_outputs(model, tokenizer, [p for e in edit_list for p in e.locality], batch_size=batch_size)


@dataclass
class EditScores:
    """WILD figures of a model on an edit set; ``locality`` is None without a baseline or locality prompts."""

    reliability: float
    generalization: float | None
    locality: float | None
    n_edits: int
    n_rephrasings: int
    n_locality: int
    per_edit: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self, details: bool = False) -> str:
        """The figures as JSON; ``details`` adds each edit's outputs."""
        d = asdict(self)
        if not details:
            d.pop("per_edit")
        return json.dumps(d, indent=2, sort_keys=True)


def evaluate_edits(
    model: Any,
    tokenizer: Any,
    edits: str | Path | Iterable[Edit | dict],
    *,
    baseline: Mapping[str, str] | None = None,
    base_model: Any = None,
    batch_size: int = 32,
) -> EditScores:
    """Reliability, generalization and locality of ``model`` on ``edits``.

    Locality needs the unedited outputs: give ``baseline`` (from :func:`locality_baseline`) or ``base_model``.
    """
    edit_list = as_edits(edits)
    loc_prompts = [p for e in edit_list for p in e.locality]
    if baseline is None and base_model is not None:
        baseline = wild_outputs(base_model, tokenizer, loc_prompts, batch_size=batch_size)
    if baseline is not None:
        missing = [p for p in loc_prompts if p not in baseline]
        if missing:
            raise PatchlabError(
                f"the locality baseline lacks {len(missing)} prompt(s) (first {missing[0]!r}); "
                "compute it with locality_baseline() on the same edits"
            )
    prompts = [e.prompt for e in edit_list] + [r for e in edit_list for r in e.rephrasings]
    if baseline is not None:
        prompts += loc_prompts
    out = wild_outputs(model, tokenizer, prompts, batch_size=batch_size)
    per_edit = []
    rel = gen = loc = 0
    n_reph = sum(len(e.rephrasings) for e in edit_list)
    for e in edit_list:
        ok = exact_match(out[e.prompt], [e.target])
        reph = [exact_match(out[r], [e.target]) for r in e.rephrasings]
        local = [out[p] == baseline[p] for p in e.locality] if baseline is not None else []
        rel += ok
        gen += sum(reph)
        loc += sum(local)
        per_edit.append({"id": e.id, "target": e.target, "output": out[e.prompt], "reliable": ok,
                         "generalized": reph, "local": local})
    return EditScores(
        reliability=rel / len(edit_list),
        generalization=gen / n_reph if n_reph else None,
        locality=loc / len(loc_prompts) if baseline is not None and loc_prompts else None,
        n_edits=len(edit_list),
        n_rephrasings=n_reph,
        n_locality=len(loc_prompts),
        per_edit=per_edit,
    )


def summary_row(scores: EditScores) -> Sequence[str]:
    """The three figures formatted for a table (``-`` when not measured)."""
    return tuple("-" if v is None else f"{v:.3f}" for v in (scores.reliability, scores.generalization, scores.locality))
