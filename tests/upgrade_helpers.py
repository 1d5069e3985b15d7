"""A registry of the tiny family for upgrade tests: v1 and v2 registered, three patches on v1 (``task``: its
fine-tune at hand, a fused port; ``stored``: its fine-tune gone, ported from the stored patch; ``strict``: a
gate it cannot pass), a 12-instance suite as the family default.

On either backend: :class:`Fam` is where a built family lives (its blob home, and on PostgreSQL its database);
:func:`build_family` and :func:`copy_family` take and return one, and ``fam.open()`` opens its registry."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import patchlab
from registry import Registry

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "fixtures" / "models"
TASK = ROOT / "fixtures" / "eval" / "task.jsonl"
EDITS = ROOT / "fixtures" / "edits" / "edits.jsonl"


@dataclass(frozen=True)
class Fam:
    """A registry for the upgrade tests: ``home`` (its blobs and runs; on SQLite also its database) and, on
    PostgreSQL, the database ``url`` on the test server ``server`` (a ``tests.pgserver.PgServer``)."""

    home: Path
    url: str | None = None
    server: Any = None

    @property
    def backend(self) -> str:
        return "postgresql" if self.url else "sqlite"

    @property
    def target(self) -> str:
        """What ``Registry(...)`` / ``patchlab -R`` take (with :meth:`env` set)."""
        return self.url or str(self.home)

    def env(self) -> dict[str, str]:
        """The environment a process needs to open this registry (a URL's home is ``$PATCHLAB_HOME``)."""
        return {"PATCHLAB_HOME": str(self.home)} if self.url else {}

    @contextlib.contextmanager
    def using_env(self) -> Iterator[None]:
        old = {k: os.environ.get(k) for k in self.env()}
        os.environ.update(self.env())
        try:
            yield
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def open(self, *, create: bool = False) -> Registry:
        with self.using_env():
            return Registry.init(self.target) if create else Registry(self.target)

    @property
    def dbname(self) -> str | None:
        return self.url.rsplit("/", 1)[1] if self.url else None


def new_fam(home: Path, backend: str = "sqlite", server: Any = None) -> Fam:
    """An empty location: ``home`` and, on PostgreSQL, a new database on ``server``."""
    if backend == "sqlite":
        return Fam(home)
    if server is None:
        raise ValueError("a PostgreSQL family needs the test server (the pg_server fixture)")
    return Fam(home, server.url(server.create_database()), server)


def build_family(
    where: Path,
    *,
    patches: tuple[str, ...] = ("task", "stored", "strict"),
    suite_lines: int = 12,
    backend: str = "sqlite",
    server: Any = None,
    edit_patch: Path | None = None,
) -> Fam:
    """Build it under ``where`` (the blob home is ``where / "reg"``) on ``backend``."""
    where.mkdir(parents=True, exist_ok=True)
    suite = where / "suite.jsonl"
    suite.write_text("".join(TASK.read_text().splitlines(keepends=True)[:suite_lines]))
    fam = new_fam(where / "reg", backend, server)
    with fam.open(create=True) as reg:
        reg.add_base("tiny", "v1", MODELS / "v1")
        reg.add_base("tiny", "v2", MODELS / "v2")
        for name in patches:
            if name in ("blend", "facts"):
                continue
            ft = MODELS / "ft-v1"
            if name == "stored":
                ft = where / "ft-gone"
                shutil.copytree(MODELS / "ft-v1", ft)
            p = patchlab.extract(MODELS / "v1", ft, where / "made" / name, device="cpu")
            reg.add_patch(p.path, name=name, base="tiny@v1")
            if name == "stored":
                shutil.rmtree(ft)
        reg.set_gate("tiny", family=True, suite=[str(suite)], expressions=["verdict != 'do not port'", "nfr <= 0.5"])
        if "strict" in patches:
            reg.set_gate("strict", expressions=["accuracy >= old + 0.5"])
        if "blend" in patches:  # a merge of task and stored, with a recipe that has a seed and densities
            m = patchlab.merge(
                [reg.patch_path("task@1"), reg.patch_path("stored@1")],
                where / "made" / "blend",
                **BLEND_RECIPE,
                device="cpu",
            )
            reg.add_patch(m.path, name="blend", base="tiny@v1", parents=["task@1", "stored@1"], relation="merge")
        if "facts" in patches:  # an edit patch (LocFT-BF on 10 edits); made once by make_edit_patch
            reg.add_patch(edit_patch or make_edit_patch(where / "edit"), name="facts", base="tiny@v1")
            reg.set_gate("facts", expressions=["verdict != 'do not port'", "reliability >= 0.8"])
    return fam


BLEND_RECIPE = {"method": "ties", "weights": [0.7, 0.6], "densities": 0.5, "seed": 3}


def make_edit_patch(where: Path, n_edits: int = 10) -> Path:
    """An edit patch on tiny v1 (LocFT-BF, layer 2, 25 epochs: ~15 s on CPU) and its edit file beside it."""
    where.mkdir(parents=True, exist_ok=True)
    edits = where / "edits.jsonl"
    edits.write_text("".join(EDITS.read_text().splitlines(keepends=True)[:n_edits]))
    out = where / "facts"
    if not (out / "patch.json").is_file():
        patchlab.edit(MODELS / "v1", edits, out, layer=2, lr=5e-3, batch_size=4, epochs=25, seed=0, device="cpu")
    return out


def copy_family(src: Fam, dst: Path) -> Fam:
    """A copy of a built family (home, suite and, on PostgreSQL, its database: a template copy), so each test
    starts from the same state."""
    shutil.copytree(src.home.parent, dst, symlinks=True)
    fam = Fam(dst / "reg")
    if src.url:
        name = src.server.create_database(template=src.dbname)
        fam = Fam(dst / "reg", src.server.url(name), src.server)
    with fam.open() as reg:  # the suite path points into the copy
        reg.set_gate("tiny", family=True, suite=[str(dst / "suite.jsonl")])
    return fam


def state(fam: Fam) -> dict[str, Any]:
    """Everything an upgrade leaves in the registry, without times and ids that differ between equal runs."""
    home = fam.home.resolve()
    with fam.open() as reg:
        # a patch's manifest records where it was made from (paths under this registry): compare its tensors
        patches = [
            (p.ref, tensors(reg.get_patch(p.ref, detail=True)), p.base, p.parents, p.aliases)
            for p in reg.list_patches()
        ]
        aliases = [(a.ref, a.target) for a in reg.list_aliases()]
        derived = [(d.patch, d.base, d.kind, str(Path(d.path).relative_to(home))) for d in reg.list_derived()]
        evals = sorted(
            (e.target, e.dataset, e.num_instances, round((e.metrics or {}).get("accuracy", -1), 6))
            for e in reg.list_evaluations()
        )
        runs = []
        for r in reg.list_runs():
            full = reg.get_run(r.id)
            steps = []
            for s in full.steps:
                out = dict(s.outcome or {})
                out.pop("evaluations", None)
                out.pop("digest", None)
                shown = repr(sorted(out.items())).replace(str(home), "HOME")
                steps.append((s.patch, s.source, s.step, s.state, shown))
            runs.append((r.family, r.to_version, r.state, r.error, tuple(steps)))
    return {"patches": patches, "aliases": aliases, "derived": derived, "evaluations": evals, "runs": runs}


def unordered(st: dict[str, Any]) -> dict[str, Any]:
    """A :func:`state` without what depends on the order parallel patches finish in (``--jobs N``, Ray):
    derived-model ids and the order of derived models, evaluations and steps."""
    out = dict(st, derived=sorted(st["derived"]), evaluations=sorted(st["evaluations"]))
    out["runs"] = [
        (*r[:4], tuple(sorted((*x[:4], re.sub(r"derived:\d+", "derived:N", x[4])) for x in r[4]))) for r in st["runs"]
    ]
    return out


def tensors(p: Any) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((n, dg) for n, dg, _ in p.files if n != "patch.json"))


