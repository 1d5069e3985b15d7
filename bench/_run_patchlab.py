"""Run one patchlab operation as its own process, so ``bench/run_port.py`` can time and sample it.

python bench/_run_patchlab.py port-fused --ft F --src S --target T --out O
python bench/_run_patchlab.py extract --src S --ft F --out O [--storage-dtype float32]
python bench/_run_patchlab.py merge --patches P1,P2,P3 --method ties --density 0.2 --onto S --out O
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# This checkout's patchlab, not whichever one the interpreter has installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("op", choices=["port-fused", "extract", "merge", "check"])
    ap.add_argument("--src", type=Path)
    ap.add_argument("--ft", type=Path)
    ap.add_argument("--target", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--storage-dtype", default=None, help="extract: float32, or the fine-tune's dtype (default)")
    ap.add_argument("--patches", help="merge: comma-separated patch directories")
    ap.add_argument("--method", default="task_arithmetic")
    ap.add_argument("--density", type=float)
    ap.add_argument("--onto", type=Path, help="merge: write base + merged Δ (a model) instead of a patch")
    a = ap.parse_args(argv)

    import patchlab

    if a.op == "check":  # is the API this benchmark needs there?
        missing = [f for f in ("port_fused", "extract") if not callable(getattr(patchlab, f, None))]
        if missing:
            print(f"patchlab has no {', '.join(missing)}", file=sys.stderr)
            return 3
        return 0
    if a.op == "merge":
        patchlab.merge(
            [Path(p) for p in a.patches.split(",")],
            a.out,
            method=a.method,
            densities=a.density,
            onto=a.onto,
            device=a.device,
        )
    elif a.op == "port-fused":
        patchlab.port_fused(a.ft, a.src, a.target, a.out, device=a.device)
    else:
        patchlab.extract(a.src, a.ft, a.out, device=a.device, storage_dtype=a.storage_dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
