"""Merge kernels: hand-computed values, peft where the conventions coincide, seeds, and chunked == whole."""

from __future__ import annotations

import pytest
import torch
from peft.utils import merge_utils as pm

from patchlab.errors import PatchlabError
from patchlab.kernels import merge as mk

T = torch.tensor


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def f32(x: float) -> float:
    return T(x, dtype=torch.float32).item()


# ---------------------------------------------------------------------------------------------------------
# counter-based RNG


def _lowbias32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_mix32_equals_python_integer_reference():
    xs = [0, 1, 2, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0xDEADBEEF, 123456789]
    got = mk._mix32(T(xs, dtype=torch.int64)).tolist()
    assert got == [_lowbias32(x) for x in xs]


def test_random_bits_equal_python_reference_including_indices_above_2_32():
    k0, k1 = mk._key(7, "layer.0.w", 2)
    start = (1 << 32) - 3
    got = mk.random_bits24(7, "layer.0.w", start, 6, stream=2).tolist()
    want = [_lowbias32(_lowbias32((i & 0xFFFFFFFF) ^ k0) ^ (i >> 32) ^ k1) >> 8 for i in range(start, start + 6)]
    assert got == want


def test_uniform_chunked_equals_whole():
    whole = mk.uniform(3, "w", 0, 1000)
    for size in (1, 7, 333, 1000):
        parts = torch.cat([mk.uniform(3, "w", s, min(size, 1000 - s)) for s in range(0, 1000, size)])
        assert same(parts, whole)


def test_uniform_range_and_distribution():
    u = mk.uniform(0, "x", 0, 200_000)
    assert u.dtype == torch.float32 and float(u.min()) >= 0 and float(u.max()) < 1
    assert torch.equal(u * 2**24, (u * 2**24).round())  # multiples of 2**-24
    assert abs(float(u.mean()) - 0.5) < 0.005
    hist = torch.histc(u, bins=10, min=0, max=1) / u.numel()
    assert float((hist - 0.1).abs().max()) < 0.005


def test_uniform_depends_on_seed_name_and_stream():
    base = mk.uniform(0, "a", 0, 64)
    assert not torch.equal(base, mk.uniform(1, "a", 0, 64))
    assert not torch.equal(base, mk.uniform(0, "b", 0, 64))
    assert not torch.equal(base, mk.uniform(0, "a", 0, 64, stream=1))
    assert same(base, mk.uniform(0, "a", 0, 64))


def test_dare_mask_keeps_density_share():
    m = mk.dare_mask((400, 250), 0.3, seed=5, name="w")
    assert abs(float(m.float().mean()) - 0.3) < 0.01
    assert mk.dare_mask((10,), 1.0, 5, "w").all()


# ---------------------------------------------------------------------------------------------------------
# sparsifiers


def test_magnitude_trim_hand_values():
    assert same(mk.magnitude_trim(T([0.1, -0.5, 0.3, -0.2]), 0.5), T([0.0, -0.5, 0.3, 0.0]))


def test_magnitude_trim_ties_keep_lowest_index():
    assert same(mk.magnitude_trim(T([1.0, -1.0, 1.0, 0.5]), 0.5), T([1.0, -1.0, 0.0, 0.0]))
    assert same(mk.magnitude_trim(T([0.5, 1.0, -1.0, 1.0]), 0.25), T([0.0, 1.0, 0.0, 0.0]))


def test_magnitude_trim_keeps_one_entry_when_density_times_numel_below_one():
    assert same(mk.magnitude_trim(T([0.1, -0.9, 0.2]), 0.1), T([0.0, -0.9, 0.0]))
    assert mk.keep_count(0.1, 3) == 1 and mk.keep_count(0.5, 7) == 3


def test_magnitude_trim_density_one_is_identity_and_zeros_stay_positive_zero():
    x = T([0.0, -0.0, 3.0, -1.0])
    assert same(mk.magnitude_trim(x, 1.0), x)
    assert same(mk.magnitude_trim(T([-0.0, 0.0, 0.0, 2.0]), 0.5), T([0.0, 0.0, 0.0, 2.0]))


