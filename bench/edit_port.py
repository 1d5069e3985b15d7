"""Portability of an edit: LocFT-BF edits made on v1 as a patch, ported to v2, against editing v2 directly.

    python bench/edit_port.py [--sizes 10 100 all] [--lr 5e-3 --batch-size 8 --epochs 25]

For each edit-set size (the first N edits of ``fixtures/edits/edits.jsonl``) it runs the real pipeline:
``patchlab.edit`` on v1 writes the one-tensor patch, ``patchlab.port`` writes v2 + Δ, and the ported
checkpoint is loaded and measured; ``patchlab.edit`` on v2 is the direct edit. Rows per size:

- ``v1 edited``: the patch applied to v1 (``patchlab.apply``: the model training left, bit for bit);
- ``v1 → v2 port``: the patch ported to v2;
- ``v2 edited``: LocFT-BF run on v2 itself with the same settings;
- ``v2 unedited``: v2 alone.

Figures as ``bench/edit_measure.py``: WILD reliability / generalization / locality (locality against the
unedited model of the same version), task, general and general on untouched people.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

HEADER = ("| edits | model | reliability | generalization | locality | task | general | general (untouched) |\n"
          "|---:|---|---:|---:|---:|---:|---:|---:|")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edits", default=str(ROOT / "fixtures" / "edits" / "edits.jsonl"))
    ap.add_argument("--sizes", nargs="+", default=["10", "100", "all"])
    ap.add_argument("--layer", type=int, default=None)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import torch
    from edit_measure import general_figures, wild_figures
    from transformers.utils import logging as hf_logging

    import patchlab
    from fixtures import model_path
    from patchlab.engine.devices import resolve_device
    from patchlab.io.hf import load_model
    from patchlab.measure.edits import locality_baseline
    from patchlab.methods.edit import load_edits

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    all_edits = load_edits(args.edits)
    lines = Path(args.edits).read_text().splitlines()
    sizes = [len(all_edits) if s == "all" else int(s) for s in args.sizes]
    kw = dict(layer=args.layer, lr=args.lr, batch_size=args.batch_size, epochs=args.epochs, seed=args.seed,
              device=args.device)
    rows = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for n in sizes:
            edits, raw = all_edits[:n], [json.loads(line) for line in lines[:n]]
            ef = tmp / f"e{n}.jsonl"
            ef.write_text("".join(line + "\n" for line in lines[:n]))
            v1_patch = patchlab.edit(model_path("v1"), ef, tmp / f"v1-{n}", **kw)
            v2_direct = patchlab.edit(model_path("v2"), ef, tmp / f"v2-{n}", **kw)
            made = {
                "v1 edited": (model_path("v1"), patchlab.apply(v1_patch.path, model_path("v1"), tmp / f"a1-{n}",
                                                               device=args.device).path),
                "v1 → v2 port": (model_path("v2"), patchlab.port(v1_patch.path, model_path("v2"), tmp / f"p2-{n}",
                                                                 device=args.device).path),
                "v2 edited": (model_path("v2"), patchlab.apply(v2_direct.path, model_path("v2"), tmp / f"a2-{n}",
                                                               device=args.device).path),
                "v2 unedited": (model_path("v2"), model_path("v2")),
            }
            baselines = {}
            for label, (base, path) in made.items():
                if base not in baselines:
                    bm, btok = load_model(base, device=dev)
                    baselines[base] = locality_baseline(bm, btok, edits)
                model, tok = load_model(path, device=dev)
                row = {"n_edits": n, "model": label, **wild_figures(model, tok, edits, baselines[base]),
                       **general_figures(model, tok, raw)}
                rows.append(row)
                print(fmt(row), file=sys.stderr, flush=True)
            rows[-4]["layer"] = v1_patch.result.params["layer"]
    print(f"settings: lr {args.lr}, batch {args.batch_size}, epochs {args.epochs}, layer "
          f"{'default' if args.layer is None else args.layer}, threads {args.threads}, device {dev}; "
          f"{time.perf_counter() - t0:.0f} s in all\n")
    print(HEADER)
    for row in rows:
        print(fmt(row))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


def fmt(row: dict) -> str:
    return (f"| {row['n_edits']} | {row['model']} | {row['reliability']:.3f} | {row['generalization']:.3f} | "
            f"{row['locality']:.3f} | {row['task']:.3f} | {row['general']:.3f} | {row['general_untouched']:.3f} |")


if __name__ == "__main__":
    main()
