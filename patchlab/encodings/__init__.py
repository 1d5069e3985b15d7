"""How one delta is stored in a patch: each encoding registers under its manifest name.

An encoding knows how to turn the fp32 ΔW of one tensor into stored tensors plus manifest fields
(``encode``) and how to give back dense fp32 rows of ΔW from what was stored (``rows``). Nothing else in
patchlab branches on encoding names: readers and writers look the encoding up here.
"""

from __future__ import annotations

from patchlab.encodings import dense, lowrank, sparse  # noqa: F401  (each registers itself)
from patchlab.encodings.base import _REGISTRY, Codec, Encoded, dense_entry
from patchlab.errors import PatchFormatError

__all__ = ["Codec", "Encoded", "codec", "dense_entry", "names"]


def codec(name: str, where: str = "") -> Codec:
    """The codec registered under ``name``; an unknown name is a patch this patchlab cannot read."""
    c = _REGISTRY.get(name)
    if c is None:
        raise PatchFormatError(f"{where or 'patch'}: unknown encoding {name!r}; upgrade patchlab to read it")
    return c


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)
