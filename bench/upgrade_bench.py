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
import resource
import shutil
import statistics
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


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its finished children (the commands)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def rounds_report(label: str, wall: dict[str, list[float]], cpu: dict[str, list[float]], base: str) -> None:
    """The figures of several rotated rounds: ``upgrade`` against each other contender, as the median of the
    rounds' ratios (each round's contenders ran back to back, so they saw the same machine) and best against
    best; CPU seconds likewise (what the workflow adds in work, whatever the machine's noise)."""
    for other in [k for k in wall if k != "upgrade"]:
        ratios = [u / o for u, o in zip(wall["upgrade"], wall[other], strict=True)]
        cratios = [u / o for u, o in zip(cpu["upgrade"], cpu[other], strict=True)]
        target = " (target <= +20%)" if other == base else ""
        best_u, best_o = min(wall["upgrade"]), min(wall[other])
        print(
            f"  {label}: upgrade run against {other}: median of {len(ratios)} rounds "
            f"{(statistics.median(ratios) - 1) * 100:+.0f}%{target}, best vs best "
            f"{best_u:.2f} / {best_o:.2f} s = {(best_u / best_o - 1) * 100:+.0f}%; "
            f"CPU seconds {(statistics.median(cratios) - 1) * 100:+.0f}% (median)",
            flush=True,
        )


def rotated(names: list[str], r: int) -> list[str]:
    """Round ``r``'s order: each contender takes each place in turn (none always runs first, after a cold
    start, or last, after another's writes)."""
    k = r % len(names)
    return names[k:] + names[:k]


def contender(mode: str, args: dict) -> None:
    """One contender of ``--replay-eval`` in a process of its own (``--contender``), timed from after its
    imports: ``hand`` ports the patches (``args["jobs"]`` at a time), ``upgrade`` runs the upgrade of the
    registry at ``args["home"]`` with evaluation replayed. Prints wall and CPU seconds as JSON."""
    from concurrent.futures import ThreadPoolExecutor

    jobs, out = int(args["jobs"]), Path(args["out"])
    c0, t0 = cpu_seconds(), time.perf_counter()
    if mode == "hand":
        with ThreadPoolExecutor(jobs) as pool:
            list(
                pool.map(lambda p: patchlab.port(p, args["target"], out / Path(p).name, device="cpu"), args["patches"])
            )
    else:
        with Registry(args["home"]) as reg:
            res = run_upgrade(reg, "llama", "v2", device="cpu", jobs=jobs, executor=ReplayExecutor(args["recorded"]))
            wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
            ports = sum(st.seconds or 0.0 for st in reg.get_run(res.run.id).steps if st.step == "port")
        print(json.dumps({"wall": wall, "cpu": cpu, "port_steps": ports}))
        return
    print(json.dumps({"wall": time.perf_counter() - t0, "cpu": cpu_seconds() - c0}))


