"""Port/extract benchmark: patchlab against a plain torch script, mergekit and the ``cat`` floor.

Each contender runs as its own process on the same family (``bench/make_family.py``); the harness
reports its wall time, CPU time and peak memory. Memory is sampled every ~20 ms from
``/proc/<pid>/status`` of the process and all its descendants: ``RssAnon`` (anonymous memory: what the
process itself allocated) is the figure that counts, ``VmRSS`` (which also counts mmapped file pages
that the kernel can drop at will) is printed for reference. Peaks between two samples can be missed.

The page cache is warmed first (every input file is read once), so all contenders read from memory;
outputs are deleted (and ``sync`` run) between contenders. Every port output is checked against a
reference the harness computes itself (``target + (ft - src)`` in fp32, cast to bf16) on a few tensors.

    python bench/make_family.py --out /work/bench-data/llama-1b
    python bench/run_port.py --family /work/bench-data/llama-1b --json bench-port.json
    python bench/run_port.py --family /work/bench-data/smoke-2l --layers 2      # quick smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from baseline_torch import weight_map  # noqa: E402

MIB = 1024 * 1024
DEFAULT_MERGEKIT = HERE / ".venv-mergekit" / "bin" / "mergekit-yaml"
FLOORS = ("cat", "cat-extract", "cp-extract", "import-torch")  # cheap; repeated more so the floor is not one noisy run
CONTENDERS = (
    "cat",
    "cat-extract",
    "cp-extract",
    "import-torch",
    "torch",
    "mergekit",
    "patchlab-port",
    "patchlab-extract",
    "patchlab-extract-fp32",
    "cli-diff",
    "cli-port",
    "cli-fused",
    "cli-diff-w1",
    "cli-port-w1",
    "cli-fused-w1",
)
# Targets from issue 2, item 7 (2-core CPU machine).
TARGET_VS_MERGEKIT = 5.0  # port at least this many times faster than mergekit
TARGET_ANON_MIB = 512.0  # peak anonymous memory of a port
TARGET_VS_CAT = 5.0  # port within this many times the cat floor
# Targets from issue 15: the user's CLI paths
TARGET_CLI_PORT_VS_MERGEKIT = 5.0  # `patchlab port PATCH TARGET OUT` (stored patch) against mergekit
TARGET_CLI_PORT_VS_FUSED = 1.2  # ... within this many times the fused CLI port
TARGET_CLI_FUSED_VS_MERGEKIT = 8.0  # `patchlab port --from-finetune FT --source SRC TARGET OUT`
TARGET_CLI_ANON_MIB = 256.0  # peak anonymous memory of both CLI ports
TARGET_EXTRACT_VS_CAT = 10.0  # `patchlab diff` within this many times `cat` of its inputs


# ---------------------------------------------------------------------------------------------------------
# Memory sampling


def _children_map() -> dict[int, list[int]]:
    """ppid -> pids of every process (the kernel here has no /proc/<pid>/task/<tid>/children)."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # Field 4 (ppid) follows the command name, which is in parentheses and may contain spaces.
        ppid = int(stat[stat.rfind(b")") + 2 :].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def _tree(root: int) -> list[int]:
    kids = _children_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, ()))
    return out


def _status_kib(pid: int) -> tuple[int, int]:
    """(RssAnon, VmRSS) of one process in KiB; (0, 0) once it is gone."""
    anon = rss = 0
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"RssAnon:"):
                    anon = int(line.split()[1])
                elif line.startswith(b"VmRSS:"):
                    rss = int(line.split()[1])
    except OSError:
        pass
    return anon, rss