def test_magnitude_trim_matches_peft():
    torch.manual_seed(0)
    x = torch.randn(13, 17)  # distinct magnitudes: peft's topk and our index tie-break agree
    for d in (0.05, 0.2, 0.5, 0.9):
        want = pm.magnitude_based_pruning(x, d)  # peft multiplies by the mask: -0.0 where we write +0.0
        assert torch.equal(mk.magnitude_trim(x, d), want) and not same(mk.magnitude_trim(x, d), want)


def test_outliers_hand_values():
    x = T([1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0, 9.0, -10.0])
    # drop int(0.2*10) = 2 outliers (10, 9), keep int(0.3*10) = 3 (8, 7, 6)
    want = T([0.0, 0.0, 0.0, 0.0, 0.0, -6.0, 7.0, -8.0, 0.0, 0.0])
    assert same(mk.magnitude_outliers(x, 0.3, 0.2), want)


def test_outliers_gamma_times_numel_below_one_drops_no_outliers():
    x = T([1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0, 9.0, -10.0])
    want = T([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -8.0, 9.0, -10.0])  # mergekit: all zero
    assert same(mk.magnitude_outliers(x, 0.3, 0.05), want)


def test_outliers_shrink_when_density_plus_gamma_exceeds_one():
    assert mk.outlier_ranks(0.9, 0.2, 10) == (1, 10)
    x = T([1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0, 9.0, -10.0])
    assert same(mk.magnitude_outliers(x, 0.9, 0.2), torch.where(x.abs() == 10, 0.0, x))


def test_della_keep_prob_hand_values():
    p = mk.della_keep_prob(T([0.1, -0.4, 0.2, 0.3]), 0.5, 0.2)
    assert p.dtype == torch.float64
    torch.testing.assert_close(p, T([0.3, 0.7, 0.3 + 0.4 / 3, 0.3 + 0.8 / 3], dtype=torch.float64))


def test_della_keep_prob_rows_ties_and_single_element():
    p = mk.della_keep_prob(T([[1.0, 1.0], [-3.0, 2.0]]), 0.5, 0.2)  # rows ranked separately; lower index ranks higher
    torch.testing.assert_close(p, T([[0.7, 0.3], [0.7, 0.3]], dtype=torch.float64))
    assert mk.della_keep_prob(T([[5.0], [1.0]]), 0.4, 0.1).tolist() == [[0.4], [0.4]]


def test_della_mask_follows_rank_probabilities():
    x = torch.arange(1.0, 6.0).repeat(4000, 1)  # each row ranks 1..5 the same way
    mask, p = mk.della_mask(x, 0.5, 0.4, seed=1, name="w")
    freq = mask.float().mean(0)
    torch.testing.assert_close(freq, p[0].float(), atol=0.02, rtol=0)
    full, _ = mk.della_mask(x, 0.6, 0.4, seed=1, name="w")  # density + ε = 1: the largest always survives
    assert full[:, 4].all() and not full[:, 0].all()


# ---------------------------------------------------------------------------------------------------------
# exact L1 and rescale


def test_l1_norm_is_exact_and_order_free():
    x = T([2.0**24, 1.0, 1.0])
    assert float((x[0] + x[1]) + x[2]) == 2.0**24  # a sequential fp32 sum loses both ones
    assert mk.l1_norm(x) == 2.0**24 + 2
    assert mk.l1_norm(T([1.0, 2.0**24, 1.0]).flip(0)) == 2.0**24 + 2
    assert mk.l1_units(T([1e-45, -1e-45])) == 2  # subnormals
    assert mk.l1_norm(T([-0.5, 0.25, 3.0])) == 3.75


def test_l1_rescale_hand_values():
    x = T([4.0, -1.0, 2.0, 1.0])
    got = mk.merge_tensor([x], "ties", densities=0.5, rescale="l1")
    assert same(got, T([4.0, 0.0, 2.0, 0.0]) * T(8 / 6, dtype=torch.float32))


