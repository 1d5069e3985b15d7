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
    """Turn every failure into one line on stderr and a non-zero exit (a traceback only with -v).

    Also sets the output guard for the command: nothing it writes may replace the registry home (or go
    inside it), the current directory or its parents, nor (once the registry is open) a registered base's
    or derived model's directory; outputs are noted in the registry's journal so ``patchlab gc`` finds
    what a killed run leaves.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from patchlab.io.outputs import guard

        with guard(_new_guard(kwargs.get("registry"))) as g:
            try:
                result = fn(*args, **kwargs)
            except KeyboardInterrupt:
                _forget_noted(g)
                fail("interrupted", 130)
            except BaseException as exc:  # noqa: BLE001 - the one error path of the CLI
                _forget_noted(g)
                if _is_cli_control(exc):  # typer.Exit, usage errors: click reports those itself
                    raise
                if STATE.verbose:
                    err_console().print_exception()
                message, code = describe_error(exc, kwargs.get("registry") or STATE.registry)
                fail(escape(message), code)
            _forget_noted(g)
            return result

    return wrapper  # type: ignore[return-value]


def _is_cli_control(exc: BaseException) -> bool:
    return isinstance(exc, typer.Exit | typer.Abort | SystemExit) or type(exc).__module__.split(".")[0] in (
        "click",
        "typer",
    )


def _new_guard(registry: str | None):
    """The output guard of one command: the registry home (and all inside it) is never an output."""
    from patchlab.io.outputs import Guard

    g = Guard()
    try:
        from registry.db import resolve_location

        home = resolve_location(registry or STATE.registry).home
    except Exception:  # a malformed --registry: the command itself reports it
        return g
    protect_home(g, home)
    if home.is_dir():
        g.journal = home / "journal"
    return g


def protect_home(g, home) -> None:
    """The registry home is never an output (nor is any directory holding it); what the registry keeps in it
    (database, blobs, cache, journal) is not written inside either. Registry workflows may keep their own
    outputs in other directories of the home (``patchlab upgrade`` does)."""
    from registry.outputs import RESERVED

    g.protect(home, "the registry home")
    for name in RESERVED:
        g.protect(home / name, f"the registry's {name}", inside=True)


def _forget_noted(g) -> None:
    """The command ended (well or with an error it cleaned up after): its journal entries are not needed,
    unless an output it wrote was never recorded (an orphan `patchlab gc` should list)."""
    from patchlab.io.outputs import read_marker

    for entry in g.noted:
        try:
            out = json.loads(entry.read_text()).get("path", "")
            m = read_marker(out) if out else None
            if m is not None and m.get("registry") and not m.get("registered"):
                continue
            entry.unlink()
        except (OSError, ValueError):
            pass


def one_line(text: str) -> str:
    return "; ".join(part.strip() for part in str(text).strip().splitlines() if part.strip())


def describe_error(exc: BaseException, registry: str | None = None) -> tuple[str, int]:
    """One line for any failure: what failed, where, and the flag or command that fixes it."""
    import errno

    if isinstance(exc, PatchlabError):
        return one_line(str(exc)), getattr(exc, "exit_code", 1) or 1
    where = f"the registry at {registry}" if registry else "the registry (--registry / PATCHLAB_HOME)"
    try:
        from sqlalchemy import exc as sa_exc
    except ImportError:  # pragma: no cover
        sa_exc = None
    if sa_exc is not None:
        if isinstance(exc, sa_exc.NoSuchModuleError | sa_exc.ArgumentError):
            return (
                f"cannot use {where}: {one_line(str(exc))}; pass --registry a directory, a .db file or a "
                "SQLAlchemy URL such as postgresql+psycopg://user@host/db",
                1,
            )
        if isinstance(exc, sa_exc.DBAPIError):
            orig = one_line(str(getattr(exc, "orig", None) or exc)).split(" [SQL:")[0]
            low = orig.lower()
            if "readonly" in low or "read-only" in low:
                return (
                    f"{where} is read-only ({orig}): commands that only read it work (ls, show, log, verify); "
                    "run this one against a writable registry (--registry)",
                    1,
                )
            if "not a database" in low or "malformed" in low or "corrupt" in low:
                return (
                    f"{where} is damaged ({orig}); restore registry.db from a backup, or point --registry at "
                    "another registry",
                    1,
                )
            if isinstance(exc, sa_exc.OperationalError):
                return (
                    f"cannot reach {where} ({orig}); check that the database server is up and the URL is right, "
                    "or pass --registry another registry",
                    1,
                )
            return f"database error in {where}: {orig}; check --registry", 1
        if isinstance(exc, sa_exc.SQLAlchemyError):
            return f"database error in {where}: {one_line(str(exc))}; check --registry", 1
    if isinstance(exc, ModuleNotFoundError):
        name = exc.name or "a module"
        return (
            f"the Python package {name!r} is not installed ({one_line(str(exc))}); install it "
            f"(`pip install {name.split('.')[0]}`) or use a --registry that does not need it",
            1,
        )
    if isinstance(exc, OSError):
        path = exc.filename or ""
        what = f" {path}" if path else ""
        if exc.filename2:
            what += f" -> {exc.filename2}"
        code = exc.errno
        if code == errno.ENOSPC:
            return f"no space left on the device writing{what}; free some space or write the output elsewhere", 1
        if code == errno.EROFS:
            return f"read-only file system:{what}; write the output somewhere writable", 1
        if code in (errno.EACCES, errno.EPERM):
            return f"permission denied:{what}; check its permissions or write the output somewhere you may", 1
        if code == errno.ENOENT:
            return f"no such file or directory:{what}; check the path", 1
        if code == errno.EDQUOT:
            return f"disk quota exceeded writing{what}; free some space or write the output elsewhere", 1
        return f"{exc.strerror or one_line(str(exc))}:{what}", 1
    if isinstance(exc, MemoryError):
        return "out of memory; use a smaller --batch-size or a machine with more memory", 1
    return (
        f"unexpected {type(exc).__name__}: {one_line(str(exc))} (run with -v for the traceback, and please report it)",
        1,
    )


def open_registry(registry: str | None, *, create: bool = False):
    """The registry named by the command's ``--registry``, else by ``patchlab -R``, else the default.

    Its bases' and derived models' directories join the command's protected outputs."""
    from patchlab.io.outputs import current_guard
    from registry import Registry

    reg = Registry(registry or STATE.registry, create=create, hub_progress=hub_bars())
    g = current_guard()
    if g is not None:
        protect_home(g, reg.home)
        try:
            for path, what in reg.protected_paths():
                g.protect(path, what)
        except BaseException:
            reg.close()
            raise
    return reg


