"""One call that measures whether a patch survives a move to a new base: the compatibility report.

``compatibility_report(patch, target, tasks=..., prompts=...)``:

1. weight-space diagnostics of the patch against the target (:func:`patchlab.measure.diagnose.diagnose`);
2. with tasks: evaluates the old fine-tune (``old_model``, else the patch re-applied to its own base), the
   new base alone (unless ``evaluate_target=False``) and the ported model (``ported``, else
   ``port(patch, target)``), then negative flips old fine-tune -> ported;
3. with prompts: TuCo of the ported model against the target base;
4. assembles the report dict (:func:`patchlab.report.render.build_report`).

Models it has to build go to a temporary directory that is removed afterwards (or to ``work_dir``);
it is marked with this process, so ``patchlab gc`` removes the copies a killed process leaves.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from patchlab.io.checkpoint import Checkpoint
from patchlab.io.outputs import scratch_dir
from patchlab.io.patch import Patch
from patchlab.measure.diagnose import diagnose
from patchlab.measure.evaluate import evaluate
from patchlab.measure.flips import compare
from patchlab.measure.tasks import Task
from patchlab.report.render import build_report

SCRATCH_PREFIX = "patchlab-compat-"


def compatibility_report(
    patch: str | Path | Patch,
    target: str | Path | Checkpoint,
    *,
    tasks: Sequence[str | Path | Task] = (),
    prompts: Sequence[str] = (),
    prompt_ids: Sequence[str] | None = None,
    source_base: str | Path | Checkpoint | None = None,
    old_model: str | Path | None = None,
    ported: str | Path | None = None,
    alpha: float = 1.0,
    vocab_policy: str | None = None,
    allow_missing: bool = False,
    evaluate_target: bool = True,
    intruders: bool = True,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    device: str = "auto",
    work_dir: str | Path | None = None,
    title: str | None = None,
) -> dict[str, Any]:
    """Plan, diagnostics, evaluation, flips and TuCo of porting ``patch`` onto ``target``, as a report dict."""
    p = Patch.open(patch)
    tgt = Checkpoint.open(target)
    diag = diagnose(p, tgt, source_base=source_base, intruders=intruders, device=device)
    plan = None
    flips = None
    evaluations = None
    tuco_report = None
    notes: list[str] = []
    need_ported = bool(tasks) or bool(prompts)
    # a scratch directory marked with this process: `patchlab gc` removes it if the process is killed
    tmp = scratch_dir(work_dir, SCRATCH_PREFIX)
    try:
        plan = _port_plan(p, tgt, Path(tmp) / "plan", alpha, vocab_policy, notes)
        if need_ported and ported is None:
            import patchlab

            out = Path(tmp) / "ported"
            patchlab.port(p, tgt, out, alpha=alpha, vocab_policy=vocab_policy, device=device)
            ported_path: Path = out
            notes.append(f"ported model built as target + {alpha}·Δ")
        else:
            ported_path = Path(ported) if ported is not None else Path(tmp) / "unused"
        if tasks:
            if old_model is None:
                import patchlab

                out = Path(tmp) / "old"
                src = source_base if source_base is not None else diag.source
                patchlab.apply(p, src, out, device=device)
                old_path: Path = out
                notes.append("old model rebuilt as the patch applied to its own base")
            else:
                old_path = Path(old_model)
            kw = {"batch_size": batch_size, "device": device, "max_new_tokens": max_new_tokens}
            old = evaluate(old_path, list(tasks), model_name=f"old: {old_model or 'base_s + Δ'}", **kw)
            new = evaluate(ported_path, list(tasks), model_name=f"ported: {ported or 'base_t + α·Δ'}", **kw)
            evaluations = {"old fine-tune": old}
            if evaluate_target:  # what the port adds over the new base alone
                evaluations["new base"] = evaluate(tgt.path, list(tasks), model_name=f"new base: {tgt.path}", **kw)
            evaluations["ported"] = new
            flips = compare(old.flip_records(), new.flip_records(), allow_missing=allow_missing)
        if prompts:
            from patchlab.measure.tuco import TuCo

            tc = TuCo.load(tgt.path, ported_path, device=device)
            try:
                tuco_report = tc.measure(list(prompts), ids=prompt_ids, batch_size=batch_size)
            finally:
                tc.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not tasks and not prompts:
        notes.append("weight-space diagnostics only: pass tasks for flips and prompts for TuCo")
    return build_report(
        title=title or f"Porting {p.path.name} onto {tgt.path.name}",
        diagnostics=diag,
        flips=flips,
        evaluations=evaluations,
        tuco=tuco_report,
        plan=plan,
        notes=notes,
        meta={"patch": str(p.path), "source base": diag.source, "target": str(tgt.path), "alpha": alpha},
    )


def _port_plan(
    p: Patch, tgt: Checkpoint, out: Path, alpha: float, vocab_policy: str | None, notes: list[str]
) -> dict[str, Any] | None:
    """The port's plan summary (a dry run: nothing written); a port that would be refused becomes a note."""
    import patchlab
    from patchlab.errors import PatchlabError

    try:
        plan = patchlab.port(p, tgt, out, alpha=alpha, vocab_policy=vocab_policy, dry_run=True)
    except PatchlabError as exc:
        notes.append(f"the port itself would be refused: {exc}")
        return None
    summary = plan.summary()
    if plan.warnings:
        summary["warnings"] = list(plan.warnings)
    return summary
