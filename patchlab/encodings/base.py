"""What an encoding is (the ``Codec`` protocol) and the registry every encoding adds itself to."""

from __future__ import annotations

from typing import Protocol

import torch


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


def dense_entry(name: str, delta: torch.Tensor, store: torch.dtype, note: str = "") -> Encoded:
    """The dense encoding of ``delta`` (also every encoder's fallback)."""
    meta: dict = {"encoding": "dense", "keys": {"delta": name}}
    if note:
        meta["encoding_note"] = note
    return meta, {name: delta.to(store).contiguous().cpu()}
