"""Output directories: what patchlab may replace, how a new one appears, and what a crash leaves.

Every output directory patchlab writes carries a marker, ``.patchlab-output.json``: its kind (``patch``,
``model``, ``adapter``, ``report``), a write id, the writing process, and (when a command records it) the
registry it is meant for. ``--overwrite`` replaces only a directory with a marker of the same kind; it never
touches the current directory or its parents, nor a path the caller protects (the registry home, registered
bases and derived models: see :func:`guard`). A new output is written into a hidden sibling
``.NAME.partial-XXXXXXXX`` (whose marker names its process) and appears by one rename; an existing output
is swapped with it atomically, so the old one stays whole until the new one is complete.

A process killed mid-write leaves its ``.partial-*`` directory; :func:`stale_partials` finds those whose
process is gone (``patchlab gc`` removes them). A process killed after the rename but before its registry
row leaves an *orphan*: an output whose marker names a registry and no registration; a rerun of the same
command under the same registry replaces it without ``--overwrite`` (see :func:`check_output`).
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patchlab.errors import OutputExistsError, UnsafeOutputError

MARKER = ".patchlab-output.json"
KINDS = ("patch", "model", "adapter", "report", "scratch")
PARTIAL = ".partial-"
OLD = ".old-"


# ---- who is writing -------------------------------------------------------------------------------------


def _proc_start(pid: int) -> str | None:
    """The start time of process ``pid`` (Linux: field 22 of /proc/PID/stat), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def owner() -> dict[str, Any]:
    """The calling process, as recorded in markers."""
    pid = os.getpid()
    return {"pid": pid, "pid_start": _proc_start(pid), "host": socket.gethostname()}


def owner_alive(info: dict[str, Any]) -> bool | None:
    """Whether the process a marker names still runs: True, False, or None when it cannot be told (another
    host, or no pid recorded)."""
    pid = info.get("pid")
    if not isinstance(pid, int) or info.get("host") != socket.gethostname():
        return None
    start = _proc_start(pid)
    if start is None:
        if Path("/proc/self/stat").exists():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    want = info.get("pid_start")
    return want is None or want == start


# ---- the guard a command sets -----------------------------------------------------------------------------


@dataclass
class Guard:
    """What the running command protects (path -> what it is), and the registry it records outputs in."""

    protected: dict[Path, str] = field(default_factory=dict)
    inside: dict[Path, str] = field(default_factory=dict)  # nothing may be written inside these either
    registry: str | None = None  # the registry home the outputs are recorded in
    journal: Path | None = None  # directory where each output about to be written is noted
    noted: list[Path] = field(default_factory=list)

    def protect(self, path: str | os.PathLike[str], what: str, *, inside: bool = False) -> None:
        p = _abs(path)
        (self.inside if inside else self.protected)[p] = what


_GUARD: contextvars.ContextVar[Guard | None] = contextvars.ContextVar("patchlab_output_guard", default=None)


def current_guard() -> Guard | None:
    return _GUARD.get()


@contextlib.contextmanager
def guard(g: Guard | None = None) -> Iterator[Guard]:
    """Set the output guard for the block (the CLI sets one per command)."""
    g = g or Guard()
    token = _GUARD.set(g)
    try:
        yield g
    finally:
        _GUARD.reset(token)


def _abs(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.abspath(Path(path).expanduser()))


def _real(path: Path) -> Path:
    try:
        return path.resolve()
    except OSError:
        return _abs(path)


# ---- markers --------------------------------------------------------------------------------------------


