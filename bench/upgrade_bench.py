"""Upgrade workflow overhead: N patches of the tiny fixture family moved v1 -> v2 by ``run_upgrade``, against a
plain ``patchlab.port`` of the same patch (the port alone, the command's core).

    python bench/upgrade_bench.py [--patches 20] [--jobs 1 2]

Per patch: the workflow's wall time with evaluation excluded (every step but evaluate/baseline, from the step
rows) and the whole wall time / N; the port alone for comparison. A 2-instance suite keeps evaluation small.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import patchlab  # noqa: E402
from registry import Registry  # noqa: E402
from registry.workflows.upgrade import run_upgrade  # noqa: E402

MODELS = ROOT / "fixtures" / "models"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patches", type=int, default=20)
    ap.add_argument("--jobs", type=int, nargs="+", default=[1, 2])
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="upgrade-bench-"))
    try:
        suite = work / "suite.jsonl"
        suite.write_text("".join((ROOT / "fixtures/eval/task.jsonl").read_text().splitlines(keepends=True)[:2]))
        patch = patchlab.extract(MODELS / "v1", MODELS / "ft-v1", work / "p", device="cpu")
        t = []
        for i in range(5):
            t0 = time.perf_counter()
            patchlab.port(patch, MODELS / "v2", work / f"port-{i}", device="cpu")
            t.append(time.perf_counter() - t0)
        port_s = sorted(t)[len(t) // 2]
        print(f"patchlab.port of one patch (median of 5): {port_s * 1000:.1f} ms")
        for jobs in a.jobs:
            reg_dir = work / f"reg-{jobs}"
            with Registry.init(reg_dir) as reg:
                reg.add_base("tiny", "v1", MODELS / "v1")
                reg.add_base("tiny", "v2", MODELS / "v2")
                for i in range(a.patches):
                    reg.add_patch(patch.path, name=f"p{i:02d}", base="tiny@v1")
                reg.set_gate("tiny", family=True, suite=[str(suite)], expressions=["nfr <= 1"])
                t0 = time.perf_counter()
                res = run_upgrade(reg, "tiny", "v2", device="cpu", jobs=jobs)
                wall = time.perf_counter() - t0
                steps = reg.get_run(res.run.id).steps
            no_eval = sum(s.seconds or 0 for s in steps if s.step not in ("evaluate", "baseline")) / a.patches
            port_step = sum(s.seconds or 0 for s in steps if s.step == "port") / a.patches
            print(
                f"jobs={jobs}: {a.patches} patches in {wall:.1f} s ({wall / a.patches * 1000:.0f} ms/patch wall); "
                f"per patch without evaluation {no_eval * 1000:.0f} ms (port step {port_step * 1000:.0f} ms) "
                f"= {no_eval / port_s:.1f}x the port alone"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
