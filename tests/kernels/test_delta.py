"""Pure tensor kernels: the fast paths agree with the obvious torch formulation."""

from __future__ import annotations

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
