"""Low-rank factorisation of dense diffs: ΔW ≈ scale · B @ A (pure tensor functions, no I/O).

Why: a full diff vector is as large as the model; most of a fine-tune's update lives in a few singular
directions per matrix (PortLLM, mergekit-extract-lora). A randomized SVD (Halko, Martinsson & Tropp 2011:
Gaussian sketch + power iterations + a small exact SVD) finds the top singular triplets in
O(m·n·(r + oversample)) instead of the O(m·n·min(m, n)) of a full SVD.

Conventions: ``delta`` is (out, in); ``B`` is (out, r), ``A`` is (r, in); the singular values are split
evenly (``B = U·√S``, ``A = √S·Vᵀ``) so both factors have the same range in half-precision storage, and the
scale is folded in (``scale = 1``). Energy kept is ``Σ_{i≤r} σ_i² / ‖Δ‖_F²``; the relative error is
``‖Δ − scale·B·A‖_F / ‖Δ‖_F`` measured on the factors as stored (after the cast).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from patchlab.errors import LowRankError

__all__ = [
    "LowRankError",
    "Factors",
    "Spectrum",
    "randomized_svd",
    "total_energy",
    "rank_for_energy",
    "factorize",
    "factor_bytes",
    "breakeven_rank",
    "worth_factoring",
    "relative_error",
    "lowrank_rows",
    "allocate_ranks",
    "spectrum",
]

#: Matrices whose smaller side is below this stay dense: factors save nothing worth a lossy encoding.
MIN_FACTOR_DIM = 16



@dataclass(frozen=True)
class Factors:
    """A rank-``rank`` factorisation ``ΔW ≈ scale · B @ A`` with its fidelity figures."""

    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    scale: float
    rank: int
    energy: float  # share of ‖Δ‖_F² kept, Σ_{i≤r} σ_i² / Σ σ_i²
    rel_error: float  # ‖Δ − scale·B·A‖_F / ‖Δ‖_F with the factors as returned


@dataclass(frozen=True)
class Spectrum:
    """Leading singular values of one matrix (descending) and its exact total energy ‖Δ‖_F²."""

    name: str
    shape: tuple[int, int]
    sigma: torch.Tensor  # 1-D fp32, descending, possibly truncated
    total: float


def total_energy(delta: torch.Tensor, *, chunk_elems: int = 1 << 22) -> float:
    """‖Δ‖_F² (exact and cheap: the denominator of every energy share), fp64 sums over fp32 row chunks."""
    flat = delta.reshape(-1)
    tot = 0.0
    for i in range(0, flat.numel(), chunk_elems):
        tot += float(torch.linalg.vector_norm(flat[i : i + chunk_elems].float()).double() ** 2)
    return tot


@contextlib.contextmanager
def _one_thread(enabled: bool) -> Iterator[None]:
    """Run small CPU factorisations single-threaded: for an m×(k+p) panel, LAPACK's threaded QR/SVD spend
    more time in barriers than in arithmetic (≈100× slower on a loaded 2-core machine)."""
    n = torch.get_num_threads()
    if not enabled or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _orth(x: torch.Tensor) -> torch.Tensor:
    with _one_thread(x.device.type == "cpu"):
        return torch.linalg.qr(x, mode="reduced").Q


#: Adaptive power iterations stop when the tail energy ‖Δ‖² − Σ_{i≤k} s_i² left to gain is below this share of
#: it: the error is then within ~0.01% of the exact truncated SVD's (the target is 0.1%).
TAIL_TOL = 2e-4
MAX_ITER = 24


def randomized_svd(
    delta: torch.Tensor,
    k: int,
    *,
    oversample: int = 10,
    n_iter: int = 2,
    seed: int = 0,
    tol: float | None = None,
    max_iter: int = MAX_ITER,
    total: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` singular triplets ``(U (m,k), S (k,), Vh (k,n))`` of a 2-D tensor, in fp32 on its device.

    Seeded Gaussian sketch of width ``k + oversample`` with ``n_iter`` QR-stabilised power iterations.
    When the sketch would cover half the smaller side or more, an exact SVD is cheaper and is used instead.

    With ``tol``, ``n_iter`` is a minimum: iterations go on (up to ``max_iter``) until the energy the top-k
    Ritz values gained in the last iteration, extrapolated geometrically to all the iterations still to
    come, is at most ``tol`` times the tail energy ``‖Δ‖² − Σ_{i≤k} s_i²`` (``total`` is ‖Δ‖², computed when
    not given). Two iterations suffice for a spectrum that drops after rank k; a flat tail (dense noise
    beside a low-rank update) needs more, and stopping at two left the error 1.5% above the exact SVD's.
    """
    if delta.ndim != 2:
        raise LowRankError(f"randomized_svd needs a 2-D tensor, got shape {tuple(delta.shape)}")
    m, n = delta.shape
    p = min(m, n)
    if not 1 <= k <= p:
        raise LowRankError(f"rank {k} is outside 1..{p} for a {m}×{n} matrix; choose a rank ≤ {p}")
    x = delta.float()
    width = min(k + max(oversample, 0), p)
    if 2 * width >= p:
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        return u[:, :k], s[:k], vh[:k]
    gen = torch.Generator(device=x.device).manual_seed(seed)
    omega = torch.randn(n, width, generator=gen, device=x.device, dtype=torch.float32)
    q = _orth(x @ omega)
    small = q.T @ x  # (width, n); its transpose is xᵀq, the next half-iteration
    if tol is not None and total is None:
        total = total_energy(x)
    captured = gained = None
    it = 0
    while it < max(n_iter, 0) or (tol is not None and it < max_iter):
        if tol is not None and it >= n_iter:
            with _one_thread(x.device.type == "cpu"):
                sv = torch.linalg.svdvals(small)
            now = float((sv[:k].double() ** 2).sum())
            if captured is not None:
                step = max(now - captured, 0.0)
                tail = max(total - now, 0.0)  # type: ignore[operator]
                if gained is not None:  # two steps seen: extrapolate their geometric decay
                    rho = step / gained if gained > 0 else 0.0
                    left = math.inf if rho >= 1.0 else step * rho / (1.0 - rho)
                    if step <= tol * tail and left <= tol * tail:
                        break
                gained = step
            captured = now
        q = _orth(x @ _orth(small.T))
        small = q.T @ x
        it += 1
    with _one_thread(x.device.type == "cpu"):
        ub, s, vh = torch.linalg.svd(small, full_matrices=False)
    u = q @ ub
    return u[:, :k], s[:k], vh[:k]


