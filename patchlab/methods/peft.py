"""PEFT interop at the patch level: a LoRA adapter directory ↔ a patchlab low-rank patch.

- ``import_peft(adapter_dir, base, out)``: every LoRA module becomes a ``lowrank`` entry (ΔW = s·B·A, the
  adapter's own factors and scale kept as they are), ``lora_B`` biases and ``modules_to_save`` weights
  become ``dense`` entries (Δ = saved − base). The adapter is checked against the base before anything is
  written.
- ``export_peft(patch, out, base=...)``: ``lowrank`` entries become LoRA modules (scale folded into B);
  modules with dense or sparse entries become ``modules_to_save`` with their full weights ``base + Δ``,
  which needs the base checkpoint. ``PeftModel.from_pretrained(base_model, out)`` then reproduces
  ``patchlab.apply(patch, base)``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from patchlab.engine.executor import atomic_output, check_output
from patchlab.errors import IncompatiblePatchError
from patchlab.io.checkpoint import META_FILES, Checkpoint, parse_dtype
from patchlab.io.patch import Patch, PatchWriter
from patchlab.io.peft import CONFIG_NAME, ExportModule, check_shapes, read_peft_adapter, write_peft_adapter
from patchlab.kernels.delta import DeltaStats
from patchlab.names import is_input_embedding

__all__ = ["import_peft", "export_peft"]

_ROWS = 4096


def _lowrank_stats(A: torch.Tensor, B: torch.Tensor, scale: float, base_t: torch.Tensor) -> dict:
    st = DeltaStats()
    for r0 in range(0, B.shape[0], _ROWS):
        d = (B[r0 : r0 + _ROWS].float() @ A.float()).mul_(scale)
        st.update(d, base_t[r0 : r0 + _ROWS].float())
    return st.result()


def _dense_stats(d: torch.Tensor, base_t: torch.Tensor) -> dict:
    st = DeltaStats()
    st.update(d, base_t.float())
    return st.result()


def import_peft(
    adapter_dir: str | Path,
    base: str | Path | Checkpoint,
    out: str | Path,
    *,
    storage_dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
) -> Patch:
    """Turn a PEFT LoRA adapter trained on ``base`` into a patchlab patch at ``out``.

    Raises ``UnsupportedAdapterError`` (DoRA, LoHa, IA3, ...), ``PeftAdapterError`` (damaged or inconsistent
    adapter) or ``IncompatiblePatchError`` (shapes or names that do not fit ``base``) before writing.
    """
    adapter = read_peft_adapter(adapter_dir)
    base_ck = Checkpoint.open(base)
    check_shapes(adapter, {n: base_ck.info(n).shape for n in base_ck.names}, tied=base_ck.tied)
    out = Path(out)
    check_output(out, overwrite, "patch")
    store = parse_dtype(storage_dtype) or torch.float32
    entries: dict[str, dict] = {}
    unused: list[dict] = []
    with atomic_output(out, overwrite, "patch") as tmp:
        w = PatchWriter(tmp)
        for name in base_ck.names:  # checkpoint order
            e = adapter.entries.get(name)
            if e is None:
                continue
            bt = base_ck.tensor(name)
            meta: dict = {"op": "add", "shape": list(e.shape), "dtype": str(bt.dtype).removeprefix("torch.")}
            saved = adapter.base_layers.get(name)
            if e.kind == "lowrank" and (saved is None or torch.equal(saved, bt.float())):
                A, B = e.A.to(store), e.B.to(store)  # type: ignore[union-attr]
                meta.update(
                    encoding="lowrank",
                    keys={"A": f"{name}::A", "B": f"{name}::B"},
                    scale=e.scale,
                    rank=e.rank,
                    energy=1.0,
                    rel_error=0.0,
                    source=f"peft:{e.source}",
                    stats=_lowrank_stats(A, B, e.scale, bt),
                )
                meta["file"] = w.add({f"{name}::A": A.contiguous(), f"{name}::B": B.contiguous()})
            else:
                if e.kind == "lowrank":  # saved base layer differs from the base: loading it replaces W
                    d = saved - bt.float() + e.scale * (e.B @ e.A)  # type: ignore[operator]
                    src = "peft:base_layer+lora"
                elif e.kind == "full":
                    d = e.delta - bt.float()  # type: ignore[operator]
                    src = "peft:modules_to_save"
                    if not bool(d.any()):
                        why = "modules_to_save weight equals the base"
                        unused.append({"name": name, "reason": why, "parameters": bt.numel()})
                        continue
                else:
                    d = e.delta  # type: ignore[assignment]
                    src = f"peft:{e.source}"
                meta.update(encoding="dense", keys={"delta": name}, source=src, stats=_dense_stats(d, bt))
                meta["file"] = w.add({name: d.to(store).contiguous()})
            entries[name] = meta
        w.copy_files(base_ck.path, META_FILES)
        w.copy_files(adapter.path, [n for n in META_FILES if n != "config.json"] + [CONFIG_NAME])
        cfg = adapter.config
        w.finish(
            {
                "base": base_ck.describe(),
                "finetuned": {
                    "peft_adapter": str(adapter.path.resolve()),
                    "base_model_name_or_path": adapter.base_model_name_or_path,
                    "tied": base_ck.tied,
                },
                "method": "import-peft",
                "parameters": {
                    k: cfg.get(k)
                    for k in (
                        "r",
                        "lora_alpha",
                        "use_rslora",
                        "rank_pattern",
                        "alpha_pattern",
                        "fan_in_fan_out",
                        "lora_bias",
                        "modules_to_save",
                        "target_modules",
                        "peft_version",
                    )
                }
                | {"storage_dtype": str(store).removeprefix("torch."), "exact": False},
            },
            entries,
            unused,
        )
    return Patch.open(out)


def export_peft(
    patch: str | Path | Patch,
    out: str | Path,
    *,
    base: str | Path | Checkpoint | None = None,
    base_model_name_or_path: str | None = None,
    task_type: str | None = "CAUSAL_LM",
    dtype: str | torch.dtype | None = None,
    skip_dense: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write a low-rank patch as a PEFT LoRA adapter directory at ``out``.

    Dense and sparse ``add`` entries can only travel as ``modules_to_save`` (full weights ``base + Δ``):
    pass ``base``, or ``skip_dense=True`` to leave them out (the adapter then reproduces only the low-rank
    part), or compress the patch to low rank first. ``set``/``delete`` entries cannot be expressed in PEFT.
    """
    p = Patch.open(patch)
    out = Path(out)
    check_output(out, overwrite, "adapter")
    base_ck = Checkpoint.open(base) if base is not None else None
    cast = parse_dtype(dtype)
    modules: list[ExportModule] = []
    dense_by_module: dict[str, list[str]] = {}
    lowrank_by_module: dict[str, str] = {}
    problems: list[str] = []
    for e in p.entries():
        mod = e.name.rpartition(".")[0]
        if e.op != "add":
            if not skip_dense:
                problems.append(f"{e.name} ({e.op}: PEFT cannot add or remove tensors)")
            continue
        if e.encoding == "lowrank":
            lowrank_by_module[mod] = e.name
        else:
            dense_by_module.setdefault(mod, []).append(e.name)
    if dense_by_module and base_ck is None and not skip_dense:
        names = [n for ns in dense_by_module.values() for n in ns]
        problems.append(
            f"{len(names)} dense/sparse tensors ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''}) can only "
            "be exported as modules_to_save with their full weights: pass base= (--base), skip_dense=True "
            "(--skip-dense) to leave them out, or compress the patch to low rank first"
        )
    if problems:
        raise IncompatiblePatchError(f"cannot export {p.path} as a PEFT adapter: " + "; ".join(problems))
    full: dict[str, torch.Tensor] = {}
    if base_ck is not None and not skip_dense:
        missing = [n for ns in dense_by_module.values() for n in ns if n not in base_ck]
        if missing:
            raise IncompatiblePatchError(f"the base {base_ck.path} lacks {missing[:4]}; pass the patch's own base")
        for mod in dense_by_module:
            # modules_to_save replaces the whole module: write every parameter of it, patched or not.
            params = [n for n in base_ck.names if n.rpartition(".")[0] == mod]
            for n in params:
                bt = base_ck.tensor(n)
                w = bt.float() + p.entry(n).dense() if n in p else bt.float()
                full[n] = w.to(bt.dtype)
    for mod, name in lowrank_by_module.items():
        if mod in dense_by_module and not skip_dense:
            continue  # the whole module travels as modules_to_save (its full weight includes this ΔW)
        e = p.entry(name)
        A, B = e.stored("A").float(), e.stored("B").float()
        emb = is_input_embedding(name)
        modules.append(ExportModule(name, A, B, float(e.meta.get("scale", 1.0)), embedding=emb))
    if base_model_name_or_path is None:  # the base it was given, else the one the patch was made on
        base_model_name_or_path = str(base_ck.path) if base_ck is not None else p.provenance.get("base", {}).get("path")
    return write_peft_adapter(
        out,
        modules,
        full_weights=full,
        base_model_name_or_path=base_model_name_or_path,
        task_type=task_type,
        dtype=cast,
        overwrite=overwrite,
    )
