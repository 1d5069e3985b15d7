"""``patchlab gate set|show``: what judges a patch when its family moves to a new base (its evaluation suite,
its gate expressions, the alias to move), per patch name or as a family's defaults."""

# No "from __future__ import annotations": typer evaluates the option annotations.

from pathlib import Path
from typing import Annotated

import typer

from cli.common import CliInputError, JsonOpt, RegistryOpt, console, escape, handled, open_registry, print_json

gate_app = typer.Typer(
    help="Evaluation suites and gates: what a ported patch must pass before its alias moves.", no_args_is_help=True
)


@gate_app.command("set")
@handled
def gate_set(
    name: Annotated[str, typer.Argument(help="A patch name (or, with --family, a family).")],
    suite: Annotated[
        list[Path] | None, typer.Option("--suite", help="A task file of the evaluation suite (repeatable).")
    ] = None,
    gate: Annotated[
        list[str] | None,
        typer.Option("--gate", help='A gate expression, e.g. "nfr <= 0.05" (repeatable; all must pass).'),
    ] = None,
    alias: Annotated[str | None, typer.Option(help="Alias to move when the gates pass (default: latest).")] = None,
    vocab_policy: Annotated[
        str | None, typer.Option(help="Family default: pad-zero, truncate, by-token or skip-embeddings.")
    ] = None,
    family: Annotated[bool, typer.Option("--family", help="NAME is a family: set its patches' defaults.")] = False,
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Set a patch name's evaluation suite and gates (or a family's defaults). Unset settings are kept."""
    if vocab_policy is not None and not family:
        raise CliInputError("--vocab-policy is a family setting: pass --family with the family's name")
    for f in suite or []:
        if not f.is_file():
            raise CliInputError(f"suite task file {f} does not exist; give a JSONL task file (see `patchlab eval`)")
    with open_registry(registry) as reg:
        g = reg.set_gate(
            name,
            family=family,
            suite=[str(f) for f in suite] if suite else None,
            expressions=gate or None,
            alias=alias,
            vocab_policy=vocab_policy,
        )
    if json_out:
        return print_json(g.to_dict())
    console().print(f"{g.scope_kind} {escape(g.scope)}: gate set")
    _print(g.to_dict())
    return None


@gate_app.command("show")
@handled
def gate_show(
    name: Annotated[str, typer.Argument(help="A patch name (or, with --family, a family).")],
    family: Annotated[bool, typer.Option("--family", help="NAME is a family.")] = False,
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Show what judges a patch name: its own settings and, for a patch, what applies after family defaults."""
    with open_registry(registry) as reg:
        own = reg.get_gate(name, family=family)
        eff = None
        if not family:
            fams = {p.base.split("@")[0] for p in reg.list_patches(name=name) if p.base}
            eff = reg.effective_gate(name, sorted(fams)[-1] if fams else None)
    if own is None and (eff is None or not eff.suite):
        raise CliInputError(
            f"no gate set for {'family' if family else 'patch'} {name!r}; set one with `patchlab gate set {name} "
            "--suite FILE --gate EXPR`"
        )
    if json_out:
        return print_json({"own": own.to_dict() if own else None, "effective": eff.to_dict() if eff else None})
    if own is not None:
        _print(own.to_dict())
    if eff is not None:
        console().print("[bold]effective[/] (patch, else family, else default):")
        _print({k: v for k, v in eff.to_dict().items() if k != "patch"})
    return None


def _print(d: dict) -> None:
    out = console()
    for k, v in d.items():
        if k in ("scope", "scope_kind"):
            continue
        shown = ", ".join(map(str, v)) if isinstance(v, (list, tuple)) else ("" if v is None else str(v))
        out.print(f"  {k}: {escape(shown)}")
