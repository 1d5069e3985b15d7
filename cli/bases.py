"""``patchlab base ...``: base model versions."""

# No "from __future__ import annotations": typer evaluates the option annotations.

from dataclasses import asdict
from typing import Annotated

import typer

from cli.common import JsonOpt, RegistryOpt, console, escape, fail, fmt_params, handled, open_registry, print_json
from patchlab.digests import short_digest

base_app = typer.Typer(help="Base model versions: add, refresh.", no_args_is_help=True)


@base_app.command("add")
@handled
def base_add(
    ref: Annotated[str, typer.Argument(help="FAMILY@VERSION (e.g. llama@v2), or FAMILY followed by VERSION.")],
    args: Annotated[list[str], typer.Argument(help="SOURCE: a local model directory, or a Hub repo id (org/name).")],
    revision: Annotated[
        str | None, typer.Option(help="Hub branch, tag or commit (default: main); recorded as its commit sha.")
    ] = None,
    no_download: Annotated[
        bool,
        typer.Option("--no-download", help="Hub: record the commit now, download and fingerprint on first use."),
    ] = False,
    release_order: Annotated[
        int | None, typer.Option(help="Position in the family's releases (default: after the newest).")
    ] = None,
    allow_nonfinite: Annotated[
        bool, typer.Option("--allow-nonfinite", help="Register it even if some weights are NaN/Inf.")
    ] = False,
    no_drift: Annotated[
        bool,
        typer.Option(
            "--no-drift",
            help="Do not measure how far it moved from the older releases that carry patches (an upgrade then "
            "measures it itself).",
        ),
    ] = False,
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Record a base version by location and fingerprint (weights are never copied).

    A new release of a family whose older releases carry patches is compared with each of them in the same
    command (one read of both; `--no-drift` skips it): the drift is recorded, so `patchlab upgrade` and its
    dry-run verdicts read neither base for it.

    A Hub repo id is resolved to a commit sha; only what a checkpoint needs (config, tokenizer, safetensors) is
    downloaded, into the Hugging Face cache, and fingerprinted; `org/name@sha` is recorded. Tokens come from
    huggingface_hub's usual places (HF_TOKEN, `hf auth login`); HF_HUB_OFFLINE=1 uses the local cache only.
    """
    if "@" in ref and len(args) == 1:
        family, version = ref.split("@", 1)
        source = args[0]
    elif "@" not in ref and len(args) == 2:
        family, (version, source) = ref, args
    else:
        fail("usage: patchlab base add FAMILY@VERSION SOURCE  (or FAMILY VERSION SOURCE)", 2)
    with open_registry(registry) as reg:
        b = reg.add_base(
            family,
            version,
            source,
            revision=revision,
            release_order=release_order,
            download=not no_download,
            allow_nonfinite=allow_nonfinite,
            drift=not no_drift,
        )
        drifts = reg.drifts_to(b.ref) if b.content is not None and not no_drift else {}
    if json_out:
        print_json({**b.to_dict(), "drift_from": {ref: asdict(st) for ref, st in drifts.items()}})
    elif b.content is None:
        console().print(
            f"added base [bold]{escape(b.ref)}[/] {escape(b.location)} "
            "(not downloaded: fetched and fingerprinted on first use)"
        )
    else:
        console().print(
            f"added base [bold]{escape(b.ref)}[/] {escape(b.location)} "
            f"({fmt_params(b.num_parameters)} params, {b.dtype or '?'}, content {short_digest(b.content)})"
        )
    for ref, st in drifts.items() if not json_out else ():
        rel = f"{st.drift_rel_base * 100:.3g}%" if st.drift_rel_base is not None else "n/a"
        console().print(
            f"  drift from {escape(ref)}: ‖Δbase‖/‖base‖ = {rel} over {fmt_params(st.numel)} weights "
            "(recorded for upgrades)"
        )


@base_app.command("refresh")
@handled
def base_refresh(
    ref: Annotated[str, typer.Argument(help="FAMILY@VERSION of a local base whose files were touched.")],
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Re-hash a local base whose files changed on disk: same weights -> its file records are updated; other
    weights -> refused (register them as a new version)."""
    with open_registry(registry) as reg:
        b = reg.refresh_base(ref)
    if json_out:
        print_json(b.to_dict())
    else:
        console().print(
            f"base [bold]{escape(b.ref)}[/]: weights unchanged (content {short_digest(b.content)}); "
            "file records updated"
        )
