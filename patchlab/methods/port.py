"""extract, apply, port and the fused port: plan first, then one streaming pass through the engine."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypedDict, Unpack

import torch
from safetensors.torch import save_file

from patchlab import __version__
from patchlab.engine.executor import Job, Shard, atomic_output, check_output, resolve_device, run, scratch
from patchlab.engine.sources import DeltaSource, PairDelta, PatchDelta
from patchlab.errors import NonFiniteDeltaError, PlanError
from patchlab.io.checkpoint import SAFE_INDEX, TOKENIZER_FILES, Checkpoint
from patchlab.io.patch import FINETUNE_DIR, FIXUPS_FILE, MANIFEST, Patch, manifest_header, tensor_digest
from patchlab.kernels.delta import (
    DeltaStats,
    all_finite,
    as_float,
    bits,
    diff_into,
    gather_rows,
    same_bits,
    scaled_add_into,
)
from patchlab.kernels.vocab import identity
from patchlab.plan import Plan, Step, plan_apply, plan_extract

Progress = Callable[[int], None]
DEFAULT_SHARD_BYTES = 4 << 30
META_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES)


def _dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """A torch dtype from its name (``"bfloat16"``)."""
    if name is None or isinstance(name, torch.dtype):
        return name
    d = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(d, torch.dtype):
        raise PlanError(f"unknown dtype {name!r}")
    return d


def _storage_dtype(name: str | torch.dtype | None) -> torch.dtype:
    d = _dtype(name) if name is not None else torch.float32
    if d not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise PlanError(f"storage dtype {name!r} cannot hold a delta; use float32 (exact), bfloat16 or float16")
    return d


def _describe(ck: Checkpoint) -> dict:
    d = {
        "path": str(ck.path.resolve()),
        "architecture": ck.architecture_digest,
        "dtype": ck.dtype,
        "vocab_size": ck.vocab_size,
        "tied": ck.tied,
        "parameters": ck.num_parameters,
    }
    if "content_digest" in ck.__dict__:  # only when already computed: hashing every byte is not free
        d["content"] = ck.content_digest
    return d


def _rows(t: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    return t[r0:r1] if t.dim() else t


def _split_shards(jobs: list[Job], max_bytes: int, prefix: str) -> list[Shard]:
    groups: list[list[Job]] = [[]]
    size = 0
    for j in jobs:
        if groups[-1] and size + j.spec.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(j)
        size += j.spec.nbytes
    n = len(groups)
    return [Shard(f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


def _copy_meta(src: Path, dst: Path, names: Sequence[str] = META_FILES) -> None:
    for n in names:
        if (src / n).exists():
            shutil.copy2(src / n, dst / n)


# ---------------------------------------------------------------------------------------------------
# extract
# ---------------------------------------------------------------------------------------------------
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
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Patch | Plan:
    """Extract the diff vector ``Δ = ft − base`` as a patch directory at ``out``.

    With the default fp32 storage, ``apply(extract(base, ft), base)`` reproduces ``ft`` bit for bit; a
    smaller ``storage_dtype`` (bfloat16, float16) halves the patch and gives up exactness.
    """
    base_ck, ft_ck = Checkpoint.open(base), Checkpoint.open(finetuned)
    try:
        store = _storage_dtype(storage_dtype)
    except PlanError:
        raise PlanError(f"unknown storage dtype {storage_dtype!r}; use float32 (exact), bfloat16 or float16") from None
    plan = plan_extract(base_ck, ft_ck, vocab_policy=vocab_policy, storage_dtype=store)
    if dry_run:
        return plan
    out = Path(out)
    check_output(out, overwrite)
    dev = resolve_device(device)
    exact = store == torch.float32
    entries: dict[str, dict] = {}
    fixups: dict[str, torch.Tensor] = {}
    jobs = [
        _extract_job(s, base_ck, ft_ck, plan, dev, exact, entries, fixups) for s in plan.steps if s.action != "delete"
    ]
    for s in plan.steps:
        if s.action == "delete":
            entries[s.name] = {"op": "delete", "shape": list(s.shape), "dtype": s.dtype}
    shards = _split_shards(jobs, max_shard_bytes, "delta")
    for sh in shards:
        for j in sh.jobs:
            entries[j.name]["file"] = sh.file
    with atomic_output(out, overwrite) as tmp:
        run(shards, tmp, dev, progress=progress)
        if fixups:
            save_file(fixups, str(tmp / FIXUPS_FILE))
        (tmp / FINETUNE_DIR).mkdir()
        _copy_meta(ft_ck.path, tmp / FINETUNE_DIR)
        ordered = {s.name: entries[s.name] for s in plan.steps}
        manifest = {
            **manifest_header(
                {
                    "base": _describe(base_ck),
                    "finetuned": _describe(ft_ck),
                    "method": "extract",
                    "parameters": {
                        "vocab_policy": vocab_policy,
                        "storage_dtype": str(store).removeprefix("torch."),
                        "exact": exact,
                    },
                }
            ),
            "totals": _totals(ordered, fixups),
            "unused": [{"name": n, "reason": r, "parameters": p} for n, r, p in plan.unused],
            "tensors": ordered,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return Patch.open(out)


def _extract_job(
    s: Step,
    base: Checkpoint,
    ft: Checkpoint,
    plan: Plan,
    dev: torch.device,
    exact: bool,
    entries: dict[str, dict],
    fixups: dict[str, torch.Tensor],
) -> Job:
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
    parts: dict[int, tuple[DeltaStats, torch.Tensor | None, torch.Tensor | None]] = {}
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

    def compute(x: tuple[torch.Tensor, ...], r0: int, r1: int) -> torch.Tensor:
        f, b = x
        shape, d_dev = tuple(f.shape), f.device
        b32 = as_float(b, scratch("extract.b32", shape, torch.float32, d_dev))
        d = diff_into(scratch("extract.delta", shape, torch.float32, d_dev), f, b32, b32)
        stats = DeltaStats()
        stats.update(d, b, offset=r0 * row)
        if stats.nonfinite:
            raise NonFiniteDeltaError(
                f"Δ of {s.name} has NaN/Inf (at flat element {stats.first_nonfinite}); "
                "the base or the fine-tune holds non-finite weights"
            )
        fix_at = fix_to = None
        if exact:  # does cast(base + Δ) give ft back? Elements where it does not are stored verbatim
            back = scratch("extract.back", shape, f.dtype, d_dev).copy_(b32.add_(d))
            if not same_bits(back, f):
                bad = (bits(back) != bits(f)).reshape(-1).nonzero().squeeze(1)
                fix_at, fix_to = (bad + r0 * row).cpu(), f.reshape(-1)[bad].cpu()
        parts[r0] = (stats, fix_at, fix_to)
        return d

    def finish() -> None:
        stats = DeltaStats()
        fix_idx: list[torch.Tensor] = []
        fix_val: list[torch.Tensor] = []
        for r0 in sorted(parts):
            st, at, to = parts[r0]
            stats.merge(st)
            if at is not None and to is not None:
                fix_idx.append(at)
                fix_val.append(to)
        parts.clear()
        entry["stats"] = stats.result()
        if fix_idx:
            key = s.name
            fixups[f"{key}::indices"] = torch.cat(fix_idx)
            fixups[f"{key}::values"] = torch.cat(fix_val)
            entry["fix"] = {
                "indices": f"{key}::indices",
                "values": f"{key}::values",
                "count": int(fixups[f"{key}::indices"].numel()),
                "base_digest": tensor_digest(base_t),
            }

    def advise(r0: int, r1: int) -> None:
        ft.advise(s.name, r0, r1)
        if bmap is None:
            base.advise(s.name, r0, min(r1, base_t.shape[0] if s.shape else 1))

    return Job(s.name, s.shape, _dtype(s.dtype), load, compute, advise, finish, parallel=True)


def _totals(entries: Mapping[str, dict], fixups: Mapping[str, torch.Tensor]) -> dict:
    adds = [e for e in entries.values() if e["op"] == "add"]
    n = sum(math.prod(e["shape"]) for e in adds)
    sumsq = sum(e["stats"]["norm"] ** 2 for e in adds)
    changed = sum(e["stats"]["changed_frac"] * math.prod(e["shape"]) for e in adds)
    return {
        "tensors": len(entries),
        "delta_tensors": len(adds),
        "delta_parameters": n,
        "norm": sumsq**0.5,
        "changed_frac": changed / n if n else 0.0,
        "fixups": sum(int(t.numel()) for k, t in fixups.items() if k.endswith("::indices")),
    }


# ---------------------------------------------------------------------------------------------------
# apply / port
# ---------------------------------------------------------------------------------------------------
class ApplyOptions(TypedDict, total=False):
    """Options shared by apply, port and port_fused."""

    alpha: float  # global scale of Δ (default 1.0)
    alpha_by_pattern: Sequence[tuple[str, float]] | Mapping[str, float] | None  # glob → α, first match wins
    vocab_policy: str | None  # pad-zero | truncate | by-token | skip-embeddings
    device: str  # auto | cpu | cuda
    overwrite: bool
    force: bool  # accept a plan that skips more than 1% of the patch's parameters
    dry_run: bool  # return the Plan; write nothing
    progress: Progress | None  # called with the bytes written


def apply(
    patch: str | Path | Patch, target: str | Path | Checkpoint, out: str | Path, **options: Unpack[ApplyOptions]
) -> Checkpoint | Plan:
    """Write ``target + α·Δ`` as a complete model directory at ``out`` (the patch's own base, usually)."""
    return _apply_source(PatchDelta(Patch.open(patch)), Checkpoint.open(target), out, "apply", **options)


def port(
    patch: str | Path | Patch, target: str | Path | Checkpoint, out: str | Path, **options: Unpack[ApplyOptions]
) -> Checkpoint | Plan:
    """Fine-tuning transfer: apply a patch made on one base version onto another (``base_t + α·Δ_s``)."""
    return _apply_source(PatchDelta(Patch.open(patch)), Checkpoint.open(target), out, "port", **options)


def port_fused(
    finetuned: str | Path | Checkpoint,
    source_base: str | Path | Checkpoint,
    target: str | Path | Checkpoint,
    out: str | Path,
    **options: Unpack[ApplyOptions],
) -> Checkpoint | Plan:
    """``target + α·(ft − source_base)`` in one streaming pass over three checkpoints; Δ is never written."""
    ft, src = Checkpoint.open(finetuned), Checkpoint.open(source_base)
    pair = PairDelta(ft, src, plan_extract(src, ft, vocab_policy=options.get("vocab_policy")))
    return _apply_source(pair, Checkpoint.open(target), out, "port-fused", **options)


def plan_for(source: DeltaSource, target: Checkpoint, operation: str, **kw: object) -> Plan:
    return plan_apply(source.view(), target, operation=operation, **kw)  # type: ignore[arg-type]


def _apply_source(
    source: DeltaSource,
    target: Checkpoint,
    out: str | Path,
    operation: str,
    *,
    alpha: float = 1.0,
    alpha_by_pattern: Sequence[tuple[str, float]] | Mapping[str, float] | None = None,
    vocab_policy: str | None = None,
    device: str = "auto",
    overwrite: bool = False,
    force: bool = False,
    dry_run: bool = False,
    progress: Progress | None = None,
) -> Checkpoint | Plan:
    plan = plan_for(
        source,
        target,
        operation,
        alpha=alpha,
        alpha_by_pattern=alpha_by_pattern,
        vocab_policy=vocab_policy,
        force=force,
    )
    if dry_run:
        return plan
    out = Path(out)
    check_output(out, overwrite)
    dev = resolve_device(device)
    shards: dict[str, list[Job]] = {}
    for s in plan.steps:
        if s.action != "drop":
            shards.setdefault(s.file or "model.safetensors", []).append(_apply_job(s, source, target, plan, dev))
    shard_list = [Shard(f, jobs) for f, jobs in shards.items()]
    with atomic_output(out, overwrite) as tmp:
        run(shard_list, tmp, dev, progress=progress)
        if len(shard_list) > 1 or target.sharded:
            wm = {j.name: sh.file for sh in shard_list for j in sh.jobs}
            total = sum(sh.nbytes for sh in shard_list)
            (tmp / SAFE_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": wm}, indent=2))
        _write_model_meta(tmp, target, source, plan)
    return Checkpoint.open(out)


def _apply_job(s: Step, source: DeltaSource, target: Checkpoint, plan: Plan, dev: torch.device) -> Job:
    dtype = _dtype(s.dtype) if s.action == "set" else target.info(s.name).dtype
    if s.action == "copy":
        t = target.tensor(s.name)
        return Job(
            s.name,
            s.shape,
            dtype,
            lambda r0, r1: (target.rows(s.name, r0, r1),),
            lambda x, r0, r1: x[0],
            advise=lambda r0, r1: target.advise(s.name, r0, r1),
            parallel=True,
        )
    dname = s.sources["delta"]
    if s.action == "set":
        return Job(
            s.name,
            s.shape,
            dtype,
            lambda r0, r1: (source.raw_rows(dname, r0, r1),),
            lambda x, r0, r1: x[0],
            parallel=True,
        )
    t = target.tensor(s.name)
    tmap = plan.row_maps.get((s.name, "target"))
    dmap = plan.row_maps.get((s.name, "delta"))
    row = math.prod(s.shape[1:]) if s.shape else 1
    fix = source.fixups(dname) if s.alpha == 1.0 and tmap is None and dmap is None else None
    fix_state: dict[str, object] = {}

    def load(r0: int, r1: int) -> tuple[torch.Tensor, ...]:
        if tmap is not None:
            tr = gather_rows(t, tmap[r0:r1]).to(dev)
        else:
            shape = (min(r1, t.shape[0]) - r0, *s.shape[1:]) if s.shape else ()
            tr = target.rows(s.name, r0, r1, scratch("apply.target", shape, t.dtype)).to(dev)
        return tr, source.rows(dname, r0, r1, dev, dmap)

    def compute(x: tuple[torch.Tensor, ...], r0: int, r1: int) -> torch.Tensor:
        tr, d = x
        if not all_finite(d):
            raise NonFiniteDeltaError(
                f"Δ of {dname} has NaN/Inf in rows {r0}..{r1}; the patch or its fine-tune holds non-finite weights"
            )
        # Δ is this chunk's own buffer (see sources): scale and accumulate in place, no allocation
        acc = scaled_add_into(d, tr, s.alpha, scratch("apply.tmp", tuple(tr.shape), torch.float32, tr.device))
        outc = scratch("apply.out", tuple(acc.shape), dtype, acc.device).copy_(acc)
        if fix is not None:
            if "ok" not in fix_state:  # the residuals are only valid on the exact base tensor they came from
                fix_state["ok"] = tensor_digest(t) == fix[0]
            if fix_state["ok"]:
                idx, vals = fix[1], fix[2]
                sel = (idx >= r0 * row) & (idx < r1 * row)
                if bool(sel.any()):
                    flat = outc.reshape(-1)
                    bits(flat)[(idx[sel] - r0 * row).to(flat.device)] = bits(vals[sel].to(dtype)).to(flat.device)
        return outc

    return Job(
        s.name,
        s.shape,
        dtype,
        load,
        compute,
        advise=lambda r0, r1: target.advise(s.name, r0, min(r1, t.shape[0]) if t.dim() else 1),
        parallel=True,  # fix_state is set idempotently; everything else is local to the chunk
    )


def _write_model_meta(tmp: Path, target: Checkpoint, source: DeltaSource, plan: Plan) -> None:
    """Config and tokenizer from the target; generation config and chat template from the fine-tune."""
    meta = source.meta_dir
    if plan.out_vocab_rows and meta is not None:
        # The output has rows the target's tokenizer does not know: they are the fine-tune's tokens.
        _copy_meta(meta, tmp, TOKENIZER_FILES)
    else:
        _copy_meta(target.path, tmp, TOKENIZER_FILES)
        if meta is not None:
            _copy_meta(meta, tmp, ("chat_template.jinja", "chat_template.json"))
            _merge_chat_template(meta / "tokenizer_config.json", tmp / "tokenizer_config.json")
    cfg = dict(target.config)
    if plan.out_vocab_rows:
        inner = cfg.get("text_config", cfg)
        inner["vocab_size"] = plan.out_vocab_rows
    if cfg:
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = (meta / "generation_config.json") if meta is not None else None
    if gen is not None and gen.exists():
        shutil.copy2(gen, tmp / "generation_config.json")
    elif (target.path / "generation_config.json").exists():
        shutil.copy2(target.path / "generation_config.json", tmp / "generation_config.json")
    (tmp / "patchlab.json").write_text(
        json.dumps(
            {
                "patchlab_version": __version__,
                "operation": plan.operation,
                "inputs": dict(plan.inputs),
                "options": dict(plan.options),
                "summary": plan.summary(),
                "warnings": list(plan.warnings),
            },
            indent=2,
        )
    )


def _merge_chat_template(src: Path, dst: Path) -> None:
    if not src.exists() or not dst.exists():
        return
    try:
        tpl = json.loads(src.read_text()).get("chat_template")
        if tpl is None:
            return
        cfg = json.loads(dst.read_text())
        cfg["chat_template"] = tpl
        dst.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    except json.JSONDecodeError:
        return


__all__ = ["extract", "apply", "port", "port_fused"]
