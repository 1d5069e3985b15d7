"""Size and fidelity of compressed patches on the tiny fixture family: bytes, energy kept, task accuracy.

For the fine-tune patch ``Δ = ft-v1 − v1`` it writes the dense patch, then low-rank versions (several
ranks and energies) and sparse ones (top-k and DARE at several densities), applies each to ``v1`` and
evaluates the result on the family's task (and general) eval sets with ``patchlab.measure.evaluate``. Printed as a
Markdown table (the one in docs/lowrank.md):

    python bench/compress_fidelity.py                       # fixtures/models/{v1,ft-v1}, fixtures/eval/*.jsonl
    python bench/compress_fidelity.py --ranks 1,4,16 --densities 0.05,0.2 --fixtures /path/to/fixtures

"bytes" are the patch's tensor bytes (safetensors shards); "energy" is Σ kept ‖Δ‖² / Σ ‖Δ‖² over all
``add`` tensors (dense ones count as fully kept) and "rel err" the pooled ‖Δ − Δ̂‖ / ‖Δ‖.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixtures", type=Path, default=ROOT / "fixtures")
    ap.add_argument("--base", default="v1")
    ap.add_argument("--ft", default="ft-v1")
    ap.add_argument("--ranks", type=_ints, default=[1, 4, 16])
    ap.add_argument("--energies", type=_floats, default=[0.9])
    ap.add_argument("--densities", type=_floats, default=[0.05, 0.2])
    ap.add_argument("--general", action="store_true", help="also evaluate eval/general.jsonl")
    ap.add_argument("--max-new-tokens", type=int, default=8, help="the task's answers are one or two words")
    ap.add_argument("--embeddings", default="dense", choices=["dense", "encode"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/compress-fidelity"))
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)

    import patchlab
    from patchlab.measure.evaluate import evaluate
    from patchlab.methods.compress import compress

    models, evals = args.fixtures / "models", args.fixtures / "eval"
    base, ft = models / args.base, models / args.ft
    wanted = [evals / "task.jsonl"] + ([evals / "general.jsonl"] if args.general else [])
    tasks = [p for p in wanted if p.exists()]
    if not (base / "config.json").exists() or not (ft / "config.json").exists() or not tasks:
        raise SystemExit(f"fixture family not found under {args.fixtures} (need models/{args.base}, "
                         f"models/{args.ft} and eval/task.jsonl); build it with `python -m fixtures.build`")
    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)

    def accuracy(model_dir: Path) -> dict[str, float]:
        res = evaluate(model_dir, tasks, device=args.device, max_new_tokens=args.max_new_tokens)
        return {name: s.accuracy for name, s in res.tasks.items()}

    t0 = time.perf_counter()
    dense = patchlab.extract(base, ft, args.work / "dense.patch", device=args.device)
    dense_bytes = dense.manifest["totals"].get("bytes") or sum(
        p.stat().st_size for p in dense.path.glob("*.safetensors"))
    rows: list[tuple[str, str, int, float, float, dict]] = []
    rows.append(("none (base)", "-", 0, 0.0, 1.0, accuracy(base)))

    def run(label: str, param: str, patch) -> None:
        out = args.work / f"m-{label}-{param}".replace(" ", "_")
        patchlab.apply(patch, base, out, device=args.device)
        t = patch.manifest["totals"]
        nbytes = t.get("bytes") or sum(p.stat().st_size for p in patch.path.glob("*.safetensors"))
        # energy: absent for a dense patch (all of it), None for DARE (rescaled survivors: no energy share)
        rows.append((label, param, nbytes, t.get("energy", 1.0), t.get("rel_error", 0.0), accuracy(out)))
        shutil.rmtree(out)

    run("dense", "fp32", dense)
    for r in args.ranks:
        run("lowrank", f"rank {r}", compress(dense, args.work / f"r{r}.patch", rank=r,
                                               embeddings=args.embeddings, device=args.device))
    for e in args.energies:
        run("lowrank", f"energy {e}", compress(dense, args.work / f"e{e}.patch", energy=e,
                                                 embeddings=args.embeddings, device=args.device))
    for d in args.densities:
        run("sparse top-k", f"density {d}", compress(dense, args.work / f"t{d}.patch", density=d,
                                                       embeddings=args.embeddings, device=args.device))
        run("sparse DARE", f"density {d}", compress(dense, args.work / f"d{d}.patch", density=d, method="dare",
                                                      seed=0, embeddings=args.embeddings, device=args.device))

    names = sorted({k for *_, acc in rows for k in acc})
    print(f"\npatch {args.ft} − {args.base} ({args.fixtures}), embeddings {args.embeddings}; "
          f"{time.perf_counter() - t0:.0f} s\n")
    head = "| encoding | parameter | bytes | × dense | energy kept | rel err | " + " | ".join(
        f"{n} acc" for n in names) + " |"
    print(head)
    print("|" + "---|" * (6 + len(names)))
    for label, param, nbytes, energy, err, acc in rows:
        ratio = f"{nbytes / dense_bytes:.3f}" if nbytes else "-"
        accs = " | ".join(f"{acc.get(n, float('nan')):.3f}" for n in names)
        en = "-" if energy is None else f"{energy:.4f}"
        print(f"| {label} | {param} | {nbytes:,} | {ratio} | {en} | {err:.4f} | {accs} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
