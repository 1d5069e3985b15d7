"""``patchlab demo``: the main job on the bundled tiny family, in a throwaway registry (a thin shell over
``registry.workflows.demo``)."""

# No "from __future__ import annotations": typer evaluates the option annotations.

import json
import shutil
from pathlib import Path
from typing import Annotated

import typer

from cli.common import STATE, DeviceOpt, JsonOpt, console, handled, lineage_tree, quiet_transformers

app = typer.Typer()


@app.command()
@handled
def demo(
    work: Annotated[
        Path | None, typer.Option(help="Keep the registry, patches and models here (default: a temp dir).")
    ] = None,
    fixtures: Annotated[Path | None, typer.Option(help="The bundled fixtures directory (default: found).")] = None,
    device: DeviceOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """Register v1 and v2 of the tiny family, diff a fine-tune of v1, port it to v2, show lineage and
    task accuracy before and after."""
    from rich.table import Table

    from registry.workflows.demo import run_demo

    quiet_transformers()
    out = console()
    log = (lambda s: None) if json_out or STATE.quiet else (lambda s: out.print(f"[dim]•[/] {s}"))
    if work is None:
        from patchlab.io.outputs import scratch_dir

        tmp = scratch_dir(None, "patchlab-demo-")  # marked with this process: `patchlab gc` finds it if killed
        try:
            result = run_demo(tmp, fixtures, device=device, log=log)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    else:
        result = run_demo(work, fixtures, device=device, log=log)
    if json_out:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    out.print(f"\nlineage of {result.ported_patch} (alias prod):")
    out.print(lineage_tree(result.lineage))
    t = Table(title="tiny family: task accuracy (exact match) and general ability (multiple choice)")
    t.add_column("model")
    t.add_column("task", justify="right")
    t.add_column("general", justify="right")
    for label, acc in result.accuracy.items():
        t.add_row(label, f"{acc:.1%}", f"{result.general[label]:.1%}")
    out.print(t)
    if result.recovered is not None:
        out.print(f"the training-free port recovers [bold]{result.recovered:.0%}[/] of the fine-tune's gain on v2")
    if work is not None:
        out.print(f"registry, patches and models kept in {work}")
