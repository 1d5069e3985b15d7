"""The main job end to end on the bundled tiny family: register two base releases, extract a fine-tune's
patch on v1, port it onto v2, re-extract the ported model as the v2 patch (the recycling chain), and
measure task accuracy before and after. ``patchlab demo`` prints what this returns."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import patchlab
from patchlab.errors import CheckpointNotFoundError
from patchlab.measure.evaluate import evaluate
from registry.api import Registry
from registry.records import LineageNode

FAMILY_MODELS = ("v1", "v2", "ft-v1", "ft-v2")


@dataclass
class DemoResult:
    work: Path
    registry: str
    patch: str
    ported_patch: str
    ported_model: Path
    lineage: LineageNode
    accuracy: dict[str, float] = field(default_factory=dict)  # model label -> task accuracy
    general: dict[str, float] = field(default_factory=dict)  # model label -> general MC accuracy

    @property
    def recovered(self) -> float | None:
        """Share of the fine-tune's gain on v2 that the training-free port recovers."""
        a = self.accuracy
        gain = a["ft-v2 (oracle)"] - a["v2"]
        return (a["v2 + Δ(v1) (ported)"] - a["v2"]) / gain if gain > 0 else None

    def to_dict(self) -> dict:
        return {
            "work": str(self.work),
            "registry": self.registry,
            "patch": self.patch,
            "ported_patch": self.ported_patch,
            "ported_model": str(self.ported_model),
            "lineage": self.lineage.to_dict(),
            "task_accuracy": self.accuracy,
            "general_accuracy": self.general,
            "recovered": self.recovered,
        }


def find_family(explicit: Path | None = None) -> Path:
    """The bundled ``fixtures`` directory: given, or beside the source tree, or in the working directory."""
    here = Path(patchlab.__file__).resolve().parent.parent / "fixtures"
    candidates = [explicit] if explicit else [here, Path.cwd() / "fixtures"]
    for c in candidates:
        if c and all((c / "models" / m / "config.json").exists() for m in FAMILY_MODELS):
            return c
    raise CheckpointNotFoundError(
        "the bundled model family was not found (looked in "
        + ", ".join(str(c) for c in candidates if c)
        + "); run from a patchlab checkout or pass --fixtures DIR"
    )


def run_demo(
    work: Path,
    fixtures: Path | None = None,
    *,
    device: str = "auto",
    log: Callable[[str], None] = lambda s: None,
) -> DemoResult:
    fx = find_family(fixtures)
    models, evals = fx / "models", fx / "eval"
    work.mkdir(parents=True, exist_ok=True)
    reg = Registry.init(work / "registry")
    try:
        log("register base versions tiny@v1 and tiny@v2")
        for v in ("v1", "v2"):
            reg.add_base("tiny", v, models / v)
        log("diff: extract the fine-tune's patch on v1 (ft-v1 − v1)")
        patch = patchlab.extract(models / "v1", models / "ft-v1", work / "patches" / "task-v1", device=device)
        p1 = reg.add_patch(patch.path, name="task", base="tiny@v1")
        log(f"port {p1.ref} onto tiny@v2 (v2 + Δ)")
        ported = patchlab.port(patch, models / "v2", work / "models" / "task-on-v2", device=device)
        reg.add_derived(p1.ref, ported.path, base="tiny@v2", kind="port")
        log("diff the ported model against v2: the patch of the next release, with its lineage")
        patch2 = patchlab.extract(models / "v2", ported.path, work / "patches" / "task-v2", device=device)
        p2 = reg.add_patch(patch2.path, name="task", base="tiny@v2", parents=[p1.ref], relation="port")
        reg.set_alias("prod", p2.ref)
        lineage = reg.lineage(p2.ref)
        result = DemoResult(work, str(work / "registry"), p1.ref, p2.ref, ported.path, lineage)
        labels = {
            "v1": models / "v1",
            "ft-v1": models / "ft-v1",
            "v2": models / "v2",
            "v2 + Δ(v1) (ported)": ported.path,
            "ft-v2 (oracle)": models / "ft-v2",
        }
        for label, path in labels.items():
            log(f"evaluate {label}")
            r = evaluate(path, [evals / "task.jsonl", evals / "general.jsonl"], device=device, batch_size=32)
            result.accuracy[label] = r.tasks["task"].accuracy
            result.general[label] = r.tasks["general"].accuracy
            target = {"v1": "tiny@v1", "v2": "tiny@v2"}.get(label)
            if target:
                reg.record_evaluation(target, "task", [i.__dict__ for i in r.instances if i.task == "task"])
        return result
    finally:
        reg.close()
