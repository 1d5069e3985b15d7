"""Weight-space diagnostics of a patch against a target base, streamed tensor by tensor.

For every ``add`` tensor of the patch, row chunks of ``base_s`` (the base the patch was made on),
``base_t`` (the target) and ``Δ`` feed :class:`~patchlab.kernels.drift.DriftAccumulator`; tensors
are combined per decoder layer and overall. Matrices (embeddings skipped by default) get an intruder
dimension count: top-k left singular vectors of the fine-tune ``base_s + Δ`` against those of ``base_s``.
Memory stays at a few row chunks, plus one matrix pair while its SVD runs.

Structural differences are listed rather than compared: patch tensors absent from the target, shape
changes (vocabulary growth compares the shared rows and is reported as such), tensors only the target has,
and the patch's own ``set``/``delete`` entries. The verdict comes from
:func:`~patchlab.kernels.drift.port_verdict`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypedDict, Unpack

import torch

from patchlab.engine.devices import resolve_device
from patchlab.engine.executor import Job, Shard, run, scratch
from patchlab.errors import IncompatiblePatchError, NonFiniteError, PatchlabError
from patchlab.io.checkpoint import Checkpoint
from patchlab.io.patch import Patch, PatchTensor
from patchlab.kernels.delta import all_finite
from patchlab.kernels.drift import DriftAccumulator, DriftStats, IntruderStats, chunk_dot, intruder_dimensions
from patchlab.measure.verdict import Thresholds, Verdict, port_verdict
from patchlab.names import align_names, is_embedding, is_vocab_tensor, layer_of


@dataclass
class TensorDiagnostics:
    """One patch tensor. ``status``: compared | rows-compared (vocabulary size differs) | missing-in-target |
    missing-in-source | shape-differs | set | delete."""

    name: str
    status: str
    layer: int | None
    shape_source: list[int] | None
    shape_target: list[int] | None
    drift: DriftStats | None = None
    intruders: IntruderStats | None = None
    note: str = ""


@dataclass
class PortDiagnostics:
    patch: str
    source: str
    target: str
    tensors: list[TensorDiagnostics]
    per_layer: dict[str, DriftStats]
    overall: DriftStats
    only_in_target: list[str]
    structural_share: float
    intruder_matrices: int
    intruder_matrix_share: float | None
    verdict: Verdict
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def matrices_with_intruders(self) -> int:
        """How many of the analysed matrices carry at least one intruder dimension."""
        return sum(1 for t in self.tensors if t.intruders is not None and t.intruders.n_intruders > 0)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PortDiagnostics:
        def tensor(d: dict[str, Any]) -> TensorDiagnostics:
            d = dict(d)
            dr, it = d.pop("drift"), d.pop("intruders")
            return TensorDiagnostics(
                **d,
                drift=DriftStats(**dr) if dr is not None else None,
                intruders=IntruderStats(**it) if it is not None else None,
            )

        d = dict(data)
        return cls(
            patch=d["patch"],
            source=d["source"],
            target=d["target"],
            tensors=[tensor(t) for t in d["tensors"]],
            per_layer={k: DriftStats(**v) for k, v in d["per_layer"].items()},
            overall=DriftStats(**d["overall"]),
            only_in_target=list(d["only_in_target"]),
            structural_share=float(d["structural_share"]),
            intruder_matrices=int(d["intruder_matrices"]),
            intruder_matrix_share=d["intruder_matrix_share"],
            verdict=Verdict(**d["verdict"]),
            settings=dict(d.get("settings", {})),
        )

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=True)


def _source_base(patch: Patch, source_base: str | Path | Checkpoint | None) -> Checkpoint:
    prov = patch.provenance.get("base", {})
    if source_base is None:
        path = prov.get("path")
        if not path or not Path(path).exists():
            raise PatchlabError(
                f"{patch.path}: the patch's base ({path!r}) is not available here; pass source_base= "
                "(--source-base) with the checkpoint the patch was extracted from"
            )
        source_base = path
    ck = Checkpoint.open(source_base)
    want = prov.get("architecture")
    if want and ck.architecture_digest != want:
        raise IncompatiblePatchError(
            f"{ck.path} is not the base this patch was made on (architecture digest {ck.architecture_digest[:12]} "
            f"vs {want[:12]} in the manifest); pass the patch's own base as source_base"
        )
    return ck


def _chunk_drift(x: tuple[torch.Tensor, ...]) -> DriftAccumulator | None:
    """One chunk's drift sums (base_s, base_t, Δ); None when an input holds NaN/Inf."""
    part = DriftAccumulator()
    n, dev = x[0].numel(), x[0].device
    part.update(*x, work=tuple(scratch(f"diagnose.w{i}", (n,), torch.float32, dev) for i in range(3)))  # type: ignore[arg-type]
    if all(math.isfinite(v) for v in (part.ss_drift, part.ss_base, part.ss_delta, part.dot)):
        return part
    # NaN/Inf in an input propagate into the sums (no separate pass over the rows); else fp32 overflowed
    if any(t.dtype.is_floating_point and not all_finite(t) for t in x):
        return None
    part = DriftAccumulator()
    part.update(*(t.double() for t in x))
    return part


