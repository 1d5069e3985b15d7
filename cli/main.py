"""The ``patchlab`` command line: a thin shell over ``registry.Registry`` and ``patchlab``.

Parses, prints and exits; no SQL and no tensor math here. Every ``PatchlabError`` becomes a one-line
``error: ...`` on stderr and a non-zero exit (a traceback only with ``-v``); commands that read have
``--json``; every command takes ``--registry PATH`` (a directory, a ``.db`` file or a SQLAlchemy URL).
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from rich.tree import Tree

app = typer.Typer(
    name="patchlab",
    help="Manage base-model versions and fine-tuning patches: register, list, trace, port.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
base_app = typer.Typer(help="Base model versions: add.", no_args_is_help=True)
alias_app = typer.Typer(help="Movable names (prod, latest...) for patches and base versions.", no_args_is_help=True)
tag_app = typer.Typer(help="Free-form labels on patches and base versions.", no_args_is_help=True)
app.add_typer(base_app, name="base")
app.add_typer(alias_app, name="alias")
app.add_typer(tag_app, name="tag")
evals_app = typer.Typer(help="Evaluation results stored in the registry.", no_args_is_help=True)
app.add_typer(evals_app, name="evals")

F = TypeVar("F", bound=Callable[..., Any])


class _State:
    registry: str | None = None
    verbose: bool = False
    quiet: bool = False


STATE = _State()

RegistryOpt = Annotated[
    str | None,
    typer.Option(
        "--registry",
        "-R",
        help="Registry: a directory, a .db file or a SQLAlchemy URL (default: $PATCHLAB_HOME, else the user data dir).",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of a table.")]
KindOpt = Annotated[
    str | None, typer.Option("--kind", help="Say what the reference names when it is ambiguous: patch or base.")
]


def _out() -> Console:
    return Console(soft_wrap=False, highlight=False, width=None if sys.stdout.isatty() else 160)


def _status(message: str) -> None:
    """A status line ("wrote ..."), silenced by ``-q``."""
    if not STATE.quiet:
        _out().print(message)


def _err() -> Console:
    return Console(stderr=True, soft_wrap=True)


def _fail(message: str, code: int = 1) -> None:
    _err().print(f"[bold red]error:[/] {message}", markup=True, highlight=False)
    raise typer.Exit(code)


def handled(fn: F) -> F:
    """Turn patchlab errors into one line on stderr and a non-zero exit (a traceback only with -v)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from patchlab.errors import PatchlabError

        try:
            return fn(*args, **kwargs)
        except PatchlabError as exc:
            if STATE.verbose:
                _err().print_exception()
            _fail(_escape(str(exc)), getattr(exc, "exit_code", 1) or 1)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        return None

    return wrapper  # type: ignore[return-value]


def _escape(s: str) -> str:
    from rich.markup import escape

    return escape(s)


def _open(registry: str | None, *, create: bool = False):
    from registry import Registry

    return Registry(registry or STATE.registry, create=create)


def _print_json(data: Any) -> None:
    # indented for a terminal; compact when piped (json's C encoder only runs without indent: 5x faster)
    indent = 2 if sys.stdout.isatty() else None
    typer.echo(json.dumps(data, indent=indent, default=str))


def _size(n: int | None) -> str:
    if n is None:
        return ""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _params(n: int | None) -> str:
    if n is None:
        return ""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


@app.callback()
def main(
    registry: RegistryOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks on errors.")] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress bars or status lines (errors and requested output only).")
    ] = False,
) -> None:
    """patchlab: base versions, fine-tuning patches and their lineage, in one registry."""
    STATE.registry = registry
    STATE.verbose = verbose or bool(os.environ.get("PATCHLAB_DEBUG"))
    STATE.quiet = quiet


# ---- registry lifecycle ---------------------------------------------------------------------------


@app.command()
@handled
def init(registry: RegistryOpt = None, json_out: JsonOpt = False) -> None:
    """Create a registry (or open and upgrade an existing one)."""
    from registry import Registry

    with Registry.init(registry or STATE.registry) as reg:
        if json_out:
            _print_json({"url": reg.location.url, "home": str(reg.home)})
        else:
            _out().print(f"registry ready at [bold]{_escape(str(reg.home))}[/] ({_escape(reg.location.url)})")


# ---- bases -----------------------------------------------------------------------------------------


