"""Pure merge kernels: sparsify, rescale, elect signs and combine several deltas of one tensor.

No I/O and no global state; every computation is fp32 and every statistic is exact, so a tensor merged in
row chunks (``MergeStats`` + ``merge_chunk``) gives the same bytes as the in-memory ``merge_tensor``.
Conventions (mergekit's defaults, and every difference from mergekit, the papers and peft) are in
``docs/merge.md``.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from patchlab.errors import MergeConfigError

Tensor = torch.Tensor
Alloc = Callable[[str, Tensor, torch.dtype], Tensor]
"""``alloc(slot, like, dtype)``: an uninitialized tensor shaped and placed like ``like``. The streaming kernels
take their temporaries from it, so a caller can hand out warm buffers reused chunk after chunk (the engine's
``scratch``); a slot's buffer is only reused once the chunk that asked for it is done."""


def fresh(slot: str, like: Tensor, dtype: torch.dtype) -> Tensor:
    """The default ``Alloc``: a new tensor each time (what the in-memory kernels and tests get)."""
    return torch.empty(like.shape, dtype=dtype, device=like.device)

MAGNITUDE = "magnitude"
RANDOM = "random"
OUTLIERS = "magnitude_outliers"
DELLA = "della_magprune"
RESCALES = ("l1", "inverse-density")
SIGN_ELECTIONS = ("sum", "count")
DEFAULT_GAMMA = 0.01
DEFAULT_EPSILON = 0.15
L1_EPS = 1e-7  # mergekit: no rescale when either L1 norm is below this



# ---------------------------------------------------------------------------------------------------------
# methods and parameter validation


@dataclass(frozen=True)
class MergeMethod:
    """One merge method: its sparsifier and mergekit's defaults for sign election, normalize and rescale."""

    name: str
    sparsifier: str | None
    sign_election: str | None
    normalize: bool
    rescale: str | None
    patch_params: tuple[str, ...]
    reference: str


def _method(name: str, sparsifier: str | None, election: str | None, normalize: bool, rescale: bool, ref: str):
    params = ("weight",) if sparsifier is None else ("weight", "density")
    params += ("gamma",) if sparsifier == OUTLIERS else ("epsilon",) if sparsifier == DELLA else ()
    return MergeMethod(name, sparsifier, election, normalize, "l1" if rescale else None, params, ref)


METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        _method("task_arithmetic", None, None, False, False, "https://arxiv.org/abs/2212.04089"),
        _method("ties", MAGNITUDE, "sum", True, False, "https://arxiv.org/abs/2306.01708"),
        _method("dare_linear", RANDOM, None, False, True, "https://arxiv.org/abs/2311.03099"),
        _method("dare_ties", RANDOM, "sum", False, True, "https://arxiv.org/abs/2311.03099"),
        _method("breadcrumbs", OUTLIERS, None, False, False, "https://arxiv.org/abs/2312.06795"),
        _method("breadcrumbs_ties", OUTLIERS, "sum", False, False, "https://arxiv.org/abs/2312.06795"),
        _method("della", DELLA, "sum", True, True, "https://arxiv.org/abs/2406.11617"),
        _method("della_linear", DELLA, None, False, True, "https://arxiv.org/abs/2406.11617"),
    )
}

GLOBAL_PARAMS = ("lambda", "normalize", "rescale", "sign_election")
_PLURAL = {"weight": "weights", "density": "densities", "gamma": "gammas", "epsilon": "epsilons"}


@dataclass(frozen=True)
class MergeParams:
    """A validated merge: the method and every parameter resolved (per patch: one entry per patch)."""

    method: MergeMethod
    weights: tuple[float, ...]
    densities: tuple[float, ...]
    gammas: tuple[float, ...]
    epsilons: tuple[float, ...]
    lambda_: float
    normalize: bool
    rescale: str | None
    sign_election: str | None

    @property
    def n_patches(self) -> int:
        return len(self.weights)


def _closest(word: str, choices: Sequence[str]) -> str:
    near = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f"; did you mean {near[0]!r}?" if near else f"; valid: {', '.join(choices)}"


def get_method(name: str | MergeMethod) -> MergeMethod:
    """The merge method called ``name``; unknown names raise with the closest valid one."""
    if isinstance(name, MergeMethod):
        return name
    if name not in METHODS:
        raise MergeConfigError(f"unknown merge method {name!r}{_closest(str(name), list(METHODS))}")
    return METHODS[name]


