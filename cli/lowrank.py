"""CLI commands for portable patches: ``compress``, ``import-peft``, ``export-peft`` (thin shells)."""

# No "from __future__ import annotations": typer evaluates the option annotations, which refer to names
# imported inside register().

import re
from pathlib import Path
from typing import Annotated

import typer

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """``"200MB"`` → 200_000_000; ``"1.5GiB"``; plain numbers are bytes."""
    from patchlab.kernels.lowrank import LowRankError

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text or "")
    if not m or m.group(2).upper() not in _UNITS:
        raise LowRankError(f"cannot read size budget {text!r}; write e.g. 200MB, 1.5GB or 750000000")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def encoding_kwargs(
    rank: int | None,
    energy: float | None,
    density: float | None,
    budget: str | None,
    method: str,
    seed: int,
    embeddings: str,
) -> dict:
    return {
        "rank": rank,
        "energy": energy,
        "density": density,
        "budget_bytes": parse_size(budget) if budget is not None else None,
        "method": method,
        "seed": seed,
        "embeddings": embeddings,
    }


def _summary(patch) -> dict:
    t = patch.manifest.get("totals", {})
    return {
        "path": str(patch.path),
        "bytes": t.get("bytes"),
        "encodings": t.get("encodings"),
        "energy": t.get("energy"),
        "rel_error": t.get("rel_error"),
    }


def register(app: typer.Typer) -> None:
    from cli.main import DeviceOpt, JsonOpt, _escape, _out, _print_json, _size, handled

    @app.command()
    @handled
    def compress(
        patch: Annotated[Path, typer.Argument(help="Patch directory to re-encode.")],
        out: Annotated[Path, typer.Argument(help="Patch directory to write.")],
        rank: Annotated[int | None, typer.Option(help="Rank-R factors per matrix (truncated SVD).")] = None,
        energy: Annotated[float | None, typer.Option(help="Smallest rank keeping this share of ‖Δ‖².")] = None,
        density: Annotated[float | None, typer.Option(help="Sparse: keep this share of entries per tensor.")] = None,
        budget: Annotated[str | None, typer.Option(help="Low-rank within a size budget, e.g. 200MB.")] = None,
        method: Annotated[str, typer.Option(help="Sparse method: topk or dare.")] = "topk",
        seed: Annotated[int, typer.Option(help="Seed of DARE and of the randomized SVD.")] = 0,
        embeddings: Annotated[str, typer.Option(help="Embeddings/lm_head: dense (default) or encode.")] = "dense",
        storage_dtype: Annotated[str | None, typer.Option(help="float32, bfloat16, float16.")] = None,
        device: DeviceOpt = "auto",
        overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
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
            return _print_json(s)
        energy = "n/a (DARE)" if s["energy"] is None else f"{s['energy']:.4f}"
        _out().print(
            f"wrote {_escape(s['path'])}: {_size(s['bytes'])}, energy kept {energy}, "
            f"relative error {s['rel_error']:.4f} ({s['encodings']})"
        )
        return None

    @app.command("import-peft")
    @handled
    def import_peft_cmd(
        adapter: Annotated[Path, typer.Argument(help="PEFT LoRA adapter directory (adapter_config.json).")],
        base: Annotated[Path, typer.Argument(help="The base checkpoint the adapter was trained on.")],
        out: Annotated[Path, typer.Argument(help="Patch directory to write.")],
        storage_dtype: Annotated[str | None, typer.Option(help="float32 (default), bfloat16 or float16.")] = None,
        overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
        json_out: JsonOpt = False,
    ) -> None:
        """Turn a PEFT LoRA adapter into a low-rank patch (ΔW = s·B·A per module)."""
        from patchlab.methods.peft import import_peft

        p = import_peft(adapter, base, out, storage_dtype=storage_dtype, overwrite=overwrite)
        s = _summary(p)
        if json_out:
            return _print_json(s)
        _out().print(f"wrote {_escape(s['path'])}: {_size(s['bytes'])} ({s['encodings']})")
        return None

    @app.command("export-peft")
    @handled
    def export_peft_cmd(
        patch: Annotated[Path, typer.Argument(help="Patch directory (low-rank entries become LoRA modules).")],
        out: Annotated[Path, typer.Argument(help="Adapter directory to write.")],
        base: Annotated[
            Path | None, typer.Option(help="Base checkpoint: dense/sparse tensors go to modules_to_save.")
        ] = None,
        base_model_name_or_path: Annotated[
            str | None, typer.Option(help="Recorded in adapter_config.json (default: the patch's base path).")
        ] = None,
        skip_dense: Annotated[bool, typer.Option(help="Leave dense/sparse tensors out of the adapter.")] = False,
        overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
        json_out: JsonOpt = False,
    ) -> None:
        """Write a low-rank patch as a PEFT LoRA adapter that PeftModel.from_pretrained loads."""
        from patchlab.methods.peft import export_peft

        path = export_peft(
            patch,
            out,
            base=base,
            base_model_name_or_path=base_model_name_or_path,
            skip_dense=skip_dense,
            overwrite=overwrite,
        )
        if json_out:
            return _print_json({"path": str(path)})
        _out().print(f"wrote {_escape(str(path))}")
        return None