def test_inverse_density_rescale_hand_values():
    got = mk.merge_tensor([T([4.0, -1.0, 2.0, 1.0])], "ties", densities=0.5, rescale="inverse-density")
    assert same(got, T([8.0, 0.0, 4.0, 0.0]))


def test_l1_rescale_skipped_below_eps():
    x = T([4e-8, -1e-8, 2e-8, 1e-8])
    assert same(mk.merge_tensor([x], "ties", densities=0.5, rescale="l1"), T([4e-8, 0.0, 2e-8, 0.0]))
    assert mk.l1_scale(10, 0) is None


def test_dare_l1_rescale_restores_the_norm():
    torch.manual_seed(1)
    x = torch.randn(50, 40)
    out = mk.merge_tensor([x], "dare_linear", densities=0.3, seed=2, name="w")
    mask = mk.dare_mask(x.shape, 0.3, 2, "w", 0)
    scale = T(mk.l1_units(x) / mk.l1_units(x[mask]), dtype=torch.float32)
    assert same(out, torch.where(mask, x, 0.0) * scale)
    assert abs(mk.l1_norm(out) / mk.l1_norm(x) - 1) < 1e-6


def test_della_inverse_density_divides_by_each_keep_probability():
    torch.manual_seed(2)
    x = torch.randn(6, 9)
    out = mk.merge_tensor([x], "della_linear", densities=0.5, epsilons=0.2, rescale="inverse-density", seed=4)
    mask, p = mk.della_mask(x, 0.5, 0.2, 4, "", 0)
    assert same(out, torch.where(mask, x, 0.0) / p.float())


# ---------------------------------------------------------------------------------------------------------
# sign election and disjoint merge


def test_elect_sign_sum_and_count_differ_and_tie_is_plus():
    ws = [T([3.0, 1.0, 0.0]), T([-1.0, -1.0, 0.0]), T([-1.0, 0.0, 0.0])]
    assert same(mk.elect_sign(ws, "sum"), T([1.0, 1.0, 1.0]))  # sums 1, 0 (tie), 0
    assert same(mk.elect_sign(ws, "count"), T([-1.0, 1.0, 1.0]))  # counts -1, 0, 0


def test_elect_sign_matches_peft_on_unweighted_tensors():
    torch.manual_seed(3)
    xs = [mk.magnitude_trim(torch.randn(8, 8), 0.5) for _ in range(3)]
    for ours, theirs in (("sum", "total"), ("count", "frequency")):
        sign = mk.elect_sign(xs, ours)
        want = pm.calculate_majority_sign_mask(torch.stack(xs), theirs)
        assert torch.equal(torch.stack([x.sign() == sign for x in xs]), want)


def test_disjoint_merge_hand_values_and_zero_divisor():
    a, b = T([1.0, -1.0, 0.0]), T([2.0, 3.0, 0.0])
    weighted = [a, b * 0.5]
    sign = mk.elect_sign(weighted, "sum")  # sums 2, 0.5, 0 -> all +
    got = mk.disjoint_merge(weighted, [1.0, 0.5], sign, normalize=True)
    assert same(got, T([2.0 / 1.5, 1.5 / 0.5, 0.0]))  # pruned/zero entries never agree; divisor 0 -> 1
    assert same(mk.disjoint_merge(weighted, [1.0, 0.5], sign, normalize=True, lambda_=2.0), got * 2.0)
    assert same(mk.disjoint_merge(weighted, [1.0, 0.5], sign, normalize=False), T([2.0, 1.5, 0.0]))


def test_disjoint_merge_without_sign_divides_by_weight_sum_or_one():
    xs = [T([1.0, 2.0]), T([3.0, -4.0])]
    assert same(mk.disjoint_merge(xs, [1.0, 3.0], None, normalize=True), T([1.0, -0.5]))
    assert same(mk.disjoint_merge(xs, [1.0, -1.0], None, normalize=True), T([4.0, -2.0]))


