"""``compress``, ``import-peft``, ``export-peft``: portable patches (low-rank, sparse, PEFT adapters)."""

# No "from __future__ import annotations": typer evaluates the option annotations.

from pathlib import Path
from typing import Annotated

import typer

from cli.common import (
    BudgetOpt,
    DensityOpt,
    DeviceOpt,
    EmbeddingsOpt,
    EnergyOpt,
    JsonOpt,
    OverwriteOpt,
    RankOpt,
    RegistryOpt,
    SeedOpt,
    SparseMethodOpt,
    StorageDtypeOpt,
    console,
    encoding_kwargs,
    escape,
    fmt_size,
    handled,
    is_ref,
    open_registry,
    print_json,
)

app = typer.Typer()


def _summary(patch) -> dict:
    t = patch.manifest.get("totals", {})
    return {
        "path": str(patch.path),
        "bytes": t.get("bytes"),
        "encodings": t.get("encodings"),
        "energy": t.get("energy"),
        "rel_error": t.get("rel_error"),
    }


@app.command()
@handled
def compress(
    patch: Annotated[Path, typer.Argument(help="Patch directory to re-encode.")],
    out: Annotated[Path, typer.Argument(help="Patch directory to write.")],
    rank: RankOpt = None,
    energy: EnergyOpt = None,
    density: DensityOpt = None,
    budget: BudgetOpt = None,
    method: SparseMethodOpt = "topk",
    seed: SeedOpt = 0,
    embeddings: EmbeddingsOpt = "dense",
    storage_dtype: StorageDtypeOpt = None,
    device: DeviceOpt = "auto",
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Re-encode a patch low-rank (--rank/--energy/--budget) or sparse (--density), tensor by tensor."""
    from patchlab.methods.compress import compress as _compress

    p = _compress(
        patch,
        out,
        storage_dtype=storage_dtype,
        device=device,
        overwrite=overwrite,
        **encoding_kwargs(rank, energy, density, budget, method, seed, embeddings),
    )
    s = _summary(p)
    if json_out:
        return print_json(s)
    energy = "n/a (DARE)" if s["energy"] is None else f"{s['energy']:.4f}"
    console().print(
        f"wrote {escape(s['path'])}: {fmt_size(s['bytes'])}, energy kept {energy}, "
        f"relative error {s['rel_error']:.4f} ({s['encodings']})"
    )
    return None


@app.command("import-peft")
@handled
def import_peft_cmd(
    adapter: Annotated[Path, typer.Argument(help="PEFT LoRA adapter directory (adapter_config.json).")],
    base: Annotated[Path, typer.Argument(help="The base checkpoint the adapter was trained on.")],
    out: Annotated[Path, typer.Argument(help="Patch directory to write.")],
    storage_dtype: StorageDtypeOpt = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Turn a PEFT LoRA adapter into a low-rank patch (ΔW = s·B·A per module)."""
    from patchlab.methods.peft import import_peft

    p = import_peft(adapter, base, out, storage_dtype=storage_dtype, overwrite=overwrite)
    s = _summary(p)
    if json_out:
        return print_json(s)
    console().print(f"wrote {escape(s['path'])}: {fmt_size(s['bytes'])} ({s['encodings']})")
    return None


@app.command("export-peft")
@handled
def export_peft_cmd(
    patch: Annotated[Path, typer.Argument(help="Patch directory (low-rank entries become LoRA modules).")],
    out: Annotated[Path, typer.Argument(help="Adapter directory to write.")],
    base: Annotated[
        str | None,
        typer.Option(
            help="Base checkpoint (a directory or family@version): dense/sparse tensors go to modules_to_save; "
            "recorded as the adapter's base."
        ),
    ] = None,
    base_model_name_or_path: Annotated[
        str | None, typer.Option(help="Recorded in adapter_config.json (default: the patch's base path).")
    ] = None,
    skip_dense: Annotated[bool, typer.Option(help="Leave dense/sparse tensors out of the adapter.")] = False,
    overwrite: OverwriteOpt = False,
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Write a low-rank patch as a PEFT LoRA adapter that PeftModel.from_pretrained loads."""
    from patchlab.methods.peft import export_peft

    if base is not None and is_ref(base):
        with open_registry(registry) as reg:
            base = str(reg.checkpoint_path(base))
    path = export_peft(
        patch,
        out,
        base=base,
        base_model_name_or_path=base_model_name_or_path,
        skip_dense=skip_dense,
        overwrite=overwrite,
    )
    if json_out:
        return print_json({"path": str(path)})
    console().print(f"wrote {escape(str(path))}")
    return None
