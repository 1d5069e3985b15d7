"""What merging does on the fixture family: accuracy on each task of single fine-tunes and of merges.

Three task patches of ``v1`` (``fixtures/build.py``): ``qa`` (``ft-v1``, "question: where does sopu live?"),
``card`` (``ft-card-v1``, "card of sopu\\ncity:") and ``verify`` (``ft-verify-v1``, "check: sopu lives in
rome.\\ntrue or false:"), each extracted with ``patchlab.extract``. Every row is a model directory written
by ``patchlab.merge(..., onto=...)`` (or a fixture model) and scored by ``patchlab.measure.evaluate.evaluate``
on the held-out eval sets (``fixtures/eval/{task,card,verify}.jsonl``, greedy, 8 new tokens, stop at newline
or ".", exact match) and on ``general.jsonl`` (cloze multiple choice: pre-training knowledge). ``→ v2`` rows are
the merge of the v1 patches written onto ``v2`` (``port_to=v2``); the oracles are the same fine-tunes of v2.

    python bench/merge_measure.py [--json bench/results/merge-fixtures.json] [--quick]

``kept`` is the mean over ``qa`` and ``card`` of (merge accuracy / that task's single fine-tune accuracy on
the same base): 1.0 means the merge lost nothing. It leaves ``verify`` out: that task is true/false and
balanced (always answering "true" scores 0.49), and its own fine-tune is barely above chance on held-out
items (it learns its training items, not the check), so a ratio to it would mean little.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import patchlab  # noqa: E402
from fixtures import EVAL, model_path  # noqa: E402
from patchlab.measure.evaluate import evaluate  # noqa: E402
from patchlab.measure.tasks import load_task  # noqa: E402

TASKS = ("qa", "card", "verify")
EVAL_FILES = {"qa": "task.jsonl", "card": "card.jsonl", "verify": "verify.jsonl"}
FINETUNES = {"v1": {"qa": "ft-v1", "card": "ft-card-v1", "verify": "ft-verify-v1"},
             "v2": {"qa": "ft-v2", "card": "ft-card-v2", "verify": "ft-verify-v2"}}
SETS = {"qa+card": ("qa", "card"), "qa+card+verify": TASKS}

# (label, method, keyword arguments of patchlab.merge) for every set of patches.
MERGES: list[tuple[str, str, dict]] = [
    ("task_arithmetic λ=0.5", "task_arithmetic", {"lambda_": 0.5}),
    ("task_arithmetic λ=0.7", "task_arithmetic", {"lambda_": 0.7}),
    ("task_arithmetic λ=1", "task_arithmetic", {"lambda_": 1.0}),
    ("ties d=0.2", "ties", {"densities": 0.2}),
    ("ties d=0.5", "ties", {"densities": 0.5}),
    ("ties d=1", "ties", {"densities": 1.0}),
    ("ties d=0.5 λ=1.5", "ties", {"densities": 0.5, "lambda_": 1.5}),
    ("dare_linear d=0.5 λ=0.7", "dare_linear", {"densities": 0.5, "lambda_": 0.7}),
    ("dare_linear d=0.5", "dare_linear", {"densities": 0.5}),
    ("dare_ties d=0.5", "dare_ties", {"densities": 0.5}),
]
QUICK = ("task_arithmetic λ=1", "ties d=0.5", "dare_linear d=0.5")
PORTED = ("task_arithmetic λ=0.7", "task_arithmetic λ=1", "ties d=0.5")


def tasks() -> list:
    out = [load_task(EVAL / f, name=t) for t, f in EVAL_FILES.items()]
    return [*out, load_task(EVAL / "general.jsonl", name="general")]


def score(model: Path, task_list: list) -> dict[str, float]:
    res = evaluate(model, task_list, batch_size=64, device="cpu", max_new_tokens=8, stop=("\n", "."))
    return {t: round(s.accuracy, 4) for t, s in res.tasks.items()}


KEPT = ("qa", "card")


def kept(row: dict[str, float], singles: dict[str, float]) -> float:
    return round(sum(row[t] / singles[t] for t in KEPT) / len(KEPT), 4)


def measure(work: Path, quick: bool = False, log=print) -> dict:
    torch.set_num_threads(2)
    task_list = tasks()
    v1, v2 = model_path("v1"), model_path("v2")
    rows: list[dict] = []

    def add(group: str, label: str, path: Path, merged: tuple[str, ...] = (), base: str = "v1") -> dict:
        t0 = time.perf_counter()
        r = {"group": group, "row": label, **score(path, task_list)}
        if merged:
            r["kept"] = kept(r, singles[base])
        rows.append(r)
        log(f"{group:<16} {label:<26} " + " ".join(f"{r[t]:.3f}" for t in (*TASKS, "general"))
            + (f"  kept {r['kept']:.3f}" if merged else "") + f"  ({time.perf_counter() - t0:.1f}s)")
        return r

    singles: dict[str, dict[str, float]] = {"v1": {}, "v2": {}}
    add("v1", "base v1", v1)
    for t, name in FINETUNES["v1"].items():
        singles["v1"][t] = add("single", name, model_path(name))[t]
    patches = {}
    for t, name in FINETUNES["v1"].items():
        patches[t] = work / f"{t}.patch"
        patchlab.extract(v1, model_path(name), patches[t])
    chosen = [m for m in MERGES if not quick or m[0] in QUICK]
    for set_name, members in SETS.items():
        for label, method, kw in chosen:
            out = work / f"{set_name}-{label}".replace(" ", "_")
            patchlab.merge([patches[t] for t in members], out, method=method, onto=v1, **kw)
            add(set_name, label, out, members)
    add("v2", "base v2", v2)
    for t, name in FINETUNES["v2"].items():
        singles["v2"][t] = add("oracle (v2)", name, model_path(name))[t]
    for set_name, members in SETS.items():
        for label, method, kw in chosen:
            if label not in PORTED and not quick:
                continue
            out = work / f"ported-{set_name}-{label}".replace(" ", "_")
            patchlab.merge([patches[t] for t in members], out, method=method, port_to=v2, onto=v2, **kw)
            add(f"{set_name} → v2", label, out, members, base="v2")
    return {"tasks": {t: EVAL_FILES[t] for t in TASKS}, "singles": singles, "rows": rows}


def table(result: dict) -> str:
    lines = [f"{'group':<20} {'row':<24} {'qa':>6} {'card':>6} {'verify':>6} {'general':>8} {'kept':>6}"]
    for r in result["rows"]:
        k = f"{r['kept']:>6.3f}" if "kept" in r else f"{'':>6}"
        lines.append(f"{r['group']:<20} {r['row']:<24} {r['qa']:>6.3f} {r['card']:>6.3f} {r['verify']:>6.3f}"
                     f" {r['general']:>8.3f} {k}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="write the rows here")
    ap.add_argument("--quick", action="store_true", help="three merges only (task_arithmetic, ties, dare)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="merge-measure-") as tmp:
        result = measure(Path(tmp), args.quick, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(table(result))
    print(f"measured in {time.perf_counter() - t0:.0f}s, load average {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