def test_disjoint_merge_matches_peft_with_unit_weights():
    torch.manual_seed(4)
    xs = [mk.magnitude_trim(torch.randn(6, 7), 0.4) for _ in range(3)]
    sign = mk.elect_sign(xs, "sum")
    mask = pm.calculate_majority_sign_mask(torch.stack(xs), "total")
    want = pm.disjoint_merge(torch.stack(xs), mask)
    torch.testing.assert_close(mk.disjoint_merge(xs, [1.0] * 3, sign, normalize=True), want, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------
# methods: hand-computed values

A = T([1.0, -2.0, 3.0, -4.0])
B = T([-1.0, 1.0, 2.0, 4.0])


def test_method_defaults_are_mergekits():
    table = {
        "task_arithmetic": (None, False, None),
        "ties": ("sum", True, None),
        "dare_linear": (None, False, "l1"),
        "dare_ties": ("sum", False, "l1"),
        "breadcrumbs": (None, False, None),
        "breadcrumbs_ties": ("sum", False, None),
        "della": ("sum", True, "l1"),
        "della_linear": (None, False, "l1"),
    }
    assert {n: (m.sign_election, m.normalize, m.rescale) for n, m in mk.METHODS.items()} == table
    p = mk.validate_merge("della", 2)
    assert p.densities == (1.0, 1.0) and p.epsilons == (0.15, 0.15) and p.weights == (1.0, 1.0)
    assert mk.validate_merge("breadcrumbs", 1).gammas == (0.01,)


def test_task_arithmetic_hand_values():
    got = mk.merge_tensor([A, B], "task_arithmetic", weights=[1.0, 0.5], lambda_=2.0)
    assert same(got, T([1.0, -3.0, 8.0, -4.0]))


def test_ties_hand_values():
    # trims: A -> [0, 0, 3, -4], B -> [0, 0, 2, 4]; sums [0, 0, 5, 0] elect + everywhere
    assert same(mk.merge_tensor([A, B], "ties", densities=0.5), T([0.0, 0.0, 2.5, 4.0]))
    # weights 1, 0.5: weighted B [0, 0, 1, 2]; sums [0, 0, 4, -2]; divisor = agreeing weights [1, 1, 1.5, 1]
    got = mk.merge_tensor([A, B], "ties", weights=[1.0, 0.5], densities=0.5)
    assert same(got, T([0.0, 0.0, 4.0 / 1.5, -4.0]))


def test_ties_sign_tie_elects_plus():
    got = mk.merge_tensor([T([1.0, -2.0]), T([-1.0, 2.0])], "ties")
    assert same(got, T([1.0, 2.0]))


def test_dare_linear_and_ties_hand_values():
    m0 = mk.dare_mask(A.shape, 0.5, 9, "w", 0)
    m1 = mk.dare_mask(B.shape, 0.5, 9, "w", 1)
    a, b = torch.where(m0, A, 0.0) / 0.5, torch.where(m1, B, 0.0) / 0.5
    kw = dict(densities=0.5, rescale="inverse-density", seed=9, name="w")
    assert same(mk.merge_tensor([A, B], "dare_linear", weights=[1.0, 0.5], **kw), a + b * 0.5)
    sign = torch.where(a + b >= 0, 1.0, -1.0)
    want = torch.where(a.sign() == sign, a, 0.0) + torch.where(b.sign() == sign, b, 0.0)  # no normalize
    assert same(mk.merge_tensor([A, B], "dare_ties", **kw), want)


def test_breadcrumbs_hand_values():
    x = T([1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0, 9.0, -10.0])
    y = -x.flip(0)
    xb = T([0.0, 0.0, 0.0, 0.0, 0.0, -6.0, 7.0, -8.0, 0.0, 0.0])
    yb = -xb.flip(0)  # [0, 0, 8, -7, 6, 0, ...]
    assert same(mk.merge_tensor([x, y], "breadcrumbs", densities=0.3, gammas=0.2), xb + yb)
    ties = mk.merge_tensor([x, y], "breadcrumbs_ties", densities=0.3, gammas=0.2, weights=[1.0, 2.0])
    s = xb + 2 * yb  # no normalize by default: agreeing entries summed
    want = torch.where((xb.sign() == torch.where(s >= 0, 1.0, -1.0)), xb, 0.0)
    want = want + torch.where((yb.sign() == torch.where(s >= 0, 1.0, -1.0)), 2 * yb, 0.0)
    assert same(ties, want)


def test_della_hand_values():
    torch.manual_seed(5)
    x, y = torch.randn(4, 6), torch.randn(4, 6)
    mx, px = mk.della_mask(x, 0.4, 0.1, 3, "w", 0)
    my, py = mk.della_mask(y, 0.4, 0.1, 3, "w", 1)
    xs = torch.where(mx, x, 0.0) * T(mk.l1_units(x) / mk.l1_units(x[mx]), dtype=torch.float32)
    ys = torch.where(my, y, 0.0) * T(mk.l1_units(y) / mk.l1_units(y[my]), dtype=torch.float32)
    sign = torch.where(xs + ys >= 0, 1.0, -1.0)
    ax, ay = xs.sign() == sign, ys.sign() == sign
    div = torch.where(ax, 1.0, 0.0) + torch.where(ay, 1.0, 0.0)
    want = (torch.where(ax, xs, 0.0) + torch.where(ay, ys, 0.0)) / div.masked_fill(div == 0, 1.0)
    assert same(mk.merge_tensor([x, y], "della", densities=0.4, epsilons=0.1, seed=3, name="w"), want)
    assert same(mk.merge_tensor([x, y], "della_linear", densities=0.4, epsilons=0.1, seed=3, name="w"), xs + ys)


def test_density_one_sparsifies_nothing_as_mergekit():
    x = T([1.0, -5.0, 3.0])
    for method in ("ties", "dare_linear", "breadcrumbs", "della"):
        assert same(mk.merge_tensor([x], method, densities=1.0), x)


# ---------------------------------------------------------------------------------------------------------
# methods against peft (weights 1 and count normalisation coincide)


def test_ties_matches_peft_with_unit_weights():
    torch.manual_seed(6)
    xs = [torch.randn(9, 11) for _ in range(3)]
    want = pm.ties(xs, torch.ones(3), 0.3)
    torch.testing.assert_close(mk.merge_tensor(xs, "ties", densities=0.3), want, rtol=0, atol=0)
    want = pm.ties(xs, torch.ones(3), 0.3, majority_sign_method="frequency")
    torch.testing.assert_close(mk.merge_tensor(xs, "ties", densities=0.3, sign_election="count"), want, rtol=0, atol=0)


def test_magnitude_prune_matches_peft_with_any_weights():
    torch.manual_seed(7)
    xs = [torch.randn(5, 12) for _ in range(2)]
    want = pm.magnitude_prune(xs, T([0.7, 1.3]), 0.25)
    got = mk.merge_tensor(xs, "ties", weights=[0.7, 1.3], densities=0.25, sign_election="none", normalize=False)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def _peft_with_our_masks(monkeypatch, masks):
    it = iter(masks)
    monkeypatch.setattr(torch, "bernoulli", lambda p: next(it).to(p.dtype))


def test_dare_matches_peft_given_the_same_masks(monkeypatch):
    torch.manual_seed(8)
    xs = [torch.randn(10, 10) for _ in range(3)]
    masks = [mk.dare_mask(x.shape, 0.4, 11, "w", i) for i, x in enumerate(xs)]
    kw = dict(densities=0.4, rescale="inverse-density", seed=11, name="w")
    _peft_with_our_masks(monkeypatch, masks)
    want = pm.dare_linear(xs, T([0.5, 1.0, 2.0]), 0.4)
    torch.testing.assert_close(
        mk.merge_tensor(xs, "dare_linear", weights=[0.5, 1.0, 2.0], **kw), want, rtol=1e-6, atol=0
    )
    _peft_with_our_masks(monkeypatch, masks)
    want = pm.dare_ties(xs, torch.ones(3), 0.4)
    torch.testing.assert_close(mk.merge_tensor(xs, "dare_ties", normalize=True, **kw), want, rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------------------
# validation, before any tensor is touched


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(method="tie"), "did you mean 'ties'"),
        (dict(method="ties", densitys=0.2), "did you mean 'densities'"),
        (dict(method="ties", weights=[1.0]), "1 weights given for 2 patches"),
        (dict(method="ties", densities=[0.2, 0.3, 0.4]), "3 densities given for 2 patches"),
        (dict(method="ties", densities=0.0), "must be in (0, 1]"),
        (dict(method="ties", densities=1.5), "must be in (0, 1]"),
        (dict(method="ties", gammas=0.1), "gamma does not apply to ties"),
        (dict(method="ties", epsilons=0.1), "epsilon does not apply to ties"),
        (dict(method="task_arithmetic", densities=0.5), "density does not apply"),
        (dict(method="task_arithmetic", rescale="l1"), "does not apply to task_arithmetic"),
        (dict(method="breadcrumbs", gammas=1.0), "gamma of patch 1"),
        (dict(method="della", densities=0.1), "0.1 ± 0.15 leaves (0, 1]"),
        (dict(method="della", densities=0.9), "0.9 ± 0.15 leaves (0, 1]"),
        (dict(method="della", densities=0.5, epsilons=-0.1), "must be >= 0"),
        (dict(method="ties", lambda_=float("nan")), "lambda must be a finite number"),
        (dict(method="ties", weights=[1.0, float("inf")]), "weight of patch 2"),
        (dict(method="ties", rescale="l2"), "unknown rescale 'l2'"),
        (dict(method="ties", sign_election="sums"), "did you mean 'sum'"),
        (dict(method="ties", normalize="yes"), "normalize must be true or false"),
    ],
)
def test_validate_merge_errors(kwargs, message):
    method = kwargs.pop("method")
    with pytest.raises(mk.MergeConfigError) as err:
        mk.validate_merge(method, 2, **kwargs)
    assert message in str(err.value)
    assert isinstance(err.value, PatchlabError) and isinstance(err.value, ValueError)


