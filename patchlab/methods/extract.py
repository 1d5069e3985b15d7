"""extract: the diff vector ``Δ = ft − base`` as a patch, planned first, then streamed through the engine.

By default each Δ is stored in its fine-tune tensor's own dtype (a bf16 model gives a bf16 patch: the bytes of
one checkpoint, half those of an fp32 Δ) and ``apply(extract(base, ft), base)`` still reproduces ``ft`` bit for
bit: elements where ``cast(base + Δ)`` would not give ``ft`` back (Δ rounded in its dtype, signed zeros,
differences past the dtype's range, which are clamped to it) are stored verbatim as fixups. ``float32``
storage is exact too, with fewer fixups; a storage dtype narrower than the fine-tune's gives up exactness.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from patchlab.engine.devices import resolve_device
from patchlab.engine.executor import Job, Shard, atomic_output, check_output, run, scratch, trim_heap_every
from patchlab.errors import NonFiniteDeltaError, PlanError
from patchlab.io.checkpoint import META_FILES, Checkpoint, parse_dtype
from patchlab.io.patch import MAX_SHARD_BYTES, Patch, PatchWriter
from patchlab.kernels.delta import DeltaStats, as_float, diff_into, gather_rows, mismatches, same_bits
from patchlab.kernels.drift import chunk_dot
from patchlab.kernels.vocab import identity
from patchlab.plan import Plan, Step, plan_extract

Progress = Callable[[int], None]
# (name, indices, values, base digest, base values) -> the entry's "fix" field
FixSink = Callable[[str, torch.Tensor, torch.Tensor, str | None, torch.Tensor | None], dict]
STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

__all__ = ["extract", "extract_job", "resolve_storage_dtype"]


def resolve_storage_dtype(
    name: str | torch.dtype | None, default: torch.dtype | None = torch.float32
) -> torch.dtype | None:
    """The dtype a delta is stored in; only floating dtypes wide enough for a difference qualify.

    ``None`` (with ``default=None``, or the name ``"finetune"``) means each tensor's fine-tune dtype."""
    if name == "finetune" or (name is None and default is None):
        return None
    try:
        d = parse_dtype(name) if name is not None else default
    except Exception:
        d = None
    if d not in STORAGE_DTYPES:
        raise PlanError(f"unknown storage dtype {name!r}; use float32 (exact), bfloat16 or float16")
    return d  # type: ignore[return-value]


def is_exact(store: torch.dtype, finetuned: torch.dtype) -> bool:
    """Whether a Δ stored in ``store`` is kept exact with residuals: fp32/fp64, or the fine-tune's own dtype
    (a narrower one would need a residual for most elements)."""
    return store in (torch.float32, torch.float64) or store == finetuned


