"""``lowrank``: ΔW = scale · B @ A (B is out×r, A is r×in), found by a randomized truncated SVD."""

from __future__ import annotations

import torch

from patchlab.encodings.base import Encoded, Request, Stored, dense_entry, register
from patchlab.kernels import lowrank as lr


class LowRank:
    name = "lowrank"

    def rows(self, e: Stored, r0: int, r1: int, device: torch.device | str, out: torch.Tensor | None) -> torch.Tensor:
        a, b = e.stored("A").to(device), e.stored("B")[r0:r1].to(device)
        return lr.lowrank_rows(a, b, float(e.meta.get("scale", 1.0)), 0, r1 - r0).reshape((r1 - r0, *e.shape[1:]))

    def gather(self, e: Stored, index: torch.Tensor, device: torch.device | str) -> torch.Tensor:
        a, b = e.stored("A").to(device), e.stored("B")[index].to(device)
        return lr.lowrank_rows(a, b, float(e.meta.get("scale", 1.0)), 0, index.numel())

    def encode(self, name: str, delta: torch.Tensor, req: Request, store: torch.dtype, rank: int | None) -> Encoded:
        if not lr.worth_factoring(delta.shape):
            why = "1-D" if delta.ndim < 2 else ("not 2-D" if delta.ndim > 2 else f"a side < {lr.MIN_FACTOR_DIM}")
            return dense_entry(name, delta, store, f"not factored ({why})")
        p = min(delta.shape)
        r = rank if rank is not None else req.rank
        if r is not None and r > p:
            if req.dense_fallback:
                return dense_entry(name, delta, store, f"rank {r} exceeds the matrix ({p}); kept dense")
            raise lr.LowRankError(
                f"rank {r} is larger than {name} ({delta.shape[0]}×{delta.shape[1]}) allows (at most {p}); "
                f"choose a rank ≤ {p}"
            )
        if r is not None and req.dense_fallback and not lr.worth_factoring(delta.shape, r):
            return dense_entry(name, delta, store, f"rank-{r} factors would not be smaller than the dense delta")
        f = lr.factorize(
            delta,
            rank=r,
            energy=req.energy if r is None else None,
            max_rank=req.max_rank,
            oversample=req.oversample,
            n_iter=req.n_iter,
            seed=req.seed,
            dtype=store,
        )
        itemsize = torch.tensor([], dtype=store).element_size()
        if req.dense_fallback and lr.factor_bytes(delta.shape, f.rank, itemsize) >= delta.numel() * itemsize:
            return dense_entry(name, delta, store, f"rank-{f.rank} factors would not be smaller than the dense delta")
        meta = {
            "encoding": "lowrank",
            "keys": {"A": f"{name}::A", "B": f"{name}::B"},
            "scale": f.scale,
            "rank": f.rank,
            "energy": f.energy,
            "rel_error": f.rel_error,
        }
        return meta, {f"{name}::A": f.A.cpu().contiguous(), f"{name}::B": f.B.cpu().contiguous()}


register(LowRank())