def test_della_epsilon_bounds_inclusive_at_one_and_ignored_at_density_one():
    assert mk.validate_merge("della", 1, densities=0.85, epsilons=0.15).densities == (0.85,)
    assert mk.validate_merge("della", 1, densities=1.0, epsilons=0.15).epsilons == (0.15,)
    with pytest.raises(mk.MergeConfigError):
        mk.validate_merge("della", 1, densities=0.15, epsilons=0.15)


def test_validate_merge_config_mergekit_names():
    p = mk.validate_merge_config("ties", [{"weight": 1, "density": 0.2}, {"weight": 0.5}], {"lambda": 2})
    assert p.weights == (1.0, 0.5) and p.densities == (0.2, 1.0) and p.lambda_ == 2.0
    with pytest.raises(mk.MergeConfigError, match="did you mean 'density'"):
        mk.validate_merge_config("ties", [{"densty": 0.2}], {})
    with pytest.raises(mk.MergeConfigError, match="did you mean 'lambda'"):
        mk.validate_merge_config("ties", [{}], {"lamda": 1})


def test_bad_parameters_raise_before_a_delta_is_touched():
    class Untouchable:
        def __getattr__(self, name):
            raise AssertionError("a delta was read before validation")

    with pytest.raises(mk.MergeConfigError):
        mk.merge_tensor([Untouchable(), Untouchable()], "della", densities=0.05)
    with pytest.raises(mk.MergeConfigError):
        mk.merge_tensor([Untouchable()], "ties", seed=1.5)


