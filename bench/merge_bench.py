"""Merge benchmark: patchlab against mergekit on three fine-tunes of the ~1.1B synthetic family.

Inputs (``bench/make_family.py --extra-ft 2``): ``src`` and three fine-tunes of it, ``ft``, ``ft2``, ``ft3``
(bf16, 3 shards each). patchlab merges *patches*: each fine-tune is first extracted once per run
(``patchlab.extract(src, ftK)`` with extract's default dtype: Δ in the fine-tune's bf16 plus the residuals
that keep it exact, half the bytes of an fp32 Δ; ``--keep-patches`` reuses whatever patches WORK holds, so
delete fp32 patches left by older runs); that preparation is timed on its own row and is **not** counted in
the merge rows (a patchlab user keeps patches, not fine-tuned checkpoints; the end-to-end figure, extraction
included, is printed as well). Merged onto ``src``, the patches they were made on, bf16 patches contribute
their exact Δ (``float(ft) − float(src)``, rebuilt from src's rows and the residuals), so task_arithmetic
is expected to equal mergekit bit for bit as it did with fp32 patches. Then, for each method, alternating
runs of:

- ``mergekit``: ``mergekit-yaml`` with ``base_model: src``, the three fine-tunes at weight 1 (density 0.2
  for ties), ``dtype: float32`` (compute), ``out_dtype: bfloat16``; ``--lazy-unpickle --no-cuda
  --no-copy-tokenizer --no-write-model-card --out-shard-size 1000M``;
- ``patchlab``: ``patchlab.merge([p1, p2, p3], method=..., densities=..., onto=src)``: the merged model in
  one pass, in src's shard layout and dtype.

Each run is its own process; wall time, CPU time (user + sys of the process tree) and peak anonymous memory
(``RssAnon`` summed over the tree, sampled every 20 ms, as ``bench/run_port.py``) are recorded; the table
shows the best wall time of ``--repeat`` runs and the worst memory. The page cache is warmed first. The
last outputs of both tools are compared tensor by tensor: max |diff| and the number of differing elements.

    python bench/make_family.py --out /work/bench-data/llama-1b --extra-ft 2
    python bench/merge_bench.py --family /work/bench-data/llama-1b --repeat 3 \\
        --mergekit bench/.venv-mergekit/bin/mergekit-yaml --json bench/results/merge-1b.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from baseline_torch import weight_map  # noqa: E402
from run_port import DEFAULT_MERGEKIT, Result, clear_output, measure, mergekit_available, warm_cache  # noqa: E402

FTS = ("ft", "ft2", "ft3")
METHODS = {"task_arithmetic": None, "ties": 0.2}  # method -> density
TARGET_VS_MERGEKIT = 5.0
TARGET_ANON_MIB = 512.0


def mergekit_yaml(src: Path, fts: list[Path], method: str, density: float | None) -> str:
    lines = [f"merge_method: {method}", f"base_model: {src}", "models:"]
    for f in fts:
        lines += [f"  - model: {f}", "    parameters:", "      weight: 1.0"]
        if density is not None:
            lines.append(f"      density: {density}")
    lines += ["dtype: float32", "out_dtype: bfloat16", ""]
    return "\n".join(lines)


def compare(a: Path, b: Path) -> dict:
    """Max |a - b| over every tensor of two checkpoints (fp32), differing elements, tensors compared."""
    from safetensors import safe_open

    wa, wb = weight_map(a), weight_map(b)
    if set(wa) != set(wb):
        return {"error": f"different tensor names: {sorted(set(wa) ^ set(wb))[:5]}"}
    worst, worst_name, n_diff, n_el = 0.0, None, 0, 0
    dtypes = set()
    for name in sorted(wa):
        with safe_open(str(a / wa[name]), framework="pt") as fa, safe_open(str(b / wb[name]), framework="pt") as fb:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
        dtypes.add((str(x.dtype), str(y.dtype)))
        if x.shape != y.shape:
            return {"error": f"{name}: shape {tuple(x.shape)} vs {tuple(y.shape)}"}
        ne = x != y
        k = int(ne.sum())
        if k:
            d = float((x.float() - y.float()).abs().max())
            if d > worst:
                worst, worst_name = d, name
        n_diff += k
        n_el += x.numel()
    return {"max_abs_diff": worst, "worst_tensor": worst_name, "differing": n_diff, "elements": n_el,
            "tensors": len(wa), "dtypes": sorted(dtypes)}


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(rows: list[tuple[str, Result, list[float]]]) -> str:
    out = [f"{'contender':<34} {'best wall s':>11} {'cpu s':>8} {'peak anon MiB':>14} {'peak rss MiB':>13}  runs"]
    for label, r, walls in rows:
        out.append(
            f"{label:<34} {fmt(r.wall_s, '.2f'):>11} {fmt(r.cpu_s, '.2f'):>8} {fmt(r.peak_anon_mib, '.1f'):>14}"
            f" {fmt(r.peak_rss_mib, '.1f'):>13}  {', '.join(f'{w:.2f}' for w in walls)}"
        )
    return "\n".join(out)


def best_of(runs: list[Result]) -> tuple[Result, list[float]]:
    ok = [r for r in runs if r.status == "ok"]
    if not ok:
        return runs[-1], []
    best = min(ok, key=lambda r: r.wall_s or 0.0)
    agg = Result(**{**asdict(best), "peak_anon_mib": max(r.peak_anon_mib or 0 for r in ok),
                    "peak_rss_mib": max(r.peak_rss_mib or 0 for r in ok)})
    return agg, [r.wall_s or 0.0 for r in ok]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", type=Path, default=Path("/work/bench-data/llama-1b"))
    ap.add_argument("--work", type=Path, default=None, help="patches and outputs (default FAMILY/_merge)")
    ap.add_argument("--mergekit", type=Path, default=DEFAULT_MERGEKIT, help="mergekit-yaml executable")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--mergekit-repeat", type=int, default=None, help="runs of mergekit (default --repeat)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated (task_arithmetic,ties)")
    ap.add_argument("--only", default="mergekit,patchlab", help="contenders: mergekit,patchlab")
    ap.add_argument("--device", default="cpu", help="patchlab's device (cpu, cuda)")
    ap.add_argument(
        "--stable-check",
        action="store_true",
        help="also run mergekit once with a stable argsort (bench/_mergekit_stable.py) and compare it to patchlab",
    )
    ap.add_argument("--keep-patches", action="store_true", help="reuse patches already extracted in WORK")
    ap.add_argument("--timeout", type=float, default=3600.0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    fam = args.family
    src, fts = fam / "src", [fam / k for k in FTS]
    for p in (src, *fts):
        if not (p / "model.safetensors.index.json").is_file():
            ap.error(f"{p} is missing; run: python bench/make_family.py --out {fam} --extra-ft 2")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if bad := [m for m in methods if m not in METHODS]:
        ap.error(f"unknown method(s) {bad}; choose from {list(METHODS)}")
    only = {c.strip() for c in args.only.split(",") if c.strip()}
    work = args.work or fam / "_merge"
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    helper = str(HERE / "_run_patchlab.py")
    mk_why = mergekit_available(args.mergekit) if "mergekit" in only else "not asked for"

    print(f"host {platform.node()}, {os.cpu_count()} CPUs, load average {os.getloadavg()}")
    inputs = [f for ck in (src, *fts) for f in sorted({ck / v for v in weight_map(ck).values()})]
    print(f"page cache warmed: {sum(f.stat().st_size for f in inputs) / 1e9:.1f} GB in {warm_cache(inputs):.1f} s")

    rows: list[tuple[str, Result, list[float]]] = []
    record: dict = {"load_start": os.getloadavg(), "family": str(fam), "repeat": args.repeat, "methods": {}}
    # 1. patches (once per run; reused with --keep-patches)
    patches = [work / f"{k}.patch" for k in FTS]
    extract_s = extract_cpu = 0.0
    extract_anon = 0.0
    for k, ft, p in zip(FTS, fts, patches, strict=True):
        if args.keep_patches and (p / "patch.json").is_file():
            continue
        clear_output(p)
        r = measure(f"extract {k}", [py, helper, "extract", "--src", str(src), "--ft", str(ft), "--out", str(p),
                                     "--device", args.device], timeout=args.timeout, log=logs / f"extract-{k}.log")
        if r.status != "ok":
            print(f"extraction of {k} failed: {r.note}", file=sys.stderr)
            return 1
        extract_s += r.wall_s or 0
        extract_cpu += r.cpu_s or 0
        extract_anon = max(extract_anon, r.peak_anon_mib or 0)
    if extract_s:
        rows.append(("patchlab extract ×3 (preparation)", Result("extract", "ok", extract_s, extract_cpu,
                                                                 extract_anon, None), []))
    patch_bytes = sum(f.stat().st_size for p in patches for f in p.rglob("*.safetensors"))
    warm = warm_cache([f for p in patches for f in sorted(p.rglob("*.safetensors"))])
    manifests = [json.loads((p / "patch.json").read_text()) for p in patches]
    stored = sorted({m["provenance"]["parameters"].get("storage_dtype", "?") for m in manifests})
    record["patch_storage_dtype"] = stored
    print(f"patches: {patch_bytes / 1e9:.1f} GB (storage_dtype {', '.join(stored)}); warmed in {warm:.1f} s")

    # 2. merges, alternating contenders
    for method in methods:
        density = METHODS[method]
        conf = work / f"mergekit-{method}.yml"
        conf.write_text(mergekit_yaml(src, fts, method, density))
        cmds = {}
        if "mergekit" in only and mk_why is None:
            cmds["mergekit"] = [str(args.mergekit), str(conf), str(work / "out-mergekit"), "--lazy-unpickle",
                                "--no-cuda", "--no-copy-tokenizer", "--no-write-model-card",
                                "--out-shard-size", "1000M", "--quiet"]
        if "patchlab" in only:
            cmd = [py, helper, "merge", "--patches", ",".join(map(str, patches)), "--method", method,
                   "--onto", str(src), "--out", str(work / "out-patchlab"), "--device", args.device]
            if density is not None:
                cmd += ["--density", str(density)]
            cmds["patchlab"] = cmd
        if args.stable_check and "mergekit" in cmds:
            stable = [str(args.mergekit.parent / "python"), str(HERE / "_mergekit_stable.py"), *cmds["mergekit"][1:]]
            cmds["mergekit-stable"] = [a.replace("out-mergekit", "out-mergekit-stable") for a in stable]
        runs: dict[str, list[Result]] = {c: [] for c in cmds}
        mk_rep = args.repeat if args.mergekit_repeat is None else args.mergekit_repeat
        for rep in range(max(args.repeat, mk_rep)):
            for c, cmd in cmds.items():
                if rep >= (args.repeat if c == "patchlab" else 1 if c == "mergekit-stable" else mk_rep):
                    continue
                out = work / f"out-{c}"
                clear_output(out)
                r = measure(f"{c} {method}", cmd, timeout=args.timeout, log=logs / f"{c}-{method}-{rep}.log")
                print(f"  {method:<16} {c:<9} run {rep + 1}: {fmt(r.wall_s, '.2f')} s wall, "
                      f"{fmt(r.cpu_s, '.2f')} s cpu, {fmt(r.peak_anon_mib, '.0f')} MiB anon, "
                      f"load {r.load_before:.2f} [{r.status}]", flush=True)
                runs[c].append(r)
        m: dict = {"density": density}
        for c in cmds:
            agg, walls = best_of(runs[c])
            rows.append((f"{c} {method}" + (f" d={density}" if density else ""), agg, walls))
            m[c] = {"best": asdict(agg), "walls": walls, "runs": [asdict(r) for r in runs[c]]}
        if "mergekit-stable" in cmds and runs["mergekit-stable"][-1].status == "ok":
            m["compare_stable"] = compare(work / "out-mergekit-stable", work / "out-patchlab")
            print(f"  {method}: mergekit with a stable argsort vs patchlab: {m['compare_stable']}")
        if {"mergekit", "patchlab"} <= set(cmds) and all(runs[c][-1].status == "ok" for c in ("mergekit", "patchlab")):
            cmp = compare(work / "out-mergekit", work / "out-patchlab")
            m["compare"] = cmp
            bm, bp = m["mergekit"]["best"], m["patchlab"]["best"]
            m["speedup_wall"] = bm["wall_s"] / bp["wall_s"]
            m["speedup_cpu"] = bm["cpu_s"] / bp["cpu_s"]
            m["speedup_end_to_end"] = bm["wall_s"] / (bp["wall_s"] + extract_s) if extract_s else None
            print(f"  {method}: outputs {cmp}")
        record["methods"][method] = m
        for c in cmds:
            clear_output(work / f"out-{c}")
    record["extract"] = {"wall_s": extract_s, "cpu_s": extract_cpu, "peak_anon_mib": extract_anon}
    record["load_end"] = os.getloadavg()

    print()
    print(table(rows))
    print()
    for method, m in record["methods"].items():
        if "speedup_wall" not in m:
            continue
        c = m["compare"]
        anon = m["patchlab"]["best"]["peak_anon_mib"]
        e2e = m["speedup_end_to_end"]
        print(f"{method}: mergekit/patchlab wall {m['speedup_wall']:.2f}x "
              f"({'PASS' if m['speedup_wall'] >= TARGET_VS_MERGEKIT else 'FAIL'} >= {TARGET_VS_MERGEKIT:g}x), "
              f"cpu {m['speedup_cpu']:.2f}x, with extraction {fmt(e2e, '.2f')}x; patchlab peak anon {anon:.0f} MiB "
              f"({'PASS' if anon < TARGET_ANON_MIB else 'FAIL'} < {TARGET_ANON_MIB:g}); outputs: max |diff| "
              f"{c.get('max_abs_diff')}, {c.get('differing')} of {c.get('elements')} elements differ")
    print(f"load average at the end {os.getloadavg()}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
