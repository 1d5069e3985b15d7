"""Time `patchlab base add` (fingerprinting a checkpoint) against `cat` of its weight files, alternating.

    PYTHONPATH=. python bench/base_add_bench.py --src /work/bench-data/llama-1b/src [--repeat 2] [--algorithm ...]

Every repeat runs, in this order: ``cat`` of the weight files to /dev/null; ``Registry.add_base`` in this
process (``add``: the fingerprint, the NaN/Inf test and the database row, torch already imported); and the
whole command ``patchlab base add`` in a fresh interpreter (``cli``: adds Python start-up, ``import torch`` and
opening the registry). Each add goes to a fresh registry in a temporary directory, made before the clock
starts; the page cache is warmed by one untimed ``cat`` first. ``--algorithm legacy`` times the sha256 scheme
instead (in process only, through ``checkpoint_facts``). Run with ``PYTHONPATH`` at a checkout from before the
blake3 fingerprints, the script times that code's ``base add`` (the "before" figures).

Prints one line per run (wall seconds, user+sys CPU seconds), then each contender's best and median and its
ratio to the best ``cat``; the load average first and last.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from patchlab.io.checkpoint import Checkpoint
from registry import Registry
from registry.bases import checkpoint_facts

try:
    from patchlab.digests import CONTENT_ALGORITHM, LEGACY
except ImportError:  # run on a checkout from before blake3 fingerprints (PYTHONPATH=that checkout): its sha256 add
    CONTENT_ALGORITHM = LEGACY = "sha256-of-sorted-tensor-sha256 (code before patchlab.digests)"


def timed(label: str, fn: Callable[[], str | None], who: int) -> float:
    """Run ``fn`` once; print ``label wall s user+sys`` (CPU of this process or of its children)."""
    c0, t0 = resource.getrusage(who), time.perf_counter()
    note = fn()
    wall = time.perf_counter() - t0
    c1 = resource.getrusage(who)
    print(
        f"{label} {wall:.2f} s {c1.ru_utime - c0.ru_utime:.2f}+{c1.ru_stime - c0.ru_stime:.2f}"
        + (f"  {note}" if note else ""),
        flush=True,
    )
    return wall


SELF, CHILDREN = resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN


def _cat(files: list[str]) -> None:
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)


def _add(reg: Registry, version: str, src: Path, algorithm: str) -> str:
    if algorithm != CONTENT_ALGORITHM:
        return checkpoint_facts(src, algorithm=algorithm)["content"][:12]
    return reg.add_base("fam", version, src).content[:19]


def _cli(home: Path, version: str, src: Path) -> str:
    """``patchlab base add`` in a fresh interpreter, importing the code this script imports (``PYTHONPATH``
    made absolute, run from the registry's folder so that the working directory does not shadow it)."""
    paths = [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    cmd = [sys.executable, "-m", "cli.app", "-R", str(home), "base", "add", f"fam@{version}", str(src)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=home, env=env)
    return out.stdout.strip().splitlines()[-1][-40:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, required=True, help="a model directory (safetensors)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--algorithm", choices=["current", "legacy"], default="current")
    ap.add_argument("--no-cli", action="store_true", help="skip the `patchlab base add` subprocess")
    args = ap.parse_args()
    algorithm = CONTENT_ALGORITHM if args.algorithm == "current" else LEGACY
    src = args.src.resolve()
    files = [str(src / f) for f in Checkpoint.open(src).weight_files() if f.endswith(".safetensors")]
    size = sum(os.path.getsize(f) for f in files)
    print(f"load {os.getloadavg()[0]:.2f}; {src}: {len(files)} files, {size / 1e9:.2f} GB; {algorithm}", flush=True)
    print(f"workers {os.environ.get('PATCHLAB_WORKERS') or len(os.sched_getaffinity(0))}", flush=True)
    _cat(files)  # warm the page cache
    work = Path(tempfile.mkdtemp(prefix="base-add-bench-"))
    times: dict[str, list[float]] = {"cat": [], "add": [], "cli": []}
    try:
        for k in range(args.repeat):
            times["cat"].append(timed("cat", lambda: _cat(files), resource.RUSAGE_CHILDREN))
            reg = Registry.init(work / f"reg-add-{k}")  # made before the clock starts, as `patchlab init` would
            try:
                times["add"].append(timed("add", partial(_add, reg, f"a{k}", src, algorithm), SELF))
            finally:
                reg.close()
            if not args.no_cli and algorithm == CONTENT_ALGORITHM:
                Registry.init(work / f"reg-cli-{k}").close()
                times["cli"].append(timed("cli", partial(_cli, work / f"reg-cli-{k}", f"c{k}", src), CHILDREN))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cat_best = min(times["cat"])
    for name, ts in times.items():
        if ts:
            best, med = min(ts), statistics.median(ts)
            rate = size / best / 1e9
            print(f"{name:4s} best {best:.2f} s, median {med:.2f} s, {rate:.2f} GB/s, {best / cat_best:.2f}x cat")
    print(f"load {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
