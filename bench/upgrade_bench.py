"""Upgrade workflow overhead: N patches of the tiny fixture family moved v1 -> v2 by ``run_upgrade``, against a
plain ``patchlab.port`` of the same patch (the port alone, the command's core).

    python bench/upgrade_bench.py [--patches 20] [--jobs 1 2]
    python bench/upgrade_bench.py --family /work/bench-data/llama-1b [--jobs 1 2]   # 3 patches of the 1.1B family
    python bench/upgrade_bench.py --family /work/bench-data/llama-1b --replay-eval  # whole runs, evaluation replayed

``--family``: the ~1.1B synthetic family (``bench/make_family.py --extra-ft 2``): ``src`` is v1, ``target`` v2,
and ``ft``, ``ft2``, ``ft3`` give three patches (extracted once, in the fine-tunes' dtype, not timed). The
family has no tokenizer: the bench links its weights into views that carry the fixture tokenizer (ids < 320),
so the 2-item suite runs for real; evaluation is excluded from the overhead figure anyway.

Per patch: the workflow's wall time with evaluation excluded (every step but evaluate/baseline, from the step
rows) and the whole wall time / N; for comparison, the port alone in this process (``patchlab.port``: the
strict baseline) and the ``patchlab port PATCH TARGET OUT`` command a user would otherwise type (a process of its
own: interpreter start and imports included). A 2-instance suite keeps evaluation small.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import patchlab  # noqa: E402
from registry import Registry  # noqa: E402
from registry.workflows.executors import LocalExecutor  # noqa: E402
from registry.workflows.upgrade import run_upgrade  # noqa: E402
from registry.workflows.upgrade_tasks import evaluate_task  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from run_port import drop_from_cache  # noqa: E402

MODELS = ROOT / "fixtures" / "models"


def view(src: Path, dst: Path) -> Path:
    """``src``'s weights (symlinks) and config with the fixture tokenizer: a checkpoint the suite can run."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix == ".safetensors" or f.name.endswith(".index.json"):
            (dst / f.name).symlink_to(f.resolve())
    shutil.copy2(src / "config.json", dst / "config.json")
    for f in (MODELS / "v1").iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy2(f, dst / f.name)
    return dst


def family_registry(home: Path, v: dict[str, Path], patches: dict[str, Path], suite: Path) -> tuple[Registry, float]:
    """A registry with llama v1 (``src``), patch ``p-K`` on it for each fine-tune K, a family gate on ``suite``
    that every patch passes, then v2 (``target``) registered as a release arrives: after the patches, so ``base
    add`` measures v2's drift from v1 (``registry.drifts``). Returns the registry and the seconds that drift pass
    took (the upgrade then reads v1 for nothing; the figures below say what counting it in would give)."""
    import registry.drifts

    reg = Registry.init(home)
    reg.add_base("llama", "v1", v["src"])
    for k, path in patches.items():
        reg.add_patch(path, name=f"p-{k}", base="llama@v1")
    reg.set_gate("llama", family=True, suite=[str(suite)], expressions=["nfr <= 1"])
    measure, took = registry.drifts.measure_release_drift, []

    def timed(*a: object, **k: object) -> object:
        t0 = time.perf_counter()
        try:
            return measure(*a, **k)  # type: ignore[arg-type]
        finally:
            took.append(time.perf_counter() - t0)

    registry.drifts.measure_release_drift = timed  # type: ignore[assignment]
    try:
        t0 = time.perf_counter()
        reg.add_base("llama", "v2", v["target"])
        print(
            f"base add v2: {time.perf_counter() - t0:.2f} s, of which its drift from v1 {sum(took):.2f} s "
            "(once per release, not timed below)",
            flush=True,
        )
    finally:
        registry.drifts.measure_release_drift = measure
    return reg, sum(took)


def port_command(patch: Path, target: Path, out: Path, home: Path, keep: bool = False) -> float:
    """Wall time of ``patchlab port PATCH TARGET OUT`` as a user types it (a new process: interpreter start and
    imports included), against a throwaway registry ``home``; the output is removed afterwards unless ``keep``."""
    exe = Path(sys.executable).parent / "patchlab"
    env = {**os.environ, "PATCHLAB_HOME": str(home)}
    t0 = time.perf_counter()
    subprocess.run([str(exe), "port", str(patch), str(target), str(out)], check=True, env=env, capture_output=True)
    dt = time.perf_counter() - t0
    if not keep:
        shutil.rmtree(out)
    return dt


