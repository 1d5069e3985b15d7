"""``diff``, ``apply``, ``port``: extract a patch and put it onto a model, recording the results in the registry
(unless --no-register)."""

# No "from __future__ import annotations": typer evaluates the option annotations.

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from cli.common import (
    AlphaByPatternOpt,
    BudgetOpt,
    ByteProgress,
    CliInputError,
    DensityOpt,
    DeviceOpt,
    EmbeddingsOpt,
    EnergyOpt,
    JsonOpt,
    NoRegisterOpt,
    OverwriteOpt,
    RankOpt,
    RegistryOpt,
    RelationOpt,
    SeedOpt,
    SparseMethodOpt,
    StorageDtypeOpt,
    VocabPolicyOpt,
    WorkersOpt,
    encoding_kwargs,
    escape,
    handled,
    is_ref,
    open_registry,
    parse_alpha_by_pattern,
    print_json,
    registered,
    status,
    will_register,
    workers_env,
)

app = typer.Typer()


@app.command()
@handled
def diff(
    base: Annotated[str, typer.Argument(help="Base checkpoint: a directory or family@version.")],
    finetuned: Annotated[str, typer.Argument(help="Fine-tuned checkpoint directory.")],
    out: Annotated[Path, typer.Argument(help="Patch directory to write.")],
    name: Annotated[str | None, typer.Option(help="Register as this name (default: the output dir name).")] = None,
    storage_dtype: StorageDtypeOpt = None,
    vocab_policy: VocabPolicyOpt = None,
    device: DeviceOpt = "auto",
    overwrite: OverwriteOpt = False,
    parent: Annotated[
        list[str] | None, typer.Option("--parent", help="A patch this one came from, e.g. a port (repeatable).")
    ] = None,
    relation: RelationOpt = "port",
    rank: RankOpt = None,
    energy: EnergyOpt = None,
    density: DensityOpt = None,
    budget: BudgetOpt = None,
    method: SparseMethodOpt = "topk",
    seed: SeedOpt = 0,
    embeddings: EmbeddingsOpt = "dense",
    no_register: NoRegisterOpt = False,
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
    workers: WorkersOpt = None,
) -> None:
    """Extract the patch (diff vector) between a base and its fine-tune, and register it.

    With --rank/--energy/--budget (low-rank) or --density (sparse) each Δ is encoded as it is computed.
    """
    import patchlab

    encoded = any(v is not None for v in (rank, energy, density, budget))
    if encoded:
        enc_kw = encoding_kwargs(rank, energy, density, budget, method, seed, embeddings)
    reg = None if no_register and not is_ref(base) else open_registry(registry)
    try:
        base_path = reg.checkpoint_path(base) if reg is not None else base
        if not no_register and reg is not None:
            # every precondition of the registration, before a byte is written
            reg.check_patch_registration(
                out, name=name, base=base if is_ref(base) else None, base_path=base_path, parents=parent or (),
                relation=relation,
            )
            will_register(reg)
        if encoded:
            from patchlab.methods.compress import extract_encoded

            with workers_env(workers):
                patch = extract_encoded(
                    base_path,
                    finetuned,
                    out,
                    storage_dtype=storage_dtype,
                    vocab_policy=vocab_policy,
                    device=device,
                    overwrite=overwrite,
                    **enc_kw,
                )
        else:
            with workers_env(workers), ByteProgress("extracting", not json_out) as progress:
                patch = patchlab.extract(
                    base_path,
                    finetuned,
                    out,
                    storage_dtype=storage_dtype,
                    vocab_policy=vocab_policy,
                    device=device,
                    overwrite=overwrite,
                    progress=progress,
                )
        info = None
        if not no_register and reg is not None:
            info = reg.add_patch(
                patch.path, name=name, base=base if is_ref(base) else None, parents=parent or (), relation=relation
            )
            registered(patch.path, info.ref)
    finally:
        if reg is not None:
            reg.close()
    if json_out:
        return print_json({"path": str(patch.path), "patch": info.to_dict() if info else None})
    msg = f"wrote {escape(str(patch.path))}"
    if info:
        msg += f"; registered [bold]{escape(info.ref)}[/] on {escape(info.base or '?')}"
    status(msg)
    return None