@base_app.command("add")
@handled
def base_add(
    ref: Annotated[str, typer.Argument(help="FAMILY@VERSION (e.g. llama@v2), or FAMILY followed by VERSION.")],
    args: Annotated[
        list[str], typer.Argument(help="SOURCE (a local model directory, or a Hub repo id with --revision).")
    ],
    revision: Annotated[str | None, typer.Option(help="Hub revision (commit or tag) for a repo id.")] = None,
    release_order: Annotated[
        int | None, typer.Option(help="Position in the family's releases (default: after the newest).")
    ] = None,
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Record a base version by location and fingerprint (weights are never copied)."""
    if "@" in ref and len(args) == 1:
        family, version = ref.split("@", 1)
        source = args[0]
    elif "@" not in ref and len(args) == 2:
        family, (version, source) = ref, args
    else:
        _fail("usage: patchlab base add FAMILY@VERSION SOURCE  (or FAMILY VERSION SOURCE)", 2)
    with _open(registry) as reg:
        b = reg.add_base(family, version, source, revision=revision, release_order=release_order)
    if json_out:
        _print_json(b.to_dict())
    else:
        _out().print(
            f"added base [bold]{_escape(b.ref)}[/] {_escape(b.location)} "
            f"({_params(b.num_parameters)} params, {b.dtype or '?'}, content {(b.content or '?')[:12]})"
        )


# ---- patches ---------------------------------------------------------------------------------------


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
    relation: Annotated[str, typer.Option(help="How it came from its parents: port, merge or derived.")] = "port",
    tag: Annotated[list[str] | None, typer.Option("--tag", help="Tag to add (repeatable).")] = None,
    message: Annotated[str | None, typer.Option("--message", "-m", help="A description.")] = None,
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Register a patch directory: its files go to the blob store, it becomes NAME@<next version>."""
    with _open(registry) as reg:
        p = reg.add_patch(
            path, name=name, base=base, parents=parent or (), relation=relation, tags=tag or (), description=message
        )
    if json_out:
        _print_json(p.to_dict())
    else:
        _out().print(
            f"registered [bold]{_escape(p.ref)}[/] on {_escape(p.base or '?')} "
            f"({p.num_tensors} tensors, {_size(p.size)}, {p.digest[:12]})"
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
    with _open(registry) as reg:
        if bases:
            items = reg.list_bases(family)
            if json_out:
                return _print_json([b.to_dict() for b in items])
            headers = ("base", "source", "params", "dtype", "content", "aliases", "tags")
            rows = [
                (
                    b.ref,
                    b.location,
                    _params(b.num_parameters),
                    b.dtype or "",
                    (b.content or "")[:12],
                    ", ".join(b.aliases),
                    ", ".join(b.tags),
                )
                for b in items
            ]
        elif derived:
            ditems = reg.list_derived(name)
            if json_out:
                return _print_json([d.to_dict() for d in ditems])
            headers = ("ref", "kind", "patch", "onto", "path", "created")
            rows = [(d.ref, d.kind, d.patch, d.base or "", d.path, d.created_at) for d in ditems]
        else:
            patches = reg.list_patches(name=name, base=base, family=family, tag=tag, all_versions=not latest)
            if json_out:
                return _print_json([p.to_dict() for p in patches])
            headers = ("patch", "base", "encoding", "tensors", "size", "digest", "aliases", "tags", "created")
            rows = [
                (
                    p.ref,
                    p.base or "",
                    p.encoding or "",
                    str(p.num_tensors),
                    _size(p.size),
                    p.digest[:12],
                    ", ".join(p.aliases),
                    ", ".join(p.tags),
                    p.created_at,
                )
                for p in patches
            ]
    if not rows:
        _err().print("(nothing registered yet)" if not (name or family or base or tag) else "(no matches)")
    else:
        _print_table(headers, rows)
    return None


RICH_ROWS = 1000


def _print_table(headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """A rich table; past RICH_ROWS rows, plain aligned columns (rich measures every cell: 20 s for 10k)."""
    if len(rows) <= RICH_ROWS:
        t = Table(*headers, box=None)
        for r in rows:
            t.add_row(*(_escape(c) for c in r))
        _out().print(t)
        return
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    sys.stdout.write("\n".join(lines) + "\n")


@app.command()
@handled
def show(
    ref: Annotated[str, typer.Argument(help="A patch (name, name@n, digest prefix, alias), base or derived:ID.")],
    kind: KindOpt = None,
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Everything the registry knows about one patch, base version or derived model."""
    from registry import refs

    with _open(registry) as reg:
        with reg.db.read() as s:
            target = refs.resolve_any(s, ref, kind)
        if target.kind == "patch":
            info: Any = reg.get_patch(target.label, detail=True)
            evals = reg.list_evaluations(target.label, kind="patch")
        elif target.kind == "base":
            info = reg.get_base(target.label)
            evals = reg.list_evaluations(target.label, kind="base")
        else:
            info = reg.get_derived(target.label)
            evals = reg.list_evaluations(target.label)
    if json_out:
        return _print_json({"kind": target.kind, **info.to_dict(), "evaluations": [e.to_dict() for e in evals]})
    out = _out()
    d = info.to_dict()
    skip = {"stats", "files", "id", "parents", "totals", "ref"}
    t = Table(show_header=False, box=None)
    t.add_row("[bold]" + target.kind, "[bold]" + _escape(info.ref))
    for k, v in d.items():
        if k in skip or v in (None, (), [], ""):
            continue
        if k == "size":
            v = _size(v)
        elif k == "num_parameters":
            v = _params(v)
        elif isinstance(v, (list, tuple)):
            v = ", ".join(map(str, v))
        elif isinstance(v, dict):
            v = json.dumps(v, sort_keys=True)
        t.add_row(k, _escape(str(v)))
    if target.kind == "patch":
        if info.parents:
            t.add_row("parents", ", ".join(f"{r} ({rel})" for r, rel in info.parents))
        t.add_row("files", ", ".join(f"{n} ({_size(sz)})" for n, _, sz in info.files))
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
                _num(s_.get("norm")),
                _num(s_.get("rel_norm")),
                _num(s_.get("changed_frac")),
            )
        out.print(st)
        if len(info.stats) > 50:
            out.print(f"... and {len(info.stats) - 50} more tensors (--json lists all)")
    if evals:
        et = Table("evaluation", "dataset", "n", "metrics", title="evaluations", box=None)
        for e in evals:
            et.add_row(str(e.id), e.dataset, str(e.num_instances), json.dumps(e.metrics, sort_keys=True))
        out.print(et)
    return None


def _num(v: Any) -> str:
    return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


@app.command()
@handled
def log(
    ref: Annotated[str, typer.Argument(help="A patch reference.")],
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """The lineage of a patch: what it was ported or merged from, back to its origin."""
    with _open(registry) as reg:
        node = reg.lineage(ref)
    if json_out:
        return _print_json(node.to_dict())
    _out().print(_lineage_tree(node))
    return None


def _lineage_tree(node: Any) -> Tree:
    """A rich tree of a patch and, below it, what it was ported or merged from."""

    def label(n) -> str:
        rel = f"[dim]{n.relation} of[/] " if n.relation else ""
        return f"{rel}[bold]{_escape(n.ref)}[/] on {_escape(n.base or '?')} [dim]{n.digest[:12]}[/]"

    def grow(tree: Tree, n) -> None:
        for p in n.parents:
            grow(tree.add(label(p)), p)

    tree = Tree(label(node))
    grow(tree, node)
    return tree


@app.command()
@handled
def path(
    ref: Annotated[str, typer.Argument(help="A patch reference.")],
    registry: RegistryOpt = None,
) -> None:
    """Materialise a registered patch as a verified directory and print its path."""
    with _open(registry) as reg:
        typer.echo(str(reg.patch_path(ref)))


# ---- aliases and tags ------------------------------------------------------------------------------


@alias_app.command("set")
@handled
def alias_set(
    alias: Annotated[str, typer.Argument(help="Alias name, e.g. prod.")],
    ref: Annotated[str, typer.Argument(help="What it points at: a patch or family@version.")],
    kind: KindOpt = None,
    registry: RegistryOpt = None,
) -> None:
    """Point an alias at a patch or base version (moves it if already set)."""
    with _open(registry) as reg:
        a = reg.set_alias(alias, ref, kind=kind)
    _out().print(f"{_escape(a.ref)} -> [bold]{_escape(a.target)}[/]")


@alias_app.command("rm")
@handled
def alias_rm(
    alias: Annotated[str, typer.Argument(help="scope@alias, e.g. llama@prod or sql-fix@prod.")],
    registry: RegistryOpt = None,
) -> None:
    """Remove an alias."""
    with _open(registry) as reg:
        a = reg.remove_alias(alias)
    _out().print(f"removed alias {_escape(a.ref)} (was {_escape(a.target)})")


@alias_app.command("ls")
@handled
def alias_ls(registry: RegistryOpt = None, json_out: JsonOpt = False) -> None:
    """List aliases."""
    with _open(registry) as reg:
        items = reg.list_aliases()
    if json_out:
        return _print_json([a.to_dict() for a in items])
    t = Table("alias", "target", box=None)
    for a in items:
        t.add_row(a.ref, a.target)
    _out().print(t)
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
    with _open(registry) as reg:
        label = ""
        for t in tags:
            label = getattr(reg, method)(ref, t, kind=kind)
    _out().print(f"{verb} {_escape(label)}: {_escape(', '.join(tags))}")


# ---- evaluations -----------------------------------------------------------------------------------


@evals_app.command("add")
@handled
def evals_add(
    ref: Annotated[str, typer.Argument(help="What was evaluated: a patch, family@version or derived:ID.")],
    result: Annotated[Path, typer.Argument(help="An evaluation result file (EvalResult.save / patchlab eval).")],
    kind: KindOpt = None,
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Store an evaluation result file against a patch, base version or derived model (one entry per task)."""
    with _open(registry) as reg:
        infos = reg.record_eval_result(ref, result, kind=kind)
    if json_out:
        return _print_json([e.to_dict() for e in infos])
    for e in infos:
        _out().print(f"recorded evaluation {e.id}: {_escape(e.target)} on {_escape(e.dataset)} ({e.num_instances})")
    return None


@evals_app.command("ls")
@handled
def evals_ls(
    ref: Annotated[str | None, typer.Argument(help="Only evaluations of this patch/base/derived model.")] = None,
    kind: KindOpt = None,
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """List stored evaluations."""
    with _open(registry) as reg:
        items = reg.list_evaluations(ref, kind=kind)
    if json_out:
        return _print_json([e.to_dict() for e in items])
    rows = [(str(e.id), e.target, e.dataset, str(e.num_instances), _metric(e.metrics), e.created_at) for e in items]
    if rows:
        _print_table(("id", "target", "dataset", "n", "accuracy", "created"), rows)
    else:
        _err().print("(no evaluations)")
    return None


def _metric(m: Any) -> str:
    v = (m or {}).get("accuracy") if isinstance(m, dict) else None
    return f"{v:.4f}" if isinstance(v, (int, float)) else ""


@evals_app.command("show")
@handled
def evals_show(
    evaluation_id: Annotated[int, typer.Argument(help="Evaluation id (see `patchlab evals ls`).")],
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """One evaluation with its per-instance results."""
    with _open(registry) as reg:
        e = reg.get_evaluation(evaluation_id)
    if json_out:
        return _print_json(e.to_dict())
    _out().print(
        f"evaluation {e.id}: [bold]{_escape(e.target)}[/] on {_escape(e.dataset)}, {e.num_instances} instances, "
        f"{_escape(json.dumps(e.metrics, sort_keys=True))}"
    )
    rows = [
        (str(r["id"]), _short(r.get("prediction")), _short(r.get("gold")), str(r.get("correct")), _num(r.get("score")))
        for r in e.results
    ]
    if rows:
        _print_table(("id", "prediction", "gold", "correct", "score"), rows)
    return None


def _short(v: Any, n: int = 40) -> str:
    s = v if isinstance(v, str) else json.dumps(v)
    return s if len(s) <= n else s[: n - 1] + "…"


# ---- maintenance -----------------------------------------------------------------------------------


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
    with _open(registry) as reg:
        removed = reg.rm(ref, kind=kind, cascade=cascade)
    if json_out:
        return _print_json({"removed": removed})
    for r in removed:
        _out().print(f"removed {_escape(r)}")
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
    with _open(registry) as reg:
        report = reg.gc(grace_seconds=grace, dry_run=dry_run)
    if json_out:
        return _print_json(report.to_dict())
    verb = "would remove" if dry_run else "removed"
    _out().print(
        f"{verb} {len(report.removed)} blobs ({_size(report.freed_bytes)} freed), kept {report.kept}"
        + (f", {report.skipped_young} unreferenced but younger than {grace:g}s" if report.skipped_young else "")
    )
    return None


@app.command()
@handled
def verify(registry: RegistryOpt = None, json_out: JsonOpt = False) -> None:
    """Re-hash every stored blob; report damaged or missing ones and what they break (exit 1 if any)."""
    with _open(registry) as reg:
        report = reg.verify()
    if json_out:
        _print_json(report.to_dict())
    else:
        out = _out()
        for p in report.problems:
            out.print(f"[red]{p.state}[/] blob {p.digest[:12]} used by {_escape(', '.join(p.patches))}")
        for b in report.missing_bases:
            out.print(f"[yellow]warning:[/] base {_escape(b)}: its directory is gone")
        out.print(
            f"checked {report.checked} blobs: "
            + ("all good" if report.ok else f"{len(report.problems)} problems; re-add the affected patches")
        )
    if not report.ok:
        raise typer.Exit(1)


# ---- core operations (registered unless --no-register) ----------------------------------------------

NoRegisterOpt = Annotated[bool, typer.Option("--no-register", help="Do not record the result in the registry.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu or cuda.")]


class _Bytes:
    """A rich progress display for the core's ``progress(nbytes)`` callback (stderr, terminals only)."""

    def __init__(self, what: str, enabled: bool) -> None:
        self.what, self._progress, self._task = what, None, None
        self.enabled = enabled and sys.stderr.isatty() and not STATE.quiet

    def __enter__(self):
        if not self.enabled:
            return None
        from rich.progress import BarColumn, DownloadColumn, Progress, SpinnerColumn, TextColumn, TransferSpeedColumn

        self._progress = Progress(
            SpinnerColumn(),
            TextColumn(self.what),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=_err(),
            transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task(self.what, total=None)
        return self._advance

    def _advance(self, nbytes: int) -> None:
        self._progress.advance(self._task, nbytes)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()


def _is_ref(s: str) -> bool:
    from registry.refs import looks_like_path

    return not looks_like_path(s)


@app.command()
@handled
def diff(
    base: Annotated[str, typer.Argument(help="Base checkpoint: a directory or family@version.")],
    finetuned: Annotated[str, typer.Argument(help="Fine-tuned checkpoint directory.")],
    out: Annotated[Path, typer.Argument(help="Patch directory to write.")],
    name: Annotated[str | None, typer.Option(help="Register as this name (default: the output dir name).")] = None,
    storage_dtype: Annotated[str | None, typer.Option(help="float32 (exact, default), bfloat16 or float16.")] = None,
    vocab_policy: Annotated[str | None, typer.Option(help="pad-zero, truncate, by-token, skip-embeddings.")] = None,
    device: DeviceOpt = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
    parent: Annotated[
        list[str] | None, typer.Option("--parent", help="A patch this one came from, e.g. a port (repeatable).")
    ] = None,
    relation: Annotated[str, typer.Option(help="How it came from its parents: port, merge or derived.")] = "port",
    rank: Annotated[int | None, typer.Option(help="Store each matrix as rank-R factors (truncated SVD).")] = None,
    energy: Annotated[
        float | None, typer.Option(help="Low-rank: smallest rank per matrix keeping this share of ||Δ||², in (0, 1].")
    ] = None,
    density: Annotated[float | None, typer.Option(help="Sparse: keep this share of entries per tensor.")] = None,
    budget: Annotated[str | None, typer.Option(help="Low-rank under a size budget for the patch, e.g. 200MB.")] = None,
    method: Annotated[str, typer.Option(help="Sparse method: topk or dare (random drop + rescale).")] = "topk",
    seed: Annotated[int, typer.Option(help="Seed of DARE and of the randomized SVD.")] = 0,
    embeddings: Annotated[str, typer.Option(help="Embeddings/lm_head: dense (default) or encode.")] = "dense",
    no_register: NoRegisterOpt = False,
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Extract the patch (diff vector) between a base and its fine-tune, and register it.

    With --rank/--energy/--budget (low-rank) or --density (sparse) each Δ is encoded as it is computed.
    """
    import patchlab

    encoded = any(v is not None for v in (rank, energy, density, budget))
    if encoded:
        from cli.lowrank import encoding_kwargs

        enc_kw = encoding_kwargs(rank, energy, density, budget, method, seed, embeddings)
    reg = None if no_register and not _is_ref(base) else _open(registry)
    try:
        base_path = reg.checkpoint_path(base) if reg is not None else base
        if encoded:
            from patchlab.methods.compress import extract_encoded

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
            with _Bytes("extracting", not json_out) as progress:
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
                patch.path, name=name, base=base if _is_ref(base) else None, parents=parent or (), relation=relation
            )
    finally:
        if reg is not None:
            reg.close()
    if json_out:
        return _print_json({"path": str(patch.path), "patch": info.to_dict() if info else None})
    msg = f"wrote {_escape(str(patch.path))}"
    if info:
        msg += f"; registered [bold]{_escape(info.ref)}[/] on {_escape(info.base or '?')}"
    _status(msg)
    return None


def _apply_like(
    op: str,
    patch: str,
    target: str,
    out: Path,
    alpha: float,
    vocab_policy: str | None,
    device: str,
    overwrite: bool,
    force: bool,
    dry_run: bool,
    no_register: bool,
    registry: str | None,
    json_out: bool,
) -> None:
    import patchlab

    fn = patchlab.apply if op == "apply" else patchlab.port
    need_reg = _is_ref(patch) or _is_ref(target) or not no_register
    reg = _open(registry) if need_reg else None
    try:
        patch_dir = reg.resolve_patch_path(patch) if reg is not None else Path(patch)
        target_path = reg.checkpoint_path(target) if reg is not None else target
        with _Bytes(f"{op}ing" if op == "port" else "applying", not (json_out or dry_run)) as progress:
            result = fn(
                patch_dir,
                target_path,
                out,
                alpha=alpha,
                vocab_policy=vocab_policy,
                device=device,
                overwrite=overwrite,
                force=force,
                dry_run=dry_run,
                progress=progress,
            )
        if dry_run:
            return _print_json(result.to_json()) if json_out else typer.echo(result.render())
        derived = None
        if reg is not None and not no_register and _is_ref(patch):
            derived = reg.add_derived(
                patch, result.path, base=target if _is_ref(target) else None, kind=op, parameters={"alpha": alpha}
            )
    finally:
        if reg is not None:
            reg.close()
    if json_out:
        return _print_json({"path": str(result.path), "derived": derived.to_dict() if derived else None})
    msg = f"wrote {_escape(str(result.path))}"
    if derived:
        msg += f"; recorded {derived.ref}"
    _status(msg)
    return None


def _apply_command(op: str, target_help: str, force_help: str, doc: str) -> Callable[..., None]:
    """``apply`` and ``port`` take the same arguments and differ only in the operation they record."""

    def command(
        patch: Annotated[str, typer.Argument(help="A patch directory or registered patch reference.")],
        target: str,
        out: Annotated[Path, typer.Argument(help="Model directory to write.")],
        alpha: Annotated[float, typer.Option(help="Scale of the patch.")] = 1.0,
        vocab_policy: Annotated[str | None, typer.Option(help="pad-zero, truncate, by-token, skip-embeddings.")] = None,
        device: DeviceOpt = "auto",
        overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
        force: bool = False,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan; write nothing.")] = False,
        no_register: NoRegisterOpt = False,
        registry: RegistryOpt = None,
        json_out: JsonOpt = False,
    ) -> None:
        _apply_like(
            op,
            patch,
            target,
            out,
            alpha,
            vocab_policy,
            device,
            overwrite,
            force,
            dry_run,
            no_register,
            registry,
            json_out,
        )

    # this module postpones annotations, which typer evaluates in module globals: set the two that
    # depend on the command as objects
    command.__annotations__["target"] = Annotated[str, typer.Argument(help=target_help)]
    command.__annotations__["force"] = Annotated[bool, typer.Option(help=force_help)]
    command.__doc__ = doc
    command.__name__ = op
    return command


apply = app.command("apply")(
    handled(
        _apply_command(
            "apply",
            "Target checkpoint: a directory or family@version.",
            "Apply even if the plan would skip part of the patch.",
            "Write TARGET + alpha * patch as a full model; records a derived model for registered patches.",
        )
    )
)
port = app.command("port")(
    handled(
        _apply_command(
            "port",
            "The newer base: a directory or family@version.",
            "Port even when the plan would skip part of the patch.",
            "Port a patch onto a newer base version (fine-tuning transfer) and record the derived model.",
        )
    )
)


from cli.compat import register as _register_compat  # noqa: E402
from cli.demo import register as _register_demo  # noqa: E402
from cli.lowrank import register as _register_lowrank  # noqa: E402

_register_lowrank(app)
_register_demo(app)
_register_compat(app)

if __name__ == "__main__":  # pragma: no cover
    # Run the app of the importable module, not of __main__: command modules (compat, lowrank, demo)
    # import cli.main, and a second copy would leave the global options (-R, -v) on the wrong STATE.
    from cli.main import app as _app

    _app()
