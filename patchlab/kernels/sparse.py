"""Sparse encodings of a dense diff: top-k magnitudes or DARE random drop (pure tensor functions, no I/O).

A sparse tensor is ``(indices, values)``: int64 flat (row-major) indices in increasing order and the values
at those positions; every other element of ΔW is zero. Row ranges can be materialised without the whole
tensor (``sparse_rows``) because the indices are sorted.

- top-k (TIES' trim step): keep the ``ceil(density·numel)`` largest magnitudes; ties at the threshold are
  broken by position, so the result is deterministic.
- DARE (Yu et al. 2024): keep each element with probability ``density`` and rescale survivors by
  ``1/density`` so the expected ΔW is unchanged. The mask comes from a generator seeded by ``seed`` and
  the tensor name, so a tensor's mask does not depend on the order tensors are processed in.
Exact zeros are never stored (they contribute nothing), so at density 1 both encodings equal the dense ΔW.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import torch

from patchlab.errors import SparseError

__all__ = ["SparseError", "check_density", "topk", "dare", "sparse_rows", "tensor_seed"]



def check_density(density: float) -> float:
    """Validate a density in (0, 1] and return it as float."""
    if isinstance(density, bool) or not isinstance(density, (int, float)) or math.isnan(density) or not (
        0.0 < density <= 1.0
    ):
        raise SparseError(f"density must be in (0, 1], got {density!r}; e.g. 0.1 keeps 10% of the entries")
    return float(density)


def _drop_zeros(idx: torch.Tensor, vals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    nz = vals != 0
    return idx[nz], vals[nz]


def topk(delta: torch.Tensor, density: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``ceil(density·numel)`` largest magnitudes of ``delta``: (sorted int64 flat indices, values)."""
    density = check_density(density)
    flat = delta.reshape(-1)
    n = flat.numel()
    k = min(n, max(1, math.ceil(density * n - 1e-9)))
    if k == n:
        idx = torch.arange(n, device=flat.device)
        return _drop_zeros(idx, flat.clone())
    mag = flat.abs().float()
    # k-th largest magnitude = (n-k+1)-th smallest; then take everything above it and fill ties in order.
    thr = torch.kthvalue(mag, n - k + 1).values
    above = mag > thr
    need = k - int(above.sum())
    keep = above
    if need > 0:
        tie_pos = torch.nonzero(mag == thr).reshape(-1)[:need]
        keep = above.clone()
        keep[tie_pos] = True
    idx = torch.nonzero(keep).reshape(-1)
    return _drop_zeros(idx, flat[idx].clone())


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed from a global seed and the tensor's name (order independent, stable across runs)."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def dare(
    delta: torch.Tensor, density: float, *, seed: int = 0, name: str = ""
) -> tuple[torch.Tensor, torch.Tensor]:
    """DARE: keep each entry with probability ``density`` (seeded per seed and name), rescale by 1/density."""
    density = check_density(density)
    flat = delta.reshape(-1)
    if density == 1.0:
        return _drop_zeros(torch.arange(flat.numel(), device=flat.device), flat.clone())
    gen = torch.Generator(device="cpu").manual_seed(tensor_seed(seed, name))
    keep = torch.rand(flat.numel(), generator=gen) < density
    idx = torch.nonzero(keep).reshape(-1).to(flat.device)
    vals = flat[idx].float().div_(density).to(flat.dtype)
    return _drop_zeros(idx, vals)


def _check(indices: torch.Tensor, values: torch.Tensor, numel: int) -> None:
    if indices.ndim != 1 or values.ndim != 1 or indices.numel() != values.numel():
        raise SparseError(
            f"sparse indices/values must be 1-D of equal length, got {tuple(indices.shape)} and "
            f"{tuple(values.shape)}; the patch is damaged: re-create it"
        )
    if indices.numel() and (int(indices[0]) < 0 or int(indices[-1]) >= numel):
        raise SparseError(f"sparse indices fall outside a tensor of {numel} elements; the patch is damaged")


def sparse_rows(
    indices: torch.Tensor, values: torch.Tensor, shape: Sequence[int], r0: int, r1: int
) -> torch.Tensor:
    """Dense fp32 rows ``r0:r1`` (first axis) of a sparse tensor, found by binary search on the indices."""
    shape = tuple(int(s) for s in shape)
    _check(indices, values, math.prod(shape))
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    r0, r1 = max(r0, 0), min(r1, shape[0])
    lo, hi = r0 * row, max(r1, r0) * row
    bounds = torch.searchsorted(indices, torch.tensor([lo, hi], dtype=indices.dtype, device=indices.device))
    a, b = int(bounds[0]), int(bounds[1])
    out = torch.zeros(hi - lo, dtype=torch.float32, device=values.device)
    out[(indices[a:b] - lo).to(values.device)] = values[a:b].float()
    return out.reshape((max(r1 - r0, 0),) + shape[1:])
