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
from typing import Annotated

import typer

from cli import bases, catalog, compat, demo, evals, labels, lowrank, maintenance, transfer
from cli.common import STATE, RegistryOpt, WorkersOpt, workers_env

app = typer.Typer(
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
for group in (catalog, maintenance, transfer, lowrank, demo, compat):
    app.add_typer(group.app)
# command groups: patchlab base|alias|tag|evals ...
app.add_typer(bases.base_app, name="base")
app.add_typer(labels.alias_app, name="alias")
app.add_typer(labels.tag_app, name="tag")
app.add_typer(evals.evals_app, name="evals")

if __name__ == "__main__":  # pragma: no cover
    app()