class Sampler(threading.Thread):
    """Samples the summed RssAnon / VmRSS of a process tree until stopped; keeps the peaks."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_anon_kib = self.peak_rss_kib = self.samples = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        pids = [self.pid]
        while not self._stop_event.is_set():
            # Walking the whole process table costs ~1.5 ms; do it every 5th sample, read the known pids always.
            if self.samples % 5 == 0:
                pids = _tree(self.pid)
            anon = rss = 0
            for pid in pids:
                a, r = _status_kib(pid)
                anon += a
                rss += r
            self.peak_anon_kib = max(self.peak_anon_kib, anon)
            self.peak_rss_kib = max(self.peak_rss_kib, rss)
            self.samples += 1
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


# ---------------------------------------------------------------------------------------------------------
# Contenders


@dataclass
class Result:
    name: str
    status: str  # "ok", "failed", "unavailable", "skipped"
    wall_s: float | None = None
    cpu_s: float | None = None
    peak_anon_mib: float | None = None
    peak_rss_mib: float | None = None
    samples: int = 0
    max_abs_diff: float | None = None  # against the harness's own reference
    load_before: float | None = None  # 1-minute load average when the run started (others' work shows here)
    note: str = ""
    command: list[str] = field(default_factory=list)


def measure(name: str, cmd: list[str], *, timeout: float, log: Path, env: dict[str, str] | None = None) -> Result:
    """Run ``cmd`` once, sampling memory; stdout/stderr go to ``log``."""
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "wb") as logf:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        sampler = Sampler(proc.pid)
        sampler.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = None
        wall = time.perf_counter() - t0
        sampler.stop()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    res = Result(
        name,
        "ok",
        wall,
        cpu,
        sampler.peak_anon_kib / 1024,
        sampler.peak_rss_kib / 1024,
        sampler.samples,
        load_before=load,
        command=cmd,
    )
    if rc != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-8:]
        res.status = "failed"
        res.note = (f"timed out after {timeout:.0f} s" if rc is None else f"exit {rc}") + f"; log {log}"
        print(f"  {name} failed ({res.note}):\n    " + "\n    ".join(tail), file=sys.stderr)
    return res


def shard_files(ckpt: Path) -> list[Path]:
    return [ckpt / f for f in sorted(set(weight_map(ckpt).values()))]


def warm_cache(paths: list[Path]) -> float:
    t0 = time.perf_counter()
    subprocess.run(["cat", *map(str, paths)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def drop_from_cache(paths: list[Path]) -> None:
    """Evict these files from the page cache (``posix_fadvise(DONTNEED)``; only their clean pages, and only
    theirs: other users of the machine keep their cache)."""
    subprocess.run(["sync"], check=False)
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cached_fraction(paths: list[Path]) -> float | None:
    """Share of these files' bytes in the page cache (util-linux ``fincore``), None when it is missing."""
    if not paths or shutil.which("fincore") is None:
        return None
    r = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES,SIZE", *map(str, paths)],
        capture_output=True,
        text=True,
    )
    res = size = 0
    for line in r.stdout.split("\n"):
        parts = line.split()
        if len(parts) == 2:
            res += int(parts[0])
            size += int(parts[1])
    return res / size if size else None