class _Compared:
    """One patch tensor whose drift is measured: its rows, the target's name, the per-chunk sums so far.

    With sums recorded at extraction (``entry.drift_sums``: ``⟨base_s, Δ⟩``, ``‖Δ‖²``, ``‖base_s‖²``) the
    tensor is measured from two parts instead of one: the base pair's sums (``‖base_t − base_s‖²``,
    ``‖base_s‖²``: the same for every patch of that base, see :func:`base_drift`) and ``⟨base_t, Δ⟩``, which a
    port computes from its own reads; then ``⟨base_t − base_s, Δ⟩ = ⟨base_t, Δ⟩ − ⟨base_s, Δ⟩``."""

    def __init__(self, index: int, entry: PatchTensor, tname: str, rows: int, target16: bool = False) -> None:
        self.index, self.entry, self.tname, self.rows = index, entry, tname, rows
        self.shape = (rows, *tuple(entry.shape)[1:]) if entry.shape else ()
        self.numel = math.prod(self.shape) if self.shape else 1
        self.parts: dict[int, DriftAccumulator] = {}  # whole sums per chunk (no recorded sums)
        self.sums = entry.drift_sums if self.numel == entry.numel else None
        self.delta16 = entry.encoding == "dense" and entry.stored_dtype("delta").itemsize == 2
        # Δ and the target both hold 16-bit values (whatever dtype a port hands their rows in): exact fp32 products
        self.narrow = self.delta16 and target16
        self.pair: dict[int, DriftAccumulator] = {}  # base pair sums per chunk (recorded sums)
        self.pair_total: DriftAccumulator | None = None  # ... or the whole tensor's, from a BaseDrift
        self.target_sumsq: float | None = None  # ‖base_t‖², from a BaseDrift
        self.tdots: dict[int, tuple[int, float]] = {}  # (elements, ⟨base_t, Δ⟩) per chunk (recorded sums)
        self.broken = False  # a chunk seen with NaN/Inf: measured again on its own, to name the culprit

    @property
    def complete(self) -> bool:
        if self.broken:
            return False
        if self.sums is None:
            return sum(p.numel for p in self.parts.values()) == self.numel
        have_pair = self.pair_total is not None or sum(p.numel for p in self.pair.values()) == self.numel
        return have_pair and sum(n for n, _ in self.tdots.values()) == self.numel

    def clear(self) -> None:
        self.parts.clear()
        self.pair.clear()
        self.tdots.clear()
        self.broken = False

    def pair_sums(self) -> DriftAccumulator:
        if self.pair_total is not None:
            return self.pair_total
        return _in_row_order(self.pair)

    def same_base(self) -> bool:
        """Do the recorded sums belong to this source base? (``‖base_s‖²`` agrees to 1e-6: a different base
        with the same architecture would not.)"""
        assert self.sums is not None
        want, got = float(self.sums["base_sumsq"]), self.pair_sums().ss_base
        return abs(want - got) <= 1e-6 * max(abs(want), abs(got))

    def total(self) -> DriftAccumulator:
        """The chunks' sums in row order: the same float64 sums whichever worker finished first."""
        if self.sums is None:
            return _in_row_order(self.parts)
        pair = self.pair_sums()
        tdot = 0.0
        for r0 in sorted(self.tdots):
            tdot += self.tdots[r0][1]
        dsq, bdot = float(self.sums["delta_sumsq"]), float(self.sums["base_dot"])
        return DriftAccumulator(pair.numel, pair.ss_drift, pair.ss_base, dsq, tdot - bdot)


