"""A registry of the tiny family for upgrade tests: v1 and v2 registered, three patches on v1 (``task``: its
fine-tune at hand, a fused port; ``stored``: its fine-tune gone, ported from the stored patch; ``strict``: a
gate it cannot pass), a 12-instance suite as the family default."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import patchlab
from registry import Registry

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "fixtures" / "models"
TASK = ROOT / "fixtures" / "eval" / "task.jsonl"


def build_family(
    where: Path, *, patches: tuple[str, ...] = ("task", "stored", "strict"), suite_lines: int = 12
) -> Path:
    """Build it under ``where``; returns the registry directory."""
    where.mkdir(parents=True, exist_ok=True)
    suite = where / "suite.jsonl"
    suite.write_text("".join(TASK.read_text().splitlines(keepends=True)[:suite_lines]))
    reg_dir = where / "reg"
    with Registry.init(reg_dir) as reg:
        reg.add_base("tiny", "v1", MODELS / "v1")
        reg.add_base("tiny", "v2", MODELS / "v2")
        for name in patches:
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
    return reg_dir


def copy_family(src: Path, dst: Path) -> Path:
    """A copy of a built family (registry directory and suite), so each test starts from the same state."""
    shutil.copytree(src.parent, dst, symlinks=True)
    reg_dir = dst / "reg"
    with Registry(reg_dir) as reg:  # the suite path points into the copy
        reg.set_gate("tiny", family=True, suite=[str(dst / "suite.jsonl")])
    return reg_dir


def state(reg_dir: Path) -> dict[str, Any]:
    """Everything an upgrade leaves in the registry, without times and ids that differ between equal runs."""
    home = reg_dir.resolve()
    with Registry(reg_dir) as reg:
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


def tensors(p: Any) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((n, dg) for n, dg, _ in p.files if n != "patch.json"))


def strays(reg_dir: Path) -> list[str]:
    """Partial outputs, temporary files and scratch models left under the upgrade runs' directories."""
    root = reg_dir / "upgrades"
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