# ---------------------------------------------------------------------------------------------------------
# reproducibility and streaming


def test_same_seed_same_bytes_other_seed_or_stream_other_bytes():
    torch.manual_seed(9)
    x = torch.randn(30, 30)
    one = mk.merge_tensor([x, x], "dare_linear", densities=0.3, seed=1, name="w")
    assert same(one, mk.merge_tensor([x, x], "dare_linear", densities=0.3, seed=1, name="w"))
    assert not torch.equal(one, mk.merge_tensor([x, x], "dare_linear", densities=0.3, seed=2, name="w"))
    assert not torch.equal(one, mk.merge_tensor([x, x], "dare_linear", densities=0.3, seed=1, name="v"))
    assert not torch.equal(mk.dare_mask(x.shape, 0.3, 1, "w", 0), mk.dare_mask(x.shape, 0.3, 1, "w", 1))


def _stream(params, deltas, rows, seed=0, name="t", reverse=False, windows=True):
    shape = deltas[0].shape
    row_numel = deltas[0][0].numel() if deltas[0].dim() else 1
    starts = list(range(0, shape[0] if deltas[0].dim() else 1, rows))
    if reverse:
        starts.reverse()

    def chunk(r):
        return [d[r : r + rows] if d.dim() else d for d in deltas]

    stats = mk.MergeStats(params, shape, seed, name, windows=windows)
    while not stats.done:
        for r in starts:
            stats.update(chunk(r), r * row_numel)
        stats.finish_pass()
    parts = {r: mk.merge_chunk(chunk(r), stats, params, seed, name, r * row_numel) for r in starts}
    return torch.cat([parts[r].reshape(-1, *shape[1:]) for r in sorted(parts)]), stats