def hub_bars() -> type | bool:
    """A class ``huggingface_hub`` draws its download progress with (rich, on stderr), or False: -q, no terminal."""
    if STATE.quiet or not sys.stderr.isatty():
        return False
    import threading

    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    lock = threading.Lock()
    shared: dict[str, Any] = {"progress": None, "open": 0}

    class RichBar:
        """The part of tqdm's interface ``snapshot_download`` uses, drawn as a rich task."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.n = kwargs.get("initial") or 0
            self.total = kwargs.get("total")
            self.format_dict: dict[str, Any] = {"rate": None}
            desc = str(kwargs.get("desc") or "")
            # the byte bar of what is written; the network transfer bar and the per-file counter stay hidden
            self._shown = kwargs.get("unit") == "B" and not desc.startswith("Downloading bytes")
            self._task = None
            if not self._shown:
                return
            with lock:
                if shared["progress"] is None:
                    shared["progress"] = Progress(
                        TextColumn("downloading"),
                        BarColumn(),
                        DownloadColumn(),
                        TransferSpeedColumn(),
                        console=err_console(),
                        transient=True,
                    )
                    shared["progress"].start()
                shared["open"] += 1
                self._task = shared["progress"].add_task("download", total=self.total or None, completed=self.n)

        def __enter__(self) -> "RichBar":
            return self

        def __exit__(self, *exc: object) -> None:
            self.close()

        def __iter__(self):
            return iter(())

        def update(self, n: float | None = 1) -> None:
            self.n += n or 0
            if self._task is not None:
                shared["progress"].update(self._task, completed=self.n, total=self.total or None)

        def refresh(self, *args: Any, **kwargs: Any) -> None:
            self.update(0)

        def set_description(self, *args: Any, **kwargs: Any) -> None:
            pass

        set_description_str = set_postfix_str = set_postfix = set_description

        def close(self) -> None:
            if self._task is None:
                return
            with lock:
                shared["progress"].remove_task(self._task)
                self._task = None
                shared["open"] -= 1
                if shared["open"] == 0:
                    shared["progress"].stop()
                    shared["progress"] = None

    return RichBar


def will_register(reg) -> None:
    """The command's outputs are meant for ``reg``: their markers say so, so a rerun after a crash between
    the output and its registry row finishes the job instead of refusing an existing output."""
    from patchlab.io.outputs import current_guard

    g = current_guard()
    if g is not None and reg is not None:
        g.registry = str(reg.home)


def registered(path, ref: str) -> None:
    """The output at ``path`` now has its registry row."""
    from patchlab.io.outputs import mark_registered

    mark_registered(path, ref)


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
