"""What every command module shares: the global state set by ``patchlab``'s own options, the consoles,
``handled`` (errors -> one line and an exit code), the option types used by more than one command, and
formatting. Imports nothing from the command modules or ``cli.app``."""

# No "from __future__ import annotations": typer evaluates the option annotations.

import contextlib
import functools
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from rich.tree import Tree

from patchlab.errors import PatchlabError

F = TypeVar("F", bound=Callable[..., Any])


class State:
    """What ``patchlab``'s own options (before the command) set."""

    registry: str | None = None
    verbose: bool = False
    quiet: bool = False


STATE = State()


class CliInputError(PatchlabError):
    """A command-line argument that names nothing usable (what was wrong and what to pass instead)."""


# ---- option types shared by several commands ------------------------------------------------------------

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
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu or cuda.")]
NoRegisterOpt = Annotated[bool, typer.Option("--no-register", help="Do not record the result in the registry.")]
OverwriteOpt = Annotated[bool, typer.Option(help="Replace OUT if it exists.")]
VocabPolicyOpt = Annotated[str | None, typer.Option(help="pad-zero, truncate, by-token, skip-embeddings.")]
StorageDtypeOpt = Annotated[
    str | None,
    typer.Option(
        help="Dtype of the stored Δ: default the fine-tune's own, exact through residuals; float32 (exact), "
        "bfloat16 or float16 (smaller; exact only when it is the fine-tune's dtype).",
        show_default=False,
    ),
]
RelationOpt = Annotated[str, typer.Option(help="How it came from its parents: port, merge or derived.")]
WorkersOpt = Annotated[
    int | None,
    typer.Option(
        "--workers",
        min=1,
        help="Worker threads (default: $PATCHLAB_WORKERS, else one per core this process may use).",
        show_default=False,
    ),
]
AlphaByPatternOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--alpha-by-pattern",
        metavar="GLOB=ALPHA",
        help="Scale tensors whose name matches GLOB by ALPHA instead of --alpha (repeatable; the first match wins).",
        show_default=False,
    ),
]

# how each Δ is encoded (patchlab diff, patchlab compress): see encoding_kwargs
RankOpt = Annotated[int | None, typer.Option(help="Store each matrix as rank-R factors (truncated SVD).")]
EnergyOpt = Annotated[
    float | None, typer.Option(help="Low-rank: smallest rank per matrix keeping this share of ||Δ||², in (0, 1].")
]
DensityOpt = Annotated[float | None, typer.Option(help="Sparse: keep this share of entries per tensor.")]
BudgetOpt = Annotated[str | None, typer.Option(help="Low-rank under a size budget for the patch, e.g. 200MB.")]
SparseMethodOpt = Annotated[str, typer.Option(help="Sparse method: topk or dare (random drop + rescale).")]
SeedOpt = Annotated[int, typer.Option(help="Seed of DARE and of the randomized SVD.")]
EmbeddingsOpt = Annotated[str, typer.Option(help="Embeddings/lm_head: dense (default) or encode.")]

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """``"200MB"`` → 200_000_000; ``"1.5GiB"``; plain numbers are bytes."""
    from patchlab.kernels.lowrank import LowRankError

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text or "")
    if not m or m.group(2).upper() not in _UNITS:
        raise LowRankError(f"cannot read size budget {text!r}; write e.g. 200MB, 1.5GB or 750000000")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


@contextlib.contextmanager
def workers_env(n: int | None) -> Iterator[None]:
    """``--workers N`` for the duration of a command: the engine and the fingerprint hasher read
    ``PATCHLAB_WORKERS``; a command's own option overrides ``patchlab --workers``, which overrides the
    environment. The previous value comes back afterwards (the CLI also runs in-process, in tests)."""
    if n is None:
        yield
        return
    old = os.environ.get("PATCHLAB_WORKERS")
    os.environ["PATCHLAB_WORKERS"] = str(n)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PATCHLAB_WORKERS", None)
        else:
            os.environ["PATCHLAB_WORKERS"] = old