METHOD_KW = {
    "task_arithmetic": {},
    "ties": dict(densities=[0.2, 0.35, 0.01]),
    "dare_linear": dict(densities=[0.3, 0.5, 0.9]),
    "dare_ties": dict(densities=[0.3, 0.5, 0.9]),
    "breadcrumbs": dict(densities=[0.3, 0.5, 0.2], gammas=[0.05, 0.0, 0.3]),
    "breadcrumbs_ties": dict(densities=[0.3, 0.5, 0.2], gammas=[0.05, 0.0, 0.3]),
    "della": dict(densities=[0.3, 0.5, 0.8], epsilons=[0.1, 0.2, 0.15]),
    "della_linear": dict(densities=[0.3, 0.5, 0.8], epsilons=[0.1, 0.2, 0.15]),
}


@pytest.mark.parametrize("method", list(mk.METHODS))
@pytest.mark.parametrize("rescale", [None, "inverse-density", "l1"])
def test_chunked_equals_whole_for_every_method(method, rescale):
    if rescale is not None and method == "task_arithmetic":
        pytest.skip("task_arithmetic drops nothing")
    torch.manual_seed(10)
    deltas = [torch.randn(23, 17), torch.randn(23, 17).to(torch.bfloat16), torch.randn(23, 17) * 1e-3]
    p = mk.validate_merge(method, 3, weights=[1.0, 0.5, -0.3], rescale=rescale, **METHOD_KW[method])
    whole = mk.merge_tensor(deltas, p, seed=4, name="model.w")
    assert whole.dtype == torch.float32
    for rows, reverse in ((1, False), (4, True), (7, False), (23, False)):
        got, _ = _stream(p, deltas, rows, seed=4, name="model.w", reverse=reverse)
        assert same(got, whole), (method, rescale, rows)


@pytest.mark.parametrize("windows", [True, False])
@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_chunked_equals_whole_when_threshold_ties_are_split(method, windows):
    torch.manual_seed(11)
    deltas = [torch.randint(-3, 4, (19, 8)).float() for _ in range(2)]  # many exact ties
    p = mk.validate_merge(method, 2, densities=0.3, rescale="l1", **({"gammas": 0.1} if "bread" in method else {}))
    whole = mk.merge_tensor(deltas, p, seed=0, name="t")
    for rows in (1, 3, 19):
        got, stats = _stream(p, deltas, rows, windows=windows)
        # with windows one pass: the kept entries are few, so the windows reach up to the largest
        assert stats.passes == (1 if windows else 3) and same(got, whole)