def read_marker(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The marker of an output directory, or None (no marker, or not readable as one)."""
    try:
        data = json.loads((Path(directory) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("kind") in KINDS else None


def write_marker(directory: Path, data: dict[str, Any]) -> None:
    tmp = directory / f"{MARKER}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
    os.replace(tmp, directory / MARKER)


def new_marker(kind: str) -> dict[str, Any]:
    g = current_guard()
    return {
        "patchlab_output": 1,
        "kind": kind,
        "write_id": uuid.uuid4().hex,
        "started": time.time(),
        **owner(),
        "registry": g.registry if g is not None else None,
        "registered": None,
    }


def mark_registered(directory: str | os.PathLike[str], ref: str) -> None:
    """Record in an output's marker that its registry row exists (it is no longer an orphan)."""
    d = Path(directory)
    m = read_marker(d)
    if m is None:
        return
    m["registered"] = ref
    try:
        write_marker(d, m)
    except OSError:
        pass


def is_orphan(marker: dict[str, Any] | None, kind: str | None, registry: str | None) -> bool:
    """An output of ``kind`` written for ``registry`` whose registration never happened (its writer was
    killed between the rename and the registry row), and whose writer is gone."""
    return (
        marker is not None
        and registry is not None
        and marker.get("registry") == registry
        and not marker.get("registered")
        and (kind is None or marker.get("kind") == kind)
        and (owner_alive(marker) is not True or _is_me(marker))
    )


def _is_me(info: dict[str, Any]) -> bool:
    """The marker names this very process (a long-lived caller whose registration failed)."""
    me = owner()
    return info.get("pid") == me["pid"] and info.get("pid_start") == me["pid_start"] and info.get("host") == me["host"]


# ---- checks -------------------------------------------------------------------------------------------


def _is_within(p: Path, root: Path) -> bool:
    return p == root or root in p.parents


def check_output(out: str | os.PathLike[str], overwrite: bool, kind: str | None = None) -> None:
    """Refuse, before any work is done, an output that must not be written or replaced.

    Never: the current directory or one of its parents, a protected path or a directory containing one.
    Existing ``out``: refused without ``overwrite`` (unless it is this registry's orphan of the same kind);
    with ``overwrite``, replaced only when it is empty or carries a marker of the same ``kind``.
    """
    out = Path(out)
    a, r = _abs(out), _real(out)
    cwd = _real(Path.cwd())
    for p in {a, r}:
        if p == cwd or p in cwd.parents:
            raise UnsafeOutputError(
                f"refusing to write {out}: it is the current directory or one of its parents; "
                "name a new directory for the output"
            )
    g = current_guard()
    if g is not None:
        for root, what in g.inside.items():
            for p in {a, r}:
                if _is_within(p, root) or _is_within(root, p):
                    raise UnsafeOutputError(
                        f"refusing to write {out}: it is inside or contains {what} ({root}); "
                        "name a directory outside it for the output"
                    )
        for prot, what in g.protected.items():
            rp = _real(prot)
            for p in {a, r}:
                if _is_within(prot, p) or _is_within(rp, p):
                    how = "is" if p in (prot, rp) else "contains"
                    raise UnsafeOutputError(f"refusing to write {out}: it {how} {what} ({prot})")
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise OutputExistsError(f"{out} exists and is not a directory; remove it yourself or choose another output")
    marker = read_marker(out)
    if not overwrite:
        if is_orphan(marker, kind, g.registry if g is not None else None):
            return  # our own crash-orphaned output: the rerun finishes the job
        raise OutputExistsError(f"{out} already exists; choose another output or pass --overwrite")
    if not any(out.iterdir()):
        return
    if marker is None:
        raise UnsafeOutputError(
            f"refusing to replace {out}: it is not empty and patchlab did not write it (no {MARKER}); "
            "--overwrite only replaces patchlab's own outputs: remove it yourself or choose another output"
        )
    if kind is not None and marker.get("kind") != kind:
        raise UnsafeOutputError(
            f"refusing to replace {out}: it holds a patchlab {marker.get('kind')} output, not a {kind}; "
            "choose another output"
        )


# ---- writing --------------------------------------------------------------------------------------------

_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd = -100
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def note_output(out: Path) -> None:
    """Note in the guard's journal that ``out`` is about to be written (``patchlab gc`` looks there)."""
    g = current_guard()
    if g is None or g.journal is None:
        return
    try:
        g.journal.mkdir(parents=True, exist_ok=True)
        entry = g.journal / f"{uuid.uuid4().hex}.json"
        entry.write_text(json.dumps({"path": str(_abs(out)), **owner(), "started": time.time()}))
        g.noted.append(entry)
    except OSError:
        pass  # a read-only registry home: nothing is recorded, the partial directory still names its owner


@contextlib.contextmanager
def atomic_output(out: str | os.PathLike[str], overwrite: bool = False, kind: str | None = None) -> Iterator[Path]:
    """A temporary directory beside ``out`` that becomes ``out`` only if the block succeeds.

    The temporary directory carries the output's marker from the start; an existing ``out`` is swapped
    with it in one step (old output intact until then) and removed afterwards.
    """
    out = Path(out)
    check_output(out, overwrite, kind)
    out.parent.mkdir(parents=True, exist_ok=True)
    note_output(out)
    tmp = out.parent / f".{out.name}{PARTIAL}{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        marker = new_marker(kind or "model")
        write_marker(tmp, marker)
        yield tmp
        if kind is None:  # a caller that did not say: the kind is read from what it wrote
            marker["kind"] = infer_kind(tmp)
            write_marker(tmp, marker)
        check_output(out, overwrite, kind)  # again: something may have appeared there meanwhile
        if out.exists():
            if _exchange(tmp, out):
                shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old output
                return
            trash = out.parent / f".{out.name}{OLD}{uuid.uuid4().hex[:8]}"
            os.rename(out, trash)
            os.rename(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def infer_kind(directory: Path) -> str:
    """What a finished output directory holds, from its files."""
    if (directory / "patch.json").is_file():
        return "patch"
    if (directory / "adapter_config.json").is_file():
        return "adapter"
    if any(directory.glob("report.*")):
        return "report"
    return "model"


# ---- leftovers --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Leftover:
    """A partial output, a replaced output not yet removed, or a scratch directory, whose writer is gone."""

    path: Path
    what: str  # "partial output", "replaced output", "scratch copy"
    size: int


def _size(p: Path) -> int:
    total = 0
    for f in p.rglob("*"):
        with contextlib.suppress(OSError):
            if f.is_file() and not f.is_symlink():
                total += f.stat().st_size
    return total


def _stale(d: Path, grace: float) -> bool:
    m = read_marker(d)
    if m is not None:
        alive = owner_alive(m)
        if alive is not None:
            return not alive
    else:
        try:  # killed between creating it and writing its marker (written before any data): holds nothing
            if all(p.name.startswith(MARKER) for p in d.iterdir()) and time.time() - d.stat().st_mtime > 1.0:
                return True
        except OSError:
            return False
    try:
        return time.time() - d.stat().st_mtime >= grace
    except OSError:
        return False


def stale_partials(outputs: Iterable[str | os.PathLike[str]], grace: float = 3600.0) -> list[Leftover]:
    """``.NAME.partial-*`` and ``.NAME.old-*`` siblings of these outputs whose writer is gone (or, when that
    cannot be told, older than ``grace`` seconds)."""
    found: dict[Path, Leftover] = {}
    for o in outputs:
        o = _abs(o)
        parent = o.parent
        if not parent.is_dir():
            continue
        for prefix, what in ((f".{o.name}{PARTIAL}", "partial output"), (f".{o.name}{OLD}", "replaced output")):
            with contextlib.suppress(OSError):
                for d in parent.iterdir():
                    if d.name.startswith(prefix) and d.is_dir() and d not in found and _stale(d, grace):
                        found[d] = Leftover(d, what, _size(d))
    return sorted(found.values(), key=lambda x: str(x.path))


def scratch_dir(parent: str | os.PathLike[str] | None, prefix: str) -> Path:
    """A temporary directory marked with its owner (kind ``scratch``), so a killed process's copies are found."""
    import tempfile

    d = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    write_marker(d, new_marker("scratch"))
    return d


def stale_scratch(
    parent: str | os.PathLike[str] | None, prefixes: Iterable[str], grace: float = 3600.0
) -> list[Leftover]:
    """Scratch directories (``prefix*`` in ``parent``, default the system temp dir) whose owner is gone."""
    import tempfile

    root = Path(parent) if parent is not None else Path(tempfile.gettempdir())
    out = []
    prefixes = tuple(prefixes)
    with contextlib.suppress(OSError):
        for d in root.iterdir():
            if d.name.startswith(prefixes) and d.is_dir() and not d.is_symlink():
                m = read_marker(d)
                if m is not None and m.get("kind") == "scratch" and _stale(d, grace):
                    out.append(Leftover(d, "scratch copy", _size(d)))
    return sorted(out, key=lambda x: str(x.path))


def remove_leftover(item: Leftover) -> int:
    """Remove a leftover; returns the bytes freed."""
    shutil.rmtree(item.path, ignore_errors=True)
    return item.size


__all__ = [
    "MARKER",
    "Guard",
    "Leftover",
    "atomic_output",
    "check_output",
    "current_guard",
    "guard",
    "is_orphan",
    "mark_registered",
    "read_marker",
    "remove_leftover",
    "scratch_dir",
    "stale_partials",
    "stale_scratch",
]
