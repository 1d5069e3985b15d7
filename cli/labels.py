"""``patchlab alias ...``, ``patchlab tag ...``: movable names and free-form labels on patches and base versions."""

# No "from __future__ import annotations": typer evaluates the option annotations.

from typing import Annotated

import typer
from rich.table import Table

from cli.common import JsonOpt, KindOpt, RegistryOpt, console, escape, handled, open_registry, print_json

alias_app = typer.Typer(help="Movable names (prod, latest...) for patches and base versions.", no_args_is_help=True)
tag_app = typer.Typer(help="Free-form labels on patches and base versions.", no_args_is_help=True)


@alias_app.command("set")
@handled
def alias_set(
    alias: Annotated[str, typer.Argument(help="Alias name, e.g. prod.")],
    ref: Annotated[str, typer.Argument(help="What it points at: a patch or family@version.")],
    kind: KindOpt = None,
    registry: RegistryOpt = None,
) -> None:
    """Point an alias at a patch or base version (moves it if already set)."""
    with open_registry(registry) as reg:
        a = reg.set_alias(alias, ref, kind=kind)
    console().print(f"{escape(a.ref)} -> [bold]{escape(a.target)}[/]")


@alias_app.command("rm")
@handled
def alias_rm(
    alias: Annotated[str, typer.Argument(help="scope@alias, e.g. llama@prod or sql-fix@prod.")],
    registry: RegistryOpt = None,
) -> None:
    """Remove an alias."""
    with open_registry(registry) as reg:
        a = reg.remove_alias(alias)
    console().print(f"removed alias {escape(a.ref)} (was {escape(a.target)})")


@alias_app.command("ls")
@handled
def alias_ls(registry: RegistryOpt = None, json_out: JsonOpt = False) -> None:
    """List aliases."""
    with open_registry(registry) as reg:
        items = reg.list_aliases()
    if json_out:
        return print_json([a.to_dict() for a in items])
    t = Table("alias", "target", box=None)
    for a in items:
        t.add_row(a.ref, a.target)
    console().print(t)
    return None


@tag_app.command("add")
@handled
def tag_add(
    ref: Annotated[str, typer.Argument(help="A patch or family@version.")],
    tags: Annotated[list[str], typer.Argument(help="Tags to add.")],
    kind: KindOpt = None,
    registry: RegistryOpt = None,
) -> None:
    """Tag a patch or base version."""
    _retag(registry, "add_tag", "tagged", ref, tags, kind)


@tag_app.command("rm")
@handled
def tag_rm(
    ref: Annotated[str, typer.Argument(help="A patch or family@version.")],
    tags: Annotated[list[str], typer.Argument(help="Tags to remove.")],
    kind: KindOpt = None,
    registry: RegistryOpt = None,
) -> None:
    """Remove tags from a patch or base version."""
    _retag(registry, "remove_tag", "untagged", ref, tags, kind)


def _retag(registry: str | None, method: str, verb: str, ref: str, tags: list[str], kind: str | None) -> None:
    """Add or remove each tag (``Registry.add_tag`` / ``remove_tag``) and say what was done."""
    with open_registry(registry) as reg:
        label = ""
        for t in tags:
            label = getattr(reg, method)(ref, t, kind=kind)
    console().print(f"{verb} {escape(label)}: {escape(', '.join(tags))}")
