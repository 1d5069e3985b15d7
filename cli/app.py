"""The ``patchlab`` command line: the Typer app, its global options and its command groups.

A thin shell over ``registry.Registry`` and ``patchlab``: parses, prints and exits; no SQL, no tensor math,
no metrics. Every ``PatchlabError`` becomes a one-line ``error: ...`` on stderr and a non-zero exit (a
traceback only with ``-v``); commands that read have ``--json``; every command takes ``--registry PATH``
(a directory, a ``.db`` file or a SQLAlchemy URL).

This module imports the command modules to assemble the app; no command module imports it (shared helpers
are in ``cli.common``).
"""

# No "from __future__ import annotations": typer evaluates the option annotations.

import os
import sys
from typing import Annotated

import typer
from typer.core import TyperGroup

from cli import (
    bases,
    catalog,
    compat,
    demo,
    edit,
    evals,
    gate,
    hub,
    labels,
    lowrank,
    maintenance,
    merge,
    transfer,
    upgrade,
)
from cli.common import STATE, RegistryOpt, WorkersOpt, err_console, escape, workers_env

#: patchlab's own flags, accepted after the command as well as before it (``patchlab ls -q``)
GLOBAL_FLAGS = ("-q", "--quiet", "-v", "--verbose")
GLOBAL_WITH_VALUE = ("-R", "--registry")


def hoist_global_flags(group, args: list[str]) -> list[str]:
    """Move -q/-v found after the command in front of it, and a --json given before the command to after
    it (every command that prints data has --json); ``--`` ends the options as usual."""
    args = list(args)
    i = 0
    while i < len(args) and args[i].startswith("-") and args[i] != "--":
        i += 2 if args[i] in GLOBAL_WITH_VALUE else 1
    if i >= len(args) or args[i] not in group.commands:
        return args
    head, rest = args[:i], args[i:]
    moved, kept = [], []
    for k, a in enumerate(rest):
        if a == "--":
            kept += rest[k:]
            break
        (moved if a in GLOBAL_FLAGS else kept).append(a)
    tail = []
    if "--json" in head:
        head = [a for a in head if a != "--json"]
        tail = ["--json"] if "--json" not in kept else []
    if "--" in kept:
        cut = kept.index("--")
        kept = kept[:cut] + tail + kept[cut:]
    else:
        kept = kept + tail
    return head + moved + kept


class PatchlabGroup(TyperGroup):
    def parse_args(self, ctx, args: list[str]) -> list[str]:
        return super().parse_args(ctx, hoist_global_flags(self, args))

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # noqa: ANN001
        """Usage errors (a missing option, a bad value) end in one line too, like every other failure."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        from typer.core import _click

        try:
            rv = super().main(args, prog_name, complete_var, False, **extra)
        except _click.exceptions.ClickException as e:
            ctx = getattr(e, "ctx", None)
            where = f"; see `{ctx.command_path} --help`" if ctx is not None else ""
            err_console().print(f"[bold red]error:[/] {escape(e.format_message())}{escape(where)}", highlight=False)
            sys.exit(e.exit_code)
        except typer.Abort:
            err_console().print("[bold red]error:[/] aborted", highlight=False)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=PatchlabGroup,
    name="patchlab",
    help="Manage base-model versions and fine-tuning patches: register, list, trace, port.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def main(
    ctx: typer.Context,
    registry: RegistryOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks on errors.")] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress bars or status lines (errors and requested output only).")
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON (passed on to the command).")] = False,
    workers: WorkersOpt = None,
) -> None:
    """patchlab: base versions, fine-tuning patches and their lineage, in one registry."""
    if workers is not None:  # for every command below; restored when the command's context closes
        cm = workers_env(workers)
        cm.__enter__()
        ctx.call_on_close(lambda: cm.__exit__(None, None, None))
    STATE.registry = registry
    STATE.verbose = verbose or bool(os.environ.get("PATCHLAB_DEBUG"))
    STATE.quiet = quiet


# top-level commands, in the order `patchlab --help` lists them
for group in (catalog, maintenance, transfer, merge, lowrank, edit, hub, demo, compat):
    app.add_typer(group.app)
# command groups: patchlab base|alias|tag|evals ...
app.add_typer(bases.base_app, name="base")
app.add_typer(labels.alias_app, name="alias")
app.add_typer(labels.tag_app, name="tag")
app.add_typer(evals.evals_app, name="evals")
app.add_typer(gate.gate_app, name="gate")
app.add_typer(upgrade.upgrade_app, name="upgrade")
app.add_typer(upgrade.app)

if __name__ == "__main__":  # pragma: no cover
    app()
