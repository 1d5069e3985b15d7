"""merge: several patches into one (task arithmetic, TIES, DARE, DELLA, breadcrumbs), planned, then streamed.

Everything is checked before a tensor byte is read: the method and its parameters (``kernels.merge``), the
inputs (they exist, none is given twice, same architecture, same base unless ``port_to``), and the plan
(``plan.plan_merge``: per output tensor, which patches contribute; one-sided tensors, vocabulary rows and
tied embeddings reconciled as a port does). Then, tensor by tensor and chunk by chunk through the engine:
the statistics passes that TIES, breadcrumbs and L1 rescale need (``MergeStats``), and one output pass
(``merge_chunk``). Memory is bounded by chunks and a few histograms, never by the model.

The Δ merged is each patch's exact ``ft − base`` in fp32 wherever the patch holds it. An exact patch stored in
a 16-bit dtype (extract's default for a bf16 fine-tune) holds Δ rounded to that dtype plus residuals; merged
on the base it was made on (every patch without ``port_to``, those recorded on ``port_to`` with it), its
exact Δ is rebuilt per chunk from the base's rows (``PatchDelta.exact_rows``: ``float(ft) − float(base)``, the
fine-tune rebuilt as ``apply`` would), so a merge of bf16 patches gives the bytes of a merge of fp32 patches
and of mergekit's ``base + Σ w·(ft − base)`` computed in fp32. That costs one read of the base's rows per
pass over such a tensor; ``onto`` reads them anyway for its output pass. Elsewhere (a patch ported by
``port_to``, row maps, low-rank and sparse entries, inexact patches) the stored Δ is merged as it is.

Output: a merged patch (dense fp32 entries; exact low-rank factor concatenation for ``task_arithmetic``
over low-rank inputs; optional re-encoding with ``rank``/``energy``), or with ``onto`` a full model
directory ``base + merged Δ`` in the same pass. Conventions: ``docs/merge.md``.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from patchlab.digests import same_algorithm
from patchlab.engine.devices import resolve_device
from patchlab.engine.executor import (
    Job,
    Shard,
    assemble,
    atomic_output,
    check_output,
    run,
    scratch,
    trim_heap,
    trim_heap_every,
)
from patchlab.engine.sources import Fixups, PatchDelta
from patchlab.errors import IncompatiblePatchError, MergeConfigError, NonFiniteDeltaError, PatchFormatError
from patchlab.io.checkpoint import SAFE_INDEX, TOKENIZER_FILES, Checkpoint, copy_files, parse_dtype
from patchlab.io.patch import FINETUNE_DIR, MANIFEST, MAX_SHARD_BYTES, Patch, PatchWriter
from patchlab.kernels.delta import DeltaStats, all_finite, as_float, scaled_add_into
from patchlab.kernels.lowrank import lowrank_rows
from patchlab.kernels.merge import DELLA, MergeParams, MergeStats, merge_chunk, validate_merge
from patchlab.names import is_vocab_tensor
from patchlab.plan import Plan, Step, plan_merge

Progress = Callable[[int], None]
STATS_GROUP = 8  # tensors whose statistics are gathered together (each holds a few 512 KiB histograms)

__all__ = ["merge", "patch_digest"]


def patch_digest(patch: Patch) -> str:
    """sha256 of a patch's manifest: it lists every tensor with its statistics, so two copies of one patch
    share it (and a changed patch does not)."""
    return hashlib.sha256((patch.path / MANIFEST).read_bytes()).hexdigest()


@dataclass
class _Input:
    patch: Patch
    source: PatchDelta
    digest: str

    @property
    def label(self) -> str:
        return str(self.patch.path)

    @property
    def base(self) -> dict:
        return self.patch.provenance.get("base") or {}


def merge(
    patches: Sequence[str | Path | Patch],
    out: str | Path,
    *,
    method: str = "task_arithmetic",
    weights: Sequence[float] | float | None = None,
    densities: Sequence[float] | float | None = None,
    gammas: Sequence[float] | float | None = None,
    epsilons: Sequence[float] | float | None = None,
    lambda_: float = 1.0,
    normalize: bool | None = None,
    rescale: str | bool | None = None,
    sign_election: str | bool | None = None,
    seed: int = 0,
    onto: str | Path | Checkpoint | None = None,
    port_to: str | Path | Checkpoint | None = None,
    base: str | Path | Checkpoint | None = None,
    rank: int | None = None,
    energy: float | None = None,
    vocab_policy: str | None = None,
    force: bool = False,
    device: str = "auto",
    overwrite: bool = False,
    dry_run: bool = False,
    progress: Progress | None = None,
) -> Patch | Checkpoint | Plan:
    """Merge ``patches`` (directories or ``Patch``es, any encodings) into one patch at ``out``.

    ``method`` and the per-patch ``weights``/``densities``/``gammas``/``epsilons`` (one number, or one per
    patch) and the global ``lambda_``/``normalize``/``rescale``/``sign_election`` follow mergekit's defaults
    (``docs/merge.md``); random methods are reproducible from ``seed``. ``onto``: write the full model
    ``onto + merged Δ`` instead of a patch. ``port_to``: the patches may come from different bases; the merge
    is expressed on ``port_to`` (a patch recorded on it, or with ``onto`` the model). ``base``: the base the
    patches were made on, when it is not at the path their manifests record. ``rank``/``energy``: re-encode
    the merged Δ low-rank (the manifest's totals report the energy kept). ``dry_run`` returns the ``Plan``.

    A 16-bit exact patch (extract's default for a bf16 model) merged on its own base contributes its exact
    fp32 Δ, rebuilt from the base's rows (an extra read of them, except with ``onto``): the result is that of
    the same merge of fp32 patches, bit for bit (the module docstring says when).
    """
    params = validate_merge(
        method, len(patches), weights, densities, gammas, epsilons, lambda_, normalize, rescale, sign_election
    )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise MergeConfigError(f"seed must be an integer, got {seed!r}")
    enc = _encoding(rank, energy, onto)
    inputs = [_open(p) for p in patches]
    _check_distinct(inputs)
    _check_architectures(inputs)
    target, onto_ck = _target(inputs, base, onto, port_to)
    own = _on_target(inputs, target, port_to)
    options = _options(params, seed, port_to, target, enc)
    plan = plan_merge(
        [i.source.view() for i in inputs],
        target,
        operation="merge" if port_to is None else "merge-port",
        model=onto_ck is not None,
        vocab_policy=vocab_policy,
        force=force,
        options=options,
    )
    plan = _mark_concat(plan, inputs, params, enc)
    if enc is not None:
        from patchlab.methods.compress import _check_rank_fits

        _check_rank_fits(enc, [(s.name, s.shape) for s in plan.steps if s.action == "merge"])
    if dry_run:
        return plan
    out = Path(out)
    check_output(out, overwrite)
    dev = resolve_device(device)
    tensors = {
        s.name: _MergeTensor(s, inputs, plan, params, seed, dev, target, own)
        for s in plan.steps
        if s.action in ("merge", "concat")
    }
    _gather_stats(list(tensors.values()), dev)
    if onto_ck is not None:
        return _write_model(out, plan, inputs, tensors, target, dev, overwrite, progress)
    provenance = _provenance(plan, inputs, target, options)
    if enc is not None:
        return _write_encoded(out, plan, inputs, tensors, target, provenance, enc, dev, overwrite)
    return _write_patch(out, plan, inputs, tensors, target, provenance, dev, overwrite, progress)


# ---- checks, all before a tensor byte is read ----------------------------------------------------------


def _encoding(rank: int | None, energy: float | None, onto: object) -> Any:
    if rank is None and energy is None:
        return None
    if onto is not None:
        raise MergeConfigError("rank/energy re-encode a merged patch; a merge written onto a base has no patch")
    from patchlab.methods.compress import EncodingRequest

    return EncodingRequest(rank=rank, energy=energy)


def _open(p: str | Path | Patch) -> _Input:
    patch = Patch.open(p)
    return _Input(patch, PatchDelta(patch), patch_digest(patch))


def _check_distinct(inputs: list[_Input]) -> None:
    seen: dict[str, int] = {}
    for k, inp in enumerate(inputs):
        for key in (str(inp.patch.path.resolve()), inp.digest):
            if key in seen:
                j = seen[key]
                raise MergeConfigError(
                    f"patch {k + 1} ({inp.label}) is patch {j + 1} again: merging a patch with itself only "
                    "rescales it; give it once, with a larger weight"
                )
        seen[str(inp.patch.path.resolve())] = seen[inp.digest] = k


def _check_architectures(inputs: list[_Input]) -> None:
    """Patches for different architectures share no tensor, or share one with another shape (vocabulary
    rows aside: those are reconciled by the plan)."""
    first = inputs[0]
    shapes = {n: tuple(m["shape"]) for n, m in first.patch.manifest["tensors"].items() if m["op"] == "add"}
    for k, inp in enumerate(inputs[1:], start=2):
        mine = {n: tuple(m["shape"]) for n, m in inp.patch.manifest["tensors"].items() if m["op"] == "add"}
        common = [n for n in mine if n in shapes]
        bad = [n for n in common if mine[n] != shapes[n] and not is_vocab_tensor(n)]
        if bad or not common:
            why = (
                f"{bad[0]} is {list(shapes[bad[0]])} in patch 1 but {list(mine[bad[0]])} in patch {k}"
                if bad
                else "they have no tensor in common"
            )
            raise IncompatiblePatchError(
                f"patch 1 ({first.label}) and patch {k} ({inp.label}) are for different architectures: {why}"
            )


def _same_base(a: dict, b: dict) -> bool:
    if a.get("content") and b.get("content") and same_algorithm(a["content"], b["content"]):
        return a["content"] == b["content"]
    return a.get("architecture") == b.get("architecture") and a.get("path") == b.get("path")


def _target(
    inputs: list[_Input],
    base: str | Path | Checkpoint | None,
    onto: str | Path | Checkpoint | None,
    port_to: str | Path | Checkpoint | None,
) -> tuple[Checkpoint, Checkpoint | None]:
    """The checkpoint the merge is expressed on (the common base, or ``port_to``) and the one written onto."""
    if port_to is not None:
        target = Checkpoint.open(port_to)
        if onto is not None:
            onto_ck = Checkpoint.open(onto)
            if onto_ck.path.resolve() != target.path.resolve():
                raise MergeConfigError(
                    f"onto ({onto_ck.path}) and port_to ({target.path}) name different bases; a ported merge "
                    "is written onto the base it is ported to"
                )
        return target, (target if onto is not None else None)
    b0 = inputs[0].base
    for k, inp in enumerate(inputs[1:], start=2):
        if not _same_base(b0, inp.base):
            p0, pk = b0.get("path", "?"), inp.base.get("path", "?")
            raise IncompatiblePatchError(
                f"patch 1 was made on {p0} but patch {k} ({inp.label}) on {pk}; merge them onto one base with "
                f"--port-to {p0}, or port first: `patchlab port {inp.label} {p0} ported-model && "
                f"patchlab diff {p0} ported-model ported.patch`"
            )
    if onto is not None:
        onto_ck = Checkpoint.open(onto)
        if b0.get("architecture") and onto_ck.architecture_digest != b0["architecture"]:
            raise IncompatiblePatchError(
                f"the patches were made on {b0.get('path', '?')}, not on {onto_ck.path} (another architecture); "
                f"pass --port-to {onto_ck.path} to port the merge onto it"
            )
        same_path = b0.get("path") == str(onto_ck.path.resolve())
        if not same_path and not (b0.get("content") and onto_ck.content_digest_like(b0["content"]) == b0["content"]):
            raise IncompatiblePatchError(
                f"the patches were made on {b0.get('path', '?')}, not on {onto_ck.path}; pass --port-to "
                f"{onto_ck.path} to port the merge onto it"
            )
        return onto_ck, onto_ck
    if base is not None:
        return Checkpoint.open(base), None
    path = b0.get("path")
    if not path or not Path(path).is_dir():
        raise PatchFormatError(
            f"the patches' base {path or '(not recorded)'} is not on disk; pass the base they were made on "
            "(base=, --base)"
        )
    return Checkpoint.open(path), None


def _on_target(inputs: list[_Input], target: Checkpoint, port_to: object) -> list[bool]:
    """Which patches were made on ``target``, the checkpoint the merge is expressed on: every one without
    ``port_to`` (``_target`` checked that they share a base and that ``onto`` is it; ``base=`` is the user's
    word), and with it those whose recorded base is ``port_to``. Their 16-bit exact entries merge exact Δ."""
    if port_to is None:
        return [True] * len(inputs)
    here = target.describe()
    return [_same_base(inp.base, here) for inp in inputs]


def _options(params: MergeParams, seed: int, port_to: object, target: Checkpoint, enc: Any) -> dict:
    m = params.method
    opts: dict[str, object] = {"method": m.name, "weights": list(params.weights)}
    if "density" in m.patch_params:
        opts["densities"] = list(params.densities)
    if "gamma" in m.patch_params:
        opts["gammas"] = list(params.gammas)
    if "epsilon" in m.patch_params:
        opts["epsilons"] = list(params.epsilons)
    opts.update(
        {
            "lambda": params.lambda_,
            "normalize": params.normalize,
            "rescale": params.rescale or "none",
            "sign_election": params.sign_election or "none",
            "seed": seed,
            "port_to": str(target.path.resolve()) if port_to is not None else None,
        }
    )
    if enc is not None:
        opts["reencode"] = {k: v for k, v in (("rank", enc.rank), ("energy", enc.energy)) if v is not None}
    return opts


def _concat_ok(step: Step, inputs: list[_Input], params: MergeParams, plan: Plan) -> bool:
    """task_arithmetic over low-rank entries only (no row maps): concatenated factors are exact."""
    if params.method.sparsifier is not None or params.sign_election is not None or len(step.shape) != 2:
        return False
    for role, dname in step.sources.items():
        e = inputs[int(role[1:])].patch.entry(dname)
        if e.encoding != "lowrank" or (step.name, role) in plan.row_maps or e.shape != step.shape:
            return False
    return True


def _mark_concat(plan: Plan, inputs: list[_Input], params: MergeParams, enc: Any) -> Plan:
    if enc is not None:
        return plan
    steps = tuple(
        replace(s, action="concat", note=(s.note + "; " if s.note else "") + "low-rank factors concatenated")
        if s.action == "merge" and _concat_ok(s, inputs, params, plan)
        else s
        for s in plan.steps
    )
    return replace(plan, steps=steps)


def _warm(slot: str, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The merge kernels' ``Alloc`` on the engine's per-thread scratch buffers: warm ones, reused chunk after
    chunk (a chunk's merged rows, in one of them, are written or added before the worker takes the next)."""
    return scratch(f"kernel.{slot}", tuple(like.shape), dtype, like.device)


# ---- one merged tensor ----------------------------------------------------------------------------------


class _MergeTensor:
    """The inputs of one ``merge`` (or ``concat``) step: every patch's Δ rows (zeros where a patch lacks the
    tensor), the merge statistics, and the chunk computation."""

    def __init__(
        self,
        step: Step,
        inputs: list[_Input],
        plan: Plan,
        params: MergeParams,
        seed: int,
        dev: torch.device,
        target: Checkpoint,
        own: list[bool],
    ):
        self.step, self.inputs, self.params, self.seed, self.dev = step, inputs, params, seed, dev
        self.name, self.shape, self.target = step.name, step.shape, target
        self.row_elems = math.prod(step.shape[1:]) if step.shape else 1
        self.roles = [(int(r[1:]), d, plan.row_maps.get((step.name, r))) for r, d in step.sources.items()]
        # patches whose exact Δ is rebuilt from the base's rows: 16-bit exact entries on their own base, row
        # for row (patch i -> its residuals and their per-tensor state)
        self.exact: dict[int, tuple[Fixups | None, dict[str, object]]] = {}
        lined_up = (
            step.action == "merge"
            and step.name in target
            and tuple(target.info(step.name).shape) == tuple(step.shape)
            and (step.name, "target") not in plan.row_maps
        )
        for i, dname, index in self.roles if lined_up else ():
            src = inputs[i].source
            if own[i] and index is None and dname == step.name and src.patch.entry(dname).shape == step.shape:
                if src.rounded(dname):
                    self.exact[i] = (src.fixups(dname), {})
        self._base_t = target.tensor(step.name) if self.exact else None
        self.stats: MergeStats | None = None
        self.checked = False  # every chunk of every input seen finite (by a finished statistics pass)
        # DELLA ranks a 0-d/1-d tensor as one row: it is merged whole (it is small), not in chunks
        self.whole = params.method.sparsifier == DELLA and len(step.shape) <= 1
        self._whole: torch.Tensor | None = None
        self._lock = threading.Lock()

    @property
    def needs_stats(self) -> bool:
        return self.step.action == "merge" and not self.whole

    def _rows(self, i: int, dname: str, index: torch.Tensor | None, r0: int, r1: int) -> torch.Tensor:
        inp = self.inputs[i]
        if index is not None:
            return inp.source.rows(dname, r0, r1, self.dev, index)
        e = inp.patch.entry(dname)
        if e.encoding == "dense" and e.shape and self.dev.type == "cpu":
            return e.rows(r0, r1, self.dev, scratch(f"merge.delta{i}", (r1 - r0, *e.shape[1:]), torch.float32))
        return e.rows(r0, r1, self.dev)

    def load(
        self, r0: int, r1: int, check: bool | None = None, base: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        """Every patch's Δ rows ``[r0, r1)`` in fp32, checked finite unless a finished statistics pass has
        already checked every chunk, or ``check`` is False (``merged`` then checks the merged rows).

        ``base``: the target's rows ``[r0, r1)`` on the device, when the caller has read them (``onto``);
        otherwise they are read here, only if a patch's exact Δ needs them."""
        shape = (r1 - r0, *self.shape[1:]) if self.shape else ()
        out: list[torch.Tensor] = [None] * self.params.n_patches  # type: ignore[list-item]
        if check is None:
            check = not self.checked
        b32 = None
        if self.exact:
            if base is None:
                dtype = self.target.info(self.name).dtype
                base = self.target.rows(self.name, r0, r1, scratch("merge.base", shape, dtype)).to(self.dev)
            b32 = as_float(base, scratch("merge.base32", shape, torch.float32, self.dev))
        for i, dname, index in self.roles:
            if i in self.exact:
                assert base is not None and b32 is not None and self._base_t is not None
                fix, state = self.exact[i]
                buf = scratch(f"merge.delta{i}", shape, torch.float32, self.dev)
                d = self.inputs[i].source.exact_rows(dname, r0, r1, base, b32, buf, fix, state, self._base_t)
            else:
                d = self._rows(i, dname, index, r0, r1)
            if check:
                self._check_rows(i, dname, d, r0, r1)
            out[i] = d.reshape(shape)
        for i in range(len(out)):
            if out[i] is None:
                out[i] = torch.zeros(shape, dtype=torch.float32, device=self.dev)
        return tuple(out)

    def _check_rows(self, i: int, dname: str, d: torch.Tensor, r0: int, r1: int) -> None:
        if not all_finite(d):
            raise NonFiniteDeltaError(
                f"Δ of {dname} in patch {i + 1} ({self.inputs[i].label}) has NaN/Inf in rows {r0}..{r1}; "
                "the patch or its fine-tune holds non-finite weights"
            )

    @property
    def checks_output(self) -> bool:
        """Without a sparsifier every input entry reaches the merged rows (w·NaN, 0·Inf are NaN), so one
        finiteness check of the merged rows (in ``merged``) can replace one per input."""
        return self.params.method.sparsifier is None and not self.whole and self.step.action == "merge"

    def load_output(self, r0: int, r1: int, base: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """``load`` for the output pass: inputs are checked here only when neither a finished statistics
        pass nor the merged rows' check covers them."""
        return self.load(r0, r1, check=not (self.checked or self.checks_output), base=base)

    def new_stats(self) -> None:
        self.stats = MergeStats(self.params, self.shape, self.seed, self.name)

    def observe(self, x: tuple[torch.Tensor, ...], r0: int, r1: int) -> torch.Tensor:
        """A statistics pass: add one chunk (from any worker, in any order: ``MergeStats.update`` adds up
        under a lock only what each chunk computed on its own, so the workers' histograms overlap)."""
        assert self.stats is not None
        self.stats.update(list(x), r0 * self.row_elems, _warm)
        # the candidate windows keep small tensors across chunks: between them, the freed per-chunk
        # temporaries stay resident (+250 MiB peak on the 1.1B TIES merge) unless the heap is given back
        trim_heap_every(16)
        return x[0]

    def merged(self, x: tuple[torch.Tensor, ...], r0: int, r1: int) -> torch.Tensor:
        """The merged Δ rows ``[r0, r1)`` in fp32."""
        if self.whole:  # a copy: callers accumulate into what they get
            return (self._merged_whole()[r0:r1] if self.shape else self._merged_whole()).clone()
        assert self.stats is not None
        out = merge_chunk(list(x), self.stats, self.params, self.seed, self.name, r0 * self.row_elems, _warm)
        if self.checks_output and not self.checked and not all_finite(out):
            # name the input; finite inputs whose merge overflows are written as they are
            for (i, dname, _), d in zip(self.roles, (x[i] for i, _, _ in self.roles), strict=True):
                self._check_rows(i, dname, d, r0, r1)
        return out

    def _merged_whole(self) -> torch.Tensor:
        with self._lock:
            if self._whole is None:
                n = self.shape[0] if self.shape else 1
                x = self.load(0, n)
                stats = MergeStats(self.params, self.shape, self.seed, self.name)
                while not stats.done:
                    stats.update(list(x), 0)
                    stats.finish_pass()
                self._whole = merge_chunk(list(x), stats, self.params, self.seed, self.name, 0).clone()
            return self._whole

    # ---- low-rank concatenation: A = [A_1; A_2; ...], B = [c_1 s_1 B_1, c_2 s_2 B_2, ...], scale 1
    def _coefficients(self) -> list[tuple[int, str, float]]:
        p = self.params
        div = 1.0
        if p.normalize:
            total = math.fsum(p.weights)
            div = total if abs(total) >= 1e-8 else 1.0
        out = []
        for i, dname, _ in self.roles:
            e = self.inputs[i].patch.entry(dname)
            out.append((i, dname, p.lambda_ * p.weights[i] / div * float(e.meta.get("scale", 1.0))))
        return out

    @property
    def concat_rank(self) -> int:
        return sum(int(self.inputs[i].patch.entry(d).stored("A").shape[0]) for i, d, _ in self.roles)

    def factor_a(self, r0: int, r1: int) -> torch.Tensor:
        parts, at = [], 0
        for i, dname, _ in self.roles:
            a = self.inputs[i].patch.entry(dname).stored("A")
            lo, hi = max(r0 - at, 0), min(r1 - at, a.shape[0])
            if lo < hi:
                parts.append(a[lo:hi].to(self.dev).float())
            at += a.shape[0]
        out = torch.cat(parts)
        self._check_finite(out, "A")
        return out

    def factor_b(self, r0: int, r1: int) -> torch.Tensor:
        parts = []
        for i, dname, c in self._coefficients():
            b = self.inputs[i].patch.entry(dname).stored("B")[r0:r1].to(self.dev).float()
            parts.append(b * c if c != 1 else b)
        out = torch.cat(parts, dim=1)
        self._check_finite(out, "B")
        return out

    def _check_finite(self, t: torch.Tensor, role: str) -> None:
        if not all_finite(t):
            raise NonFiniteDeltaError(f"the low-rank factors ({role}) of {self.name} have NaN/Inf in a patch")

    def concat_rows(self, r0: int, r1: int) -> torch.Tensor:
        """Dense rows of the concatenated factors, computed as ``apply`` computes a low-rank entry's rows."""
        a = self.factor_a(0, self.concat_rank)
        return lowrank_rows(a, self.factor_b(r0, r1), 1.0, 0, r1 - r0)


def _gather_stats(tensors: list[_MergeTensor], dev: torch.device) -> None:
    """Streaming statistics passes (engine jobs that write nothing; their chunks are observed by whichever
    worker loaded them), a few tensors at a time so the histograms and candidate windows held at once stay
    few. Tensors that need no pass are done at once."""
    todo = [t for t in tensors if t.needs_stats]
    for k in range(0, len(todo), STATS_GROUP):
        group = todo[k : k + STATS_GROUP]
        for t in group:
            t.new_stats()
        pending = [t for t in group if not t.stats.done]  # type: ignore[union-attr]
        while pending:
            jobs = [Job(t.name, t.shape, torch.float32, t.load, t.observe, parallel=True) for t in pending]
            run([Shard("", jobs)], None, dev)
            for t in pending:
                t.stats.finish_pass()  # type: ignore[union-attr]
                t.checked = True
            trim_heap()  # the finished passes' candidates are gone
            pending = [t for t in pending if not t.stats.done]  # type: ignore[union-attr]


# ---- outputs --------------------------------------------------------------------------------------------


def _delta_job(t: _MergeTensor, dtype: torch.dtype, entry: dict | None) -> Job:
    """The engine job writing one merged Δ (fp32); fills ``entry["stats"]`` when it is done."""
    parts: dict[int, DeltaStats] = {}

    def compute(x: tuple[torch.Tensor, ...], r0: int, r1: int) -> torch.Tensor:
        d = t.concat_rows(r0, r1) if t.step.action == "concat" else t.merged(x, r0, r1)
        if entry is None:  # written onto a base: no manifest entry to fill
            return d
        st = DeltaStats()
        st.update(d, offset=r0 * t.row_elems)
        parts[r0] = st
        return d

    def finish() -> None:
        st = DeltaStats()
        for r0 in sorted(parts):
            st.merge(parts[r0])
        if entry is not None:
            entry["stats"] = {k: v for k, v in st.result().items() if k != "rel_norm"}

    load = (lambda r0, r1: ()) if t.step.action == "concat" else t.load_output
    return Job(t.name, t.shape, dtype, load, compute, finish=finish, parallel=True)


def _set_job(s: Step, inputs: list[_Input]) -> tuple[Job, dict]:
    role, dname = next(iter(s.sources.items()))
    src = inputs[int(role[1:])]
    e = src.patch.entry(dname)
    entry = {
        "op": "set",
        "encoding": "dense",
        "shape": list(s.shape),
        "dtype": e.meta["dtype"],
        "keys": {"value": s.name},
    }
    if s.note:
        entry["note"] = s.note
    job = Job(
        s.name,
        s.shape,
        e.stored("value").dtype,
        lambda r0, r1: (src.source.raw_rows(dname, r0, r1),),
        lambda x, r0, r1: x[0],
        parallel=True,
    )
    return job, entry


def _provenance(plan: Plan, inputs: list[_Input], target: Checkpoint, options: dict) -> dict:
    return {
        "base": target.describe(),
        "finetuned": {
            "source": "merge of " + ", ".join(i.label for i in inputs),
            "tied": target.tied,
            "vocab_size": plan.out_vocab_rows or target.vocab_size,
        },
        "method": "merge",
        "parameters": dict(options, vocab_policy=plan.options.get("vocab_policy")),
        "inputs": [{"path": str(i.patch.path.resolve()), "digest": i.digest, "base": i.base} for i in inputs],
    }


def _finetune_files(tmp: Path, plan: Plan, inputs: list[_Input], target: Checkpoint) -> None:
    """The merged patch's ``finetune/``: the first patch's files (generation config, chat template), with the
    tokenizer and config of the base the merge is expressed on (unless the merge grew the vocabulary)."""
    dst = tmp / FINETUNE_DIR
    dst.mkdir(exist_ok=True)
    src = inputs[0].patch.finetune_dir
    if src.is_dir():
        import shutil

        shutil.copytree(src, dst, dirs_exist_ok=True)
    if not plan.out_vocab_rows:
        copy_files(target.path, dst, (*TOKENIZER_FILES, "config.json"))


def _unused(plan: Plan) -> list[dict]:
    return [{"name": n, "reason": r, "parameters": p} for n, r, p in plan.unused]


def _write_patch(
    out: Path,
    plan: Plan,
    inputs: list[_Input],
    tensors: dict[str, _MergeTensor],
    target: Checkpoint,
    provenance: dict,
    dev: torch.device,
    overwrite: bool,
    progress: Progress | None,
) -> Patch:
    entries: dict[str, dict] = {}
    jobs: dict[str, Job] = {}
    files: dict[str, list[str]] = {}  # entry -> its stored tensors (A and B of a low-rank entry share a shard)
    for s in plan.steps:
        if s.action == "merge":
            entries[s.name] = {"op": "add", "encoding": "dense", "shape": list(s.shape), "dtype": s.dtype}
            entries[s.name]["keys"] = {"delta": s.name}
            if s.rows:
                entries[s.name]["rows"] = s.rows
            jobs[s.name] = _delta_job(tensors[s.name], torch.float32, entries[s.name])
        elif s.action == "concat":
            t = tensors[s.name]
            r = t.concat_rank
            a, b = f"{s.name}::A", f"{s.name}::B"
            entries[s.name] = {
                "op": "add",
                "encoding": "lowrank",
                "shape": list(s.shape),
                "dtype": s.dtype,
                "keys": {"A": a, "B": b},
                "scale": 1.0,
                "rank": r,
                "energy": 1.0,
                "rel_error": 0.0,
                "encoding_note": "concatenated factors of the inputs (exact)",
            }
            jobs[a] = Job(
                a, (r, s.shape[1]), torch.float32, lambda r0, r1: (), lambda x, r0, r1, t=t: t.factor_a(r0, r1)
            )
            jobs[b] = Job(
                b, (s.shape[0], r), torch.float32, lambda r0, r1: (), lambda x, r0, r1, t=t: t.factor_b(r0, r1)
            )
        elif s.action == "set":
            jobs[s.name], entries[s.name] = _set_job(s, inputs)
        elif s.action == "delete":
            entries[s.name] = {"op": "delete", "shape": list(s.shape), "dtype": s.dtype}
    for n, j in jobs.items():
        j.parallel = True
        files.setdefault(n.split("::")[0], []).append(n)
    with atomic_output(out, overwrite) as tmp:
        writer = PatchWriter(tmp, MAX_SHARD_BYTES)
        shards = writer.plan_shards([(e, sum(jobs[n].spec.nbytes for n in ns)) for e, ns in files.items()])
        for file, names in shards:
            for e in names:
                entries[e]["file"] = file
        run(
            [Shard(file, [jobs[n] for e in names for n in files[e]]) for file, names in shards],
            tmp,
            dev,
            progress=progress,
        )
        _finetune_files(tmp, plan, inputs, target)
        writer.finish(provenance, entries, _unused(plan))
    return Patch.open(out)


def _write_encoded(
    out: Path,
    plan: Plan,
    inputs: list[_Input],
    tensors: dict[str, _MergeTensor],
    target: Checkpoint,
    provenance: dict,
    enc: Any,
    dev: torch.device,
    overwrite: bool,
) -> Patch:
    """The merged Δ re-encoded low-rank, one tensor in memory at a time (assembled by the engine)."""
    from patchlab.methods.compress import _Item, _write
    from patchlab.methods.compress import _provenance as encoded_provenance

    items: list[_Item] = []
    for s in plan.steps:
        if s.action == "merge":
            meta = {"op": "add", "shape": list(s.shape), "dtype": s.dtype}
            if s.rows:
                meta["rows"] = s.rows
            job = _delta_job(tensors[s.name], torch.float32, meta)
            items.append(_Item(s.name, meta, delta=lambda job=job: assemble(job, dev, torch.float32)))
        elif s.action == "set":
            job, meta = _set_job(s, inputs)
            items.append(_Item(s.name, meta, tensors=lambda job=job: {job.name: assemble(job, dev)}))
        elif s.action == "delete":
            items.append(_Item(s.name, {"op": "delete", "shape": list(s.shape), "dtype": s.dtype}))
    prov = encoded_provenance("merge", provenance, enc, torch.float32)
    return _write(
        out,
        items,
        enc,
        torch.float32,
        prov,
        _unused(plan),
        lambda w: _finetune_files(w.root, plan, inputs, target),
        overwrite,
        MAX_SHARD_BYTES,
        None,
    )


def _write_model(
    out: Path,
    plan: Plan,
    inputs: list[_Input],
    tensors: dict[str, _MergeTensor],
    target: Checkpoint,
    dev: torch.device,
    overwrite: bool,
    progress: Progress | None,
) -> Checkpoint:
    """``target + merged Δ`` as a model directory, in the target's shard layout, in one pass: each chunk's
    Δ is computed exactly as the merged patch would store it, then added as ``apply`` adds."""
    from patchlab.methods.port import finite_job, write_model_meta

    shards: dict[str, list[Job]] = {}
    for s in plan.steps:
        if s.action in ("drop", "delete"):
            continue
        file = s.file or "model.safetensors"
        if s.action in ("merge", "concat"):
            job = _onto_job(s, tensors[s.name], target, plan, dev)
        elif s.action == "set":
            job, _ = _set_job(s, inputs)
            job.dtype = parse_dtype(s.dtype) or job.dtype
        else:
            job = _copy_job(s, target)
        shards.setdefault(file, []).append(finite_job(job, target))  # a NaN in the base is refused too
    shard_list = [Shard(f, jobs) for f, jobs in shards.items()]
    with atomic_output(out, overwrite) as tmp:
        run(shard_list, tmp, dev, progress=progress)
        if len(shard_list) > 1 or target.sharded:
            wm = {j.name: sh.file for sh in shard_list for j in sh.jobs}
            total = sum(sh.nbytes for sh in shard_list)
            (tmp / SAFE_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": wm}, indent=2))
        meta = inputs[0].patch.finetune_dir
        write_model_meta(tmp, target, _Meta(meta if meta.is_dir() else None), plan)
    return Checkpoint.open(out)


@dataclass
class _Meta:
    meta_dir: Path | None


def _copy_job(s: Step, target: Checkpoint) -> Job:
    return Job(
        s.name,
        s.shape,
        target.info(s.name).dtype,
        lambda r0, r1: (target.rows(s.name, r0, r1),),
        lambda x, r0, r1: x[0],
        advise=lambda r0, r1: target.advise(s.name, r0, r1),
        parallel=True,
    )


def _onto_job(s: Step, t: _MergeTensor, target: Checkpoint, plan: Plan, dev: torch.device) -> Job:
    from patchlab.kernels.delta import gather_rows

    base_t = target.tensor(s.name)
    dtype = base_t.dtype
    tmap = plan.row_maps.get((s.name, "target"))
    delta = _delta_job(t, torch.float32, None)

    def load(r0: int, r1: int) -> tuple[torch.Tensor, ...]:
        if tmap is not None:
            tr = gather_rows(base_t, tmap[r0:r1]).to(dev)
        else:
            shape = (r1 - r0, *s.shape[1:]) if s.shape else ()
            tr = target.rows(s.name, r0, r1, scratch("merge.target", shape, dtype)).to(dev)
        # the base rows just read serve the exact Δ of 16-bit patches too (no second read)
        return (tr, *(t.load_output(r0, r1, base=tr) if s.action == "merge" else delta.load(r0, r1)))

    def compute(x: tuple[torch.Tensor, ...], r0: int, r1: int) -> torch.Tensor:
        tr, rest = x[0], x[1:]
        d = delta.compute(rest, r0, r1)
        acc = scaled_add_into(d, tr, 1.0, scratch("merge.tmp", tuple(tr.shape), torch.float32, tr.device))
        return scratch("merge.out", tuple(acc.shape), dtype, acc.device).copy_(acc)

    return Job(s.name, s.shape, dtype, load, compute, parallel=True)