def clear_output(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    subprocess.run(["sync"], check=False)


def mergekit_available(exe: Path) -> str | None:
    """None when ``exe`` runs and its python imports mergekit, else why not."""
    if not exe.is_file():
        return f"{exe} not found (install: see docs/bench.md)"
    py = exe.parent / "python"
    r = subprocess.run([str(py), "-c", "import mergekit"], capture_output=True, text=True)
    if r.returncode != 0:
        return "mergekit not importable: " + (r.stderr.strip().splitlines() or ["?"])[-1]
    return None


def mergekit_config(src: Path, ft: Path, target: Path) -> str:
    """task_arithmetic with base src and ft, target at weight 1: src + (ft - src) + (target - src)."""
    return (
        "merge_method: task_arithmetic\n"
        f"base_model: {src}\n"
        "models:\n"
        f"  - model: {ft}\n"
        "    parameters:\n      weight: 1.0\n"
        f"  - model: {target}\n"
        "    parameters:\n      weight: 1.0\n"
        "parameters:\n  normalize: false\n"
        "dtype: float32\n"
        "out_dtype: bfloat16\n"
    )


def patchlab_available() -> str | None:
    r = subprocess.run(
        [sys.executable, str(HERE / "_run_patchlab.py"), "check"], capture_output=True, text=True, cwd=REPO
    )
    if r.returncode != 0:
        return "patchlab port_fused/extract not importable: " + (r.stderr.strip().splitlines() or ["?"])[-1]
    return None


# ---------------------------------------------------------------------------------------------------------
# Verification


def _read(ckpt: Path, name: str, wmap: dict[str, str] | None = None):
    from safetensors import safe_open

    wmap = wmap if wmap is not None else weight_map(ckpt)
    with safe_open(str(ckpt / wmap[name]), framework="pt") as f:
        return f.get_tensor(name)


def check_names(src: Path) -> list[str]:
    """A few tensors of every kind to compare outputs on: embeddings, attention, MLP, norms, head."""
    names = list(weight_map(src))
    layers = sorted({int(n.split(".")[2]) for n in names if n.startswith("model.layers.")})
    last = layers[-1] if layers else 0
    want = [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        f"model.layers.{last}.mlp.down_proj.weight",
        "model.layers.0.input_layernorm.weight",
        "model.norm.weight",
        "lm_head.weight",
    ]
    return [n for n in want if n in names]


def port_reference(src: Path, ft: Path, target: Path, names: list[str]) -> dict:
    ref = {}
    for n in names:
        t = _read(target, n)
        ref[n] = (t.float() + (_read(ft, n).float() - _read(src, n).float())).to(t.dtype)
    return ref


def port_diff(out: Path, ref: dict) -> float:
    """Largest |out - ref| over the reference tensors (inf if a tensor is missing or mis-shaped)."""
    try:
        wmap = weight_map(out)
    except FileNotFoundError:
        wmap = {}
        for f in sorted(out.glob("*.safetensors")):
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as sf:
                wmap.update({k: f.name for k in sf.keys()})
    worst = 0.0
    for n, r in ref.items():
        if n not in wmap:
            return float("inf")
        t = _read(out, n, wmap)
        if t.shape != r.shape:
            return float("inf")
        worst = max(worst, (t.float() - r.float()).abs().max().item())
    return worst


def extract_diff(out: Path, src: Path, ft: Path, names: list[str]) -> float:
    """Largest |dense ΔW - (ft - src)| over ``names`` of a patchlab patch."""
    sys.path.insert(0, str(REPO))
    from patchlab.io.patch import Patch

    patch = Patch.open(out)
    worst = 0.0
    for n in names:
        d = patch.entry(n).dense()
        exact = _read(ft, n).float() - _read(src, n).float()
        worst = max(worst, (d.float().reshape(exact.shape) - exact).abs().max().item())
    return worst


# ---------------------------------------------------------------------------------------------------------
# Report


def _fmt(x: float | None, spec: str) -> str:
    """``format(x, spec)``, or a dash as wide as the spec's width when there is no figure."""
    if x is None:
        width = spec.split(".")[0]
        return "-".rjust(int(width) if width.isdigit() else 1)
    return format(x, spec)


def table(results: list[Result]) -> str:
    head = (
        f"{'contender':<18} {'status':<11} {'wall s':>8} {'cpu s':>8} {'anon MiB':>9} {'RSS MiB':>9} "
        f"{'max|diff|':>10} {'load':>5}  note"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r.name:<18} {r.status:<11} {_fmt(r.wall_s, '8.2f')} {_fmt(r.cpu_s, '8.2f')} "
            f"{_fmt(r.peak_anon_mib, '9.1f')} {_fmt(r.peak_rss_mib, '9.1f')} "
            f"{_fmt(r.max_abs_diff, '10.3g')} {_fmt(r.load_before, '5.2f')}  {r.note}"
        )
    return "\n".join(lines)


def ratios(by: dict[str, Result]) -> dict[str, float | None]:
    """Wall-time ratios (what the targets are about) and, on a shared machine, CPU-time ones beside them."""

    def fig(n: str, attr: str) -> float | None:
        r = by.get(n)
        return getattr(r, attr) if r is not None and r.status == "ok" else None

    def ratio(a: str, b: str, attr: str = "wall_s") -> float | None:
        fa, fb = fig(a, attr), fig(b, attr)
        return fa / fb if fa is not None and fb else None

    pairs = [
        ("mergekit", "patchlab-port"),
        ("torch", "patchlab-port"),
        ("patchlab-port", "cat"),
        ("patchlab-extract", "cat-extract"),
        ("patchlab-extract-fp32", "cat-extract"),
        ("mergekit", "cli-port"),
        ("mergekit", "cli-fused"),
        ("cli-port", "cli-fused"),
        ("cli-fused", "patchlab-port"),
        ("cli-diff", "cat-extract"),
        ("cli-diff", "cp-extract"),
        ("cli-port", "cat"),
        ("cli-diff-w1", "cli-diff"),
        ("cli-port-w1", "cli-port"),
        ("cli-fused-w1", "cli-fused"),
    ]
    out: dict[str, float | None] = {f"{a}/{b}": ratio(a, b) for a, b in pairs}
    out.update({f"{a}/{b} (cpu s)": ratio(a, b, "cpu_s") for a, b in pairs})
    return out