def extract(
    base: str | Path | Checkpoint,
    finetuned: str | Path | Checkpoint,
    out: str | Path,
    *,
    storage_dtype: str | torch.dtype | None = None,
    vocab_policy: str | None = None,
    device: str = "auto",
    overwrite: bool = False,
    dry_run: bool = False,
    progress: Progress | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Patch | Plan:
    """Extract the diff vector ``Δ = ft − base`` as a patch directory at ``out``.

    By default (``storage_dtype=None``) each Δ is stored in its fine-tune tensor's dtype, and
    ``apply(extract(base, ft), base)`` reproduces ``ft`` bit for bit (residuals are stored where rounding Δ
    would lose it). ``float32`` is exact too; a dtype narrower than the fine-tune's gives up exactness.
    """
    base_ck, ft_ck = Checkpoint.open(base), Checkpoint.open(finetuned)
    store = resolve_storage_dtype(storage_dtype, None)
    plan = plan_extract(base_ck, ft_ck, vocab_policy=vocab_policy, storage_dtype=store)
    if dry_run:
        return plan
    out = Path(out)
    check_output(out, overwrite, "patch")
    dev = resolve_device(device)
    diffs = [s for s in plan.steps if s.action == "diff"]
    exact = all(is_exact(parse_dtype(s.dtype), ft_ck.info(s.name).dtype) for s in diffs)
    entries: dict[str, dict] = {}
    with atomic_output(out, overwrite, "patch") as tmp:
        writer = PatchWriter(tmp, max_shard_bytes)
        jobs = {
            s.name: extract_job(
                s,
                base_ck,
                ft_ck,
                plan,
                dev,
                entries,
                writer.add_fixups
                if s.action == "diff" and is_exact(parse_dtype(s.dtype), ft_ck.info(s.name).dtype)
                else None,
            )
            for s in plan.steps
            if s.action != "delete"
        }
        for s in plan.steps:
            if s.action == "delete":
                entries[s.name] = {"op": "delete", "shape": list(s.shape), "dtype": s.dtype}
        shards = writer.plan_shards([(n, j.spec.nbytes) for n, j in jobs.items()])
        for file, names in shards:
            for n in names:
                entries[n]["file"] = file
        run([Shard(file, [jobs[n] for n in names]) for file, names in shards], tmp, dev, progress=progress)
        writer.copy_files(ft_ck.path, META_FILES)
        provenance = {
            "base": base_ck.describe(),
            "finetuned": ft_ck.describe(),
            "method": "extract",
            "parameters": {
                "vocab_policy": vocab_policy,
                "storage_dtype": "finetune" if store is None else str(store).removeprefix("torch."),
                "exact": exact,
            },
        }
        unused = [{"name": n, "reason": r, "parameters": p} for n, r, p in plan.unused]
        writer.finish(provenance, {s.name: entries[s.name] for s in plan.steps}, unused)
    return Patch.open(out)


def drift_sums(chunks: list[tuple[float, float, float]]) -> dict[str, float]:
    """A manifest entry's ``drift_sums``: ``⟨base, Δ⟩`` and ``‖Δ‖²`` of the stored Δ and ``‖base‖²`` (which tells a
    diagnosis that it is given the same base), each summed in fp64 over the chunks in row order. With them a
    diagnosis measures ``⟨base_t − base, Δ⟩`` from a port's reads of base_t and Δ alone (``measure.diagnose``)."""
    base_dot = delta_sumsq = base_sumsq = 0.0
    for a, b, c in chunks:
        base_dot += a
        delta_sumsq += b
        base_sumsq += c
    return {"base_dot": base_dot, "delta_sumsq": delta_sumsq, "base_sumsq": base_sumsq}


def extract_job(
    s: Step,
    base: Checkpoint,
    ft: Checkpoint,
    plan: Plan,
    dev: torch.device,
    entries: dict[str, dict],
    fixups: FixSink | None = None,
) -> Job:
    """The engine job computing one tensor's Δ (or copying a ``set`` value); fills ``entries[s.name]``.

    With ``fixups``, elements where ``cast(base + Δ)`` does not give the fine-tune back are handed to it once
    the tensor is done (exact extraction).
    """
    ft_t = ft.tensor(s.name)
    ft_dtype = str(ft_t.dtype).removeprefix("torch.")
    if s.action == "set":
        entries[s.name] = {
            "op": "set",
            "encoding": "dense",
            "shape": list(s.shape),
            "dtype": ft_dtype,
            "keys": {"value": s.name},
            "note": s.note,
        }
        return Job(
            s.name,
            s.shape,
            ft_t.dtype,
            lambda r0, r1: (ft.rows(s.name, r0, r1),),
            lambda x, r0, r1: x[0],
            advise=lambda r0, r1: ft.advise(s.name, r0, r1),
        )
    base_t = base.tensor(s.name)
    bmap = plan.row_maps.get((s.name, "base"))
    # per chunk (first row → statistics, residual positions, residual values), combined in row order by
    # finish: chunks are computed in parallel, and the manifest must not depend on which finished first
    parts: dict[int, tuple[DeltaStats, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]] = {}
    sums: dict[int, tuple[float, float, float] | None] = {}  # per chunk: ⟨base, Δ⟩, ‖Δ‖² (stored Δ), ‖base‖²
    row = math.prod(s.shape[1:]) if s.shape else 1
    entry: dict = {
        "op": "add",
        "encoding": "dense",
        "shape": list(s.shape),
        "dtype": ft_dtype,
        "keys": {"delta": s.name},
    }
    if s.rows:
        entry["rows"] = s.rows
    entries[s.name] = entry

    def load(r0: int, r1: int) -> tuple[torch.Tensor, ...]:
        shape = (r1 - r0, *s.shape[1:]) if s.shape else ()
        f = ft.rows(s.name, r0, r1, scratch("extract.ft", shape, ft_t.dtype)).to(dev)
        if bmap is not None:
            b = gather_rows(base_t, bmap[r0:r1]).to(dev)
        elif s.shape and r1 > base_t.shape[0]:  # truncate never reads past the base; pad rows are zero
            b = gather_rows(base_t, identity(r1, base_t.shape[0])[r0:r1]).to(dev)
        else:
            b = base.rows(s.name, r0, r1, scratch("extract.base", shape, base_t.dtype)).to(dev)
        return f, b

    store = parse_dtype(s.dtype)
    numel = math.prod(s.shape) if s.shape else 1
    store_max = torch.finfo(store).max if store != torch.float32 else None

    def compute(x: tuple[torch.Tensor, ...], r0: int, r1: int) -> torch.Tensor:
        f, b = x
        shape, d_dev = tuple(f.shape), f.device
        b32 = as_float(b, scratch("extract.b32", shape, torch.float32, d_dev))
        d = diff_into(scratch("extract.delta", shape, torch.float32, d_dev), f, b32, b32)
        stats = DeltaStats()
        # statistics of the exact Δ, whatever it is stored in
        stats.update(d, b32, offset=r0 * row, work=scratch("extract.sum", shape, torch.float32, d_dev))
        if stats.nonfinite:
            raise NonFiniteDeltaError(
                f"Δ of {s.name} has NaN/Inf (at flat element {stats.first_nonfinite}); "
                "the base or the fine-tune holds non-finite weights"
            )
        out = d
        if store_max is not None:  # round Δ to its storage dtype; what apply will read back is float(that)
            if stats.max_abs > store_max:  # e.g. fp16 65504 − (−65504): keep it finite, a residual restores ft
                d.clamp_(-store_max, store_max)
            out = scratch("extract.stored", shape, store, d_dev).copy_(d)
            if fixups is not None:
                d.copy_(out)
        # the diagnosis of a later port needs ⟨base, Δ⟩, ‖Δ‖² of the Δ as stored and ‖base‖² (sums of this read)
        stored = d if store_max is None or fixups is not None else out
        if bmap is None and not (s.shape and r1 > base_t.shape[0]):  # the base's own rows
            work, b16, d16 = (
                scratch("extract.dot", shape, torch.float32, d_dev),
                base_t.element_size() == 2,
                store.itemsize == 2,
            )
            sums[r0] = (
                chunk_dot(b32, stored, work, b16 and d16),
                chunk_dot(stored, stored, work, d16),
                chunk_dot(b32, b32, work, b16),
            )
        else:
            sums[r0] = None
        fix_at = fix_to = fix_base = None
        if fixups is not None:  # does cast(base + Δ) give ft back? Elements where it does not are kept
            # (b32 may be the base rows themselves: add out of place, the residuals record the base's values)
            total = torch.add(b32, d, out=scratch("extract.sum", shape, torch.float32, d_dev))
            back = scratch("extract.back", shape, f.dtype, d_dev).copy_(total)
            # an fp32 Δ is almost always exact (one cheap comparison); a rounded one rarely is in a whole chunk
            if store_max is not None or not same_bits(back, f):
                bad = mismatches(back, f, scratch("extract.mask", shape, torch.bool, d_dev))
                if bad.numel():
                    # int32 positions where they fit: residuals wait in memory until the tensor is done
                    fix_at = (bad + r0 * row).to(torch.int32 if numel < 2**31 else torch.int64).cpu()
                    fix_to = f.reshape(-1)[bad.to(d_dev)].cpu()
                    fix_base = b.reshape(-1)[bad.to(d_dev)].cpu()
                    del bad
                    trim_heap_every(16)  # small results kept across chunks fragment the heap: give it back
        parts[r0] = (stats, fix_at, fix_to, fix_base)
        return out

    def finish() -> None:
        stats = DeltaStats()
        fix_idx: list[torch.Tensor] = []
        fix_val: list[torch.Tensor] = []
        fix_base: list[torch.Tensor] = []
        for r0 in sorted(parts):
            st, at, to, was = parts[r0]
            stats.merge(st)
            if at is not None and to is not None and was is not None:
                fix_idx.append(at)
                fix_val.append(to)
                fix_base.append(was)
        parts.clear()
        entry["stats"] = stats.result()
        got = [sums[r0] for r0 in sorted(sums)]
        sums.clear()
        if got and all(g is not None for g in got):
            entry["drift_sums"] = drift_sums(got)  # type: ignore[arg-type]
        if fix_idx and fixups is not None:  # sorted: chunks in row order, positions ascending in each
            entry["fix"] = fixups(s.name, torch.cat(fix_idx), torch.cat(fix_val), None, torch.cat(fix_base))

    def advise(r0: int, r1: int) -> None:
        ft.advise(s.name, r0, r1)
        if bmap is None:
            base.advise(s.name, r0, min(r1, base_t.shape[0] if s.shape else 1))

    return Job(s.name, s.shape, parse_dtype(s.dtype), load, compute, advise, finish, parallel=True)
