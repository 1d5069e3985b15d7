"""``init``, ``add``, ``ls``, ``show``, ``log``, ``path``: create the registry, register patches, and read
what it holds."""

# No "from __future__ import annotations": typer evaluates the option annotations.

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from cli.common import (
    STATE,
    JsonOpt,
    KindOpt,
    RegistryOpt,
    RelationOpt,
    console,
    err_console,
    escape,
    fmt_num,
    fmt_params,
    fmt_size,
    handled,
    lineage_tree,
    open_registry,
    print_json,
    print_table,
)
from patchlab.digests import short_digest

app = typer.Typer()


@app.command()
@handled
def init(registry: RegistryOpt = None, json_out: JsonOpt = False) -> None:
    """Create a registry (or open and upgrade an existing one)."""
    from registry import Registry

    with Registry.init(registry or STATE.registry) as reg:
        if json_out:
            print_json({"url": reg.location.url, "home": str(reg.home)})
        else:
            console().print(f"registry ready at [bold]{escape(str(reg.home))}[/] ({escape(reg.location.url)})")


@app.command("add")
@handled
def add(
    path: Annotated[Path, typer.Argument(help="A patch directory (patch.json + shards).")],
    name: Annotated[str | None, typer.Option(help="Patch name (default: the directory name).")] = None,
    base: Annotated[
        str | None, typer.Option(help="Base it was made on, family@version (default: matched by fingerprint).")
    ] = None,
    parent: Annotated[
        list[str] | None, typer.Option("--parent", help="A patch this one came from (repeatable).")
    ] = None,
    relation: RelationOpt = "port",
    tag: Annotated[list[str] | None, typer.Option("--tag", help="Tag to add (repeatable).")] = None,
    message: Annotated[str | None, typer.Option("--message", "-m", help="A description.")] = None,
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Register a patch directory: its files go to the blob store, it becomes NAME@<next version>."""
    with open_registry(registry) as reg:
        p = reg.add_patch(
            path, name=name, base=base, parents=parent or (), relation=relation, tags=tag or (), description=message
        )
    if json_out:
        print_json(p.to_dict())
    else:
        console().print(
            f"registered [bold]{escape(p.ref)}[/] on {escape(p.base or '?')} "
            f"({p.num_tensors} tensors, {fmt_size(p.size)}, {p.digest[:12]})"
        )


@app.command("ls")
@handled
def ls(
    bases: Annotated[bool, typer.Option("--bases", help="List base versions instead of patches.")] = False,
    derived: Annotated[bool, typer.Option("--derived", help="List derived models instead of patches.")] = False,
    name: Annotated[str | None, typer.Option(help="Only this patch name.")] = None,
    family: Annotated[str | None, typer.Option(help="Only this family.")] = None,
    base: Annotated[str | None, typer.Option(help="Only patches made on this base (family@version).")] = None,
    tag: Annotated[str | None, typer.Option(help="Only patches with this tag.")] = None,
    latest: Annotated[bool, typer.Option("--latest", help="Only the newest version of each name.")] = False,
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """List patches (default), base versions (--bases) or derived models (--derived)."""
    with open_registry(registry) as reg:
        if bases:
            items = reg.list_bases(family)
            if json_out:
                return print_json([b.to_dict() for b in items])
            headers = ("base", "source", "params", "dtype", "content", "aliases", "tags")
            rows = [
                (
                    b.ref,
                    b.location,
                    fmt_params(b.num_parameters),
                    b.dtype or "",
                    short_digest(b.content) if b.content else "",
                    ", ".join(b.aliases),
                    ", ".join(b.tags),
                )
                for b in items
            ]
        elif derived:
            ditems = reg.list_derived(name)
            if json_out:
                return print_json([d.to_dict() for d in ditems])
            headers = ("ref", "kind", "patch", "onto", "path", "created")
            rows = [(d.ref, d.kind, d.patch, d.base or "", d.path, d.created_at) for d in ditems]
        else:
            patches = reg.list_patches(name=name, base=base, family=family, tag=tag, all_versions=not latest)
            if json_out:
                return print_json([p.to_dict() for p in patches])
            headers = ("patch", "base", "encoding", "tensors", "size", "digest", "aliases", "tags", "created")
            rows = [
                (
                    p.ref,
                    p.base or "",
                    p.encoding or "",
                    str(p.num_tensors),
                    fmt_size(p.size),
                    p.digest[:12],
                    ", ".join(p.aliases),
                    ", ".join(p.tags),
                    p.created_at,
                )
                for p in patches
            ]
    if not rows:
        err_console().print("(nothing registered yet)" if not (name or family or base or tag) else "(no matches)")
    else:
        print_table(headers, rows)
    return None


@app.command()
@handled
def show(
    ref: Annotated[str, typer.Argument(help="A patch (name, name@n, digest prefix, alias), base or derived:ID.")],
    kind: KindOpt = None,
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Everything the registry knows about one patch, base version or derived model."""
    with open_registry(registry) as reg:
        target = reg.resolve(ref, kind=kind)
        if target.kind == "patch":
            info: Any = reg.get_patch(target.label, detail=True)
            evals = reg.list_evaluations(target.label, kind="patch")
        elif target.kind == "base":
            info = reg.get_base(target.label)
            evals = reg.list_evaluations(target.label, kind="base")
        else:
            info = reg.get_derived(target.label)
            evals = reg.list_evaluations(target.label)
        pushes = reg.list_pushes(target.label, kind=target.kind) if target.kind != "base" else []
    if json_out:
        return print_json(
            {
                "kind": target.kind,
                **info.to_dict(),
                "evaluations": [e.to_dict() for e in evals],
                "pushes": [p.to_dict() for p in pushes],
            }
        )
    out = console()
    d = info.to_dict()
    skip = {"stats", "files", "id", "parents", "totals", "ref"}
    t = Table(show_header=False, box=None)
    t.add_row("[bold]" + target.kind, "[bold]" + escape(info.ref))
    for k, v in d.items():
        if k in skip or v in (None, (), [], ""):
            continue
        if k == "size":
            v = fmt_size(v)
        elif k == "num_parameters":
            v = fmt_params(v)
        elif isinstance(v, (list, tuple)):
            v = ", ".join(map(str, v))
        elif isinstance(v, dict):
            v = json.dumps(v, sort_keys=True)
        t.add_row(k, escape(str(v)))
    if target.kind == "patch":
        if info.parents:
            t.add_row("parents", ", ".join(f"{r} ({rel})" for r, rel in info.parents))
        t.add_row("files", ", ".join(f"{n} ({fmt_size(sz)})" for n, _, sz in info.files))
    out.print(t)
    if target.kind == "patch" and info.stats:
        st = Table("tensor", "op", "encoding", "shape", "norm", "rel_norm", "changed", title="tensors", box=None)
        for name, e in list(info.stats.items())[:50]:
            s_ = e.get("stats") or {}
            st.add_row(
                name,
                str(e.get("op", "")),
                str(e.get("encoding", "")),
                "×".join(map(str, e.get("shape") or [])),
                fmt_num(s_.get("norm")),
                fmt_num(s_.get("rel_norm")),
                fmt_num(s_.get("changed_frac")),
            )
        out.print(st)
        if len(info.stats) > 50:
            out.print(f"... and {len(info.stats) - 50} more tensors (--json lists all)")
    if evals:
        et = Table("evaluation", "dataset", "n", "metrics", title="evaluations", box=None)
        for e in evals:
            et.add_row(str(e.id), e.dataset, str(e.num_instances), json.dumps(e.metrics, sort_keys=True))
        out.print(et)
    if pushes:
        pt = Table("repo", "revision", "commit", "as", "new commit", "when", title="pushes", box=None)
        for p in pushes:
            pt.add_row(
                escape(p.repo_id), escape(p.revision), p.commit_sha[:12], p.kind,
                "yes" if p.created_commit else "no", p.created_at,
            )  # fmt: skip
        out.print(pt)
    return None


@app.command()
@handled
def log(
    ref: Annotated[str, typer.Argument(help="A patch reference.")],
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """The lineage of a patch: what it was ported or merged from, back to its origin."""
    with open_registry(registry) as reg:
        node = reg.lineage(ref)
    if json_out:
        return print_json(node.to_dict())
    console().print(lineage_tree(node))
    return None


@app.command()
@handled
def path(
    ref: Annotated[str, typer.Argument(help="A patch reference.")],
    registry: RegistryOpt = None,
) -> None:
    """Materialise a registered patch as a verified directory and print its path."""
    with open_registry(registry) as reg:
        typer.echo(str(reg.patch_path(ref)))
