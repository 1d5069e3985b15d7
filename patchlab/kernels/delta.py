"""Pure tensor functions for diff vectors: no I/O, no global state, fp32 accumulation.

Every function takes row chunks of tensors, so the engine can stream arbitrarily large tensors through them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

_INT_VIEW = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


def diff(finetuned: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``Δ = ft − base`` in fp32.

    Low-precision inputs are converted first: mixed-dtype in-place ops take a slow, unvectorised path.
    """
    return finetuned.to(torch.float32, copy=True).sub_(base.float())


def as_float(t: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """``t`` in fp32: itself when it already is, else converted into ``scratch`` (fp32, same shape)."""
    return t if t.dtype == torch.float32 else scratch.copy_(t)


def diff_into(out: torch.Tensor, finetuned: torch.Tensor, base: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """``Δ = ft − base`` in fp32 written into ``out``, with ``scratch`` for the converted base (both fp32, the
    inputs' shape): bit-identical to ``diff``, without allocating."""
    return out.copy_(finetuned).sub_(as_float(base, scratch))


def scaled_add_into(delta: torch.Tensor, target: torch.Tensor, alpha: float, scratch: torch.Tensor) -> torch.Tensor:
    """``α·Δ + target`` in fp32, in place in ``delta`` (``scratch``: fp32, for a low-precision target).

    The one formula of apply, port and the fused port, so all three agree bit for bit at any α.
    """
    if alpha != 1:
        delta.mul_(alpha)
    return delta.add_(as_float(target, scratch))


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a floating tensor as integers, for exact comparisons (``-0.0 != 0.0``, NaN == NaN)."""
    return t.contiguous().view(_INT_VIEW[t.element_size()])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when two tensors of one dtype and shape hold identical bits (``-0.0`` differs from ``0.0``)."""
    if a.device.type == "cpu" and b.device.type == "cpu" and a.is_contiguous() and b.is_contiguous():
        # a vectorised byte comparison: torch.equal on 16-bit integer views is 6x slower
        return bool(np.array_equal(a.view(-1).view(torch.uint8).numpy(), b.view(-1).view(torch.uint8).numpy()))
    return torch.equal(bits(a), bits(b))


def mismatches(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Flat positions (int64, ascending) where two tensors of one dtype and shape differ in their bits.

    On CPU through numpy: its ``flatnonzero`` of a 16-bit comparison is 2x torch's ``(a != b).nonzero()``.
    ``mask`` (bool, ``a.numel()`` elements) is scratch for the comparison.
    """
    if a.device.type == "cpu" and b.device.type == "cpu" and a.is_contiguous() and b.is_contiguous():
        an, bn = bits(a).reshape(-1).numpy(), bits(b).reshape(-1).numpy()
        m = np.not_equal(an, bn, out=mask.reshape(-1).numpy()) if mask is not None else an != bn
        return torch.from_numpy(np.flatnonzero(m))
    return (bits(a) != bits(b)).reshape(-1).nonzero().squeeze(1)


def count_nonzero(t: torch.Tensor, work: torch.Tensor | None = None) -> int:
    """Non-zero elements of a finite float tensor.

    ``torch.count_nonzero`` is not vectorised on CPU (1.1 ms per 512K fp32 elements, 20x a norm); the sum
    of ``|sign(x)|`` is, and counts exactly while every partial sum stays below 2**24. ``work`` (same shape
    and dtype) holds the signs: a fresh 2 MiB tensor a chunk costs more in page faults than the count.
    """
    if t.dtype in (torch.float32, torch.float64) and t.numel() < 1 << 24:
        if work is not None and work.shape == t.shape and work.dtype == t.dtype:
            return int(torch.sign(t, out=work).abs_().sum())
        return int(t.sign().abs_().sum())
    return int(torch.count_nonzero(t))


@dataclass
class DeltaStats:
    """Streaming statistics of one delta tensor against its reference weight.

    Per-chunk norms are fp32 reductions of cache-sized chunks; they are accumulated across chunks in
    Python floats (fp64). A non-finite value makes the chunk's norm non-finite, so detecting NaN/Inf
    costs nothing extra; only then is the exact position looked up.
    """

    numel: int = 0
    sumsq: float = 0.0
    ref_sumsq: float = 0.0
    max_abs: float = 0.0
    changed: int = 0
    nonfinite: int = 0
    _first_bad: int | None = field(default=None, repr=False)

    def update(
        self,
        delta: torch.Tensor,
        reference: torch.Tensor | None = None,
        offset: int = 0,
        work: torch.Tensor | None = None,
    ) -> None:
        """Add a chunk (``work``: optional fp32 scratch of the chunk's shape, spares an allocation)."""
        d = delta if delta.dtype == torch.float32 else delta.float()
        n = d.numel()
        if not n:
            return
        norm = float(torch.linalg.vector_norm(d))
        if not math.isfinite(norm):
            bad = (~torch.isfinite(d)).reshape(-1).nonzero()
            if bad.numel():
                self.nonfinite += int(bad.numel())
                if self._first_bad is None:
                    self._first_bad = offset + int(bad[0])
                return
            norm = float(torch.linalg.vector_norm(d.double()))  # finite values whose fp32 norm overflowed
        self.numel += n
        self.sumsq += norm * norm
        lo, hi = torch.aminmax(d)  # 20x cheaper than an ∞-norm on CPU
        self.max_abs = max(self.max_abs, -float(lo), float(hi))
        self.changed += count_nonzero(d, work)
        if reference is not None and reference.numel():
            r = float(torch.linalg.vector_norm(reference, dtype=torch.float32))
            self.ref_sumsq += r * r

    def merge(self, other: DeltaStats) -> None:
        """Add another part's statistics (merging parts in order equals updating with them in order)."""
        self.numel += other.numel
        self.sumsq += other.sumsq
        self.ref_sumsq += other.ref_sumsq
        self.max_abs = max(self.max_abs, other.max_abs)
        self.changed += other.changed
        self.nonfinite += other.nonfinite
        if self._first_bad is None:
            self._first_bad = other._first_bad

    @property
    def first_nonfinite(self) -> int | None:
        return self._first_bad

    def result(self) -> dict[str, float]:
        norm = self.sumsq**0.5
        ref = self.ref_sumsq**0.5
        return {
            "norm": norm,
            "rel_norm": norm / ref if ref > 0 else (0.0 if norm == 0 else float("inf")),
            "max_abs": self.max_abs,
            "changed_frac": self.changed / self.numel if self.numel else 0.0,
        }


def all_finite(t: torch.Tensor) -> bool:
    """True when no element is NaN/Inf; one cheap reduction, exact check only on suspicion."""
    if t.numel() == 0:
        return True
    if math.isfinite(float(t.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(t).all())


_MINMAX_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def finite_exact(t: torch.Tensor) -> bool:
    """True when no element is NaN/Inf; exact, in one read and no temporary.

    For fp16/bf16/fp32/fp64 the minimum and maximum are taken (``torch.aminmax`` propagates NaN, and an
    infinity is an extreme): both are finite exactly when every element is. Other dtypes use ``isfinite``.
    """
    if t.numel() == 0:
        return True
    if t.dtype in _MINMAX_DTYPES:
        lo, hi = torch.aminmax(t.reshape(-1))
        return math.isfinite(float(lo)) and math.isfinite(float(hi))
    return bool(torch.isfinite(t).all())


def gather_rows(source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``source[index]`` in fp32, with zeros where ``index`` is -1 (rows the source does not have)."""
    out = torch.zeros((index.numel(), *source.shape[1:]), dtype=torch.float32, device=source.device)
    ok = index >= 0
    if bool(ok.any()):
        out[ok] = source[index[ok]].float()
    return out
