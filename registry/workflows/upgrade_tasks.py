"""The heavy work of an upgrade, as plain functions of paths: port a patch onto the new base, evaluate a model.

They touch no database (only the driver writes to the registry), so they run the same in the driver's
threads (``--executor local``) or as Ray tasks on other machines (``--executor ray``), provided those machines
see the same paths (the registry's blob cache, the base checkpoints, the run directory): a shared file system.
Outputs are written atomically (a ``.NAME.partial-*`` directory renamed into place), so a killed task leaves
either the whole output or a partial directory the driver recognises and removes.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any


def complete_model(path: Path) -> bool:
    """A model directory a finished port wrote (the rename is atomic: present means whole)."""
    return (path / "config.json").is_file() and (path / "patchlab.json").is_file()


def write_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file renamed into place (whole or absent)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def clean_partials(out: Path) -> list[str]:
    """Remove what a killed writer of ``out`` left beside it (``.NAME.partial-*``, ``.NAME.old-*``)."""
    removed = []
    if out.parent.is_dir():
        for p in out.parent.iterdir():
            if p.name.startswith((f".{out.name}.partial-", f".{out.name}.old-", f".{out.name}.tmp-")):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p.name)
    return removed


def port_task(
    *,
    out: str,
    target: str,
    patch_dir: str | None,
    finetuned: str | None,
    source_base: str | None,
    vocab_policy: str | None,
    device: str,
    diagnose: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Port onto ``target`` at ``out``: fused (``target + (ft − source_base)``) when the fine-tune is given,
    else from the stored patch. An existing complete output (a killed run's) is reused.

    ``diagnose`` (``source_base``, ``intruders``, ``out``: a JSON path; ``pair_later``), with a port from the
    stored patch: the sums of the patch's diagnosis gathered on the port's own reads of the target and Δ
    (``Diagnosis.observed``), written to ``out`` for the driver to finish (``Diagnosis.load_observed``). With
    ``pair_later`` (the patch records its drift sums and the driver measures the two bases' sums beside the
    port) the source base is not read here; else its rows are read on top."""
    import patchlab
    from patchlab.measure.diagnose import Diagnosis

    out_p = Path(out)
    clean_partials(out_p)
    if complete_model(out_p):
        return {"out": out, "reused": True, "fused": finetuned is not None, "diagnosed": False}
    if out_p.exists():
        shutil.rmtree(out_p)
    diag = None
    if finetuned is not None:
        patchlab.port_fused(finetuned, source_base, target, out_p, vocab_policy=vocab_policy, device=device)
    else:
        from patchlab.io.checkpoint import Checkpoint
        from patchlab.io.patch import Patch

        # the diagnosis and the port share the opened patch and target (their manifests and headers read once)
        patch, tgt = Patch.open(patch_dir), Checkpoint.open(target)  # type: ignore[arg-type]
        if diagnose is not None:
            diag = Diagnosis(
                patch,
                tgt,
                source_base=diagnose["source_base"],
                intruders=bool(diagnose.get("intruders")),
                device=device,
                pair_later=bool(diagnose.get("pair_later")),
            )
        observe = diag.observe if diag is not None else None
        patchlab.port(patch, tgt, out_p, vocab_policy=vocab_policy, device=device, observe=observe)
    if diag is not None and diagnose is not None:
        write_atomic(Path(diagnose["out"]), json.dumps(diag.observed()))
    return {"out": out, "reused": False, "fused": finetuned is not None, "diagnosed": diag is not None}


#: merge() keyword arguments a merged patch's recorded recipe (its manifest's provenance parameters) maps onto
RECIPE_KEYS = {
    "method": "method",
    "weights": "weights",
    "densities": "densities",
    "gammas": "gammas",
    "epsilons": "epsilons",
    "lambda": "lambda_",
    "normalize": "normalize",
    "rescale": "rescale",
    "sign_election": "sign_election",
    "seed": "seed",
}


def merge_recipe(parameters: dict[str, Any]) -> dict[str, Any]:
    """``patchlab.methods.merge.merge`` keyword arguments from a merged patch's recorded parameters."""
    kw = {arg: parameters[k] for k, arg in RECIPE_KEYS.items() if k in parameters}
    for k in ("rescale", "sign_election"):
        if kw.get(k) == "none":
            kw[k] = None
    for k in ("rank", "energy"):
        if (parameters.get("reencode") or {}).get(k) is not None:
            kw[k] = parameters["reencode"][k]
    return kw


def merge_task(
    *,
    patch_out: str,
    out: str,
    target: str,
    parents: list[str],
    recipe: dict[str, Any],
    vocab_policy: str | None,
    device: str,
) -> dict[str, Any]:
    """Rebuild a merged patch from its upgraded ``parents`` (patch directories on ``target``) with its recorded
    ``recipe`` at ``patch_out`` (a patch that records the recipe again), then apply it onto ``target`` at
    ``out`` (the model the suite evaluates). Complete outputs a killed run left are reused."""
    import patchlab

    patch_p, out_p = Path(patch_out), Path(out)
    clean_partials(patch_p)
    clean_partials(out_p)
    reused = (patch_p / "patch.json").is_file()
    if not reused:
        if patch_p.exists():
            shutil.rmtree(patch_p)
        patchlab.merge(parents, patch_p, base=target, vocab_policy=vocab_policy, device=device, **recipe)
    if not complete_model(out_p):
        if out_p.exists():
            shutil.rmtree(out_p)
        patchlab.apply(patch_p, target, out_p, device=device)
    return {"out": out, "patch": patch_out, "reused": reused, "fused": False}


def evaluate_task(*, model: str, suite: list[str], device: str, batch_size: int = 32) -> dict[str, Any]:
    """Evaluate ``model`` on the suite's task files; the ``EvalResult`` as JSON."""
    from patchlab.measure.evaluate import evaluate

    return evaluate(model, [Path(s) for s in suite], device=device, batch_size=batch_size).to_json()


def baseline_task(
    *,
    patch_dir: str,
    source_base: str,
    finetuned: str | None,
    scratch: str,
    suite: list[str],
    device: str,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Evaluate the previous version: its fine-tune when available, else the patch re-applied to its base
    (built in ``scratch``, removed afterwards)."""
    import patchlab

    if finetuned is not None:
        return evaluate_task(model=finetuned, suite=suite, device=device, batch_size=batch_size)
    out = Path(scratch)
    clean_partials(out)
    if out.exists():
        shutil.rmtree(out)
    try:
        patchlab.apply(patch_dir, source_base, out, device=device)
        return evaluate_task(model=str(out), suite=suite, device=device, batch_size=batch_size)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def port_and_evaluate_task(port: dict[str, Any] | None, evaluate: dict[str, Any] | None) -> dict[str, Any]:
    """One patch's port then evaluation, in one task (what a Ray worker runs)."""
    out: dict[str, Any] = {}
    if port is not None:
        out["port"] = port_task(**port)
    if evaluate is not None:
        out["evaluate"] = evaluate_task(**evaluate)
    return out


def reachable(paths: list[str]) -> list[str]:
    """The paths this process cannot see (a worker checks the driver's paths before any work)."""
    return [p for p in paths if not os.path.exists(p)]