def parse_alpha_by_pattern(items: list[str] | None) -> list[tuple[str, float]] | None:
    """``["*.mlp.*=0.5", "lm_head*=0"]`` → ``[("*.mlp.*", 0.5), ("lm_head*", 0.0)]``, in the order given."""
    if not items:
        return None
    out = []
    for item in items:
        pat, eq, val = item.rpartition("=")
        try:
            a = float(val)
        except ValueError:
            a = None
        if not eq or not pat or a is None:
            raise CliInputError(f"--alpha-by-pattern takes GLOB=ALPHA, e.g. '*.mlp.*=0.5'; got {item!r}")
        out.append((pat, a))
    return out


def encoding_kwargs(
    rank: int | None,
    energy: float | None,
    density: float | None,
    budget: str | None,
    method: str,
    seed: int,
    embeddings: str,
) -> dict:
    """The encoding options as the keyword arguments of ``patchlab.methods.compress``."""
    return {
        "rank": rank,
        "energy": energy,
        "density": density,
        "budget_bytes": parse_size(budget) if budget is not None else None,
        "method": method,
        "seed": seed,
        "embeddings": embeddings,
    }


# ---- consoles, errors ---------------------------------------------------------------------------------


def console() -> Console:
    """Standard output."""
    return Console(soft_wrap=False, highlight=False, width=None if sys.stdout.isatty() else 160)


def err_console() -> Console:
    return Console(stderr=True, soft_wrap=True)


def status(message: str) -> None:
    """A status line ("wrote ..."), silenced by ``-q``."""
    if not STATE.quiet:
        console().print(message)


def fail(message: str, code: int = 1) -> None:
    err_console().print(f"[bold red]error:[/] {message}", markup=True, highlight=False)
    raise typer.Exit(code)


def escape(s: str) -> str:
    from rich.markup import escape as _escape

    return _escape(s)


def handled(fn: F) -> F:
    """Turn patchlab errors into one line on stderr and a non-zero exit (a traceback only with -v)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PatchlabError as exc:
            if STATE.verbose:
                err_console().print_exception()
            fail(escape(str(exc)), getattr(exc, "exit_code", 1) or 1)
        except KeyboardInterrupt:
            fail("interrupted", 130)
        return None

    return wrapper  # type: ignore[return-value]


def open_registry(registry: str | None, *, create: bool = False):
    """The registry named by the command's ``--registry``, else by ``patchlab -R``, else the default."""
    from registry import Registry

    return Registry(registry or STATE.registry, create=create)


def is_ref(s: str) -> bool:
    """True for a registry reference, False for a path."""
    from registry.refs import looks_like_path

    return not looks_like_path(s)


def quiet_transformers() -> None:
    """No transformers progress bars: our own lines say what is happening."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


class ByteProgress:
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
            console=err_console(),
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


# ---- formatting -----------------------------------------------------------------------------------------


def print_json(data: Any) -> None:
    # indented for a terminal; compact when piped (json's C encoder only runs without indent: 5x faster)
    indent = 2 if sys.stdout.isatty() else None
    typer.echo(json.dumps(data, indent=indent, default=str))


def fmt_size(n: int | None) -> str:
    if n is None:
        return ""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def fmt_params(n: int | None) -> str:
    if n is None:
        return ""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def fmt_num(v: Any) -> str:
    return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def fmt_pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def fmt_float(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


RICH_ROWS = 1000


def print_table(headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """A rich table; past RICH_ROWS rows, plain aligned columns (rich measures every cell: 20 s for 10k)."""
    if len(rows) <= RICH_ROWS:
        t = Table(*headers, box=None)
        for r in rows:
            t.add_row(*(escape(c) for c in r))
        console().print(t)
        return
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    sys.stdout.write("\n".join(lines) + "\n")


def lineage_tree(node: Any) -> Tree:
    """A rich tree of a patch (a ``registry.LineageNode``) and, below it, what it was ported or merged from."""

    def label(n) -> str:
        rel = f"[dim]{n.relation} of[/] " if n.relation else ""
        return f"{rel}[bold]{escape(n.ref)}[/] on {escape(n.base or '?')} [dim]{n.digest[:12]}[/]"

    def grow(tree: Tree, n) -> None:
        for p in n.parents:
            grow(tree.add(label(p)), p)

    tree = Tree(label(node))
    grow(tree, node)
    return tree