class ReplayExecutor(LocalExecutor):
    """Runs ports for real and answers every evaluation with one real evaluation recorded before the run, so
    the run's wall time holds everything but evaluation (flips, gate and reports still run on the result)."""

    def __init__(self, result: dict) -> None:
        self.result = result

    def evaluate(self, args: dict) -> dict:
        return json.loads(json.dumps(self.result))

    def baseline(self, args: dict) -> dict:
        return json.loads(json.dumps(self.result))


def replay_bench(family: Path, jobs_list: list[int], work: Path) -> None:
    """Whole-run wall time, evaluation replayed, against what a user would run by hand: ``patchlab.port`` of each
    patch with outputs kept, one after another (``--jobs 1``) or two at a time (``--jobs 2``); each contender
    starts with the bases, the patches and the registry evicted from the page cache (``drop_from_cache``)."""
    from concurrent.futures import ThreadPoolExecutor

    suite = work / "suite.jsonl"
    suite.write_text("".join((ROOT / "fixtures/eval/task.jsonl").read_text().splitlines(keepends=True)[:2]))
    v = {k: view(family / k, work / "views" / k) for k in ("src", "target", "ft", "ft2", "ft3")}
    fts = ("ft", "ft2", "ft3")
    patches = {k: patchlab.extract(v["src"], v[k], work / "patches" / k, device="cpu").path for k in fts}
    recorded = evaluate_task(model=str(v["target"]), suite=[str(suite)], device="cpu")

    def evict(*extra: Path) -> None:
        drop_from_cache(
            [*family.rglob("*.safetensors"), *(work / "patches").rglob("*.safetensors")]
            + [f for d in extra for f in d.rglob("*") if f.is_file()]
        )

    for jobs in jobs_list:
        by_hand, commands, runs = [], [], []
        for rep in range(2):
            out = work / f"by-hand-{jobs}-{rep}"
            evict()
            t0 = time.perf_counter()
            with ThreadPoolExecutor(jobs) as pool:
                list(pool.map(lambda k, o=out: patchlab.port(patches[k], v["target"], o / k, device="cpu"), fts))
            by_hand.append(time.perf_counter() - t0)
            shutil.rmtree(out)
            evict()
            t0 = time.perf_counter()
            with ThreadPoolExecutor(jobs) as pool:
                list(
                    pool.map(
                        lambda k, o=out: port_command(patches[k], v["target"], o / k, work / "cmd-home", keep=True),
                        fts,
                    )
                )
            commands.append(time.perf_counter() - t0)
            shutil.rmtree(out, ignore_errors=True)
            home = work / f"reg-{jobs}-{rep}"
            reg, drift_s = family_registry(home, v, patches, suite)
            with reg:
                evict(home)
                t0 = time.perf_counter()
                run_upgrade(reg, "llama", "v2", device="cpu", jobs=jobs, executor=ReplayExecutor(recorded))
                runs.append(time.perf_counter() - t0)
            shutil.rmtree(home)
            print(
                f"jobs={jobs} round {rep + 1}: 3 ports by hand {by_hand[-1]:.2f} s, 3 `patchlab port` commands "
                f"{commands[-1]:.2f} s, upgrade run {runs[-1]:.2f} s ({(runs[-1] / by_hand[-1] - 1) * 100:+.0f}%, "
                f"{(runs[-1] / commands[-1] - 1) * 100:+.0f}% against the commands; with base add's drift pass "
                f"counted in {((runs[-1] + drift_s) / by_hand[-1] - 1) * 100:+.0f}%, "
                f"{((runs[-1] + drift_s) / commands[-1] - 1) * 100:+.0f}%)",
                flush=True,
            )
        print(
            f"  jobs={jobs}: best upgrade run {min(runs):.2f} s vs best 3 ports by hand {min(by_hand):.2f} s: "
            f"overhead {(min(runs) / min(by_hand) - 1) * 100:+.0f}% (target <= +20%); against the best 3 commands "
            f"{min(commands):.2f} s: {(min(runs) / min(commands) - 1) * 100:+.0f}%",
            flush=True,
        )


