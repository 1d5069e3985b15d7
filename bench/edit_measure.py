"""Measure LocFT-BF against depth-first sequential FT and unlocalized (all-weights) FT on the fixture family.

    python bench/edit_measure.py [--sizes 10 100 all] [--lr 5e-3 --batch-size 8 --epochs 25] [--locate]

For each edit-set size (the first N edits of ``fixtures/edits/edits.jsonl``) and method, one fresh process
loads v1, records the unedited outputs of the locality prompts, trains, and measures the edited model:

- WILD reliability / generalization / locality (``patchlab.measure.edits``);
- general ability through ``patchlab.measure.evaluate``: task = exact match on ``fixtures/eval/task.jsonl`` (8 new
  tokens, stop at newline or "."), general = multiple-choice accuracy on ``fixtures/eval/general.jsonl``, and
  general on the items whose person no edit of the set touches (a counterfactual edit *should* change the
  answer of a general item about its fact, so the plain figure mixes success with damage);
- speed: edits per second of training; memory: trained parameters, their gradient + Adam state, and the
  process's peak RSS during training (peak CUDA allocation on a GPU).

Prints a Markdown table (and writes JSON with ``--json``). One process per row so each peak is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ("none", "locft-bf", "sequential-ft", "full-ft")


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(args: argparse.Namespace, method: str, n: int) -> dict:
    """Train and measure one (method, size) in this process; returns the row."""
    import torch
    from transformers.utils import logging as hf_logging

    from patchlab.engine.devices import resolve_device
    from patchlab.io.hf import load_model
    from patchlab.measure.edits import locality_baseline
    from patchlab.methods.edit import edited, full_ft, load_edits, locft_bf, sequential_ft

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    model, tok = load_model(args.model, device=resolve_device(args.device))
    edits = load_edits(args.edits)[:n]
    raw = [json.loads(line) for line in Path(args.edits).read_text().splitlines()[: len(edits)]]
    base = locality_baseline(model, tok, edits)
    cuda = next(model.parameters()).device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rss0 = _maxrss_mib()
    common = dict(lr=args.lr)
    if method == "locft-bf":
        res = locft_bf(model, tok, edits, layer=args.layer, batch_size=args.batch_size, epochs=args.epochs,
                       seed=args.seed, **common)
    elif method == "sequential-ft":
        res = sequential_ft(model, tok, edits, layer=args.layer, steps_per_edit=args.steps_per_edit, **common)
    elif method == "full-ft":
        res = full_ft(model, tok, edits, batch_size=args.batch_size, epochs=args.epochs, seed=args.seed, **common)
    else:
        res = None
    rss1 = _maxrss_mib()
    peak_cuda = torch.cuda.max_memory_allocated() / 2**20 if cuda else None

    def measure() -> dict:
        return {**wild_figures(model, tok, edits, base), **general_figures(model, tok, raw)}

    if res is None:
        row = measure()
        row.update(seconds=0.0, trained_params=0)
    else:
        with edited(model, res):
            row = measure()
        n_params = sum(d.numel() for d in res.deltas.values())
        row.update(seconds=res.seconds, trained_params=n_params, epochs_run=len(res.losses),
                   final_loss=res.losses[-1], edits_sha256=res.edits_sha256)
    row.update(method=method, n_edits=len(edits), device=str(next(model.parameters()).device),
               peak_rss_mib=round(rss1, 1), rss_growth_mib=round(rss1 - rss0, 1), peak_cuda_mib=peak_cuda)
    return row


def wild_figures(model, tok, edits, baseline) -> dict:
    """WILD reliability / generalization / locality (locality against ``baseline``, the unedited outputs)."""
    from patchlab.measure.edits import evaluate_edits

    s = evaluate_edits(model, tok, edits, baseline=baseline)
    return {"reliability": s.reliability, "generalization": s.generalization, "locality": s.locality}


def general_figures(model, tok, raw: list[dict]) -> dict:
    """task, general and general on the items about people no edit of ``raw`` (the edit lines) touches."""
    from fixtures import EVAL
    from fixtures.build import SEED, make_world
    from patchlab.measure.evaluate import evaluate

    world = make_world(SEED)
    touched = {r.get("subject") for r in raw}
    ev = evaluate(model, [EVAL / "task.jsonl", EVAL / "general.jsonl"], tokenizer=tok, max_new_tokens=8,
                  stop=("\n", "."))
    gen = [i for i in ev.instances if i.task == "general"]
    prompts = {json.loads(line)["id"]: json.loads(line)["prompt"] for line in
               (EVAL / "general.jsonl").read_text().splitlines()}
    untouched = [i for i in gen if not (set(prompts[i.id].split()) & touched & set(world.old))]
    task = [i for i in ev.instances if i.task == "task"]
    return {
        "task": sum(i.correct for i in task) / len(task),
        "general": sum(i.correct for i in gen) / len(gen),
        "general_untouched": sum(i.correct for i in untouched) / len(untouched),
        "n_general_untouched": len(untouched),
    }


def fmt(row: dict) -> str:
    speed = "-" if not row["seconds"] else f"{row['n_edits'] / row['seconds']:.1f}"
    state = row["trained_params"] * 12 / 2**20  # fp32 gradient + Adam m and v per trained parameter
    mem = f"{row['peak_cuda_mib']:.0f} (CUDA)" if row.get("peak_cuda_mib") else f"{row['peak_rss_mib']:.0f}"
    return (f"| {row['method']} | {row['n_edits']} | {row['reliability']:.3f} | {row['generalization']:.3f} | "
            f"{row['locality']:.3f} | {row['task']:.3f} | {row['general']:.3f} | {row['general_untouched']:.3f} | "
            f"{row['seconds']:.1f} | {speed} | {row['trained_params']:,} | {state:.2f} | {mem} |")


HEADER = ("| method | edits | reliability | generalization | locality | task | general | general (untouched) | "
          "train s | edits/s | trained params | grad+Adam MiB | peak MiB |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "fixtures" / "models" / "v1"))
    ap.add_argument("--edits", default=str(ROOT / "fixtures" / "edits" / "edits.jsonl"))
    ap.add_argument("--sizes", nargs="+", default=["10", "100", "all"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--layer", type=int, default=None)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--steps-per-edit", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--locate", action="store_true", help="also run locate() on all edits and print its table")
    ap.add_argument("--locate-epochs", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--one", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args, args.one[0], int(args.one[1]))))
        return
    n_all = sum(1 for line in Path(args.edits).read_text().splitlines() if line.strip())
    sizes = [n_all if s == "all" else int(s) for s in args.sizes]
    passthrough = [a for a in sys.argv[1:] if a not in ("--locate",)]
    rows = []
    t0 = time.perf_counter()
    for n in sizes:
        for method in args.methods:
            cmd = [sys.executable, __file__, *passthrough, "--one", method, str(n)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(fmt(rows[-1]), file=sys.stderr, flush=True)
    print(f"settings: lr {args.lr}, batch {args.batch_size}, epochs {args.epochs}, layer "
          f"{'default' if args.layer is None else args.layer}, steps/edit (sequential) {args.steps_per_edit}, "
          f"threads {args.threads}; {time.perf_counter() - t0:.0f} s in all\n")
    print(HEADER)
    for row in rows:
        print(fmt(row))
    if args.locate:
        import torch

        from patchlab.engine.devices import resolve_device
        from patchlab.io.hf import load_model
        from patchlab.methods.edit import locate

        torch.set_num_threads(args.threads)
        model, tok = load_model(args.model, device=resolve_device(args.device))
        found = locate(model, tok, args.edits, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                       epochs=args.locate_epochs)
        print(f"\nlocate (share 0.2 = {len(found.sample_ids)} edits, {args.locate_epochs} epochs each): "
              f"layer {found.layer}\n")
        print(found.markdown())
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