def strays(fam: Fam) -> list[str]:
    """Partial outputs, temporary files and scratch models left under the upgrade runs' directories."""
    root = fam.home / "upgrades"
    if not root.is_dir():
        return []
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.name.startswith(".") and any(k in p.name for k in (".partial-", ".old-", ".tmp-", ".baseline-"))
    )


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Readable differences between two :func:`state` dicts (for assertion messages)."""
    out = []
    for k in a:
        if a[k] != b.get(k):
            if k == "runs" and len(a[k]) == len(b[k]):
                for ra, rb in zip(a[k], b[k], strict=True):
                    if ra[:4] != rb[:4]:
                        out.append(f"run {ra[:4]} != {rb[:4]}")
                    out += [f"step {x} != {y}" for x, y in zip(ra[4], rb[4], strict=False) if x != y]
            else:
                out.append(f"{k}: {a[k]} != {b.get(k)}")
    return out


def check_end_to_end(fam: Fam, result: Any) -> None:
    """What an upgrade of the built family (all three patches) must leave: ``task`` and ``stored`` pass, get
    NAME@2 on v2 with lineage and the moved alias; ``strict`` fails its gate, gets NAME@2 but no alias (its
    ``latest`` pinned to NAME@1); the run, its summary files and per-patch reports; no partial outputs."""
    assert not result.all_passed
    with fam.open() as reg:
        for name in ("task", "stored"):
            p = reg.get_patch(f"{name}@2")
            assert p.base == "tiny@v2" and p.parents == ((f"{name}@1", "port"),)
            assert reg.get_patch(f"{name}@latest").ref == f"{name}@2"
            assert [n.ref for n in reg.lineage(f"{name}@2").parents] == [f"{name}@1"]
        strict = reg.get_patch("strict@2")  # registered, but its alias did not move
        assert strict.base == "tiny@v2" and strict.aliases == ()
        assert reg.get_patch("strict@latest").ref == "strict@1"  # pinned where "latest" meant before
        assert reg.verify().ok
        run = reg.get_run(result.run.id)
        assert run.state == "done" and {s.state for s in run.steps} <= {"done", "skipped"}
        # no vocabulary change: every patch is ported from its stored Δ, never fused from its fine-tune
        fused = {s.patch: s.outcome["fused"] for s in run.steps if s.step == "port"}
        assert fused == {"task": False, "strict": False, "stored": False}
    rows = {p["patch"]: p for p in result.summary["patches"]}
    assert rows["task"]["gate"] == "pass" and rows["task"]["alias_moved"]
    assert rows["strict"]["gate"] == "fail" and not rows["strict"]["alias_moved"]
    assert "gate failed: accuracy >= old + 0.5" in rows["strict"]["reason"]
    work = fam.home / "upgrades" / f"run-{result.run.id}"
    md = (work / "summary.md").read_text()
    assert "strict@1 → strict@2" in md and "Why aliases did not move" in md and "accuracy >= old + 0.5" in md
    assert json.loads((work / "summary.json").read_text())["passed"] == 2
    html = (work / "summary.html").read_text()
    assert "<script" not in html and "http" not in html.replace('lang="en"', "") and "<svg" in html
    for name in ("task", "stored", "strict"):
        assert (work / "reports" / f"{name}.html").is_file() and (work / "reports" / f"{name}.md").is_file()
    assert strays(fam) == []