def family_bench(family: Path, jobs_list: list[int], work: Path, cold: bool = False) -> None:
    """Three patches of the 1.1B family, v1 -> v2: per patch, the workflow's steps without evaluation against
    ``patchlab.port`` of the same patch onto v2 (best of two, warm cache; for ``--jobs 2``, ports run two at a
    time, as the workflow runs them)."""
    suite = work / "suite.jsonl"
    suite.write_text("".join((ROOT / "fixtures/eval/task.jsonl").read_text().splitlines(keepends=True)[:2]))
    v = {k: view(family / k, work / "views" / k) for k in ("src", "target", "ft", "ft2", "ft3")}
    fts = ("ft", "ft2", "ft3")
    patches = {}
    for k in fts:
        t0 = time.perf_counter()
        patches[k] = patchlab.extract(v["src"], v[k], work / "patches" / k, device="cpu").path
        print(f"setup: extract {k} {time.perf_counter() - t0:.1f} s (not timed below)", flush=True)

    def inputs(k: str) -> list[Path]:
        """What a port of patch k reads: the target's weights and the patch's files."""
        return [*(family / "target").glob("*.safetensors"), *Path(patches[k]).rglob("*.safetensors")]

    port_s = {}
    for k in fts:
        t = []
        for i in range(2):
            out = work / f"port-{k}-{i}"
            if cold:
                drop_from_cache(inputs(k))
            t0 = time.perf_counter()
            patchlab.port(patches[k], v["target"], out, device="cpu")
            t.append(time.perf_counter() - t0)
            shutil.rmtree(out)
        port_s[k] = min(t)
        print(f"patchlab.port {k}: {', '.join(f'{x:.2f}' for x in t)} s (best {port_s[k]:.2f} s)", flush=True)
    cmd_s = {}
    for k in fts:
        t = []
        for _ in range(2):
            if cold:
                drop_from_cache(inputs(k))
            t.append(port_command(patches[k], v["target"], work / f"cmd-{k}", work / "cmd-home"))
        cmd_s[k] = min(t)
        print(f"`patchlab port` command {k}: {', '.join(f'{x:.2f}' for x in t)} s (best {cmd_s[k]:.2f} s)", flush=True)
    # with --jobs 2 two patches run at once: their ports share the cores, so compare with ports run 2 at a time
    port_s2 = {}
    if any(j > 1 for j in jobs_list):
        from concurrent.futures import ThreadPoolExecutor

        def timed_port(k: str) -> float:
            out = work / f"port2-{k}"
            t0 = time.perf_counter()
            patchlab.port(patches[k], v["target"], out, device="cpu")
            dt = time.perf_counter() - t0
            shutil.rmtree(out)
            return dt

        for _ in range(2):
            if cold:
                for k in fts:
                    drop_from_cache(inputs(k))
            with ThreadPoolExecutor(2) as pool:
                got = dict(zip(fts, pool.map(timed_port, fts), strict=True))
            port_s2 = {k: min(got[k], port_s2.get(k, float("inf"))) for k in fts}
        print(
            f"patchlab.port, 2 at a time: {', '.join(f'{k} {port_s2[k]:.2f}' for k in fts)} s (best of 2)", flush=True
        )
        cmd_s2: dict[str, float] = {}
        for _ in range(2):
            if cold:
                for k in fts:
                    drop_from_cache(inputs(k))
            with ThreadPoolExecutor(2) as pool:
                got = dict(
                    zip(
                        fts,
                        pool.map(lambda k: port_command(patches[k], v["target"], work / f"cmd2-{k}", work / "h2"), fts),
                        strict=True,
                    )
                )
            cmd_s2 = {k: min(got[k], cmd_s2.get(k, float("inf"))) for k in fts}
        print(
            f"`patchlab port` commands, 2 at a time: {', '.join(f'{k} {cmd_s2[k]:.2f}' for k in fts)} s (best of 2)",
            flush=True,
        )
    for jobs in jobs_list:
        home = work / f"reg-{jobs}"
        reg, drift_s = family_registry(home, v, patches, suite)
        with reg:
            t0 = time.perf_counter()
            res = run_upgrade(reg, "llama", "v2", device="cpu", jobs=jobs)
            wall = time.perf_counter() - t0
            steps = reg.get_run(res.run.id).steps
        print(f"jobs={jobs}: 3 patches in {wall:.1f} s wall (evaluation included)")
        by: dict[str, dict[str, float]] = {}
        for st in steps:
            by.setdefault(st.patch, {})[st.step] = st.seconds or 0.0
        total_wf = total_port = total_cmd = 0.0
        base = port_s2 if jobs > 1 else port_s
        cmd = cmd_s2 if jobs > 1 else cmd_s
        for k in fts:
            st = by[f"p-{k}"]
            no_eval = sum(x for name, x in st.items() if name not in ("evaluate", "baseline"))
            total_wf, total_port, total_cmd = total_wf + no_eval, total_port + base[k], total_cmd + cmd[k]
            detail = ", ".join(f"{name} {x:.2f}" for name, x in st.items())
            print(
                f"  p-{k}: without evaluation {no_eval:.2f} s vs port alone {base[k]:.2f} s = "
                f"{no_eval / base[k]:.2f}x ({detail})"
            )
        print(
            f"  jobs={jobs}: workflow steps without evaluation {total_wf:.2f} s vs ports {total_port:.2f} s: "
            f"overhead {(total_wf / total_port - 1) * 100:+.0f}% (target <= +20%); vs `patchlab port` commands "
            f"{total_cmd:.2f} s: {(total_wf / total_cmd - 1) * 100:+.0f}%; with base add's drift pass counted in "
            f"{((total_wf + drift_s) / total_port - 1) * 100:+.0f}% and "
            f"{((total_wf + drift_s) / total_cmd - 1) * 100:+.0f}%",
            flush=True,
        )
        if jobs == 1:  # the run's wall time less the evaluation steps: bookkeeping between steps counted too
            evals = sum(x for st in by.values() for name, x in st.items() if name in ("evaluate", "baseline"))
            rest = wall - evals
            print(
                f"  jobs=1: run wall time less evaluation {rest:.2f} s vs ports {total_port:.2f} s: "
                f"overhead {(rest / total_port - 1) * 100:+.0f}%",
                flush=True,
            )
        shutil.rmtree(home)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patches", type=int, default=20)
    ap.add_argument("--jobs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--family", type=Path, default=None, help="the 1.1B family (src, target, ft, ft2, ft3)")
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument(
        "--cold",
        action="store_true",
        help="--family: evict each baseline port's inputs from the page cache first (the workflow's ports run "
        "after evaluations that load two fp32 models, which on a small machine evict them too)",
    )
    ap.add_argument(
        "--replay-eval",
        action="store_true",
        help="--family: time whole runs with every evaluation answered by one recorded evaluation, against the "
        "same ports run by hand (outputs kept; two at a time for --jobs 2), each from a cold page cache",
    )
    a = ap.parse_args()
    if a.family is not None:
        work = Path(tempfile.mkdtemp(prefix="upgrade-bench-", dir=a.work))
        try:
            if a.replay_eval:
                replay_bench(a.family, a.jobs, work)
            else:
                family_bench(a.family, a.jobs, work, cold=a.cold)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return
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
        c = sorted(port_command(patch.path, MODELS / "v2", work / "cmd-out", work / "cmd-home") for _ in range(3))
        cmd_s = c[1]
        print(f"`patchlab port PATCH v2 OUT` command (median of 3, process start included): {cmd_s * 1000:.0f} ms")
        for jobs in a.jobs:
            reg_dir = work / f"reg-{jobs}"
            with Registry.init(reg_dir) as reg:
                reg.add_base("tiny", "v1", MODELS / "v1")
                for i in range(a.patches):
                    reg.add_patch(patch.path, name=f"p{i:02d}", base="tiny@v1")
                reg.add_base("tiny", "v2", MODELS / "v2")  # as a release arrives: its drift from v1 is recorded
                reg.set_gate("tiny", family=True, suite=[str(suite)], expressions=["nfr <= 1"])
                t0 = time.perf_counter()
                res = run_upgrade(reg, "tiny", "v2", device="cpu", jobs=jobs)
                wall = time.perf_counter() - t0
                steps = reg.get_run(res.run.id).steps
            no_eval = sum(s.seconds or 0 for s in steps if s.step not in ("evaluate", "baseline")) / a.patches
            evals = sum(s.seconds or 0 for s in steps if s.step in ("evaluate", "baseline"))
            port_step = sum(s.seconds or 0 for s in steps if s.step == "port") / a.patches
            print(
                f"jobs={jobs}: {a.patches} patches in {wall:.1f} s ({wall / a.patches * 1000:.0f} ms/patch wall); "
                f"per patch without evaluation {no_eval * 1000:.0f} ms (port step {port_step * 1000:.0f} ms) "
                f"= {no_eval / port_s:.1f}x the port alone, {(no_eval / cmd_s - 1) * 100:+.0f}% against the command"
                + (f"; run wall less evaluation {(wall - evals) / a.patches * 1000:.0f} ms/patch" if jobs == 1 else "")
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
