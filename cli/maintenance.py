"""``rm``, ``gc``, ``verify``: remove entries, collect unreferenced blobs, re-hash the store."""

# No "from __future__ import annotations": typer evaluates the option annotations.

from typing import Annotated

import typer

from cli.common import JsonOpt, KindOpt, RegistryOpt, console, escape, fmt_size, handled, open_registry, print_json

app = typer.Typer()


@app.command()
@handled
def rm(
    ref: Annotated[str, typer.Argument(help="A patch, family@version or derived:ID.")],
    cascade: Annotated[
        bool, typer.Option("--cascade", help="Also remove what depends on it (child patches, derived, aliases).")
    ] = False,
    kind: KindOpt = None,
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Remove an entry (blobs stay until `patchlab gc`); refuses while others depend on it."""
    with open_registry(registry) as reg:
        removed = reg.rm(ref, kind=kind, cascade=cascade)
    if json_out:
        return print_json({"removed": removed})
    for r in removed:
        console().print(f"removed {escape(r)}")
    return None


@app.command()
@handled
def gc(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only report what would be removed.")] = False,
    grace: Annotated[
        float, typer.Option(help="Keep unreferenced blobs younger than this many seconds (writes in flight).")
    ] = 3600.0,
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Delete blobs that no registry entry refers to."""
    with open_registry(registry) as reg:
        report = reg.gc(grace_seconds=grace, dry_run=dry_run)
    if json_out:
        return print_json(report.to_dict())
    verb = "would remove" if dry_run else "removed"
    console().print(
        f"{verb} {len(report.removed)} blobs ({fmt_size(report.freed_bytes)} freed), kept {report.kept}"
        + (f", {report.skipped_young} unreferenced but younger than {grace:g}s" if report.skipped_young else "")
    )
    return None


@app.command()
@handled
def verify(registry: RegistryOpt = None, json_out: JsonOpt = False) -> None:
    """Re-hash every stored blob; report damaged or missing ones and what they break (exit 1 if any)."""
    with open_registry(registry) as reg:
        report = reg.verify()
    if json_out:
        print_json(report.to_dict())
    else:
        out = console()
        for p in report.problems:
            out.print(f"[red]{p.state}[/] blob {p.digest[:12]} used by {escape(', '.join(p.patches))}")
        for b in report.missing_bases:
            out.print(f"[yellow]warning:[/] base {escape(b)}: its directory is gone")
        out.print(
            f"checked {report.checked} blobs: "
            + ("all good" if report.ok else f"{len(report.problems)} problems; re-add the affected patches")
        )
    if not report.ok:
        raise typer.Exit(1)
