"""Pure tensor kernels: the fast paths agree with the obvious torch formulation."""

from __future__ import annotations

import pytest
import torch

from patchlab.kernels.delta import DeltaStats, count_nonzero, diff, diff_into, same_bits, scaled_add_into


def test_same_bits_sees_signed_zeros_and_nan_payloads():
    a = torch.tensor([0.0, 1.5, float("nan"), -2.0], dtype=torch.bfloat16)
    assert same_bits(a, a.clone())
    b = a.clone()
    b[0] = -0.0  # equal as numbers, not as bits
    assert not same_bits(a, b)
    assert not same_bits(a[::2], b[::2])  # strided views take the generic path
    assert same_bits(a[::2], a.clone()[::2])


def test_count_nonzero_matches_torch_on_every_float_dtype():
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        t = torch.randn(1000, generator=g).to(dtype)
        t[torch.rand(1000, generator=g) < 0.3] = 0
        t[5] = -0.0
        assert count_nonzero(t) == int(torch.count_nonzero(t)), dtype


def test_diff_into_equals_diff_bit_for_bit():
    g = torch.Generator().manual_seed(1)
    ft, base = torch.randn(64, 8, generator=g).bfloat16(), torch.randn(64, 8, generator=g).bfloat16()
    out, tmp = torch.empty(64, 8), torch.empty(64, 8)
    assert same_bits(diff_into(out, ft, base, tmp), diff(ft, base))


def test_stats_merged_by_part_equal_stats_updated_in_order():
    g = torch.Generator().manual_seed(2)
    d, ref = torch.randn(100, 7, generator=g), torch.randn(100, 7, generator=g)
    whole = DeltaStats()
    merged = DeltaStats()
    for r0 in range(0, 100, 13):
        whole.update(d[r0 : r0 + 13], ref[r0 : r0 + 13])
        part = DeltaStats()
        part.update(d[r0 : r0 + 13], ref[r0 : r0 + 13])
        merged.merge(part)
    assert merged.result() == whole.result()


def test_scaled_add_into_is_alpha_delta_plus_target_in_fp32():
    g = torch.Generator().manual_seed(3)
    d, tgt = torch.randn(32, 4, generator=g), torch.randn(32, 4, generator=g).bfloat16()
    want = (d * 0.37) + tgt.float()
    got = scaled_add_into(d.clone(), tgt, 0.37, torch.empty(32, 4))
    assert same_bits(got, want)
    assert same_bits(scaled_add_into(d.clone(), tgt, 1.0, torch.empty(32, 4)), d + tgt.float())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_finite_exact_finds_every_nan_and_inf_bit_pattern_anywhere(dtype):
    from patchlab.kernels.delta import finite_exact

    info = torch.finfo(dtype)
    edge = torch.tensor([info.max, -info.max, info.tiny, info.smallest_normal / 4, 0.0, -0.0], dtype=dtype)
    assert finite_exact(edge) and finite_exact(torch.empty(0, dtype=dtype))
    bits = {torch.float64: torch.int64, torch.float32: torch.int32}.get(dtype, torch.int16)
    width = dtype.itemsize * 8
    mant = {torch.float64: 52, torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}[dtype]
    exp = ((1 << (width - 1)) - 1) ^ ((1 << mant) - 1)  # the exponent field, all ones
    patterns = [exp, exp | 1, exp | (1 << (mant - 1)), exp | ((1 << mant) - 1)]  # inf, sNaN, qNaN
    patterns += [p | (1 << (width - 1)) for p in patterns]  # and negative
    for n in (1, 7, 33, 1000):
        for pos in sorted({0, n // 2, n - 1}):
            for p in patterns:
                x = torch.ones(n, dtype=dtype)
                x.view(bits)[pos] = p - (1 << width) if p >= 1 << (width - 1) else p
                assert not finite_exact(x.view(n)), (n, pos, hex(p))
    assert finite_exact(torch.ones(3, 5, dtype=dtype)[:, 1:])  # not contiguous


def test_finite_exact_other_float_dtypes():
    from patchlab.kernels.delta import finite_exact

    if not hasattr(torch, "float8_e5m2"):
        pytest.skip("no float8 in this torch")
    x = torch.zeros(8, dtype=torch.float8_e5m2)
    assert finite_exact(x)
    x.view(torch.uint8)[3] = 0x7C  # e5m2 infinity
    assert not finite_exact(x)
