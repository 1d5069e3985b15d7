"""Weight-space diagnostic kernels against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from patchlab.kernels.drift import DriftAccumulator, DriftStats, chunk_dot, drift_stats, intruder_dimensions
from patchlab.measure.verdict import CARE, DO_NOT, SAFE, Thresholds, port_verdict
from patchlab.names import is_embedding, layer_of


def test_drift_hand_values():
    s = torch.tensor([3.0, 4.0])  # ‖base_s‖ = 5
    t = torch.tensor([3.0, 5.0])  # drift (0, 1)
    st = drift_stats(s, t, torch.tensor([0.0, 2.0]))
    assert st.drift_norm == pytest.approx(1.0) and st.base_norm == pytest.approx(5.0)
    assert st.delta_norm == pytest.approx(2.0)
    assert st.drift_rel_delta == pytest.approx(0.5)
    assert st.drift_rel_base == pytest.approx(0.2)
    assert st.cos_drift_delta == pytest.approx(1.0)
    assert drift_stats(s, t, torch.tensor([2.0, 0.0])).cos_drift_delta == pytest.approx(0.0)
    assert drift_stats(s, t, torch.tensor([0.0, -1.0])).cos_drift_delta == pytest.approx(-1.0)
    same = drift_stats(s, s, torch.zeros(2))
    assert same.drift_norm == 0.0 and same.drift_rel_delta is None and same.cos_drift_delta is None


def test_chunked_and_combined_accumulation_equal_whole():
    g = torch.Generator().manual_seed(0)
    s, t, d = (torch.randn(10, 6, generator=g) for _ in range(3))
    whole = drift_stats(s, t, d)
    acc = DriftAccumulator()
    for r0 in range(0, 10, 3):
        acc.update(s[r0 : r0 + 3], t[r0 : r0 + 3], d[r0 : r0 + 3])
    assert acc.stats() == pytest.approx(whole) or acc.stats().__dict__ == pytest.approx(whole.__dict__)
    a, b = DriftAccumulator(), DriftAccumulator()
    a.update(s[:4], t[:4], d[:4])
    b.update(s[4:], t[4:], d[4:])
    assert (a + b).stats().__dict__ == pytest.approx(whole.__dict__)
    with pytest.raises(ValueError, match="shapes differ"):
        DriftAccumulator().update(s, t[:3], d)


def test_bf16_inputs_accumulate_in_wide_precision():
    s = torch.ones(1000, dtype=torch.bfloat16)
    t = s + 0.5
    st = drift_stats(s, t, torch.full((1000,), 0.25, dtype=torch.bfloat16))
    assert st.drift_norm == pytest.approx(0.5 * 1000**0.5)
    assert st.drift_rel_delta == pytest.approx(2.0)


def _orthonormal(m, n, seed):
    q, _ = torch.linalg.qr(torch.randn(m, n, generator=torch.Generator().manual_seed(seed)))
    return q


def test_intruder_dimensions_found_and_absent():
    m, n, r = 64, 32, 32
    u = _orthonormal(m, m, 1)
    v = _orthonormal(n, n, 2)
    s = torch.linspace(10.0, 1.0, r)
    base = u[:, :r] @ torch.diag(s) @ v.T
    # nothing changed: every tuned singular vector is a base singular vector
    none = intruder_dimensions(base, base.clone())
    assert none.n_intruders == 0 and min(none.max_similarity) == pytest.approx(1.0, abs=1e-4)
    # a large rank-1 update along a direction orthogonal to the base's column space: an intruder at top
    w = u[:, r]  # orthogonal to u[:, :r]
    tuned = base + 20.0 * torch.outer(w, v[:, r - 1])  # cos with u[:, r-1] is 1/sqrt(401)
    st = intruder_dimensions(base, tuned, k=10, epsilon=0.5)
    assert st.k == 10 and st.intruder_indices == [0] and st.n_intruders == 1
    assert st.max_similarity[0] < 0.1
    # small full-rank noise: the top directions survive
    noisy = base + 0.01 * torch.randn(m, n, generator=torch.Generator().manual_seed(3))
    assert intruder_dimensions(base, noisy).n_intruders == 0
    with pytest.raises(ValueError, match="one shape"):
        intruder_dimensions(base, base[:, :5])
    assert intruder_dimensions(base[:4, :3], base[:4, :3]).k == 3  # k capped by the matrix rank


def test_name_helpers():
    assert layer_of("model.layers.12.self_attn.q_proj.weight") == 12
    assert layer_of("model.embed_tokens.weight") is None
    assert is_embedding("lm_head.weight") and is_embedding("model.embed_tokens.weight")
    assert not is_embedding("model.layers.0.mlp.up_proj.weight")


def stats(rel_delta=0.5, rel_base=0.01, cos=0.1) -> DriftStats:
    return DriftStats(
        numel=100,
        drift_norm=1.0,
        base_norm=1.0 / rel_base,
        delta_norm=1.0 / rel_delta,
        drift_rel_delta=rel_delta,
        drift_rel_base=rel_base,
        cos_drift_delta=cos,
    )


def test_verdict_levels_and_reasons():
    v = port_verdict(stats())
    assert v.level == SAFE and "under the thresholds" in v.reasons[0]
    v = port_verdict(stats(rel_delta=2.0))
    assert v.level == CARE and "2×" in v.reasons[0]
    v = port_verdict(stats(rel_delta=40.0, rel_base=0.5))
    assert v.level == DO_NOT and len(v.reasons) == 2
    v = port_verdict(stats(cos=0.8))
    assert v.level == CARE and "α < 1" in v.reasons[0]
    v = port_verdict(stats(), per_layer={0: stats(), 3: stats(rel_delta=30.0)})
    assert v.level == DO_NOT and "layer 3" in v.reasons[0]
    v = port_verdict(stats(), per_layer={0: stats(), 1: stats(rel_delta=2.5)})
    assert v.level == CARE and "layer 1" in v.reasons[0]
    v = port_verdict(stats(), structural_share=0.02, structural_examples=["model.layers.0.q_norm.weight"])
    assert v.level == CARE and "q_norm" in v.reasons[0]
    v = port_verdict(stats(), structural_share=0.5)
    assert v.level == DO_NOT
    v = port_verdict(stats(), intruder_matrix_share=0.9)
    assert v.level == CARE and "intruder" in v.reasons[0]
    v = port_verdict(stats(rel_delta=2.0), thresholds=Thresholds(rel_delta_care=5.0))
    assert v.level == SAFE and v.thresholds["rel_delta_care"] == 5.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunk_dot_of_16_bit_values_sums_exact_products(dtype):
    """The products of two 16-bit floats are exact in fp32: the chunk's sum must be that of the exact products
    (fp64 here) to fp32 summation error, not that of products rounded to 16 bits (~1e-3 each)."""
    g = torch.Generator().manual_seed(0)
    a = (torch.randn(1 << 16, generator=g) * 0.02).to(dtype)
    b = (a.float() + torch.randn(1 << 16, generator=g) * 1e-3).to(dtype)
    for x, y in ((a, b), (a, a), (a.float(), b), (b, a.float())):
        got = chunk_dot(x, y, torch.empty(1 << 16), narrow=True)
        truth = float((x.double() * y.double()).sum())
        assert abs(got - truth) <= 3e-7 * abs(truth), (x.dtype, y.dtype, got, truth)  # rounded products: 4e-6
    # widening a 16-bit operand first changes nothing: the same exact products, the same sum
    assert chunk_dot(a, b, narrow=True) == chunk_dot(a.float(), b, narrow=True) == chunk_dot(b, a.float(), narrow=True)