def transfer_command(op: str, target_help: str, force_help: str, doc: str) -> Callable[..., None]:
    """The ``apply`` or ``port`` command: they take the same arguments and differ only in the library verb
    they call and the operation they record. With ``--from-finetune FT --source BASE`` the delta is
    ``FT − BASE``, computed on the fly (the fused path: no patch is written or read) and the positional
    arguments are ``TARGET OUT``."""

    def command(
        patch: Annotated[
            str, typer.Argument(help="A patch directory or registered patch reference (TARGET with --from-finetune).")
        ],
        target: Annotated[str, typer.Argument(help=target_help + " (OUT with --from-finetune).")],
        out: Annotated[Path | None, typer.Argument(help="Model directory to write.", show_default=False)] = None,
        from_finetune: Annotated[
            Path | None,
            typer.Option(
                "--from-finetune",
                metavar="FT",
                help="Take the delta as FT − SOURCE on the fly (fused: no patch written); needs --source.",
                show_default=False,
            ),
        ] = None,
        source: Annotated[
            str | None,
            typer.Option(
                "--source",
                metavar="BASE",
                help="The base FT was fine-tuned from (a directory or family@version); with --from-finetune.",
                show_default=False,
            ),
        ] = None,
        alpha: Annotated[float, typer.Option(help="Scale of the patch.")] = 1.0,
        alpha_by_pattern: AlphaByPatternOpt = None,
        vocab_policy: VocabPolicyOpt = None,
        device: DeviceOpt = "auto",
        overwrite: OverwriteOpt = False,
        force: Annotated[bool, typer.Option(help=force_help)] = False,
        allow_nonfinite: Annotated[
            bool, typer.Option("--allow-nonfinite", help="Write the model even if weights are NaN/Inf.")
        ] = False,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan; write nothing.")] = False,
        no_register: NoRegisterOpt = False,
        registry: RegistryOpt = None,
        json_out: JsonOpt = False,
        workers: WorkersOpt = None,
    ) -> None:
        import patchlab

        fused = from_finetune is not None
        if fused:
            if source is None:
                raise CliInputError("--from-finetune needs --source BASE (the base the fine-tune was made from)")
            if out is not None:
                raise CliInputError(
                    f"with --from-finetune the arguments are TARGET OUT; got a third one ({escape(str(out))})"
                )
            patch, target, out = "", patch, Path(target)
        elif source is not None:
            raise CliInputError("--source goes with --from-finetune FT; to use a stored patch, pass only PATCH")
        elif out is None:
            raise CliInputError(f"missing OUT: patchlab {op} PATCH TARGET OUT")
        by_pattern = parse_alpha_by_pattern(alpha_by_pattern)
        # the registry is needed to resolve references, and to record a result made from a registered patch;
        # a port between plain directories never opens it (no database start-up on the fast path)
        need_reg = (not fused and is_ref(patch)) or is_ref(target) or (fused and is_ref(source))
        reg = open_registry(registry) if need_reg else None
        try:
            target_path = reg.checkpoint_path(target) if reg is not None else target
            if reg is not None and not no_register and not fused and is_ref(patch):
                if target is not None and is_ref(target):
                    reg.get_base(target)  # recorded below: it must resolve before anything is written
                will_register(reg)
            options = dict(
                alpha=alpha,
                alpha_by_pattern=by_pattern,
                vocab_policy=vocab_policy,
                device=device,
                overwrite=overwrite,
                force=force,
                dry_run=dry_run,
                allow_nonfinite=allow_nonfinite,
            )
            with workers_env(workers), ByteProgress(
                f"{op}ing" if op == "port" else "applying", not (json_out or dry_run)
            ) as progress:
                if fused:
                    src_path = reg.checkpoint_path(source) if reg is not None else source
                    result = patchlab.port_fused(
                        from_finetune, src_path, target_path, out, progress=progress, **options
                    )
                else:
                    fn = patchlab.apply if op == "apply" else patchlab.port
                    patch_dir = reg.resolve_patch_path(patch) if reg is not None else Path(patch)
                    result = fn(patch_dir, target_path, out, progress=progress, **options)
            if dry_run:
                return print_json(result.to_json()) if json_out else typer.echo(result.render())
            derived = None
            if reg is not None and not no_register and not fused and is_ref(patch):
                params: dict = {"alpha": alpha}
                if by_pattern:
                    params["alpha_by_pattern"] = dict(by_pattern)
                derived = reg.add_derived(
                    patch, result.path, base=target if is_ref(target) else None, kind=op, parameters=params
                )
                registered(result.path, derived.ref)
        finally:
            if reg is not None:
                reg.close()
        if json_out:
            return print_json({"path": str(result.path), "derived": derived.to_dict() if derived else None})
        msg = f"wrote {escape(str(result.path))}"
        if derived:
            msg += f"; recorded {derived.ref}"
        status(msg)
        return None

    command.__doc__ = doc
    command.__name__ = op
    return handled(command)


apply = app.command("apply")(
    transfer_command(
        "apply",
        "Target checkpoint: a directory or family@version.",
        "Apply even if the plan would skip part of the patch.",
        "Write TARGET + alpha * patch as a full model; records a derived model for registered patches.",
    )
)
port = app.command("port")(
    transfer_command(
        "port",
        "The newer base: a directory or family@version.",
        "Port even when the plan would skip part of the patch.",
        "Port a patch onto a newer base version (fine-tuning transfer) and record the derived model.\n\n"
        "With --from-finetune FT --source BASE: TARGET + alpha * (FT − BASE) in one pass, no patch written.",
    )
)
