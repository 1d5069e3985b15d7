"""Content fingerprints: which algorithm a recorded digest was made with, and how to show one.

A content digest says which algorithm made it, so a registry needs no column for it (no migration):

* ``blake3:<64 hex>`` is ``blake3-of-sorted-tensor-blake3`` (``CONTENT_ALGORITHM``, every new fingerprint);
* a bare ``<64 hex>`` is ``sha256-of-sorted-tensor-sha256``, the only algorithm before it (``LEGACY``).

Both are defined in ``patchlab.io.checkpoint`` and ``docs/registry.md``. A digest is re-verified with the
algorithm it names, so fingerprints recorded by older versions keep verifying. Torch-free: listing a registry
imports this.
"""

from __future__ import annotations

import re

from patchlab.errors import UnknownDigestError

LEGACY = "sha256-of-sorted-tensor-sha256"
BLAKE3 = "blake3-of-sorted-tensor-blake3"
#: The algorithm of every new content fingerprint.
CONTENT_ALGORITHM = BLAKE3
#: What a digest of each algorithm starts with (the legacy sha256 digests are bare hex).
PREFIXES = {BLAKE3: "blake3:", LEGACY: ""}
ALGORITHMS = tuple(PREFIXES)
_HEX64 = re.compile(r"[0-9a-f]{64}")


def content_algorithm(digest: str) -> str:
    """The algorithm that made a recorded content digest; ``UnknownDigestError`` for an unknown format."""
    for algorithm, prefix in PREFIXES.items():
        if prefix and digest.startswith(prefix):
            if _HEX64.fullmatch(digest[len(prefix) :]):
                return algorithm
            break
    else:
        if _HEX64.fullmatch(digest):
            return LEGACY
    raise UnknownDigestError(
        f"content fingerprint {digest[:24]!r} is not in a format this patchlab knows "
        f"({', '.join(ALGORITHMS)}); it was recorded by a newer version: upgrade patchlab"
    )


def make_digest(algorithm: str, hexdigest: str) -> str:
    """The recorded form of a hex digest made by ``algorithm`` (its prefix, then the hex)."""
    return PREFIXES[algorithm] + hexdigest


def hex_part(digest: str) -> str:
    """The hex digits of a digest, without its algorithm prefix."""
    for prefix in PREFIXES.values():
        if prefix and digest.startswith(prefix):
            return digest[len(prefix) :]
    return digest


def short_digest(digest: str | None, n: int = 12) -> str:
    """The first ``n`` hex digits (what listings show, and what a content prefix reference matches)."""
    return hex_part(digest)[:n] if digest else "?"


def same_algorithm(a: str, b: str) -> bool:
    """Whether two digests were made by one algorithm, so that comparing them says anything."""
    try:
        return content_algorithm(a) == content_algorithm(b)
    except UnknownDigestError:
        return False
