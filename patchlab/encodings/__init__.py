"""How one delta is stored in a patch: each encoding registers under its manifest name.

An encoding knows how to turn the fp32 ΔW of one tensor into stored tensors plus manifest fields
(``encode``) and how to give back dense fp32 rows of ΔW from what was stored (``rows``). Nothing else in
patchlab branches on encoding names: readers and writers look the encoding up here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from patchlab.errors import PatchFormatError


class Stored(Protocol):
    """What a decoder needs of a stored patch entry (``patchlab.io.patch.PatchTensor`` is one)."""

    name: str
    meta: dict

    @property
    def shape(self) -> tuple[int, ...]: ...

    def stored(self, role: str) -> torch.Tensor: ...

    def stored_rows(self, role: str, r0: int, r1: int, out: torch.Tensor | None = None) -> torch.Tensor: ...


class Request(Protocol):
    """What an encoder is asked for (``patchlab.methods.compress.EncodingRequest`` is one)."""

    rank: int | None
    energy: float | None
    density: float | None
    method: str
    seed: int
    oversample: int
    n_iter: int
    max_rank: int | None
    dense_fallback: bool


Encoded = tuple[dict, dict[str, torch.Tensor]]  # manifest fields, tensors to store under their keys


class Codec(Protocol):
    name: str

    def rows(
        self, e: Stored, r0: int, r1: int, device: torch.device | str, out: torch.Tensor | None
    ) -> torch.Tensor: ...

    def gather(self, e: Stored, index: torch.Tensor, device: torch.device | str) -> torch.Tensor:
        """Dense fp32 rows at ``index`` (a 1-D int64 tensor of valid row numbers, any order)."""
        ...

    def encode(self, name: str, delta: torch.Tensor, req: Request, store: torch.dtype, rank: int | None) -> Encoded: ...


_REGISTRY: dict[str, Codec] = {}


def register(codec: Codec) -> Codec:
    _REGISTRY[codec.name] = codec
    return codec


def codec(name: str, where: str = "") -> Codec:
    """The codec registered under ``name``; an unknown name is a patch this patchlab cannot read."""
    _load()
    c = _REGISTRY.get(name)
    if c is None:
        raise PatchFormatError(f"{where or 'patch'}: unknown encoding {name!r}; upgrade patchlab to read it")
    return c


def names() -> tuple[str, ...]:
    _load()
    return tuple(_REGISTRY)


def _load() -> None:
    if not _REGISTRY:
        from patchlab.encodings import dense, lowrank, sparse  # noqa: F401  (each registers itself)


def dense_entry(name: str, delta: torch.Tensor, store: torch.dtype, note: str = "") -> Encoded:
    """The dense encoding of ``delta`` (also every encoder's fallback)."""
    meta: dict = {"encoding": "dense", "keys": {"delta": name}}
    if note:
        meta["encoding_note"] = note
    return meta, {name: delta.to(store).contiguous().cpu()}


Progress = Callable[[str], None]
