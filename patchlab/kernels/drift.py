"""Pure weight-space diagnostics for porting a patch Δ (made on base_s) onto a newer base_t.

No I/O: tensors in, numbers out, fp32 (or fp64) accumulation. The streaming driver over checkpoints
feeds these row chunk by row chunk.

- :class:`DriftAccumulator`: ``‖base_t − base_s‖``, ``‖base_s‖``, ``‖Δ‖`` and ``⟨base_t − base_s, Δ⟩``
  accumulated over row chunks of one tensor (or over many tensors: a layer, the whole model); gives the
  drift relative to ``‖Δ‖`` and to ``‖base_s‖`` and ``cos(base_t − base_s, Δ)`` (ALGORITHMS.md §1).
- :func:`chunk_dot`: ``Σ a·b`` of one chunk, so that ``⟨base_t − base_s, Δ⟩ = ⟨base_t, Δ⟩ − ⟨base_s, Δ⟩`` can be
  measured from a port's own reads of base_t and Δ when ``⟨base_s, Δ⟩`` was recorded at extraction.
- :func:`intruder_dimensions`: among the top-k left singular vectors of the tuned matrix, those whose
  largest |cosine| with every left singular vector of the base matrix is below ε (ALGORITHMS.md §7).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class DriftStats:
    """Drift of one tensor or of an aggregate of tensors; ratios are None where undefined (zero norm)."""

    numel: int
    drift_norm: float
    base_norm: float
    delta_norm: float
    drift_rel_delta: float | None
    drift_rel_base: float | None
    cos_drift_delta: float | None


@dataclass
class DriftAccumulator:
    """Sums of squares and the inner product, accumulated in float64 over chunks; combinable with ``+``."""

    numel: int = 0
    ss_drift: float = 0.0
    ss_base: float = 0.0
    ss_delta: float = 0.0
    dot: float = 0.0

    def update(
        self,
        base_s: torch.Tensor,
        base_t: torch.Tensor,
        delta: torch.Tensor | None = None,
        work: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """Add one chunk (same shapes). Without ``delta`` only drift and base norms are accumulated.

        In fp32 (fp64 inputs stay fp64) with torch's cascaded sums, each chunk's sums added in fp64: within
        ~1e-8 relative of the all-fp64 way at a sixth of its time (a 16-bit chunk's drift is exact in fp32).
        ``work``: three fp32 buffers of at least the chunk's size (spares allocating and faulting them in)."""
        if base_s.shape != base_t.shape or (delta is not None and delta.shape != base_s.shape):
            raise ValueError(
                f"chunk shapes differ: base_s {tuple(base_s.shape)}, base_t {tuple(base_t.shape)}, "
                f"delta {None if delta is None else tuple(delta.shape)}"
            )
        n = base_s.numel()
        wide = torch.float64 if torch.float64 in (base_s.dtype, base_t.dtype) else torch.float32
        if work is not None and wide == torch.float32 and all(w.numel() >= n for w in work):
            s, d, sq = (w.reshape(-1)[:n] for w in work)
            s.copy_(base_s.reshape(-1))
            d.copy_(base_t.reshape(-1)).sub_(s)
        else:
            s = base_s.reshape(-1).to(wide)
            d = base_t.reshape(-1).to(wide) - s
            sq = torch.empty_like(d)
        self.numel += n
        self.ss_drift += float(torch.mul(d, d, out=sq).sum())
        self.ss_base += float(torch.mul(s, s, out=sq).sum())
        if delta is not None:
            dl = delta.reshape(-1)
            dl = dl if dl.dtype == wide else dl.to(wide)
            self.ss_delta += float(torch.mul(dl, dl, out=sq).sum())
            self.dot += float(torch.mul(d, dl, out=sq).sum())

    def __add__(self, other: DriftAccumulator) -> DriftAccumulator:
        return DriftAccumulator(
            self.numel + other.numel,
            self.ss_drift + other.ss_drift,
            self.ss_base + other.ss_base,
            self.ss_delta + other.ss_delta,
            self.dot + other.dot,
        )

    def stats(self) -> DriftStats:
        dn, bn, an = math.sqrt(self.ss_drift), math.sqrt(self.ss_base), math.sqrt(self.ss_delta)
        return DriftStats(
            numel=self.numel,
            drift_norm=dn,
            base_norm=bn,
            delta_norm=an,
            drift_rel_delta=dn / an if an > 0 else None,
            drift_rel_base=dn / bn if bn > 0 else None,
            cos_drift_delta=self.dot / (dn * an) if dn > 0 and an > 0 else None,
        )


def chunk_dot(a: torch.Tensor, b: torch.Tensor, work: torch.Tensor | None = None, narrow: bool | None = None) -> float:
    """``Σ a·b`` of one chunk from exact products, so that a difference of two such sums (``⟨base_t, Δ⟩ −
    ⟨base_s, Δ⟩``) keeps its digits when it is far smaller than either. ``narrow``: both inputs hold 16-bit float
    values (whatever their dtype; by default: both dtypes are 16-bit), whose products fp32 holds exactly: then
    they are formed and summed in fp32 (in ``work``, an fp32 buffer of at least the chunk's size); else in fp64.
    NaN/Inf in an input give a non-finite result (callers check)."""
    if a.shape != b.shape:
        raise ValueError(f"chunk shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    n = a.numel()
    if narrow is None:
        narrow = a.element_size() <= 2 and b.element_size() <= 2 and a.is_floating_point() and b.is_floating_point()
    if not narrow:  # torch's own product and sum, not BLAS: the same bits whatever the buffers' alignment
        return float(a.reshape(-1).double().mul_(b.reshape(-1)).sum())
    out = work.reshape(-1)[:n] if work is not None and work.numel() >= n else torch.empty(n, device=a.device)
    if torch.float32 in (a.dtype, b.dtype):  # computed in fp32 (type promotion): exact products
        torch.mul(a.reshape(-1), b.reshape(-1), out=out)
    else:  # widen first: torch.mul(bf16, bf16, out=fp32) multiplies in bf16, rounding each product to 8 bits
        out.copy_(a.reshape(-1)).mul_(b.reshape(-1))
    # torch's cascaded fp32 sum of exact products: ~1e-10 of Σ|a·b| on 512K-element chunks, as good as fp64 here
    return float(out.sum())


def drift_stats(base_s: torch.Tensor, base_t: torch.Tensor, delta: torch.Tensor | None = None) -> DriftStats:
    """Drift statistics of one whole tensor (see :class:`DriftAccumulator` for chunked use)."""
    acc = DriftAccumulator()
    acc.update(base_s, base_t, delta)
    return acc.stats()


@dataclass
class IntruderStats:
    """Intruder dimensions of one matrix: indices among the top k tuned singular vectors, and each of
    the k vectors' best |cosine| with the base's singular vectors."""

    k: int
    epsilon: float
    n_intruders: int
    intruder_indices: list[int]
    max_similarity: list[float]


def intruder_dimensions(
    w_base: torch.Tensor, w_tuned: torch.Tensor, *, k: int = 10, epsilon: float = 0.5
) -> IntruderStats:
    """Top-k left singular vectors of ``w_tuned`` whose max |cos| with all of ``w_base``'s is below ε."""
    if w_base.ndim != 2 or w_base.shape != w_tuned.shape:
        raise ValueError(
            f"intruder dimensions need two matrices of one shape, got {tuple(w_base.shape)} and {tuple(w_tuned.shape)}"
        )
    if not 0 < epsilon <= 1:
        raise ValueError(f"epsilon must be in (0, 1], got {epsilon}")
    k = min(k, min(w_base.shape))
    u_b = torch.linalg.svd(w_base.to(torch.float32), full_matrices=False).U
    u_t = torch.linalg.svd(w_tuned.to(torch.float32), full_matrices=False).U[:, :k]
    best = (u_t.T @ u_b).abs().amax(dim=1)
    idx = [i for i in range(k) if float(best[i]) < epsilon]
    return IntruderStats(
        k=k,
        epsilon=epsilon,
        n_intruders=len(idx),
        intruder_indices=idx,
        max_similarity=[float(v) for v in best],
    )
