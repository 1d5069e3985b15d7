"""Tensor-name rules, in one place: vocabulary tensors, embeddings, decoder layers, prefix alignment.

Checkpoints of one family name the same weight differently (``model.layers.3.mlp.down_proj.weight``, PEFT's
``base_model.model.`` prefix, multimodal ``language_model.`` wrappers); everything that reads meaning into a
name asks here.
"""

from __future__ import annotations

import re
from collections.abc import Container, Sequence

# Tensors whose first dimension is the vocabulary (input embeddings and output heads).
VOCAB_SUFFIXES = ("embed_tokens.weight", "lm_head.weight", "wte.weight", "embed_out.weight", "word_embeddings.weight")
EMBED_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")
# Prefixes that wrap the same weights in other checkpoints of a family (PEFT, multimodal wrappers).
KNOWN_PREFIXES = ("base_model.model.", "language_model.", "model.language_model.")
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def is_vocab_tensor(name: str) -> bool:
    """A tensor whose rows are the vocabulary (input embedding or output head)."""
    return name.endswith(VOCAB_SUFFIXES)


def is_input_embedding(name: str) -> bool:
    return name.endswith(EMBED_SUFFIXES)


def is_embedding(name: str) -> bool:
    """Input embedding or output head (vocabulary-sized matrices), skipped by intruder analysis by default."""
    return any(k in name for k in ("embed_tokens", "lm_head", "wte", "word_embeddings", "embed_out"))


def layer_of(name: str) -> int | None:
    """Decoder layer index of a tensor name (``model.layers.3.mlp...`` -> 3); None for non-layer tensors."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def align_names(names: Sequence[str], target: Container[str]) -> tuple[dict[str, str], str | None]:
    """Map ``names`` to names in ``target``, stripping or adding a known prefix when that matches more keys.

    Returns the mapping and a note saying which prefix was changed (None when names already match best).
    """
    best: tuple[int, dict[str, str], str | None] = (sum(n in target for n in names), {n: n for n in names}, None)
    if best[0] == len(names):
        return best[1], None
    for p in KNOWN_PREFIXES:
        for how, f in (("strip", lambda n, p=p: n.removeprefix(p)), ("add", lambda n, p=p: p + n)):
            m = {n: f(n) for n in names}
            hits = sum(v in target for v in m.values())
            if hits > best[0]:
                best = (hits, m, f"{how} prefix {p!r}")
    return best[1], best[2]
