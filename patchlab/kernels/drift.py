"""Pure weight-space diagnostics for porting a patch Δ (made on base_s) onto a newer base_t.

No I/O: tensors in, numbers out, fp32 (or fp64) accumulation. The streaming driver over checkpoints
feeds these row chunk by row chunk.

- :class:`DriftAccumulator`: ``‖base_t − base_s‖``, ``‖base_s‖``, ``‖Δ‖`` and ``⟨base_t − base_s, Δ⟩``
  accumulated over row chunks of one tensor (or over many tensors: a layer, the whole model); gives the
  drift relative to ``‖Δ‖`` and to ``‖base_s‖`` and ``cos(base_t − base_s, Δ)`` (ALGORITHMS.md §1).
- :func:`intruder_dimensions`: among the top-k left singular vectors of the tuned matrix, those whose
  largest |cosine| with every left singular vector of the base matrix is below ε (ALGORITHMS.md §7).
- :func:`port_verdict`: "safe to port" / "port with care" / "do not port" with reasons, from aggregated
  statistics and :class:`Thresholds`.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

SAFE = "safe to port"
CARE = "port with care"
DO_NOT = "do not port"
_LEVELS = (SAFE, CARE, DO_NOT)
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def layer_of(name: str) -> int | None:
    """Decoder layer index of a tensor name (``model.layers.3.mlp...`` -> 3); None for non-layer tensors."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def is_embedding(name: str) -> bool:
    """Input embedding or output head (vocabulary-sized matrices), skipped by intruder analysis by default."""
    return any(k in name for k in ("embed_tokens", "lm_head", "wte", "word_embeddings", "embed_out"))


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

    def update(self, base_s: torch.Tensor, base_t: torch.Tensor, delta: torch.Tensor | None = None) -> None:
        """Add one chunk (same shapes). Without ``delta`` only drift and base norms are accumulated."""
        if base_s.shape != base_t.shape or (delta is not None and delta.shape != base_s.shape):
            raise ValueError(
                f"chunk shapes differ: base_s {tuple(base_s.shape)}, base_t {tuple(base_t.shape)}, "
                f"delta {None if delta is None else tuple(delta.shape)}"
            )
        s = base_s.to(torch.float64)
        d = base_t.to(torch.float64) - s
        self.numel += s.numel()
        self.ss_drift += float((d * d).sum())
        self.ss_base += float((s * s).sum())
        if delta is not None:
            dl = delta.to(torch.float64)
            self.ss_delta += float((dl * dl).sum())
            self.dot += float((d * dl).sum())

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