def targets(by: dict[str, Result], rat: dict[str, float | None]) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for the issue's three targets."""
    out = []
    r = rat["mergekit/patchlab-port"]
    out.append(
        (
            f"port >= {TARGET_VS_MERGEKIT:g}x faster than mergekit",
            _fmt(r, ".2f") + "x",
            "n/a" if r is None else ("PASS" if r >= TARGET_VS_MERGEKIT else "FAIL"),
        )
    )
    p = by.get("patchlab-port")
    anon = p.peak_anon_mib if p is not None and p.status == "ok" else None
    out.append(
        (
            f"port peak anon < {TARGET_ANON_MIB:g} MiB",
            _fmt(anon, ".1f") + " MiB",
            "n/a" if anon is None else ("PASS" if anon < TARGET_ANON_MIB else "FAIL"),
        )
    )
    r = rat["patchlab-port/cat"]
    out.append(
        (
            f"port within {TARGET_VS_CAT:g}x of cat",
            _fmt(r, ".2f") + "x",
            "n/a" if r is None else ("PASS" if r <= TARGET_VS_CAT else "FAIL"),
        )
    )

    def check(label: str, key: str, limit: float, at_least: bool) -> None:
        v = rat.get(key)
        ok = None if v is None else (v >= limit if at_least else v <= limit)
        out.append((label, _fmt(v, ".2f") + "x", "n/a" if ok is None else ("PASS" if ok else "FAIL")))

    check(
        f"cli-port >= {TARGET_CLI_PORT_VS_MERGEKIT:g}x faster than mergekit",
        "mergekit/cli-port",
        TARGET_CLI_PORT_VS_MERGEKIT,
        True,
    )
    check(
        f"cli-port within {TARGET_CLI_PORT_VS_FUSED:g}x of cli-fused",
        "cli-port/cli-fused",
        TARGET_CLI_PORT_VS_FUSED,
        False,
    )
    check(
        f"cli-fused >= {TARGET_CLI_FUSED_VS_MERGEKIT:g}x faster than mergekit",
        "mergekit/cli-fused",
        TARGET_CLI_FUSED_VS_MERGEKIT,
        True,
    )
    check(f"cli-diff within {TARGET_EXTRACT_VS_CAT:g}x of cat", "cli-diff/cat-extract", TARGET_EXTRACT_VS_CAT, False)
    for n in ("cli-port", "cli-fused"):
        r = by.get(n)
        anon = r.peak_anon_mib if r is not None and r.status == "ok" else None
        out.append(
            (
                f"{n} peak anon <= {TARGET_CLI_ANON_MIB:g} MiB",
                _fmt(anon, ".1f") + " MiB",
                "n/a" if anon is None else ("PASS" if anon <= TARGET_CLI_ANON_MIB else "FAIL"),
            )
        )
    return out


