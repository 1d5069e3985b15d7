"""``dense``: ΔW stored as it is, in the storage dtype."""

from __future__ import annotations

import torch

from patchlab.encodings.base import Encoded, Request, Stored, dense_entry, register


class Dense:
    name = "dense"

    def rows(self, e: Stored, r0: int, r1: int, device: torch.device | str, out: torch.Tensor | None) -> torch.Tensor:
        if not e.shape:
            return e.stored("delta").to(device, torch.float32, copy=True)
        return e.stored_rows("delta", r0, r1, out).to(device).float()

    def gather(self, e: Stored, index: torch.Tensor, device: torch.device | str) -> torch.Tensor:
        return e.stored("delta")[index].to(device).float()

    def encode(self, name: str, delta: torch.Tensor, req: Request, store: torch.dtype, rank: int | None) -> Encoded:
        return dense_entry(name, delta, store)


register(Dense())