def rank_for_energy(sigma: torch.Tensor, total: float, energy: float) -> int | None:
    """Smallest r with Σ_{i≤r} σ_i² ≥ energy·total, or None when the given σ's do not reach it."""
    check_energy(energy)
    if total <= 0.0:
        return 1
    cum = torch.cumsum(sigma.double() ** 2, 0)
    # A relative slack of 1e-9 keeps energy=1.0 reachable despite fp rounding of the total.
    hit = torch.nonzero(cum >= energy * total * (1 - 1e-9))
    return int(hit[0]) + 1 if hit.numel() else None


def check_energy(energy: float) -> None:
    if not (isinstance(energy, (int, float)) and 0.0 < energy <= 1.0) or math.isnan(energy):
        raise LowRankError(f"energy must be in (0, 1], got {energy!r}; e.g. 0.9 keeps 90% of ‖Δ‖²")


def factor_bytes(shape: Sequence[int], rank: int, itemsize: int) -> int:
    """Bytes of the A and B factors of a rank-``rank`` factorisation."""
    return rank * (int(shape[0]) + int(shape[1])) * itemsize


def breakeven_rank(shape: Sequence[int]) -> int:
    """Largest rank whose factors are strictly smaller than the dense matrix (0 if none)."""
    m, n = int(shape[0]), int(shape[1])
    return max((m * n - 1) // (m + n), 0)


def worth_factoring(shape: Sequence[int], rank: int | None = None) -> bool:
    """2-D, both sides ≥ MIN_FACTOR_DIM, and (for a given rank) factors smaller than the dense delta."""
    if len(shape) != 2 or min(shape) < MIN_FACTOR_DIM:
        return False
    return rank is None or rank <= breakeven_rank(shape)


def relative_error(
    delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float = 1.0, *, chunk_rows: int = 4096
) -> float:
    """‖Δ − scale·B·A‖_F / ‖Δ‖_F computed exactly in row chunks (bounded memory), fp32 with fp64 sums."""
    num = 0.0
    den = 0.0
    a = A.float()
    for r0 in range(0, delta.shape[0], chunk_rows):
        d = delta[r0 : r0 + chunk_rows].float()
        approx = (B[r0 : r0 + chunk_rows].float() @ a).mul_(scale)
        den += float(torch.linalg.vector_norm(d)) ** 2
        num += float(torch.linalg.vector_norm(approx.sub_(d))) ** 2  # approx is a fresh tensor: reuse it
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return math.sqrt(num / den)


def lowrank_rows(A: torch.Tensor, B: torch.Tensor, scale: float, r0: int, r1: int) -> torch.Tensor:
    """Dense fp32 rows ``r0:r1`` of ``scale · B @ A`` without building the whole matrix."""
    return (B[r0:r1].float() @ A.float()).mul_(scale)


def spectrum(
    delta: torch.Tensor, k: int, *, name: str = "", oversample: int = 10, n_iter: int = 2, seed: int = 0
) -> Spectrum:
    """Leading ``k`` singular values of ``delta`` (randomized) plus its exact total energy."""
    k = min(k, min(delta.shape))
    _, s, _ = randomized_svd(delta, k, oversample=oversample, n_iter=n_iter, seed=seed)
    return Spectrum(name=name, shape=(int(delta.shape[0]), int(delta.shape[1])), sigma=s.float().cpu(),
                    total=total_energy(delta))


def factorize(
    delta: torch.Tensor,
    *,
    rank: int | None = None,
    energy: float | None = None,
    max_rank: int | None = None,
    oversample: int = 10,
    n_iter: int = 2,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    tol: float | None = TAIL_TOL,
) -> Factors:
    """Truncated SVD of a 2-D diff at a fixed ``rank`` or at the smallest rank keeping ``energy`` of ‖Δ‖².

    Exactly one of ``rank`` / ``energy`` is given. For ``energy`` the sketch starts at a modest width and
    doubles until the leading σ's reach the target (or ``max_rank`` / the full rank is hit: then an exact
    SVD decides). Computation is fp32 on ``delta``'s device; factors are cast to ``dtype`` (default fp32)
    and the relative error is measured on the cast factors. ``n_iter`` power iterations are a minimum: with
    ``tol`` (default) more run until the captured energy stops growing (see ``randomized_svd``), which keeps
    the error within 0.1% of the exact truncated SVD's on flat-tailed spectra too; ``tol=None`` runs exactly
    ``n_iter``.
    """
    if delta.ndim != 2:
        raise LowRankError(f"only 2-D tensors can be factorised, got shape {tuple(delta.shape)}")
    if (rank is None) == (energy is None):
        raise LowRankError("give exactly one of rank= or energy=")
    m, n = delta.shape
    p = min(m, n)
    x = delta.float()
    tot = total_energy(x)
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise LowRankError(f"rank must be a positive integer, got {rank!r}")
        if rank > p:
            raise LowRankError(
                f"rank {rank} is larger than the {m}×{n} matrix allows (at most {p}); choose a rank ≤ {p}"
            )
        u, s, vh = randomized_svd(x, rank, oversample=oversample, n_iter=n_iter, seed=seed, tol=tol, total=tot)
        r = rank
    else:
        check_energy(energy)  # type: ignore[arg-type]
        cap = p if max_rank is None else max(1, min(max_rank, p))
        k = min(cap, max(8, p // 64))
        while True:
            u, s, vh = randomized_svd(x, k, oversample=oversample, n_iter=n_iter, seed=seed, tol=tol, total=tot)
            found = rank_for_energy(s, tot, energy)  # type: ignore[arg-type]
            if found is not None:
                r = found
                break
            if k >= cap:
                r = cap  # the target is not reachable under max_rank: keep all we may
                break
            k = min(cap, 2 * k)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    root = s.sqrt()
    B = u * root  # (m, r)
    A = root[:, None] * vh  # (r, n)
    kept = float((s.double() ** 2).sum()) / tot if tot > 0 else 1.0
    if dtype is not None:
        A, B = A.to(dtype), B.to(dtype)
    err = relative_error(x, A, B, 1.0)
    return Factors(A=A, B=B, scale=1.0, rank=r, energy=min(kept, 1.0), rel_error=err)


def allocate_ranks(spectra: Sequence[Spectrum], budget_bytes: int, itemsize: int) -> dict[str, int]:
    """Ranks per matrix maximising the total energy kept with all factors within ``budget_bytes``.

    Each extra rank of a matrix costs ``(m + n)·itemsize`` bytes and gains ``σ_i²``; within one matrix the
    gain per byte decreases with i, so taking increments greedily by gain/byte over all matrices is optimal
    for this (fractional) knapsack up to the last increment. Ranks can be 0 (the tensor is dropped from the
    low-rank part; the caller decides what that means). Only the σ's given are considered.
    """
    if budget_bytes < 0:
        raise LowRankError(f"size budget must be positive, got {budget_bytes} bytes")
    ranks = {s.name: 0 for s in spectra}
    gains, costs, owners = [], [], []
    for i, sp in enumerate(spectra):
        if sp.sigma.numel() == 0:
            continue
        cost = float((sp.shape[0] + sp.shape[1]) * itemsize)
        g = sp.sigma.double() ** 2
        gains.append(g / cost)
        costs.append(torch.full_like(g, cost))
        owners.append(torch.full(g.shape, i, dtype=torch.long))
    if not gains:
        return ranks
    ratio = torch.cat(gains)
    cost = torch.cat(costs)
    owner = torch.cat(owners)
    order = torch.argsort(ratio, descending=True, stable=True)
    spent = torch.cumsum(cost[order], 0)
    take = order[spent <= budget_bytes]
    counts = torch.bincount(owner[take], minlength=len(spectra))
    for i, sp in enumerate(spectra):
        ranks[sp.name] = int(counts[i])
    return ranks