# ---------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--family",
        type=Path,
        default=Path("/work/bench-data/llama-1b"),
        help="family directory made by bench/make_family.py (holds src/, ft/, target/)",
    )
    ap.add_argument(
        "--layers",
        type=int,
        default=None,
        help="make the family with this many layers first if it is missing or different "
        "(e.g. 2 for a quick smoke run); without it the family must already exist",
    )
    ap.add_argument(
        "--work",
        type=Path,
        default=None,
        help="where contenders write their outputs (default: FAMILY/_out); emptied between runs",
    )
    ap.add_argument(
        "--only",
        default=",".join(CONTENDERS),
        help=f"comma-separated contenders to run (default all: {','.join(CONTENDERS)})",
    )
    ap.add_argument(
        "--mergekit",
        type=Path,
        default=DEFAULT_MERGEKIT,
        help="mergekit-yaml executable (default: bench/.venv-mergekit/bin/mergekit-yaml)",
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs per contender; the table shows the best wall time and the worst memory",
    )
    ap.add_argument(
        "--repeat-floor",
        type=int,
        default=3,
        help="runs of the cheap floors (cat, cat-extract, import-torch), at least --repeat (default 3)",
    )
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per contender")
    ap.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set an environment variable for every contender (repeatable), e.g. OMP_NUM_THREADS=1",
    )
    ap.add_argument(
        "--cold",
        action="store_true",
        help="evict each contender's input files from the page cache before every run (posix_fadvise "
        "DONTNEED on those files only) instead of warming the cache first",
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)

    only = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = sorted(set(only) - set(CONTENDERS))
    if unknown:
        ap.error(f"unknown contender(s) {', '.join(unknown)}; choose from {', '.join(CONTENDERS)}")

    extra_env = {}
    for kv in args.env:
        key, eq, value = kv.partition("=")
        if not eq or not key:
            ap.error(f"--env takes KEY=VALUE, got {kv!r}")
        extra_env[key] = value
    env = {**os.environ, **extra_env}
    fam = args.family
    if args.layers is not None:
        from make_family import generate

        generate(fam, layers=args.layers)
    src, ft, target = fam / "src", fam / "ft", fam / "target"
    for p in (src, ft, target):
        if not (p / "model.safetensors.index.json").is_file() and not (p / "model.safetensors").is_file():
            ap.error(f"{p} is not a checkpoint; make the family first: python bench/make_family.py --out {fam}")
    work = args.work or fam / "_out"
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)

    inputs = {k: shard_files(p) for k, p in (("src", src), ("ft", ft), ("target", target))}
    in_bytes = sum(f.stat().st_size for fs in inputs.values() for f in fs)
    n_params = (
        json.loads((src / "model.safetensors.index.json").read_text())["metadata"]["total_size"] // 2
        if (src / "model.safetensors.index.json").is_file()
        else None
    )
    cfg = json.loads((src / "config.json").read_text())
    load = os.getloadavg()
    print(
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
        + ("  (WARNING: other work is running; wall times will be inflated)" if load[0] > 0.5 else "")
    )
    if extra_env:
        print("environment for every contender: " + " ".join(f"{k}={v}" for k, v in extra_env.items()))
    print(
        f"family {fam}: {cfg.get('num_hidden_layers')} layers, "
        f"{'' if n_params is None else f'{n_params / 1e9:.3f}B params, '}"
        f"{in_bytes / 1e9:.2f} GB of port inputs (src+ft+target); {os.cpu_count()} CPUs; "
        f"python {platform.python_version()}"
    )
    warm = warm_cache([f for fs in inputs.values() for f in fs])
    print(
        f"page cache warmed: cat of every input shard once took {warm:.2f} s "
        f"({in_bytes / MIB / warm:.0f} MiB/s); "
        + (
            "COLD: each contender's inputs are evicted from the page cache before every run"
            if args.cold
            else "all contenders below read from a warm cache"
        )
    )
    patch_dir = work / "_patch"  # the stored patch `cli-port` ports (made by the CLI's own diff, untimed)
    py = sys.executable
    cli = [py, "-m", "cli.app", "-q"]
    if "cli-port" in only or "cli-port-w1" in only:
        if patch_dir.exists():
            shutil.rmtree(patch_dir)
        t0 = time.perf_counter()
        subprocess.run([*cli, "diff", str(src), str(ft), str(patch_dir), "--no-register"], cwd=REPO, check=True)
        print(f"stored patch for cli-port made with `patchlab diff` in {time.perf_counter() - t0:.2f} s (untimed)")
        inputs["patch"] = sorted(patch_dir.glob("*.safetensors"))
        warm_cache(inputs["patch"])

    names = check_names(src)
    ref = port_reference(src, ft, target, names)
    print(f"reference for output checks: {len(names)} tensors ({', '.join(names)})")

    results: list[Result] = []
    reads = {  # the files each contender reads (evicted before every run with --cold)
        "cat": ("src", "ft", "target"),
        "cat-extract": ("src", "ft"),
        "cp-extract": ("ft",),
        "import-torch": (),
        "cli-port": ("patch", "target"),
        "cli-port-w1": ("patch", "target"),
    }

    def contender(name: str) -> tuple[list[str] | None, str, Callable[[Path], float] | None, bool]:
        """(command, note or reason it is unavailable, output check, uses the output dir)."""
        out = str(work / name)
        if name in ("cat", "cat-extract"):
            kinds = ("src", "ft", "target") if name == "cat" else ("src", "ft")
            files = [str(f) for k in kinds for f in inputs[k]]
            cmd = ["sh", "-c", 'exec cat "$@" > /dev/null', "cat", *files]
            return cmd, f"floor: read {'+'.join(kinds)} once", None, False
        if name == "cp-extract":  # the write floor: an extract writes about one checkpoint's bytes
            files = [str(f) for f in inputs["ft"]]
            cmd = ["sh", "-c", 'mkdir -p "$0" && exec cp "$@" "$0"', out, *files]
            return cmd, "floor: cp of ft's shards (reads + writes one checkpoint)", None, True
        if name == "import-torch":
            return (
                [py, "-c", "import torch, safetensors.torch"],
                "startup floor of any python+torch contender (no data)",
                None,
                False,
            )
        if name == "torch":
            return (
                [
                    py,
                    str(HERE / "baseline_torch.py"),
                    "--src",
                    str(src),
                    "--ft",
                    str(ft),
                    "--target",
                    str(target),
                    "--out",
                    out,
                ],
                "per-shard load_file, fp32 math, save_file",
                lambda o: port_diff(o, ref),
                True,
            )
        if name == "mergekit":
            why = mergekit_available(args.mergekit)
            if why is not None:
                return None, why, None, False
            conf = work / "mergekit.yml"
            conf.write_text(mergekit_config(src, ft, target))
            return (
                [
                    str(args.mergekit),
                    str(conf),
                    out,
                    "--lazy-unpickle",
                    "--no-cuda",
                    "--no-copy-tokenizer",
                    "--no-write-model-card",
                    "--out-shard-size",
                    "500M",
                    "--quiet",
                ],
                "task_arithmetic, base src, ft & target at weight 1, fp32 compute",
                lambda o: port_diff(o, ref),
                True,
            )
        why = patchlab_available()
        if why is not None:
            return None, why, None, False
        if name == "patchlab-port":
            return (
                [
                    py,
                    str(HERE / "_run_patchlab.py"),
                    "port-fused",
                    "--ft",
                    str(ft),
                    "--src",
                    str(src),
                    "--target",
                    str(target),
                    "--out",
                    out,
                ],
                "port_fused(ft, src, target, out), device=cpu",
                lambda o: port_diff(o, ref),
                True,
            )
        if name == "cli-diff":
            return (
                [*cli, "diff", str(src), str(ft), out, "--no-register"],
                "`patchlab diff SRC FT OUT` (Δ in the fine-tune's dtype + residuals); max|diff| dense ΔW vs ft - src",
                lambda o: extract_diff(o, src, ft, names),
                True,
            )
        if name == "cli-port":
            return (
                [*cli, "port", str(patch_dir), str(target), out, "--no-register"],
                "`patchlab port PATCH TARGET OUT`, PATCH from `patchlab diff` (bf16 Δ + residuals)",
                lambda o: port_diff(o, ref),
                True,
            )
        if name == "cli-fused":
            return (
                [*cli, "port", "--from-finetune", str(ft), "--source", str(src), str(target), out, "--no-register"],
                "`patchlab port --from-finetune FT --source SRC TARGET OUT`",
                lambda o: port_diff(o, ref),
                True,
            )
        assert name in ("patchlab-extract", "patchlab-extract-fp32"), name
        fp32 = name.endswith("fp32")
        return (
            [py, str(HERE / "_run_patchlab.py"), "extract", "--src", str(src), "--ft", str(ft), "--out", out]
            + (["--storage-dtype", "float32"] if fp32 else []),
            f"extract(src, ft, out{', storage_dtype=float32' if fp32 else ''}), device=cpu; "
            "max|diff| is dense ΔW vs ft - src",
            lambda o: extract_diff(o, src, ft, names),
            True,
        )

    for name in (c for c in CONTENDERS if c in only):
        print(f"running {name} ...", flush=True)
        if name.endswith("-w1"):  # the same CLI command on one worker thread: the scaling table
            base = name.removesuffix("-w1")
            cmd, note, check, writes = contender(base)
            own = [str(work / name) if c == str(work / base) else c for c in cmd]  # its own output directory
            cmd, note = [*own, "--workers", "1"], note + " --workers 1"
        else:
            cmd, note, check, writes = contender(name)
        if cmd is None:
            res = Result(name, "unavailable", note=note)
            print(f"  {name}: unavailable: {note}", flush=True)
            results.append(res)
            continue
        runs: list[Result] = []
        n_runs = max(args.repeat, args.repeat_floor) if name in FLOORS else args.repeat
        for i in range(n_runs):
            out = work / name
            clear_output(out)
            if args.cold:
                extract_like = "extract" in name or name.startswith("cli-diff")
                kinds = reads.get(name, ("src", "ft") if extract_like else ("src", "ft", "target"))
                files = [f for k in kinds for f in inputs[k]]
                drop_from_cache(files)
                frac = cached_fraction(files)
                if frac is not None and frac > 0.05:
                    print(f"  WARNING: {frac:.0%} of {name}'s inputs still cached after eviction", flush=True)
            r = measure(name, cmd, timeout=args.timeout, log=logs / f"{name}.{i + 1}.log", env=env)
            r.note = note
            if r.status == "ok" and check is not None:
                try:
                    r.max_abs_diff = check(out)
                except Exception as e:  # report, don't hide, a check that could not run
                    r.note += f"; output check failed: {type(e).__name__}: {e}"
            if writes:
                clear_output(out)
            runs.append(r)
            print(
                f"  {name} run {i + 1}: {r.status}, {r.wall_s:.2f} s (cpu {r.cpu_s:.2f} s), "
                f"peak anon {r.peak_anon_mib:.1f} MiB, peak RSS {r.peak_rss_mib:.1f} MiB, "
                f"load before {r.load_before:.2f}",
                flush=True,
            )
            if r.status != "ok":
                break
        res = min(runs, key=lambda r: (r.status != "ok", r.wall_s))
        if len(runs) > 1:
            res.peak_anon_mib = max(r.peak_anon_mib or 0.0 for r in runs)
            res.peak_rss_mib = max(r.peak_rss_mib or 0.0 for r in runs)
            res.note = (
                f"best wall of {len(runs)} ({', '.join(f'{r.wall_s:.2f}' for r in runs)}), worst memory; " + res.note
            )
        results.append(res)

    by = {r.name: r for r in results}
    rat = ratios(by)
    print()
    print(table(results))
    print()
    for k, v in rat.items():
        print(f"{k:<38} {_fmt(v, '.2f')}")
    verdicts = targets(by, rat)
    print()
    for t, m, v in verdicts:
        print(f"target: {t:<40} measured {m:<12} {v}")
    # cli-port reads a Δ stored in bf16 (rounded once): it differs from the fp32 reference by that rounding
    # (bench/native_delta.py measures how much); every other port must equal the reference bit for bit
    ports = [
        r
        for r in results
        # a port from a bf16 patch and the diff itself differ from the fp32 reference by design (w1 variants too)
        if r.max_abs_diff is not None and "extract" not in r.name and not r.name.startswith(("cli-port", "cli-diff"))
    ]
    bad = [r.name for r in ports if r.max_abs_diff > 0]
    if bad:
        print(f"\nWARNING: port outputs differ from the fp32 reference: {', '.join(bad)}")
    elif ports:
        print(
            f"\noutputs agree: {', '.join(r.name for r in ports)} equal the harness's fp32 reference bit for bit "
            f"on {len(names)} tensors (max |diff| 0), so they equal each other there"
        )

    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "family": str(fam),
                    "layers": cfg.get("num_hidden_layers"),
                    "params": n_params,
                    "input_bytes": in_bytes,
                    "cpus": os.cpu_count(),
                    "warm_cache_s": warm,
                    "cold": args.cold,
                    "loadavg_start": load,
                    "env": extra_env,
                    "repeat": args.repeat,
                    "repeat_floor": args.repeat_floor,
                    "checked_tensors": names,
                    "results": [asdict(r) for r in results],
                    "ratios": rat,
                    "targets": [{"target": t, "measured": m, "verdict": v} for t, m, v in verdicts],
                },
                indent=2,
            )
            + "\n"
        )
        print(f"\nfigures written to {args.json}")
    return 1 if any(r.status == "failed" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