def run_contender(mode: str, args: dict) -> dict[str, float]:
    """Wall and CPU seconds (and an upgrade's port steps) of :func:`contender` run in a fresh interpreter (no
    state left by the bench's own setup: allocator, thread pools, open maps)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--contender", mode, json.dumps(args)]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])


def replay_bench(family: Path, jobs_list: list[int], work: Path, rounds: int = 3) -> None:
    """Whole-run wall time, evaluation replayed, against what a user would run by hand: ``patchlab.port`` of each
    patch with outputs kept, one after another (``--jobs 1``) or two at a time (``--jobs 2``), and the same as
    ``patchlab port`` commands. Each contender runs in a fresh process, starts with the bases, the patches and
    the registry evicted from the page cache (``drop_from_cache``, after a ``sync``), and takes each place in
    the order in turn over ``rounds`` rounds."""
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
        wall: dict[str, list[float]] = {"by hand": [], "commands": [], "upgrade": []}
        cpu: dict[str, list[float]] = {k: [] for k in wall}
        for r in range(rounds):
            drift_s = port_steps = 0.0
            for name in rotated(list(wall), r):
                out = work / f"out-{jobs}-{r}"
                if name == "by hand":
                    evict()
                    d = run_contender(
                        "hand",
                        {
                            "jobs": jobs,
                            "out": str(out),
                            "target": str(v["target"]),
                            "patches": [str(patches[k]) for k in fts],
                        },
                    )
                    got = (d["wall"], d["cpu"])
                elif name == "commands":
                    evict()
                    c0, t0 = cpu_seconds(), time.perf_counter()
                    with ThreadPoolExecutor(jobs) as pool:
                        list(
                            pool.map(
                                lambda k, o=out: port_command(
                                    patches[k], v["target"], o / k, work / "cmd-home", keep=True
                                ),
                                fts,
                            )
                        )
                    got = (time.perf_counter() - t0, cpu_seconds() - c0)
                else:
                    home = work / f"reg-{jobs}-{r}"
                    reg, drift_s = family_registry(home, v, patches, suite)
                    reg.close()
                    evict(home)
                    d = run_contender(
                        "upgrade", {"jobs": jobs, "out": str(out), "home": str(home), "recorded": recorded}
                    )
                    got, port_steps = (d["wall"], d["cpu"]), d["port_steps"]
                    shutil.rmtree(home)
                shutil.rmtree(out, ignore_errors=True)
                wall[name].append(got[0])
                cpu[name].append(got[1])
            up = wall["upgrade"][-1]
            print(
                f"jobs={jobs} round {r + 1} ({', '.join(rotated(list(wall), r))}): "
                + ", ".join(f"{k} {wall[k][-1]:.2f} s ({cpu[k][-1]:.1f} CPU s)" for k in wall)
                + f": upgrade {(up / wall['by hand'][-1] - 1) * 100:+.0f}% against the ports by hand, "
                f"{(up / wall['commands'][-1] - 1) * 100:+.0f}% against the commands; with base add's drift pass "
                f"({drift_s:.2f} s) counted in {((up + drift_s) / wall['by hand'][-1] - 1) * 100:+.0f}%; its port "
                f"steps took {port_steps:.2f} s (summed over workers), the run {up:.2f} s",
                flush=True,
            )
        rounds_report(f"jobs={jobs}", wall, cpu, "by hand")


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
    ap.add_argument("--rounds", type=int, default=3, help="rotated rounds of each contender (medians reported)")
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
    ap.add_argument("--contender", nargs=2, metavar=("MODE", "ARGS"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.contender:
        contender(a.contender[0], json.loads(a.contender[1]))
        return
    if a.family is not None:
        work = Path(tempfile.mkdtemp(prefix="upgrade-bench-", dir=a.work))
        try:
            if a.replay_eval:
                replay_bench(a.family, a.jobs, work, rounds=a.rounds)
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
        recorded = evaluate_task(model=str(MODELS / "v2"), suite=[str(suite)], device="cpu")
        from concurrent.futures import ThreadPoolExecutor

        for jobs in a.jobs:
            wall: dict[str, list[float]] = {"by hand": [], "upgrade": []}
            cpu: dict[str, list[float]] = {k: [] for k in wall}
            for r in range(a.rounds):
                for name in rotated(list(wall), r):
                    if name == "by hand":  # the same ports, one after another or two at a time
                        out = work / f"hand-{jobs}-{r}"
                        c0, t0 = cpu_seconds(), time.perf_counter()
                        with ThreadPoolExecutor(jobs) as pool:
                            list(
                                pool.map(
                                    lambda i, o=out: patchlab.port(patch, MODELS / "v2", o / f"p{i}", device="cpu"),
                                    range(a.patches),
                                )
                            )
                        wall[name].append(time.perf_counter() - t0)
                        cpu[name].append(cpu_seconds() - c0)
                        shutil.rmtree(out)
                        continue
                    reg_dir = work / f"reg-{jobs}-{r}"
                    with Registry.init(reg_dir) as reg:
                        reg.add_base("tiny", "v1", MODELS / "v1")
                        for i in range(a.patches):
                            reg.add_patch(patch.path, name=f"p{i:02d}", base="tiny@v1")
                        reg.add_base("tiny", "v2", MODELS / "v2")  # as a release arrives: its drift is recorded
                        reg.set_gate("tiny", family=True, suite=[str(suite)], expressions=["nfr <= 1"])
                        c0, t0 = cpu_seconds(), time.perf_counter()
                        res = run_upgrade(reg, "tiny", "v2", device="cpu", jobs=jobs, executor=ReplayExecutor(recorded))
                        wall[name].append(time.perf_counter() - t0)
                        cpu[name].append(cpu_seconds() - c0)
                        steps = reg.get_run(res.run.id).steps
                    shutil.rmtree(reg_dir)
                by: dict[str, float] = {}
                for st in steps:
                    by[st.step] = by.get(st.step, 0.0) + (st.seconds or 0.0) / a.patches
                hand, up = wall["by hand"][-1] / a.patches, wall["upgrade"][-1] / a.patches
                print(
                    f"jobs={jobs} round {r + 1}: {a.patches} patches: ports by hand {hand * 1000:.0f} ms/patch, "
                    f"upgrade run {up * 1000:.0f} ms/patch ({(up / hand - 1) * 100:+.0f}%; "
                    f"{(up / cmd_s - 1) * 100:+.0f}% against the command); its steps per patch (ms): "
                    + ", ".join(f"{k} {x * 1000:.1f}" for k, x in by.items()),
                    flush=True,
                )
            rounds_report(f"jobs={jobs}", wall, cpu, "by hand")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