def test_split_ties_keep_exactly_k():
    x = torch.ones(6, 5)
    x[2, 1] = 2.0
    p = mk.validate_merge("ties", 1, densities=0.3)  # k = 9: the 2.0 and the first 8 ones
    got, stats = _stream(p, [x], 2)
    th = stats.patches[0].select.thresholds[9]
    assert (th.greater, th.equal, th.keep_equal) == (1, 29, 8)
    want = torch.zeros(30)
    want[:8] = 1.0
    want[11] = 2.0
    assert same(got, want.view(6, 5))


@pytest.mark.parametrize("shape", [(40,), (5, 3, 4), ()])
def test_chunked_equals_whole_for_other_ranks(shape):
    torch.manual_seed(12)
    deltas = [torch.randn(shape) for _ in range(2)]
    for method in ("ties", "dare_ties", "breadcrumbs", "della"):
        p = mk.validate_merge(method, 2, densities=0.4, **({"epsilons": 0.1} if "della" in method else {}))
        whole = mk.merge_tensor(deltas, p, seed=1, name="t")
        rows = 40 if method == "della" and len(shape) == 1 else 3
        got, _ = _stream(p, deltas, rows, seed=1)
        assert same(got.view(whole.shape), whole), (method, shape)


def test_della_needs_a_1d_tensor_in_one_chunk():
    p = mk.validate_merge("della", 1, densities=0.4, epsilons=0.1)
    stats = mk.MergeStats(p, (10,), 0, "t")
    with pytest.raises(ValueError, match="one chunk"):
        stats.update([torch.randn(5)], 0)


def test_merge_chunk_refuses_incomplete_or_foreign_statistics():
    p = mk.validate_merge("ties", 1, densities=0.5)
    stats = mk.MergeStats(p, (4, 4), 0, "t")
    x = torch.randn(4, 4)
    with pytest.raises(ValueError, match="incomplete"):
        mk.merge_chunk([x], stats, p, 0, "t", 0)
    with pytest.raises(ValueError, match="other parameters"):
        mk.merge_chunk([x], stats, mk.validate_merge("ties", 1, densities=0.4), 0, "t", 0)
    with pytest.raises(ValueError, match="whole rows"):
        stats.update([x[:1]], 3)


def test_streaming_passes_per_method():
    shape = (8, 8)
    passes = {}
    for method, kw in METHOD_KW.items():
        p = mk.validate_merge(method, 1, **{k: v[:1] for k, v in kw.items()})
        _, stats = _stream(p, [torch.randn(shape)], 3, windows=False)
        passes[method] = stats.passes
    assert passes == {
        "task_arithmetic": 0,
        "ties": 2,
        "dare_linear": 1,
        "dare_ties": 1,
        "breadcrumbs": 2,
        "breadcrumbs_ties": 2,
        "della": 1,
        "della_linear": 1,
    }
    p = mk.validate_merge("dare_linear", 1, densities=0.5, rescale="inverse-density")
    assert mk.MergeStats(p, shape).done


def test_radix_select_equals_sort():
    torch.manual_seed(13)
    x = torch.cat([torch.randn(300) * 10.0 ** torch.randint(-30, 30, (300,)), torch.zeros(20), torch.full((30,), 0.5)])
    x = x[torch.randperm(x.numel())].view(35, 10)
    ks = [1, 17, 100, 330, 350]
    sel = mk.RadixSelect(ks, rows=35, want_l1=True)
    while not sel.done:
        for r in (30, 0, 10, 20):
            sel.update(mk._abs_bits(x[r : r + 10]).view(-1, 10), r)
        sel.finish_pass()
    desc = x.abs().reshape(-1).sort(descending=True).values
    for k in ks:
        assert sel.thresholds[k].value == float(desc[k - 1])
        assert sel.top_units(k) == mk.l1_units(desc[:k])
    assert sel.total_units == mk.l1_units(x)
