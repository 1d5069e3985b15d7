"""Vocabulary reconciliation: row maps between tensors whose first dimension is the vocabulary.

A row map is a LongTensor with one entry per output row: the source row it comes from, or -1 for a row the
source does not have (which then contributes zeros). Every policy reduces to such maps, so the engine needs
one gather, not one code path per policy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

POLICIES = ("pad-zero", "truncate", "by-token", "skip-embeddings")


@dataclass(frozen=True)
class RowPlan:
    """How the rows of one vocabulary tensor line up: output rows and a map per input role."""

    out_rows: int
    maps: dict[str, torch.Tensor]  # role -> row map (len out_rows), identity roles omitted
    note: str


def identity(n: int, src_rows: int) -> torch.Tensor:
    """Rows 0..n-1, with -1 where the source has fewer rows."""
    m = torch.arange(n, dtype=torch.long)
    m[m >= src_rows] = -1
    return m


def by_token(out_vocab: dict[str, int], src_vocab: dict[str, int], out_rows: int) -> tuple[torch.Tensor, int, int]:
    """Map each output row to the source row of the same token string.

    Returns (map, rows matched, source tokens with no place in the output). Rows past the tokenizer
    (padding rows of a padded embedding) map to the same index when the source has it.
    """
    m = torch.full((out_rows,), -1, dtype=torch.long)
    for tok, i in out_vocab.items():
        j = src_vocab.get(tok)
        if j is not None and i < out_rows:
            m[i] = j
    matched = int((m >= 0).sum())
    lost = sum(1 for t in src_vocab if t not in out_vocab)
    return m, matched, lost


def same_ids(a: dict[str, int] | None, b: dict[str, int] | None) -> bool:
    """True when every token both vocabularies know has the same id in each (unknown counts as same)."""
    if a is None or b is None:
        return True
    small, big = (a, b) if len(a) <= len(b) else (b, a)
    return all(big.get(t, i) == i for t, i in small.items())
