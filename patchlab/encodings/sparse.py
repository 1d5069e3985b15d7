"""``sparse``: ΔW as sorted flat indices and the values there (top-k magnitudes or a DARE random drop)."""

from __future__ import annotations

import math

import torch

from patchlab.encodings.base import Encoded, Request, Stored, dense_entry, register
from patchlab.kernels import sparse as sp


class Sparse:
    name = "sparse"

    def rows(self, e: Stored, r0: int, r1: int, device: torch.device | str, out: torch.Tensor | None) -> torch.Tensor:
        shape = e.shape or (1,)
        rows = sp.sparse_rows(e.stored("indices"), e.stored("values"), shape, r0, r1).to(device)
        return rows if e.shape else rows.reshape(())

    def gather(self, e: Stored, index: torch.Tensor, device: torch.device | str) -> torch.Tensor:
        lo, hi = int(index.min()), int(index.max()) + 1
        return self.rows(e, lo, hi, device, None)[(index - lo).to(device)]

    def encode(self, name: str, delta: torch.Tensor, req: Request, store: torch.dtype, rank: int | None) -> Encoded:
        if delta.ndim == 0:
            return dense_entry(name, delta, store, "scalar")
        if req.method == "topk":
            idx, vals = sp.topk(delta, req.density)  # type: ignore[arg-type]
        else:
            idx, vals = sp.dare(delta, req.density, seed=req.seed, name=name)  # type: ignore[arg-type]
        vals = vals.to(store)
        flat = delta.reshape(-1)
        tot = float(torch.linalg.vector_norm(flat, dtype=torch.float64) ** 2)
        kept = flat[idx]
        kept2 = float(torch.linalg.vector_norm(kept, dtype=torch.float64) ** 2)
        err2 = tot - kept2 + float(torch.linalg.vector_norm(kept - vals.float(), dtype=torch.float64) ** 2)
        meta = {
            "encoding": "sparse",
            "keys": {"indices": f"{name}::indices", "values": f"{name}::values"},
            "density": req.density,
            "method": req.method,
            "nnz": int(idx.numel()),
            "rel_error": math.sqrt(max(err2, 0.0) / tot) if tot > 0 else 0.0,
        }
        if req.method == "dare":
            meta["seed"] = req.seed
        else:
            meta["energy"] = min(kept2 / tot, 1.0) if tot > 0 else 1.0
        return meta, {f"{name}::indices": idx.cpu().contiguous(), f"{name}::values": vals.cpu().contiguous()}


register(Sparse())
