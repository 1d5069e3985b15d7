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
    """Delete blobs that no registry entry refers to, and what killed commands left (partial outputs,
    scratch copies); list outputs that were written but never recorded."""
    with open_registry(registry) as reg:
        report = reg.gc(grace_seconds=grace, dry_run=dry_run)
    if json_out:
        return print_json(report.to_dict())
    verb = "would remove" if dry_run else "removed"
    out = console()
    for x in report.leftovers:
        out.print(f"{verb} {escape(x)}")
    for o in report.orphans:
        out.print(f"[yellow]orphan:[/] {escape(o)} was written but never recorded; rerun the command that made it")
    out.print(
        f"{verb} {len(report.removed)} blobs ({fmt_size(report.freed_bytes)} freed), kept {report.kept}"
        + (f", {report.skipped_young} unreferenced but younger than {grace:g}s" if report.skipped_young else "")
        + (
            f"; {len(report.leftovers)} leftovers of killed commands ({fmt_size(report.leftover_bytes)})"
            if report.leftovers
            else ""
        )
    )
    return None


@app.command()
@handled
def verify(
    bases: Annotated[
        bool, typer.Option("--bases", help="Also re-hash every local base's weights (slow: reads them all).")
    ] = False,
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Re-hash every stored blob and check every local base's files (--bases: re-hash their weights too);
    report damaged or missing blobs, changed bases and what they break (exit 1 if any)."""
    with open_registry(registry) as reg:
        report = reg.verify(full_bases=bases)
    if json_out:
        print_json(report.to_dict())
    else:
        out = console()
        for p in report.problems:
            out.print(f"[red]{p.state}[/] blob {p.digest[:12]} used by {escape(', '.join(p.patches))}")
        for b in report.missing_bases:
            out.print(f"[yellow]warning:[/] base {escape(b)}: its directory is gone")
        for b, why in report.changed_bases:
            fam = b.rsplit("@", 1)[0]
            out.print(
                f"[red]changed[/] base {escape(b)}: {escape(why)}; `patchlab base refresh {escape(b)}` if only "
                f"file times changed, else register the new weights: `patchlab base add {escape(fam)}@NEW PATH`"
            )
        n = len(report.problems) + len(report.changed_bases)
        out.print(
            f"checked {report.checked} blobs and {report.checked_bases} bases: "
            + ("all good" if report.ok else f"{n} problems; re-add the affected patches from their directories")
        )
    if not report.ok:
        raise typer.Exit(1)
