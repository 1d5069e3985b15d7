"""The port verdict: "safe to port" / "port with care" / "do not port", with reasons, from the aggregated
drift and intruder statistics of :mod:`patchlab.measure.diagnose` and :class:`Thresholds`."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from patchlab.kernels.drift import DriftStats

SAFE = "safe to port"
CARE = "port with care"
DO_NOT = "do not port"
_LEVELS = (SAFE, CARE, DO_NOT)


@dataclass(frozen=True)
class Thresholds:
    """Where a port stops being "safe" (care) and becomes "do not port".

    Calibrated on the tiny fixture family (``bench/compat_calibrate.py``): Δ = ft-v1 − v1 ported onto
    targets walking from v2 (v1 further pre-trained: the port nearly matches the ft-v2 oracle) towards an
    untrained model of the same shape (an earlier training stage). The port keeps ≥ 85% of the oracle's task
    accuracy up to drift/‖Δ‖ 0.91, relative drift 0.14, worst layer 1.27; 38-73% at 1.26-1.69, 0.20-0.27,
    1.84-2.54; ≤ 11% from 2.40, 0.38, 3.67. Real model families have other scales: re-run the calibration
    on one of yours and pass your own ``Thresholds``.
    """

    rel_delta_care: float = 1.1  # ‖base_t − base_s‖ / ‖Δ‖ over all patched tensors
    rel_delta_stop: float = 2.25
    rel_base_care: float = 0.17  # ‖base_t − base_s‖ / ‖base_s‖
    rel_base_stop: float = 0.35
    layer_rel_delta_care: float = 1.5  # the worst single layer's ‖drift‖ / ‖Δ‖
    layer_rel_delta_stop: float = 3.25
    cos_care: float = 0.5  # |cos(base_t − base_s, Δ)|: the new base already contains (or undoes) Δ
    structural_care: float = 0.0  # share of Δ's parameters on tensors missing/reshaped in base_t
    structural_stop: float = 0.10
    intruder_matrix_share_care: float = 0.5  # share of analysed matrices with >= 1 intruder dimension


@dataclass
class Verdict:
    level: str
    reasons: list[str] = field(default_factory=list)
    thresholds: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def port_verdict(
    overall: DriftStats,
    *,
    per_layer: dict[int, DriftStats] | None = None,
    structural_share: float = 0.0,
    structural_examples: list[str] | None = None,
    intruder_matrix_share: float | None = None,
    thresholds: Thresholds | None = None,
    extra_care: list[str] | None = None,
) -> Verdict:
    """Verdict from aggregated diagnostics; every reason names the number and the threshold it crossed."""
    th = thresholds or Thresholds()
    level = 0
    reasons: list[str] = []

    def flag(lv: int, msg: str) -> None:
        nonlocal level
        level = max(level, lv)
        reasons.append(f"[{_LEVELS[lv]}] {msg}")

    r = overall.drift_rel_delta
    rb0, c0 = overall.drift_rel_base, overall.cos_drift_delta
    if any(v is not None and not math.isfinite(v) for v in (r, rb0, c0)):
        flag(
            2,
            f"the diagnostics are not finite (bases differ by {_fmt(r)}×, relative drift {_fmt(rb0)}, cos "
            f"{_fmt(c0)}): a base or the patch holds NaN/Inf; nothing can be said about this port",
        )
    if r is not None:
        if r > th.rel_delta_stop:
            flag(
                2,
                f"the bases differ by {_fmt(r)}× the patch's own norm (> {th.rel_delta_stop}): the new base "
                "moved far more than the fine-tuning did, as across pre-training stages",
            )
        elif r > th.rel_delta_care:
            flag(
                1,
                f"the bases differ by {_fmt(r)}× the patch's norm (> {th.rel_delta_care}); evaluate the port",
            )
    rb = overall.drift_rel_base
    if rb is not None:
        if rb > th.rel_base_stop:
            flag(
                2,
                f"relative base drift ‖base_t − base_s‖/‖base_s‖ = {_fmt(rb)} (> {th.rel_base_stop}): "
                "the target is not a close relative of the patch's base",
            )
        elif rb > th.rel_base_care:
            flag(1, f"relative base drift {_fmt(rb)} (> {th.rel_base_care})")
    c = overall.cos_drift_delta
    if c is not None and abs(c) > th.cos_care:
        if c > 0:
            flag(
                1,
                f"cos(base drift, Δ) = {_fmt(c)}: the new base already contains part of the patch, "
                "so porting it may overshoot; try α < 1 and evaluate",
            )
        else:
            flag(1, f"cos(base drift, Δ) = {_fmt(c)}: the new base moved against the patch; evaluate the port")
    if per_layer:
        worst = max(
            ((i, s.drift_rel_delta) for i, s in per_layer.items() if s.drift_rel_delta is not None),
            key=lambda t: t[1],
            default=None,
        )
        if worst is not None and worst[1] > th.layer_rel_delta_stop:
            flag(
                2,
                f"layer {worst[0]}: the bases differ by {_fmt(worst[1])}× the patch there "
                f"(> {th.layer_rel_delta_stop})",
            )
        elif worst is not None and worst[1] > th.layer_rel_delta_care:
            flag(
                1,
                f"layer {worst[0]}: the bases differ by {_fmt(worst[1])}× the patch there "
                f"(> {th.layer_rel_delta_care})",
            )
    if structural_share > th.structural_stop:
        flag(
            2,
            f"{structural_share:.1%} of the patch's parameters sit on tensors missing or reshaped in the "
            f"target (> {th.structural_stop:.0%})" + _examples(structural_examples),
        )
    elif structural_share > th.structural_care:
        flag(
            1,
            f"{structural_share:.2%} of the patch's parameters sit on tensors missing or reshaped in the "
            "target; the plan must pick a policy for them" + _examples(structural_examples),
        )
    if intruder_matrix_share is not None and intruder_matrix_share > th.intruder_matrix_share_care:
        flag(
            1,
            f"{intruder_matrix_share:.0%} of the analysed matrices carry intruder dimensions (> "
            f"{th.intruder_matrix_share_care:.0%}): a low-rank-like patch, linked to forgetting",
        )
    for note in extra_care or []:
        flag(1, note)
    if not reasons:
        reasons.append(
            f"[{SAFE}] bases differ by {_fmt(r)}× the patch norm, relative drift {_fmt(rb)}, "
            f"cos {_fmt(c)}: all under the thresholds"
        )
    return Verdict(level=_LEVELS[level], reasons=reasons, thresholds=asdict(th))


def _examples(names: list[str] | None) -> str:
    if not names:
        return ""
    return " (e.g. " + ", ".join(names[:3]) + ("..." if len(names) > 3 else "") + ")"