def _in_row_order(parts: dict[int, DriftAccumulator]) -> DriftAccumulator:
    acc = DriftAccumulator()
    for r0 in sorted(parts):
        acc = acc + parts[r0]
    return acc


def _chunk_tdot(target_rows: torch.Tensor, delta_rows: torch.Tensor, narrow: bool) -> float | None:
    """``⟨base_t, Δ⟩`` of one chunk (``narrow``: both hold 16-bit values, see ``chunk_dot``); None when an input
    holds NaN/Inf."""
    n = delta_rows.numel()
    v = chunk_dot(target_rows, delta_rows, scratch("diagnose.w0", (n,), torch.float32, delta_rows.device), narrow)
    return v if math.isfinite(v) else None


@dataclass
class BaseDrift:
    """``‖base_t − base_s‖²`` and ``‖base_s‖²`` per tensor of two bases: the part of a diagnosis every patch
    made on ``source`` shares when it goes to ``target`` (an upgrade measures it once per run)."""

    source: str
    target: str
    tensors: dict[str, DriftAccumulator]
    target_sumsq: dict[str, float] = field(default_factory=dict)  # ‖base_t‖²: for sums recorded on base_t

    def sums_dict(self) -> dict[str, Any]:
        """The sums alone, as JSON (what a registry records for the pair; the paths are its own)."""
        return {"tensors": {k: asdict(v) for k, v in self.tensors.items()}, "target_sumsq": dict(self.target_sumsq)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BaseDrift:
        tensors = {k: DriftAccumulator(**v) for k, v in d["tensors"].items()}
        return cls(d["source"], d["target"], tensors, {k: float(v) for k, v in d.get("target_sumsq", {}).items()})

    def dumps(self) -> str:
        return json.dumps({"source": self.source, "target": self.target, **self.sums_dict()})

    @classmethod
    def loads(cls, text: str) -> BaseDrift:
        return cls.from_dict(json.loads(text))

    def overall(self) -> DriftStats:
        """The drift of every measured tensor together (``drift_rel_base``: ``‖base_t − base_s‖ / ‖base_s‖``)."""
        acc = DriftAccumulator()
        for name in sorted(self.tensors):
            acc = acc + self.tensors[name]
        return acc.stats()

    def missing(self, names: Iterable[str], source: Checkpoint, target: Checkpoint) -> list[str]:
        """Those of ``names`` a diagnosis would need from this pair that it lacks (a tensor the target lacks or
        holds in another shape is never measured, so never missing)."""
        names = list(names)
        t_names, _ = align_names(names, target)
        out = []
        for name in names:
            tname = t_names.get(name, name)
            if name in self.tensors or name not in source or tname not in target:
                continue
            if tuple(source.info(name).shape) == tuple(target.info(tname).shape):
                out.append(name)
        return out


def _read_pair(
    src: Checkpoint, name: str, tgt: Checkpoint, tname: str, r0: int, r1: int, dev: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``r0..r1`` of one tensor of both bases, read into per-worker buffers with positional reads (the
    engine's read-ahead covers them; faulting a cold mapped view in reads a few pages at a time)."""
    info = src.info(name)
    shape = (min(r1, info.shape[0]) - r0, *info.shape[1:]) if info.shape else ()
    bs = src.rows(name, r0, r1, scratch("diagnose.read_s", shape, info.dtype))
    bt = tgt.rows(tname, r0, r1, scratch("diagnose.read_t", shape, tgt.info(tname).dtype))
    return bs.to(dev), bt.to(dev)


def _advise_pair(src: Checkpoint, name: str, tgt: Checkpoint, tname: str) -> Callable[[int, int], None]:
    """Read-ahead for both bases' rows of one tensor (see :meth:`Checkpoint.advise`)."""
    rows = src.info(name).shape[0] if src.info(name).shape else 1

    def advise(r0: int, r1: int) -> None:
        src.advise(name, r0, min(r1, rows))
        tgt.advise(tname, r0, min(r1, rows))

    return advise


def base_drift(
    source: str | Path | Checkpoint,
    target: str | Path | Checkpoint,
    names: list[str],
    device: str = "auto",
    *,
    release_source: bool = False,
) -> BaseDrift:
    """The base pair's sums of the tensors ``names`` (names in ``source``; a tensor the target lacks, or has
    in another shape, is left out), in one streaming pass over both bases. ``release_source``: drop the source's
    rows from the page cache once summed (an upgrade reads the old base once; its ports read the new one)."""
    src, tgt = Checkpoint.open(source), Checkpoint.open(target)
    dev = resolve_device(device)
    t_names, _ = align_names(names, tgt)
    parts: dict[str, dict[int, DriftAccumulator]] = {}
    tsq: dict[str, dict[int, float]] = {}
    jobs = []
    for name in names:
        tname = t_names.get(name, name)
        if name not in src or tname not in tgt or tuple(src.info(name).shape) != tuple(tgt.info(tname).shape):
            continue
        shape = tuple(src.info(name).shape)
        got, got_t = parts.setdefault(name, {}), tsq.setdefault(name, {})

        def load(r0: int, r1: int, name: str = name, tname: str = tname) -> tuple:
            return _read_pair(src, name, tgt, tname, r0, r1, dev)

        def compute(
            x: tuple[torch.Tensor, ...],
            r0: int,
            r1: int,
            name: str = name,
            got: dict = got,
            got_t: dict = got_t,
            rows: bool = bool(shape),
        ) -> torch.Tensor:
            part = _chunk_drift(x)
            if part is None:
                for t, what in zip(x, (f"the base {src.path}", f"the target {tgt.path}"), strict=True):
                    if not all_finite(t):
                        raise NonFiniteError(
                            f"{what} holds NaN/Inf in {name} (rows {r0}..{r1}); diagnostics of non-finite weights "
                            "mean nothing: fix the checkpoint"
                        )
            got[r0] = part  # type: ignore[assignment]
            if release_source and rows:
                src.release(name, r0, r1)
            n, t16 = x[1].numel(), x[1].element_size() == 2  # ‖base_t‖² as extract records ‖base‖²
            got_t[r0] = chunk_dot(x[1], x[1], scratch("diagnose.w0", (n,), torch.float32, x[1].device), t16)
            return x[0]

        jobs.append(
            Job(name, shape, torch.float32, load, compute, advise=_advise_pair(src, name, tgt, tname), parallel=True)
        )
    if jobs:
        run([Shard("", jobs)], None, dev)
    tensors = {k: _in_row_order(v) for k, v in parts.items() if v}
    return BaseDrift(
        str(src.path), str(tgt.path), tensors, {k: sum(v[r] for r in sorted(v)) for k, v in tsq.items() if v}
    )


class Diagnosis:
    """A port diagnosis planned from headers, then measured in one streaming pass of its own (:meth:`run`) or
    on the reads of a port that goes through the same tensors (:meth:`observe`, given to ``port(observe=)``);
    :meth:`result` measures whatever no port fed and gives the :class:`PortDiagnostics`."""

    def __init__(
        self,
        patch: str | Path | Patch,
        target: str | Path | Checkpoint,
        *,
        source_base: str | Path | Checkpoint | None = None,
        intruders: bool = True,
        intruder_k: int = 10,
        epsilon: float = 0.5,
        include_embeddings: bool = False,
        thresholds: Thresholds | None = None,
        device: str = "auto",
        base_pair: BaseDrift | None = None,
        pair_later: bool = False,
    ) -> None:
        self.patch = p = Patch.open(patch)
        self.src = _source_base(p, source_base)
        self.tgt = tgt = Checkpoint.open(target)
        self.dev = resolve_device(device)
        self.intruders, self.intruder_k, self.epsilon = intruders, intruder_k, epsilon
        self.include_embeddings, self.thresholds = include_embeddings, thresholds
        self.tensors: list[TensorDiagnostics] = []
        self.patch_params = self.structural_params = 0
        self.structural_names: list[str] = []
        self.care_notes: list[str] = []
        self.compared: dict[str, _Compared] = {}
        # the target may carry a known prefix the patch lacks (or the reverse), as apply/port accept
        self.t_names, prefix_note = align_names(p.names, tgt)
        if prefix_note:
            self.care_notes.append(f"target tensor names differ from the patch's by a prefix ({prefix_note})")
        for entry in p.entries():
            self._plan(entry)
        if self.patch_params == 0:
            raise PatchlabError(f"{p.path}: the patch has no 'add' tensors; there is nothing to diagnose")
        self.pair_later = pair_later  # a BaseDrift comes before result(): observe reads no source rows
        if (
            base_pair is not None
            and _same_path(base_pair.source, self.src.path)
            and _same_path(base_pair.target, tgt.path)
        ):
            for name, c in self.compared.items():
                if c.sums is not None:
                    c.pair_total = base_pair.tensors.get(name)
                    c.target_sumsq = base_pair.target_sumsq.get(name)

    @property
    def uses_recorded_sums(self) -> bool:
        """Some tensors carry sums recorded at extraction: a :class:`BaseDrift` of the two bases spares reading
        the source base during a port (:meth:`observe`)."""
        return any(c.sums is not None for c in self.compared.values())

    def _plan(self, entry: PatchTensor) -> None:
        src, tgt = self.src, self.tgt
        name, op = entry.name, entry.op
        tname = self.t_names[name]
        layer = layer_of(name)
        s_shape = list(src.info(name).shape) if name in src else None
        t_shape = list(tgt.info(tname).shape) if tname in tgt else None
        if op in ("set", "delete"):
            self.tensors.append(
                TensorDiagnostics(name, op, layer, s_shape, t_shape, note="replaced" if op == "set" else "removed")
            )
            return
        self.patch_params += entry.numel
        if t_shape is None or s_shape is None:
            status = "missing-in-target" if t_shape is None else "missing-in-source"
            self.structural_params += entry.numel
            self.structural_names.append(name)
            self.tensors.append(TensorDiagnostics(name, status, layer, s_shape, t_shape))
            return
        shape = tuple(entry.shape)
        rows = shape[0] if shape else 1
        note = ""
        status = "compared"
        if s_shape != list(shape):
            raise IncompatiblePatchError(
                f"{name}: the patch's Δ has shape {list(shape)} but the source base has {s_shape}; "
                "source_base is not the patch's base"
            )
        if t_shape != s_shape:
            if len(t_shape) == len(s_shape) and t_shape[1:] == s_shape[1:] and is_vocab_tensor(name):
                rows = min(rows, t_shape[0])
                status = "rows-compared"
                note = f"vocabulary rows {s_shape[0]} -> {t_shape[0]}: compared the first {rows}"
                self.care_notes.append(f"{name}: {note}; the port needs a vocabulary policy")
            else:
                self.structural_params += entry.numel
                self.structural_names.append(name)
                self.tensors.append(TensorDiagnostics(name, "shape-differs", layer, s_shape, t_shape))
                return
        self.tensors.append(TensorDiagnostics(name, status, layer, s_shape, t_shape, note=note))
        target16 = tgt.info(tname).dtype.itemsize == 2
        self.compared[name] = _Compared(len(self.tensors) - 1, entry, tname, rows, target16)

    def observe(self, name: str, r0: int, r1: int, target_rows: torch.Tensor, delta_rows: torch.Tensor) -> None:
        """Rows ``[r0, r1)`` of the patch tensor ``name``'s Δ and of the target, as a port reads them (before
        α; the target's possibly widened to fp32, the same values): their sums, with the source base's rows
        read here unless a :class:`BaseDrift` gave the base pair's.
        Chunks that do not line up are ignored (:meth:`result` measures those tensors on its own)."""
        c = self.compared.get(name)
        if c is None or c.broken or r1 > c.rows or tuple(target_rows.shape) != tuple(delta_rows.shape):
            return
        shape = (r1 - r0, *c.shape[1:]) if c.shape else ()
        if tuple(target_rows.shape) != shape:
            return
        if c.sums is not None:
            tdot = _chunk_tdot(target_rows, delta_rows, c.narrow)
            if tdot is None:
                c.broken = True
                return
            c.tdots[r0] = (delta_rows.numel(), tdot)
            if c.pair_total is not None or self.pair_later:
                return
        src_info = self.src.info(name)
        bs = self.src.rows(name, r0, r1, scratch("diagnose.src", shape, src_info.dtype)).to(delta_rows.device)
        part = _chunk_drift((bs, target_rows) if c.sums is not None else (bs, target_rows, delta_rows))
        if part is None:
            c.broken = True
        elif c.sums is not None:
            c.pair[r0] = part
        else:
            c.parts[r0] = part

    def run(self) -> None:
        """Measure, in one streaming pass, every compared tensor no port fed whole."""
        todo = [c for c in self.compared.values() if not c.complete]
        for c in todo:
            c.clear()
        if todo:
            run([Shard("", [self._job(c) for c in todo])], None, self.dev)

    def _job(self, c: _Compared) -> Job:
        src, tgt, name = self.src, self.tgt, c.entry.name
        # recorded sums and the base pair's (a BaseDrift): only ⟨base_t, Δ⟩ is left, the source base is not read
        target_only = c.sums is not None and c.pair_total is not None

        def load(r0: int, r1: int) -> tuple[torch.Tensor, ...]:
            if target_only:
                info = tgt.info(c.tname)
                shape = (min(r1, c.rows) - r0, *c.shape[1:]) if c.shape else ()
                bt = tgt.rows(c.tname, r0, r1, scratch("diagnose.read_t", shape, info.dtype)).to(self.dev)
                return bt, bt, c.entry.rows(r0, r1, self.dev).reshape(bt.shape)
            bs, bt = _read_pair(src, name, tgt, c.tname, r0, r1, self.dev)
            return bs, bt, c.entry.rows(r0, r1, self.dev).reshape(bs.shape)

        def culprit(x: tuple[torch.Tensor, ...], r0: int, r1: int) -> None:
            whats = (f"the patch's base {src.path}", f"the target {tgt.path}", "the patch")
            for i, (t, what) in enumerate(zip(x, whats, strict=True)):
                if (i or not target_only) and t.dtype.is_floating_point and not all_finite(t):
                    raise NonFiniteError(
                        f"{what} holds NaN/Inf in {name} (rows {r0}..{r1}); diagnostics of non-finite weights "
                        "mean nothing: fix the checkpoint or the patch"
                    )

        def compute(x: tuple[torch.Tensor, ...], r0: int, r1: int) -> torch.Tensor:
            if c.sums is None:
                part = _chunk_drift(x)
                if part is None:
                    culprit(x, r0, r1)
                c.parts[r0] = part  # type: ignore[assignment]
                return x[2]
            tdot = _chunk_tdot(x[1], x[2], c.narrow)
            if tdot is None:
                culprit(x, r0, r1)
            c.tdots[r0] = (x[2].numel(), tdot)  # type: ignore[assignment]
            if c.pair_total is None:
                part = _chunk_drift(x[:2])
                if part is None:
                    culprit(x, r0, r1)
                c.pair[r0] = part  # type: ignore[assignment]
            return x[2]

        if target_only:
            rows = c.rows

            def advise(r0: int, r1: int) -> None:
                tgt.advise(c.tname, r0, min(r1, rows))

        else:
            advise = _advise_pair(src, name, tgt, c.tname)
        return Job(name, c.shape, torch.float32, load, compute, advise=advise, parallel=True)

    def observed(self) -> dict[str, Any]:
        """What :meth:`observe` gathered, as JSON: a port can hand it to the process that finishes the diagnosis
        (:meth:`load_observed`, then :meth:`result`), for instance once a :class:`BaseDrift` measured beside the
        port is ready."""
        out: dict[str, Any] = {}
        for name, c in self.compared.items():
            out[name] = {
                "parts": {str(r0): asdict(a) for r0, a in c.parts.items()},
                "pair": {str(r0): asdict(a) for r0, a in c.pair.items()},
                "tdots": {str(r0): list(v) for r0, v in c.tdots.items()},
                "broken": c.broken,
            }
        return {"patch": str(self.patch.path), "target": str(self.tgt.path), "tensors": out}

    def load_observed(self, data: dict[str, Any]) -> None:
        """Take over the sums another process's :meth:`observe` gathered (:meth:`observed`) for this patch and
        target; what they lack :meth:`result` measures."""
        if not (_same_path(data["patch"], self.patch.path) and _same_path(data["target"], self.tgt.path)):
            raise PatchlabError(f"observed sums of {data['patch']} on {data['target']} are not this diagnosis'")
        for name, got in data["tensors"].items():
            c = self.compared.get(name)
            if c is None:
                continue
            c.parts = {int(r0): DriftAccumulator(**a) for r0, a in got["parts"].items()}
            c.pair = {int(r0): DriftAccumulator(**a) for r0, a in got["pair"].items()}
            c.tdots = {int(r0): (int(v[0]), float(v[1])) for r0, v in got["tdots"].items()}
            c.broken = bool(got["broken"])

    def target_sums(self) -> dict[str, dict[str, float]]:
        """Drift sums of the same Δ recorded against the target (``methods.extract.drift_sums``), for a patch that
        carries this Δ onto it (``Registry.add_ported_patch``), so the next release's diagnosis needs no read of
        this base either: every tensor a port fed whole whose ``‖base_t‖²`` a :class:`BaseDrift` gave."""
        out = {}
        for name, c in self.compared.items():
            if c.sums is None or c.target_sumsq is None or c.broken or c.numel != c.entry.numel:
                continue
            if sum(n for n, _ in c.tdots.values()) != c.numel:
                continue
            tdot = 0.0
            for r0 in sorted(c.tdots):
                tdot += c.tdots[r0][1]
            out[name] = {"base_dot": tdot, "delta_sumsq": float(c.sums["delta_sumsq"]), "base_sumsq": c.target_sumsq}
        return out

    def result(self) -> PortDiagnostics:
        """The diagnostics (measuring first what no port fed), intruders included when asked for."""
        self.run()
        # sums recorded against another base (same architecture, other weights) do not apply: measure whole
        other = [c for c in self.compared.values() if c.sums is not None and not c.same_base()]
        for c in other:
            c.sums, c.pair_total = None, None
            c.clear()
        if other:
            self.run()
        src, dev = self.src, self.dev
        layer_acc: dict[str, DriftAccumulator] = {}
        overall = DriftAccumulator()
        n_matrices = n_with_intruders = 0
        for c in sorted(self.compared.values(), key=lambda c: c.index):
            entry, diag = c.entry, self.tensors[c.index]
            acc = c.total()
            overall = overall + acc
            key = str(diag.layer) if diag.layer is not None else "other"
            layer_acc[key] = layer_acc.get(key, DriftAccumulator()) + acc
            diag.drift = acc.stats()
            if self.intruders and len(entry.shape) == 2 and (self.include_embeddings or not is_embedding(entry.name)):
                w = src.tensor(entry.name).to(dev, torch.float32)
                stats = intruder_dimensions(w, w + entry.dense(dev), k=self.intruder_k, epsilon=self.epsilon)
                diag.intruders = stats
                n_matrices += 1
                n_with_intruders += stats.n_intruders > 0
        tgt, p = self.tgt, self.patch
        care_notes = list(self.care_notes)
        seen = set(self.t_names.values()) | set(p.names)
        only_target = sorted(n for n in tgt.names if n not in seen and n not in src)
        if only_target:
            care_notes.append(
                f"{len(only_target)} tensor(s) exist only in the target (e.g. {only_target[0]}); they keep the "
                "target's values"
            )
        per_layer_stats = {k: a.stats() for k, a in sorted(layer_acc.items(), key=lambda kv: _layer_key(kv[0]))}
        share = self.structural_params / self.patch_params
        intr_share = n_with_intruders / n_matrices if n_matrices else None
        overall_stats = overall.stats()
        verdict = port_verdict(
            overall_stats,
            per_layer={int(k): v for k, v in per_layer_stats.items() if k != "other"},
            structural_share=share,
            structural_examples=self.structural_names,
            intruder_matrix_share=intr_share,
            thresholds=self.thresholds,
            extra_care=care_notes,
        )
        return PortDiagnostics(
            patch=str(p.path),
            source=str(src.path),
            target=str(tgt.path),
            tensors=self.tensors,
            per_layer=per_layer_stats,
            overall=overall_stats,
            only_in_target=only_target,
            structural_share=share,
            intruder_matrices=n_matrices,
            intruder_matrix_share=intr_share,
            verdict=verdict,
            settings={
                "intruders": self.intruders,
                "intruder_k": self.intruder_k,
                "epsilon": self.epsilon,
                "include_embeddings": self.include_embeddings,
                "device": str(dev),
            },
        )


class DiagnoseOptions(TypedDict, total=False):
    """Keyword options of :func:`diagnose` (those of :class:`Diagnosis`)."""

    source_base: str | Path | Checkpoint | None  # the patch's own base (default: the path in its manifest)
    intruders: bool  # the intruder-dimension analysis (two SVDs per matrix), default True
    intruder_k: int
    epsilon: float
    include_embeddings: bool
    thresholds: Thresholds | None
    device: str
    base_pair: BaseDrift | None  # the two bases' shared sums (base_drift), spares reading them again


def diagnose(
    patch: str | Path | Patch, target: str | Path | Checkpoint, **options: Unpack[DiagnoseOptions]
) -> PortDiagnostics:
    """Drift of the target base against the patch's base, per tensor/layer/overall, intruder dimensions
    of the patch, and a porting verdict. Reads nothing but headers until the comparisons start."""
    return Diagnosis(patch, target, **options).result()


def _same_path(a: str | Path, b: str | Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def _layer_key(k: str) -> tuple[int, int]:
    return (1, 0) if k == "other" else (0, int(k))