def _number(what: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise MergeConfigError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _per_patch(method: MergeMethod, param: str, values: Any, n: int, default: float) -> tuple[float, ...]:
    if values is None:
        return (default,) * n
    if param not in method.patch_params:
        users = [m.name for m in METHODS.values() if param in m.patch_params]
        raise MergeConfigError(f"{param} does not apply to {method.name}; it is a parameter of {', '.join(users)}")
    if isinstance(values, int | float):
        values = (values,) * n
    values = tuple(values)
    if len(values) != n:
        raise MergeConfigError(f"{len(values)} {_PLURAL[param]} given for {n} patches; give one per patch")
    return tuple(_number(f"{param} of patch {i + 1}", v) for i, v in enumerate(values))


def _choice(what: str, value: Any, choices: Sequence[str], default: str | None) -> str | None:
    if value is None:
        return default
    if value is False or value == "none":
        return None
    if value is True and what == "rescale":
        return "l1"  # mergekit's `rescale: true`
    if value not in choices:
        raise MergeConfigError(f"unknown {what} {value!r}{_closest(str(value), [*choices, 'none'])}")
    return value


def validate_merge(
    method: str | MergeMethod,
    n_patches: int,
    weights: Sequence[float] | float | None = None,
    densities: Sequence[float] | float | None = None,
    gammas: Sequence[float] | float | None = None,
    epsilons: Sequence[float] | float | None = None,
    lambda_: float = 1.0,
    normalize: bool | None = None,
    rescale: str | bool | None = None,
    sign_election: str | bool | None = None,
    **unknown: Any,
) -> MergeParams:
    """Check a merge before any tensor is read and resolve the defaults (``None``: the method's own).

    Per-patch values may be one number for every patch. ``rescale`` and ``sign_election`` take ``"none"``
    or ``False`` to turn them off. Raises ``MergeConfigError`` with one line that says what to fix.
    """
    m = get_method(method)
    if unknown:
        known = ["weights", "densities", "gammas", "epsilons", "lambda_", "normalize", "rescale", "sign_election"]
        bad = sorted(unknown)[0]
        raise MergeConfigError(f"unknown merge parameter {bad!r}{_closest(bad, known)}")
    if isinstance(n_patches, bool) or not isinstance(n_patches, int) or n_patches < 1:
        raise MergeConfigError(f"a merge needs at least one patch, got {n_patches!r}")
    w = _per_patch(m, "weight", weights, n_patches, 1.0)
    d = _per_patch(m, "density", densities, n_patches, 1.0)
    g = _per_patch(m, "gamma", gammas, n_patches, DEFAULT_GAMMA)
    e = _per_patch(m, "epsilon", epsilons, n_patches, DEFAULT_EPSILON)
    for i, di in enumerate(d):
        if not 0 < di <= 1:
            raise MergeConfigError(f"density of patch {i + 1} is {di}; it must be in (0, 1]")
    for i, gi in enumerate(g):
        if not 0 <= gi < 1:
            raise MergeConfigError(f"gamma of patch {i + 1} is {gi}; it must be in [0, 1)")
    if m.sparsifier == DELLA:
        for i, (di, ei) in enumerate(zip(d, e, strict=True)):
            if ei < 0:
                raise MergeConfigError(f"epsilon of patch {i + 1} is {ei}; it must be >= 0")
            if di < 1 and not (di - ei > 0 and di + ei <= 1):
                raise MergeConfigError(
                    f"patch {i + 1}: density ± epsilon = {di} ± {ei} leaves (0, 1]; lower epsilon below "
                    f"{min(di, 1 - di):g}"
                )
    lam = _number("lambda", lambda_)
    norm = m.normalize if normalize is None else normalize
    if not isinstance(norm, bool):
        raise MergeConfigError(f"normalize must be true or false, got {normalize!r}")
    resc = _choice("rescale", rescale, RESCALES, m.rescale)
    if resc is not None and m.sparsifier is None:
        raise MergeConfigError(f"rescale={resc} does not apply to {m.name}, which drops nothing")
    elect = _choice("sign election", sign_election, SIGN_ELECTIONS, m.sign_election)
    return MergeParams(m, w, d, g, e, lam, norm, resc, elect)


def validate_merge_config(
    method: str, patches: Sequence[Mapping[str, Any]], parameters: Mapping[str, Any] | None = None
) -> MergeParams:
    """``validate_merge`` from mergekit-style names: per patch ``weight``/``density``/``gamma``/``epsilon``,
    global ``lambda``/``normalize``/``rescale``/``sign_election``. Unknown names raise with the closest one."""
    m = get_method(method)
    per: dict[str, list[Any]] = {}
    for i, p in enumerate(patches):
        for key in p:
            if key not in m.patch_params:
                hint = _closest(key, m.patch_params)
                raise MergeConfigError(f"patch {i + 1}: unknown parameter {key!r} for {m.name}{hint}")
    for key in m.patch_params:
        given = [p.get(key) for p in patches]
        if any(v is not None for v in given):
            if any(v is None for v in given) and key != "weight":
                default = {"density": 1.0, "gamma": DEFAULT_GAMMA, "epsilon": DEFAULT_EPSILON}[key]
                given = [default if v is None else v for v in given]
            per[_PLURAL[key]] = given
    if "weights" in per and any(v is None for v in per["weights"]):
        per["weights"] = [1.0 if v is None else v for v in per["weights"]]
    glob = dict(parameters or {})
    for key in glob:
        if key not in GLOBAL_PARAMS:
            raise MergeConfigError(f"unknown merge parameter {key!r}{_closest(key, GLOBAL_PARAMS)}")
    if "lambda" in glob:
        glob["lambda_"] = glob.pop("lambda")
    return validate_merge(m, len(patches), **per, **glob)


# ---------------------------------------------------------------------------------------------------------
# counter-based random numbers


_M32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """``x·c mod 2**32`` for int64 ``x`` in [0, 2**32) with 16-bit limbs: every product stays below 2**49."""
    return (((x & 0xFFFF) * c) + (((x >> 16) * c) & 0xFFFF) * 65536) & _M32


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit avalanche bijection (Wellons' lowbias32) on int64 tensors holding 32-bit values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _key(seed: int, name: str, stream: int) -> tuple[int, int]:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise MergeConfigError(f"seed must be an integer, got {seed!r}")
    digest = hashlib.blake2b(f"{seed}\0{stream}\0{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")


def random_bits24(
    seed: int, name: str, start: int, count: int, stream: int = 0, device: torch.device | str | None = None
) -> Tensor:
    """24 random bits (int64) for flat elements ``start .. start+count-1``, a function of
    (seed, name, stream, index) only: chunks, threads and devices get the same values."""
    k0, k1 = _key(seed, name, stream)
    idx = torch.arange(start, start + count, dtype=torch.int64, device=device)
    h = _mix32((idx & _M32) ^ k0)
    h = _mix32(h ^ (idx >> 32) ^ k1)
    return h >> 8


def uniform(
    seed: int, name: str, start: int, count: int, stream: int = 0, device: torch.device | str | None = None
) -> Tensor:
    """Uniform fp32 numbers in [0, 1) (multiples of 2**-24) for flat elements ``start .. start+count-1``."""
    return random_bits24(seed, name, start, count, stream, device).to(torch.float32).mul_(2.0**-24)


# ---------------------------------------------------------------------------------------------------------
# exact L1 norms: integer sums of mantissas per exponent, so the order of the additions cannot matter


def _abs_bits(x: Tensor) -> Tensor:
    """The bit patterns of ``|x|`` (fp32) as int64: ordered exactly like the magnitudes."""
    return x.float().abs().contiguous().view(torch.int32).to(torch.int64)


def _abs_bits32(x: Tensor, out: Tensor | None = None) -> Tensor:
    """``_abs_bits`` as int32 (the sign bit is clear, so the order is the same): half the memory traffic of
    int64 for the streaming passes, which only compare, shift, mask and histogram the patterns. ``out``: an
    int32 buffer shaped like ``x`` to write them into."""
    if out is None:
        return x.float().abs().contiguous().view(torch.int32)
    torch.abs(x.float(), out=out.view(torch.float32))
    return out


def _keep_ge(bits: Tensor, t: int, out: Tensor) -> Tensor:
    """Integer keep-mask (−1: keep, 0: drop) of ``bits >= t`` for non-negative fp32 bit patterns, into ``out``.

    ``~((bits − t) >> 31)`` never overflows (both lie in [0, 2**31)), and integer masks are several times
    cheaper on CPU than boolean compares followed by ``torch.where``."""
    if t > 0x7FFFFFFF:
        return out.zero_()
    return torch.sub(bits, t, out=out).bitwise_right_shift_(31).bitwise_not_()


def _masked(x: Tensor, keep: Tensor, out: Tensor) -> Tensor:
    """``torch.where(keep != 0, x, +0.0)`` for fp32 ``x`` and an integer keep-mask (−1/0), bit for bit (NaN
    payloads included), as a bitwise and of the patterns, into the fp32 buffer ``out``."""
    torch.bitwise_and(x.contiguous().view(torch.int32), keep, out=out.view(torch.int32))
    return out


def _mantissa(bits: Tensor) -> Tensor:
    return (bits & 0x7FFFFF) | ((bits >> 23) > 0).to(torch.int64) * 0x800000


def _exp_units(per_exponent: Tensor) -> int:
    """Σ over exponents e of ``sums[e]·2**(max(e,1)-1)``: an exact L1 in units of 2**-149."""
    total = 0
    for e, s in enumerate(per_exponent.tolist()):
        if s:
            total += s << max(e, 1) - 1
    return total


def _hi_units(hist_sums: Tensor) -> int:
    """``_exp_units`` of mantissa sums kept per high-16-bit bucket (sign 0, 8 exponent bits, 7 mantissa bits)."""
    return _exp_units(hist_sums.view(512, 128).sum(1)[:256])


def l1_units(x: Tensor) -> int:
    """The exact L1 norm of fp32 ``x`` as an integer number of 2**-149 (the smallest fp32 subnormal)."""
    bits = _abs_bits(x).reshape(-1)
    h = torch.zeros(256, dtype=torch.int64, device=bits.device).index_add_(0, bits >> 23, _mantissa(bits))
    return _exp_units(h.cpu())


def l1_norm(x: Tensor) -> float:
    """The L1 norm of ``x`` computed exactly and rounded once to fp64."""
    return l1_units(x) / (1 << 149)


def l1_scale(before_units: int, after_units: int) -> Tensor | None:
    """mergekit's L1 rescale factor ``‖t‖₁ / ‖masked‖₁`` (fp32 0-d tensor), or None when either norm is
    below 1e-7 (mergekit leaves the survivors as they are then)."""
    if before_units / (1 << 149) < L1_EPS or after_units / (1 << 149) < L1_EPS:
        return None
    return torch.tensor(before_units / after_units, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------
# sparsifiers on one whole tensor (the in-memory reference)


def keep_count(density: float, numel: int) -> int:
    """Entries a magnitude trim keeps: ``int(density·numel)`` as mergekit, but at least one."""
    return max(1, int(density * numel))


def outlier_ranks(density: float, gamma: float, numel: int) -> tuple[int, int]:
    """The magnitude ranks ``[lo, hi)`` (0 = largest) breadcrumbs keeps: ``gamma·numel`` outliers dropped,
    then ``max(1, int(density·numel))`` kept; fewer outliers when both do not fit (mergekit)."""
    target = keep_count(density, numel)
    top = int(gamma * numel)
    top = min(top, numel - target)
    return top, top + target


def _descending_order(x: Tensor) -> Tensor:
    """Flat indices by |x| descending; equal magnitudes in index order (the lower index ranks higher)."""
    return torch.sort(_abs_bits(x).reshape(-1), descending=True, stable=True).indices


def _rank_range_mask(x: Tensor, lo: int, hi: int) -> Tensor:
    mask = torch.zeros(x.numel(), dtype=torch.bool, device=x.device)
    mask[_descending_order(x)[lo:hi]] = True
    return mask.view(x.shape) & (x != 0)


def trim_mask(delta: Tensor, density: float) -> Tensor:
    """Keep-mask of a magnitude trim: the top ``keep_count`` |x| (ties: lowest flat index first).

    Zeros count towards k but are never marked kept (they are zero either way).
    """
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    return _rank_range_mask(delta, 0, keep_count(density, delta.numel()))


def outlier_mask(delta: Tensor, density: float, gamma: float) -> Tensor:
    """Keep-mask of breadcrumbs' magnitude-outliers sparsifier (ranks ``outlier_ranks``)."""
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    return _rank_range_mask(delta, *outlier_ranks(density, gamma, delta.numel()))


def _prob_threshold(p: float) -> int:
    return min(1 << 24, int(p * (1 << 24) + 0.5))


def dare_mask(
    shape: Sequence[int] | torch.Size,
    density: float,
    seed: int,
    name: str,
    stream: int = 0,
    start: int = 0,
    device: torch.device | str | None = None,
) -> Tensor:
    """Keep-mask of DARE: each element kept with probability ``density`` (to 2**-24), decided by the counter
    RNG at its flat index ``start + i`` in the whole tensor."""
    count = math.prod(shape)
    bits = random_bits24(seed, name, start, count, stream, device)
    return (bits < _prob_threshold(density)).view(tuple(shape))


def _della_rows(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1) if x.dim() >= 2 else x.reshape(1, -1)


def della_keep_prob(delta: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA's keep probability (fp64): linear in the magnitude rank within each row, from ``density − ε``
    (smallest) to ``density + ε`` (largest); ties: the lower index ranks higher; a one-element row gets
    ``density``. Rows are dim-0 slices; a 0-d or 1-d tensor is one row (as mergekit)."""
    rows = _della_rows(delta)
    n = rows.shape[1]
    if n == 1:
        return torch.full(delta.shape, density, dtype=torch.float64, device=delta.device)
    order = torch.sort(_abs_bits(rows), dim=1, descending=True, stable=True).indices
    pos = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=order.device).expand_as(order))
    rank_norm = (n - 1 - pos).to(torch.float64) / (n - 1)
    return ((density - epsilon) + rank_norm * 2 * epsilon).view(delta.shape)


def della_mask(
    delta: Tensor, density: float, epsilon: float, seed: int, name: str, stream: int = 0, start: int = 0
) -> tuple[Tensor, Tensor]:
    """DELLA's keep-mask and keep probabilities; ``delta`` holds whole rows starting at flat index ``start``."""
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool), torch.ones(delta.shape, dtype=torch.float64)
    p = della_keep_prob(delta, density, epsilon)
    u = random_bits24(seed, name, start, delta.numel(), stream, delta.device).to(torch.float64) * 2.0**-24
    return (u.view(delta.shape) < p), p


def apply_mask(delta: Tensor, mask: Tensor, scale: Tensor | float | None = None) -> Tensor:
    """``delta`` where ``mask`` (dropped entries +0.0), times ``scale`` when given (``/ keep_prob`` for a
    tensor of probabilities, ``/ density`` for a float: the inverse-density rescale)."""
    return _scaled(torch.where(mask, delta.float(), 0.0), scale)


def _scaled(out: Tensor, scale: Tensor | float | None) -> Tensor:
    """``apply_mask``'s rescale, in place on the masked ``out`` (the same rounding as a new tensor)."""
    if scale is None:
        return out
    if isinstance(scale, float):
        return out.div_(scale)
    if scale.dtype == torch.float64:
        return out.div_(scale.to(torch.float32))
    return out.mul_(scale)


def magnitude_trim(delta: Tensor, density: float) -> Tensor:
    """The top-``density`` magnitudes of ``delta`` (fp32), the rest zero (TIES' trim)."""
    return apply_mask(delta, trim_mask(delta, density))


def magnitude_outliers(delta: Tensor, density: float, gamma: float) -> Tensor:
    """``delta`` without its top ``gamma`` share and its bottom share, ``density`` kept (breadcrumbs)."""
    return apply_mask(delta, outlier_mask(delta, density, gamma))


def random_drop(delta: Tensor, density: float, seed: int, name: str, stream: int = 0) -> Tensor:
    """DARE without rescale: each entry of ``delta`` kept with probability ``density``, seeded per tensor."""
    return apply_mask(delta, dare_mask(delta.shape, density, seed, name, stream, device=delta.device))


def della_drop(delta: Tensor, density: float, epsilon: float, seed: int, name: str, stream: int = 0) -> Tensor:
    """DELLA's MagPrune without rescale."""
    return apply_mask(delta, della_mask(delta, density, epsilon, seed, name, stream)[0])


# ---------------------------------------------------------------------------------------------------------
# sign election and disjoint merge


def elect_sign(weighted: Sequence[Tensor], method: str = "sum", alloc: Alloc = fresh) -> Tensor:
    """The elected sign (fp32 ±1) of weighted deltas: ``sum`` — sign of Σ wᵢΔᵢ, ``count`` — sign of
    Σ sign(wᵢΔᵢ); a tie (0) elects +, a NaN sum −. Temporaries and the result come from ``alloc``."""
    if method not in SIGN_ELECTIONS:
        raise MergeConfigError(f"unknown sign election {method!r}{_closest(method, SIGN_ELECTIONS)}")
    first = weighted[0]
    total = alloc("merge.total", first, torch.float32)
    if method == "sum":
        if len(weighted) > 1:
            torch.add(first, weighted[1], out=total)
        else:
            total.copy_(first)
        for t in weighted[2:]:
            total.add_(t)
    else:
        torch.sign(first, out=total)
        tmp = alloc("merge.sign_tmp", first, torch.float32) if len(weighted) > 1 else total
        for t in weighted[1:]:
            total.add_(torch.sign(t, out=tmp))
    return _sign_of(total, alloc("merge.sign", first, torch.float32))


def _sign_of(total: Tensor, out: Tensor) -> Tensor:
    """``torch.where(total >= 0, 1.0, -1.0)`` into ``out``, with integer operations on the bit patterns.

    ``total`` is scratch: adding +0.0 turns −0.0 (which elects +) into +0.0. Then "−" is a set sign bit or a
    NaN (magnitude bits above +Inf's): ``(0x7F800000 − (b & 0x7FFFFFFF)) | b`` has its sign bit set exactly
    then (no term overflows); that bit, spread by ``>> 31`` and masked, is the sign bit of ±1.0."""
    b = total.add_(0.0).view(torch.int32)
    s = out.view(torch.int32)
    torch.bitwise_and(b, 0x7FFFFFFF, out=s).neg_().add_(0x7F800000).bitwise_or_(b)
    s.bitwise_right_shift_(31).bitwise_and_(-0x80000000).bitwise_or_(0x3F800000)
    return out


def disjoint_merge(
    weighted: Sequence[Tensor],
    weights: Sequence[float],
    sign: Tensor | None,
    normalize: bool,
    lambda_: float = 1.0,
    alloc: Alloc = fresh,
) -> Tensor:
    """Σ of the weighted deltas that agree with ``sign`` (all of them when None; zeros never agree), divided
    when ``normalize`` by the sum of the agreeing weights at each entry (0 → 1; Σwᵢ without a sign,
    |Σwᵢ| < 1e-8 → 1, as mergekit), then times λ. The inputs are left alone; temporaries and the result
    come from ``alloc``."""
    if sign is None:
        mixed = alloc("merge.mixed", weighted[0], torch.float32).copy_(weighted[0])
        for t in weighted[1:]:
            mixed.add_(t)
        if normalize:
            total = math.fsum(weights)
            mixed.div_(1.0 if abs(total) < 1e-8 else total)
    else:
        mixed = _agreeing_sum(weighted, weights, sign, normalize, alloc)
    if lambda_ != 1:
        mixed.mul_(lambda_)
    return mixed


def _agreeing_sum(
    weighted: Sequence[Tensor], weights: Sequence[float], sign: Tensor, normalize: bool, alloc: Alloc
) -> Tensor:
    """``disjoint_merge`` with a sign, before λ.

    t·sign is |t| where t agrees with the elected sign and <= 0 elsewhere (exact: sign is ±1). The agreeing
    entries all carry the elected sign and rounding is symmetric, so sign·Σ|t| has the same bytes as Σ t over
    them; adding +0.0 turns the -0.0 of "nothing agrees" into the +0.0 written there."""
    mixed = alloc("merge.mixed", sign, torch.float32)
    u = alloc("merge.agree_part", sign, torch.float32) if len(weighted) > 1 else mixed
    agree = alloc("merge.agree", sign, torch.bool) if normalize else None
    divisor = alloc("merge.divisor", sign, torch.float32) if normalize else None
    for i, (t, w) in enumerate(zip(weighted, weights, strict=True)):
        part = torch.mul(t, sign, out=mixed if i == 0 else u)
        if divisor is not None and agree is not None:
            torch.gt(part, 0, out=agree)
            share = agree if w == 1 else agree * w
            if i == 0:
                divisor.copy_(share)
            else:
                divisor.add_(share)
        part.clamp_(min=0.0)
        if i:
            mixed.add_(part)
    mixed.mul_(sign).add_(0.0)
    if divisor is not None:
        if min(weights) >= 1:  # agreeing weights then sum to 0 or to at least 1: clamping is the same fill
            divisor.clamp_(min=1.0)
        else:
            divisor.masked_fill_(divisor == 0, 1.0)
        mixed.div_(divisor)
    return mixed


def _weight(t: Tensor, w: float) -> Tensor:
    return t if w == 1 else t * w


def _combine(sparse: Sequence[Tensor], params: MergeParams, alloc: Alloc = fresh) -> Tensor:
    weighted = [_weight(t, w) for t, w in zip(sparse, params.weights, strict=True)]
    sign = elect_sign(weighted, params.sign_election, alloc) if params.sign_election else None
    return disjoint_merge(weighted, params.weights, sign, params.normalize, params.lambda_, alloc)


# ---------------------------------------------------------------------------------------------------------
# the in-memory reference


def _sparsify_whole(x: Tensor, params: MergeParams, i: int, seed: int, name: str) -> Tensor:
    kind, density = params.method.sparsifier, params.densities[i]
    if kind is None or density >= 1:
        return x
    prob: Tensor | None = None
    if kind == MAGNITUDE:
        mask = trim_mask(x, density)
    elif kind == OUTLIERS:
        mask = outlier_mask(x, density, params.gammas[i])
    elif kind == RANDOM:
        mask = dare_mask(x.shape, density, seed, name, i, device=x.device)
    else:
        mask, prob = della_mask(x, density, params.epsilons[i], seed, name, i)
    return _rescaled(x, mask, params.rescale, density, prob, lambda: l1_units(x), lambda: l1_units(x[mask]))


def _rescaled(
    x: Tensor,
    mask: Tensor,
    rescale: str | None,
    density: float,
    prob: Tensor | None,
    before: Callable[[], int],
    after: Callable[[], int],
) -> Tensor:
    if rescale is None:
        return apply_mask(x, mask)
    if rescale == "inverse-density":
        return apply_mask(x, mask, prob if prob is not None else density)
    return apply_mask(x, mask, l1_scale(before(), after()))


def merge_tensor(
    deltas: Sequence[Tensor],
    method: str | MergeMethod | MergeParams,
    weights: Sequence[float] | float | None = None,
    densities: Sequence[float] | float | None = None,
    gammas: Sequence[float] | float | None = None,
    epsilons: Sequence[float] | float | None = None,
    lambda_: float = 1.0,
    normalize: bool | None = None,
    rescale: str | bool | None = None,
    sign_election: str | bool | None = None,
    seed: int = 0,
    name: str = "",
) -> Tensor:
    """Merge the deltas of one tensor in memory (fp32): sparsify each, rescale, weight, elect signs,
    disjoint-merge, normalize, times λ. ``method`` may be a validated ``MergeParams``."""
    if isinstance(method, MergeParams):
        params = method
    else:
        params = validate_merge(
            method, len(deltas), weights, densities, gammas, epsilons, lambda_, normalize, rescale, sign_election
        )
    _key(seed, name, 0)
    _check_deltas(deltas, params)
    sparse = [_sparsify_whole(d.float(), params, i, seed, name) for i, d in enumerate(deltas)]
    return _combine(sparse, params)


def _check_deltas(deltas: Sequence[Tensor], params: MergeParams, shape: Sequence[int] | None = None) -> None:
    if len(deltas) != params.n_patches:
        raise MergeConfigError(f"{len(deltas)} deltas given for a merge of {params.n_patches} patches")
    want = tuple(deltas[0].shape) if shape is None else tuple(shape)
    for i, d in enumerate(deltas):
        if tuple(d.shape) != want:
            raise MergeConfigError(f"delta {i + 1} has shape {tuple(d.shape)}, expected {want}")


# ---------------------------------------------------------------------------------------------------------
# streaming: exact per-tensor statistics from passes over row chunks, then merge_chunk


@dataclass
class Threshold:
    """The k-th largest magnitude of a tensor: the set "rank < k" is every |x| above ``bits`` plus the first
    ``keep_equal`` of the ``equal`` entries at ``bits`` in flat-index order (zeros are never kept)."""

    k: int
    bits: int
    greater: int
    equal: int
    keep_equal: int
    ties_before_row: Tensor | None = None  # exclusive prefix of per-row tie counts, when ties are split

    @property
    def value(self) -> float:
        return torch.tensor([self.bits], dtype=torch.int32).view(torch.float32).item()

    @property
    def splits_ties(self) -> bool:
        return self.bits != 0 and self.keep_equal < self.equal

    def _ties_kept(self, start_row: int, end_row: int) -> bool | None:
        """Whether rows ``[start_row, end_row)`` keep all (True) or none (False) of their entries equal to the
        threshold, or None when the k-th rank falls among them (only there is a running ordinal needed)."""
        assert self.ties_before_row is not None
        if int(self.ties_before_row[end_row]) <= self.keep_equal:
            return True
        if int(self.ties_before_row[start_row]) >= self.keep_equal:
            return False
        return None

    def top_mask(self, bits: Tensor, start_row: int) -> Tensor:
        """Mask of ranks below k for a chunk of |x| bit patterns shaped (rows, row_numel) from ``start_row``."""
        if self.bits == 0:
            return bits > 0
        if not self.splits_ties:
            return bits >= self.bits
        kept = self._ties_kept(start_row, start_row + bits.shape[0])
        if kept is not None:
            return bits >= self.bits if kept else bits > self.bits
        assert self.ties_before_row is not None
        eq = bits == self.bits
        ordinal = torch.cumsum(eq.reshape(-1), 0).view(eq.shape) + (int(self.ties_before_row[start_row]) - 1)
        return (bits > self.bits) | (eq & (ordinal < self.keep_equal))

    def keep(self, bits: Tensor, start_row: int, out: Tensor) -> Tensor:
        """``top_mask`` as an integer keep-mask (−1/0) in the int32 buffer ``out``, for int32 ``bits``."""
        if self.bits == 0:
            return _keep_ge(bits, 1, out)
        kept = self._ties_kept(start_row, start_row + bits.shape[0]) if self.splits_ties else True
        if kept is None:
            return out.copy_(self.top_mask(bits, start_row)).neg_()
        return _keep_ge(bits, self.bits if kept else self.bits + 1, out)


def _select(hist: Tensor, k: int) -> tuple[int, int]:
    """(bucket, count above it) of the k-th largest entry of a 65536-bucket histogram: the block of 256
    buckets first, then the bucket inside it (two small cumulative sums instead of one of 65536)."""
    coarse = hist.view(256, 256).sum(1)
    block, above = _first_reaching(coarse, k, 0)
    fine = hist[block * 256 : (block + 1) * 256]
    b, above = _first_reaching(fine, k, above)
    return block * 256 + b, above


def _first_reaching(hist: Tensor, k: int, above: int) -> tuple[int, int]:
    """The highest index b of ``hist`` at which ``above`` + the counts from the top down to b reach k, and
    the count above b (``above`` included)."""
    desc = hist.flip(0).cumsum(0) + above
    j = int(torch.searchsorted(desc, torch.tensor([k], dtype=desc.dtype)))
    b = hist.numel() - 1 - j
    return b, int(desc[j]) - int(hist[b])


WINDOW_SLACK = 0.1  # the first candidate window spans the ranks k·(1 ± 0.1) of the first chunk's histogram
WINDOW_MIN_SLACK = 0.02  # ... and narrows towards k·(1 ± 0.02) of the running histogram as chunks come in
WINDOW_CAP = 16  # a window holding more than numel/16 candidates (or 65536, if more) is given up


class _Window:
    """Every |x| bit pattern whose high 16 bits lie in ``[lo, hi]``, with its flat index: the candidates for
    one rank k, collected during the high-bits pass so that, when the k-th largest lands in the window, its
    low bits and its ties' positions come from them instead of two more passes over the tensor.

    The window starts from the first chunk's estimate of the k-th largest and only ever narrows (to the
    running histogram's estimate, each time the elements seen double), so every chunk was collected over a
    superset of the final window: the candidates in it are complete. A narrowing drops the others. With
    ``open_top`` (a small k) the window reaches up to the largest magnitudes: the first chunk says little
    about where the few largest entries are, and there are few candidates above the estimate anyway."""

    def __init__(self, lo: int, hi: int, seen: int, cap: int, index_dtype: torch.dtype, open_top: bool = False):
        self.lo, self.hi, self.open_top = lo, (0xFFFF if open_top else hi), open_top
        self.first = self.next_narrow = seen
        self.cap, self.index_dtype = cap, index_dtype
        self.bits: list[Tensor] = []
        self.index: list[Tensor] = []
        self.count = 0
        self.lo_hist: Tensor | None = None

    @staticmethod
    def bounds(hist: Tensor, n: int, k: int, numel: int, slack: float) -> tuple[int, int]:
        """High-16-bit buckets holding the ranks ``k·(1 ± slack)`` as estimated from ``hist`` of n elements."""
        kc = k * n / numel
        top, _ = _select(hist, max(1, math.floor(kc * (1 - slack))))
        bottom, _ = _select(hist, min(n, math.ceil(kc * (1 + slack)) + 1))
        return bottom, top

    def narrow(self, hist: Tensor, seen: int, k: int, numel: int) -> bool:
        """Shrink towards the running estimate once the elements seen have doubled; False when it is empty."""
        if seen < self.next_narrow:
            return True
        self.next_narrow = 2 * seen
        slack = max(WINDOW_MIN_SLACK, WINDOW_SLACK * math.sqrt(self.first / seen))
        lo, hi = self.bounds(hist, seen, k, numel, slack)
        lo, hi = max(lo, self.lo), (self.hi if self.open_top else min(hi, self.hi))
        if lo > hi:
            return False
        if (lo, hi) != (self.lo, self.hi):
            self.lo, self.hi = lo, hi
            keep = [self._inside(b >> 16) for b in self.bits]
            self.bits = [b[m] for b, m in zip(self.bits, keep, strict=True)]
            self.index = [i[m] for i, m in zip(self.index, keep, strict=True)]
            self.count = sum(b.numel() for b in self.bits)
        return True

    def _inside(self, hi16: Tensor) -> Tensor:
        return (hi16 >= self.lo) & (hi16 <= self.hi)

    def candidates(
        self, flat: Tensor, hi16: Tensor, start: int, lo: int, hi: int, alloc: Alloc = fresh
    ) -> tuple[Tensor, Tensor]:
        """A chunk's candidates over the bounds ``[lo, hi]``: their bit patterns and flat indices (the chunk's
        elements start at flat index ``start``). Touches no state: threads may run it at once."""
        inside = torch.ge(hi16, lo, out=alloc("merge.inside", hi16, torch.bool))
        inside.logical_and_(torch.le(hi16, hi, out=alloc("merge.below", hi16, torch.bool)))
        idx = inside.nonzero().squeeze(1)
        return flat[idx], idx.add_(start).to(self.index_dtype)

    def add(self, bits: Tensor, index: Tensor) -> bool:
        """Keep a chunk's candidates; False when the window is over its cap."""
        self.bits.append(bits)
        self.index.append(index)
        self.count += index.numel()
        return self.count <= self.cap

    def covers(self, bucket: int) -> bool:
        return self.lo <= bucket <= self.hi

    def resolve(
        self, k: int, bucket: int, above: int, bucket_count: int, rows: int, row_numel: int
    ) -> Threshold | None:
        """The k-th largest from the candidates (``bucket``: its high bits, ``above``: the count above that
        bucket; with ``ties_before_row`` when its ties are split), or None if the candidates are not the
        whole bucket. ``lo_hist``: the bucket's low-bits histogram, for ``top_units``."""
        parts = [((b >> 16) == bucket, b, i) for b, i in zip(self.bits, self.index, strict=True)]
        if not parts:
            return None
        bits = torch.cat([b[m] for m, b, _ in parts])
        self.lo_hist = torch.bincount((bits & 0xFFFF).to(torch.int64), minlength=65536).cpu()
        if int(self.lo_hist.sum()) != bucket_count:
            return None
        lo, above_lo = _select(self.lo_hist, k - above)
        greater = above + above_lo
        th = Threshold(k, (bucket << 16) | lo, greater, int(self.lo_hist[lo]), k - greater)
        if th.splits_ties:  # the exclusive prefix of the per-row counts of the entries equal to it
            index = torch.cat([i[m] for m, _, i in parts])[bits == th.bits].to(torch.int64)
            counts = torch.bincount(index // row_numel, minlength=rows).cpu()
            th.ties_before_row = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        return th


class RadixSelect:
    """Exact streaming k-th-largest |x| (several k at once) by radix select over the fp32 bit patterns.

    Pass 0 histograms the high 16 bits over all chunks, pass 1 the low 16 bits inside each chosen bucket,
    and pass 2 (only when the threshold's ties are split) counts the ties per row, so chunks whose ties
    come first can be told apart. Memory: 65536-bucket histograms, plus one count per row in pass 2.
    Chunks of a pass may come in any order. With ``want_l1`` the exact L1 norms of the whole tensor and
    of each top-k set come out too (integer units of 2**-149).

    Given ``numel`` (the tensor's element count), pass 0 also collects the candidates of a window of
    buckets around an estimate of each k-th largest (``_Window``): when the true bucket lies inside, passes
    1 and 2 are not needed (``passes`` is 1). The thresholds are the same either way; a missed estimate
    only costs the passes it could not save.
    """

    def __init__(self, ks: Sequence[int], rows: int, want_l1: bool = False, numel: int | None = None):
        self.ks = sorted(set(ks))
        if not self.ks or self.ks[0] < 1:
            raise ValueError(f"ranks must be >= 1, got {ks}")
        self.rows, self.want_l1, self.numel = rows, want_l1, numel
        self.stage = 0
        self.done = False
        self._hi = torch.zeros(65536, dtype=torch.int64)
        self._hi_sum = torch.zeros(65536, dtype=torch.int64) if want_l1 else None
        self._lo: dict[int, Tensor] = {}
        self._count_lo: set[int] = set()  # buckets whose low bits pass 1 histograms
        self._bucket: dict[int, tuple[int, int]] = {}
        self._row_ties: dict[int, Tensor] = {}
        self._windows: dict[int, _Window] | None = None if numel else {}
        self._seen = 0
        self._row_numel = 1
        self._lock = threading.Lock()
        self.thresholds: dict[int, Threshold] = {}
        self.total_units = 0

    def update(self, bits: Tensor, start_row: int, alloc: Alloc = fresh) -> None:
        """Add a chunk of |x| bit patterns (int32 or int64, shaped (rows, row_numel)) from row ``start_row``.

        Chunks of one pass may be added from several threads at once: each computes its chunk's counts and
        candidates on its own and only adds them up under the lock. Chunk-sized temporaries come from
        ``alloc``: between the small candidate tensors a window keeps, fresh ones fragment the C heap (+250
        MiB of freed but resident pages on the 1.1B merge)."""
        if self.done:
            return
        flat = bits.reshape(-1)
        hi = torch.bitwise_right_shift(flat, 16, out=alloc("merge.hi16", flat, flat.dtype))
        if self.stage == 0:
            self._update_high(flat, hi, bits.shape[1] if bits.dim() == 2 else 1, start_row, alloc)
        elif self.stage == 1:
            counts = {b: torch.bincount(flat[hi == b] & 0xFFFF, minlength=65536).cpu() for b in self._count_lo}
            with self._lock:
                for b, c in counts.items():
                    self._lo[b] += c
        else:
            ties = {k: (bits == self.thresholds[k].bits).sum(dim=1).cpu() for k in self._row_ties}
            with self._lock:
                for k, c in ties.items():
                    self._row_ties[k][start_row : start_row + bits.shape[0]] += c

    def _update_high(self, flat: Tensor, hi: Tensor, row_numel: int, start_row: int, alloc: Alloc) -> None:
        """Pass 0: the high-bits histogram (and mantissa sums for L1), and the candidate windows' share."""
        chunk = torch.bincount(hi, minlength=65536).cpu()
        sums = None
        if self._hi_sum is not None:
            wide = flat.to(torch.int64)
            zeros = torch.zeros(65536, dtype=torch.int64, device=flat.device)
            sums = zeros.index_add_(0, wide >> 16, _mantissa(wide)).cpu()
        with self._lock:
            self._hi += chunk
            if sums is not None:
                self._hi_sum += sums
            self._seen += flat.numel()
            self._row_numel = row_numel
            windows = self._open_windows(chunk, flat.numel())
        start = start_row * row_numel
        found = {k: w.candidates(flat, hi, start, lo, top, alloc) for k, (w, lo, top) in windows.items()}
        with self._lock:
            for k, (bits, index) in found.items():
                w = self._windows.get(k) if self._windows else None
                if w is not None and not w.add(bits, index):
                    del self._windows[k]

    def _open_windows(self, chunk: Tensor, n: int) -> dict[int, tuple[_Window, int, int]]:
        """Under the lock: the windows (opened on the first chunk, narrowed as the running histogram grows)
        and the bounds this chunk collects over. A window only narrows, so a chunk collected over older,
        wider bounds than another's holds every candidate of the final window too."""
        if self._windows is None:
            assert self.numel is not None
            cap = max(1 << 16, self.numel // WINDOW_CAP)
            dtype = torch.int32 if self.numel < 1 << 31 else torch.int64
            # a small k (a few entries kept) may sit in any chunk: collect everything above the estimate
            self._windows = {
                k: _Window(
                    *_Window.bounds(chunk, n, k, self.numel, WINDOW_SLACK), n, cap, dtype, open_top=4 * k <= cap
                )
                for k in self.ks
            }
        out = {}
        for k, w in list(self._windows.items()):
            assert self.numel is not None
            if w.narrow(self._hi, self._seen, k, self.numel):
                out[k] = (w, w.lo, w.hi)
            else:
                del self._windows[k]
        return out

    def finish_pass(self) -> None:
        if self.done:
            return
        if self.stage == 0:
            self._finish_high()
        elif self.stage == 1:
            for k in self._bucket:
                b, above = self._bucket[k]
                lo, above_lo = _select(self._lo[b], k - above)
                greater = above + above_lo
                equal = int(self._lo[b][lo])
                self.thresholds[k] = Threshold(k, (b << 16) | lo, greater, equal, k - greater)
                if self.thresholds[k].splits_ties:
                    self._row_ties[k] = torch.zeros(self.rows, dtype=torch.int64)
            self.stage = 2
            self.done = not self._row_ties
        else:
            for k, counts in self._row_ties.items():
                self.thresholds[k].ties_before_row = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
            self.done = True

    def _finish_high(self) -> None:
        """End of pass 0: each k's bucket; thresholds straight from a window that holds it, else pass 1."""
        n = int(self._hi.sum())
        if self.ks[-1] > n:
            raise ValueError(f"rank {self.ks[-1]} asked of a tensor of {n} elements")
        if self._hi_sum is not None:
            self.total_units = _hi_units(self._hi_sum)
        windows = list((self._windows or {}).values())
        for k in self.ks:
            b, above = _select(self._hi, k)
            if not self._resolve(k, b, above, [w for w in windows if w.covers(b)]):
                self._bucket[k] = (b, above)
                self._count_lo.add(b)
                self._lo.setdefault(b, torch.zeros(65536, dtype=torch.int64))
        self._windows = {}
        self.stage = 1
        self.done = not self._bucket

    def _resolve(self, k: int, bucket: int, above: int, windows: list[_Window]) -> bool:
        for w in windows:
            th = w.resolve(k, bucket, above, int(self._hi[bucket]), self.rows, self._row_numel)
            if th is not None:
                assert w.lo_hist is not None
                self.thresholds[k] = th
                self._lo.setdefault(bucket, w.lo_hist)
                return True
        return False

    def release(self) -> None:
        """Drop the histograms (after the selection is done; ``top_units`` is then unavailable)."""
        assert self.done
        self._hi = self._hi_sum = None  # type: ignore[assignment]
        self._lo, self._row_ties, self._windows = {}, {}, {}

    def top_units(self, k: int) -> int:
        """Exact L1 of the k largest magnitudes (needs ``want_l1``; after the selection is done)."""
        assert self._hi_sum is not None and self.done
        th = self.thresholds[k]
        b, lo = th.bits >> 16, th.bits & 0xFFFF
        above = self._hi_sum.clone()
        above[: b + 1] = 0
        units = _hi_units(above)
        vals = torch.arange(lo + 1, 65536, dtype=torch.int64) | (b << 16)
        inside = int((self._lo[b][lo + 1 :] * _mantissa(vals)).sum()) + th.keep_equal * int(
            _mantissa(torch.tensor(th.bits))
        )
        return units + (inside << max(b >> 7, 1) - 1)


class _PatchStats:
    """The statistics one patch's sparsifier needs for one tensor."""

    def __init__(self, params: MergeParams, i: int, numel: int, rows: int, windows: bool = True):
        self.kind = params.method.sparsifier
        self.density = params.densities[i]
        self.l1 = params.rescale == "l1"
        self.scale: Tensor | None = None
        self.select: RadixSelect | None = None
        self.ranks: tuple[int, int] = (0, numel)
        self._before = self._after = 0
        self._lock = threading.Lock()
        if self.kind is None or self.density >= 1:
            self.kind, self.done = None, True
        elif self.kind in (MAGNITUDE, OUTLIERS):
            self.ranks = (
                (0, keep_count(self.density, numel))
                if self.kind == MAGNITUDE
                else outlier_ranks(self.density, params.gammas[i], numel)
            )
            ks = [k for k in self.ranks if k > 0]
            self.select = RadixSelect(ks, rows, self.l1, numel if windows else None)
            self.done = False
        else:
            self.done = not self.l1

    def update(self, x: Tensor, bits: Tensor, sparse: Tensor | None, start_row: int, alloc: Alloc = fresh) -> None:
        if self.done:
            return
        if self.select is not None:
            self.select.update(bits, start_row, alloc)
        else:  # random/della with l1: one pass
            assert sparse is not None
            before, after = l1_units(x), l1_units(sparse)
            with self._lock:
                self._before += before
                self._after += after

    def finish_pass(self) -> None:
        if self.done:
            return
        if self.select is not None:
            self.select.finish_pass()
            self.done = self.select.done
            if self.done and self.l1:
                lo, hi = self.ranks
                after = self.select.top_units(hi) - (self.select.top_units(lo) if lo else 0)
                self.scale = l1_scale(self.select.total_units, after)
        else:
            self.scale = l1_scale(self._before, self._after)
            self.done = True


class MergeStats:
    """Per-tensor statistics for ``merge_chunk``, gathered in streaming passes over the tensor's row chunks::

        stats = MergeStats(params, shape, seed, name)
        while not stats.done:
            for start_index, chunks in row_chunks(...):  # any chunk sizes, any order within a pass
                stats.update(chunks, start_index)
            stats.finish_pass()

    ``task_arithmetic``, density 1 and DARE/DELLA without L1 rescale need no pass at all; TIES and
    breadcrumbs need one when the candidate windows of the first pass hold their thresholds (``RadixSelect``),
    else two (three when the threshold's ties must be split by index); L1 rescale of DARE and DELLA needs one.
    ``windows=False`` skips the candidate windows (always two or three passes, no candidate memory).
    """

    def __init__(
        self,
        params: MergeParams,
        shape: Sequence[int] | torch.Size,
        seed: int = 0,
        name: str = "",
        windows: bool = True,
    ):
        _key(seed, name, 0)
        self.params, self.shape, self.seed, self.name = params, tuple(shape), seed, name
        self.numel = math.prod(self.shape)
        self.row_numel = math.prod(self.shape[1:]) if self.shape else 1
        self.rows = self.shape[0] if self.shape else 1
        self.patches = [_PatchStats(params, i, self.numel, self.rows, windows) for i in range(params.n_patches)]
        self.passes = 0

    @property
    def done(self) -> bool:
        return all(p.done for p in self.patches)

    def update(self, deltas_chunk: Sequence[Tensor], start_index: int, alloc: Alloc = fresh) -> None:
        """Add one row chunk of every patch's delta (the elements from flat index ``start_index``). Chunks of
        a pass may be added from several threads at once; temporaries come from ``alloc``."""
        start_row = _check_chunk(deltas_chunk, self, self.params, self.seed, self.name, start_index)
        for i, (p, d) in enumerate(zip(self.patches, deltas_chunk, strict=True)):
            if p.done:
                continue
            x = d.float()
            sparse = None
            if p.select is None:
                sparse = _sparsify_chunk(x, None, self, i, start_index, start_row, scaled=False)
            bits = _abs_bits32(x, alloc("merge.stats_bits", x, torch.int32))
            p.update(x, bits.view(x.shape[0] if x.dim() else 1, -1), sparse, start_row, alloc)

    def finish_pass(self) -> None:
        """End a pass over all chunks. Once the last pass is done the histograms are dropped: ``merge_chunk``
        needs only the thresholds and scales, so a merge can hold the statistics of every tensor at once."""
        for p in self.patches:
            p.finish_pass()
        self.passes += 1
        if self.done:
            for p in self.patches:
                if p.select is not None:
                    p.select.release()


def _check_chunk(
    chunks: Sequence[Tensor], stats: MergeStats, params: MergeParams, seed: int, name: str, start_index: int
) -> int:
    if stats.params != params or stats.seed != seed or stats.name != name:
        raise ValueError(f"{name}: statistics were gathered for other parameters, seed or tensor name")
    _check_deltas(chunks, params, (chunks[0].shape[0], *stats.shape[1:]) if stats.shape else ())
    if start_index % stats.row_numel or start_index + chunks[0].numel() > stats.numel:
        raise ValueError(f"{name}: chunk at element {start_index} is not whole rows of {stats.shape}")
    if params.method.sparsifier == DELLA and len(stats.shape) <= 1 and chunks[0].numel() != stats.numel:
        raise ValueError(f"{name}: DELLA ranks a {len(stats.shape)}-d tensor as one row; pass it in one chunk")
    return start_index // stats.row_numel


def _sparsify_chunk(
    x: Tensor,
    bits: Tensor | None,
    stats: MergeStats,
    i: int,
    start: int,
    start_row: int,
    scaled: bool = True,
    alloc: Alloc = fresh,
) -> Tensor:
    params, p = stats.params, stats.patches[i]
    kind, density = p.kind, params.densities[i]
    if kind is None:
        return x
    prob: Tensor | None = None
    if kind in (MAGNITUDE, OUTLIERS):
        assert p.select is not None and bits is not None
        keep = _magnitude_keep(p, x, bits, start_row, alloc, i)
        out = _masked(x, keep, alloc(f"merge.sparse{i}", x, torch.float32))
        if not scaled or params.rescale is None:
            return out
        return _scaled(out, density if params.rescale == "inverse-density" else p.scale)
    if kind == RANDOM:
        mask = dare_mask(x.shape, density, stats.seed, stats.name, i, start, x.device)
    else:
        mask, prob = della_mask(x, density, params.epsilons[i], stats.seed, stats.name, i, start)
    if not scaled or params.rescale is None:
        return apply_mask(x, mask)
    if params.rescale == "inverse-density":
        return apply_mask(x, mask, prob if prob is not None else density)
    return apply_mask(x, mask, p.scale)


def _magnitude_keep(p: _PatchStats, x: Tensor, bits: Tensor, start_row: int, alloc: Alloc, i: int) -> Tensor:
    """The integer keep-mask (−1/0) of ranks ``p.ranks`` for a chunk: the top ``hi`` minus the top ``lo``."""
    assert p.select is not None
    lo, hi = p.ranks
    b2 = bits.view(x.shape[0] if x.dim() else 1, -1)
    keep = p.select.thresholds[hi].keep(b2, start_row, alloc(f"merge.keep{i}", b2, torch.int32))
    if lo:
        top = p.select.thresholds[lo].keep(b2, start_row, alloc(f"merge.keep_top{i}", b2, torch.int32))
        keep.bitwise_and_(top.bitwise_not_())
    return keep.view(x.shape)


def merge_chunk(
    deltas_chunk: Sequence[Tensor],
    stats: MergeStats,
    params: MergeParams,
    seed: int,
    name: str,
    start_index: int,
    alloc: Alloc = fresh,
) -> Tensor:
    """Merge one row chunk (flat elements from ``start_index``) of every patch's delta: the same bytes as
    the matching rows of ``merge_tensor`` on the whole tensor. ``stats`` must be done. Temporaries and the
    result come from ``alloc`` (the inputs are left alone)."""
    start_row = _check_chunk(deltas_chunk, stats, params, seed, name, start_index)
    if not stats.done:
        raise ValueError(f"{name}: merge statistics are incomplete; run every pass first")
    sparse = []
    for i, d in enumerate(deltas_chunk):
        x = d.float()
        bits = None
        if stats.patches[i].select is not None:
            bits = _abs_bits32(x, alloc(f"merge.bits{i}", x, torch.int32))
        sparse.append(_sparsify_chunk(x, bits, stats, i, start_index, start_row, alloc=alloc))
    return _combine(sparse, params, alloc)
