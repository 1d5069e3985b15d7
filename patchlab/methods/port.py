"""apply, port and the fused port: plan first, then one streaming pass through the engine."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypedDict, Unpack

import torch

from patchlab import __version__
from patchlab.engine.devices import resolve_device
from patchlab.engine.executor import Job, Shard, atomic_output, check_output, run, scratch
from patchlab.engine.sources import DeltaSource, PairDelta, PatchDelta, write_fixups
from patchlab.errors import NonFiniteDeltaError, NonFiniteError
from patchlab.io.checkpoint import SAFE_INDEX, TOKENIZER_FILES, Checkpoint, copy_files, parse_dtype
from patchlab.io.patch import Patch
from patchlab.kernels.delta import all_finite, as_float, gather_rows, scaled_add_into
from patchlab.plan import Plan, Step, plan_apply, plan_extract

Progress = Callable[[int], None]
# (Δ name, first row, end row, the target's rows, Δ's rows before α): a measurement riding on a port's reads
Observer = Callable[[str, int, int, torch.Tensor, torch.Tensor], None]


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
    allow_nonfinite: bool  # write NaN/Inf weights instead of refusing them
    observe: Observer | None  # sees each chunk's target and Δ rows (e.g. measure.diagnose.Diagnosis.observe)


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
    allow_nonfinite: bool = False,
    observe: Observer | None = None,
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
    check_output(out, overwrite, "model")
    dev = resolve_device(device)
    shards: dict[str, list[Job]] = {}
    for s in plan.steps:
        if s.action != "drop":
            job = _apply_job(s, source, target, plan, dev, observe)
            if not allow_nonfinite:
                job = finite_job(job, target)
            shards.setdefault(s.file or "model.safetensors", []).append(job)
    shard_list = [Shard(f, jobs) for f, jobs in shards.items()]
    with atomic_output(out, overwrite, "model") as tmp:
        run(shard_list, tmp, dev, progress=progress)
        if len(shard_list) > 1 or target.sharded:
            wm = {j.name: sh.file for sh in shard_list for j in sh.jobs}
            total = sum(sh.nbytes for sh in shard_list)
            (tmp / SAFE_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": wm}, indent=2))
        write_model_meta(tmp, target, source, plan)
    return Checkpoint.open(out)


def finite_job(job: Job, target: Checkpoint) -> Job:
    """``job`` refusing NaN/Inf in what it produces (the target's own weights included), by tensor name."""
    compute = job.compute
    if not job.dtype.is_floating_point:
        return job

    def checked(x: tuple[torch.Tensor, ...], r0: int, r1: int) -> torch.Tensor:
        out = compute(x, r0, r1)
        if not all_finite(out):
            src = f"{target.path} holds NaN/Inf in {job.name}" if job.name in target else "the patch holds NaN/Inf"
            raise NonFiniteError(
                f"the output tensor {job.name} has NaN/Inf in rows {r0}..{r1} ({src}); nothing was written. "
                "Fix the input, or pass --allow-nonfinite if non-finite weights are meant"
            )
        return out

    return dataclasses.replace(job, compute=checked)


def _apply_job(
    s: Step, source: DeltaSource, target: Checkpoint, plan: Plan, dev: torch.device, observe: Observer | None = None
) -> Job:
    dtype = parse_dtype(s.dtype) if s.action == "set" else target.info(s.name).dtype
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
    seen = observe if tmap is None and dmap is None else None  # rows as the patch's: what an observer can use
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
        tmp = scratch("apply.tmp", tuple(tr.shape), torch.float32, tr.device)
        if seen is not None:  # the target's rows widened once, for the observer and for the sum below
            tf = as_float(tr, tmp)
            seen(dname, r0, r1, tf, d)
        else:
            tf = tr
        # Δ is this chunk's own buffer (see sources): scale and accumulate in place, no allocation
        acc = scaled_add_into(d, tf, s.alpha, tmp)
        outc = scratch("apply.out", tuple(acc.shape), dtype, acc.device).copy_(acc)
        if fix is not None:
            write_fixups(outc, tr, fix, fix_state, t, r0 * row, r1 * row)
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


def write_model_meta(tmp: Path, target: Checkpoint, source: DeltaSource, plan: Plan) -> None:
    """Config and tokenizer from the target; generation config and chat template from the fine-tune."""
    meta = source.meta_dir
    if plan.out_vocab_rows and meta is not None:
        # The output has rows the target's tokenizer does not know: they are the fine-tune's tokens.
        copy_files(meta, tmp, TOKENIZER_FILES)
    else:
        copy_files(target.path, tmp, TOKENIZER_FILES)
        if meta is not None:
            copy_files(meta, tmp, ("chat_template.jinja", "chat_template.json"))
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


__all__ = ["apply", "port", "port_fused"]
