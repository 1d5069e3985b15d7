"""Low-rank extraction: patchlab (randomized SVD) vs mergekit-extract-lora (full fp32 SVD), same rank.

One run measures, for each tool on the same synthetic Llama family (``src`` base, ``ft`` fine-tune):
wall time, peak anonymous memory (RssAnon summed over the process tree, sampled every 20 ms) and the
reconstruction error of every matrix both tools factorise,
``‖Δ − Δ̂‖_F / ‖Δ‖_F`` with ``Δ = ft − src`` in fp32, per tensor and pooled (√(Σ‖Δ − Δ̂‖² / Σ‖Δ‖²)).

Both tools store bf16 factors (mergekit writes the checkpoint dtype; patchlab is given
``storage_dtype=bfloat16``) and keep embeddings / lm_head at full size (mergekit: modules_to_save;
patchlab: dense Δ), so the outputs are comparable in size too.

    python bench/bench_lowrank.py --family /work/bench-data/llama-1b --rank 16 \
        --mergekit-venv bench/.venv-mergekit

An existing family directory (``src/``, ``ft/``) is used as it is; with ``--layers N`` (or when it is
missing) a family is generated under ``--work`` by ``bench/make_family.py`` when present, else by a small
generator of the same recipe here (TinyLlama-1.1B shapes, bf16, rank-16 update + noise).
mergekit lives in its own venv (``bench/.venv-mergekit``: torch==2.13.0 then mergekit); without one the
mergekit column is skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


# ------------------------------------------------------------------------------------------------ memory
def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def _rss_anon_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[float, int, int, str, float]:
    """Run ``cmd``; return (wall s, peak RssAnon of its process tree in bytes, exit code, output, CPU s).

    CPU seconds (user + system of the whole tree, from the kernel's child rusage) are reported beside wall
    time because a shared machine's load stretches wall time of both tools unevenly.
    """
    import resource

    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    peak = 0
    done = threading.Event()
    chunks: list[str] = []

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            chunks.append(line)
        done.set()

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    while proc.poll() is None:
        tree, stack = [], [proc.pid]
        while stack:
            p = stack.pop()
            tree.append(p)
            stack += _children(p)
        peak = max(peak, sum(_rss_anon_kib(p) for p in tree))
        time.sleep(0.02)
    wall = time.perf_counter() - t0
    th.join(timeout=5)
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    return wall, peak * 1024, proc.returncode, "".join(chunks), cpu


# ------------------------------------------------------------------------------------------------ family
def ensure_family(family: Path, layers: int | None, work: Path, ft_noise: float | None = None) -> tuple[Path, Path]:
    """An existing family is used as it is; ``--layers N`` (or a missing family) generates one under ``work``
    (never inside someone else's family directory). ``ft_noise`` sets the fine-tune's dense noise (2e-3: as
    much energy as its rank-16 update, a flat tail)."""
    src, ft = family / "src", family / "ft"
    if layers is None and ft_noise is None and (src / "config.json").exists() and (ft / "config.json").exists():
        return src, ft
    n = layers or 2
    target = work / (f"family-{n}l" + (f"-noise{ft_noise:g}" if ft_noise is not None else ""))
    try:  # the shared generator, when this checkout has it
        sys.path.insert(0, str(ROOT / "bench"))
        import make_family  # type: ignore[import-not-found]

        kw = {"ft_noise": ft_noise} if ft_noise is not None else {}
        paths = make_family.generate(target, layers=n, **kw)
        return paths["src"], paths["ft"]
    except ImportError:
        return _own_family(target, n)


def _own_family(family: Path, layers: int) -> tuple[Path, Path]:
    """Same recipe as bench/make_family.py, written here for when that script is not in the checkout."""
    import zlib

    from safetensors.torch import save_file
    from transformers import LlamaConfig

    h, inter, kv, vocab = 2048, 5632, 256, 32000
    specs = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(layers):
        p = f"model.layers.{i}"
        specs += [(f"{p}.self_attn.q_proj.weight", (h, h)), (f"{p}.self_attn.k_proj.weight", (kv, h)),
                  (f"{p}.self_attn.v_proj.weight", (kv, h)), (f"{p}.self_attn.o_proj.weight", (h, h)),
                  (f"{p}.mlp.gate_proj.weight", (inter, h)), (f"{p}.mlp.up_proj.weight", (inter, h)),
                  (f"{p}.mlp.down_proj.weight", (h, inter)), (f"{p}.input_layernorm.weight", (h,)),
                  (f"{p}.post_attention_layernorm.weight", (h,))]
    specs += [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]
    src_sd, ft_sd = {}, {}
    for name, shp in specs:
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        if len(shp) == 1:
            s = 1 + 0.01 * torch.randn(shp, generator=g)
            f = s + 0.01 * torch.randn(shp, generator=g)
        else:
            s = 0.02 * torch.randn(shp, generator=g)
            f = (torch.randn(shp[0], 16, generator=g) @ torch.randn(16, shp[1], generator=g)) * (2e-3 / 4)
            f += 2e-4 * torch.randn(shp, generator=g) + s
        src_sd[name], ft_sd[name] = s.bfloat16(), f.bfloat16()
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=4, tie_word_embeddings=False)
    cfg.architectures = ["LlamaForCausalLM"]
    for kind, sd in (("src", src_sd), ("ft", ft_sd)):
        d = family / kind
        d.mkdir(parents=True, exist_ok=True)
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
        c = cfg.to_dict()
        c["torch_dtype"] = "bfloat16"
        (d / "config.json").write_text(json.dumps(c, indent=2))
    return family / "src", family / "ft"


# ------------------------------------------------------------------------------------------------ error
def reconstruction_errors(src: Path, ft: Path, approx: dict[str, callable]) -> dict[str, float]:
    """Per-matrix relative errors of ``approx[name]() ≈ ft − src`` and the pooled error (key '*')."""
    from patchlab.io.checkpoint import Checkpoint

    s_ck, f_ck = Checkpoint.open(src), Checkpoint.open(ft)
    errs: dict[str, float] = {}
    num = den = 0.0
    for name, fn in approx.items():
        d = f_ck.tensor(name).float() - s_ck.tensor(name).float()
        e2 = float(torch.linalg.vector_norm(d - fn(), dtype=torch.float64) ** 2)
        n2 = float(torch.linalg.vector_norm(d, dtype=torch.float64) ** 2)
        errs[name] = math.sqrt(e2 / n2) if n2 else 0.0
        num += e2
        den += n2
    errs["*"] = math.sqrt(num / den) if den else 0.0
    return errs


def exact_errors(src: Path, ft: Path, names: list[str], rank: int) -> dict[str, float]:
    """Relative error of the exact rank-``rank`` truncated SVD of every matrix, √(Σ_{i>r} σ_i² / Σ σ_i²), and
    pooled (key '*')."""
    from patchlab.io.checkpoint import Checkpoint

    s_ck, f_ck = Checkpoint.open(src), Checkpoint.open(ft)
    out: dict[str, float] = {}
    num = den = 0.0
    for name in names:
        d = f_ck.tensor(name).float() - s_ck.tensor(name).float()
        sv = torch.linalg.svdvals(d).double()
        tail, tot = float((sv[rank:] ** 2).sum()), float((sv**2).sum())
        out[name] = math.sqrt(tail / tot) if tot else 0.0
        num += tail
        den += tot
    out["*"] = math.sqrt(num / den) if den else 0.0
    return out


def _dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*.safetensors"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", type=Path, default=Path("/work/bench-data/llama-1b"))
    ap.add_argument("--layers", type=int, default=None, help="generate a family with this many layers")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-lowrank"))
    ap.add_argument("--mergekit-venv", type=Path, default=ROOT / "bench" / ".venv-mergekit")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--n-iter", type=int, default=2, help="power iterations of the randomized SVD (a minimum)")
    ap.add_argument(
        "--ft-noise",
        type=float,
        default=None,
        help="generate the family with this fine-tune noise std (2e-3: flat tail, as much energy as the update)",
    )
    ap.add_argument("--no-exact", action="store_true", help="skip the exact-SVD error of every matrix")
    ap.add_argument("--oversample", type=int, default=10)
    args = ap.parse_args(argv)

    args.work.mkdir(parents=True, exist_ok=True)
    src, ft = ensure_family(args.family, args.layers, args.work, args.ft_noise)
    ours_out, mk_out = args.work / f"patchlab-r{args.rank}", args.work / f"mergekit-r{args.rank}"
    for d in (ours_out, mk_out):
        if d.exists():
            import shutil

            shutil.rmtree(d)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    code = (
        "import time; from patchlab.methods.compress import extract_encoded; t = time.perf_counter(); "
        f"extract_encoded({str(src)!r}, {str(ft)!r}, {str(ours_out)!r}, rank={args.rank}, "
        f"storage_dtype='bfloat16', device={args.device!r}, oversample={args.oversample}, n_iter={args.n_iter}); "
        "print('inner', time.perf_counter() - t)"
    )
    t_ours, m_ours, rc, log, c_ours = run_measured([sys.executable, "-c", code], env)
    if rc != 0:
        print(log)
        raise SystemExit(f"patchlab extraction failed (exit {rc})")

    mk_bin = args.mergekit_venv / "bin" / "mergekit-extract-lora"
    mk = None
    if mk_bin.exists():
        cmd = [str(mk_bin), "--model", str(ft), "--base-model", str(src), "--out-path", str(mk_out),
               "--max-rank", str(args.rank)]
        if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
            cmd += ["--cuda"]
        t_mk, m_mk, rc, mlog, c_mk = run_measured(cmd)
        if rc != 0:
            print(mlog[-3000:])
            raise SystemExit(f"mergekit-extract-lora failed (exit {rc})")
        mk = (t_mk, m_mk, c_mk)
    else:
        print(f"(no mergekit venv at {args.mergekit_venv}: mergekit column skipped)")

    # ---- reconstruction errors on the matrices both factorised
    from patchlab.io.patch import Patch
    from patchlab.io.peft import read_peft_adapter

    ours = Patch.open(ours_out)
    ours_low = {e.name: e for e in ours.entries() if e.op == "add" and e.encoding == "lowrank"}
    names = sorted(ours_low)
    mk_fns: dict = {}
    if mk:
        ad = read_peft_adapter(mk_out)
        low = {n: e for n, e in ad.entries.items() if e.kind == "lowrank"}
        names = sorted(set(names) & set(low))
        mk_fns = {n: (lambda e=low[n]: e.scale * (e.B @ e.A)) for n in names}
    e_ours = reconstruction_errors(src, ft, {n: (lambda e=ours_low[n]: e.dense()) for n in names})
    e_mk = reconstruction_errors(src, ft, mk_fns) if mk else None
    e_exact = None if args.no_exact else exact_errors(src, ft, names, args.rank)

    n_params = sum(math.prod(e.shape) for e in ours.entries() if e.op == "add")
    print(f"\nfamily {src.parent} ({n_params / 1e9:.2f}B parameters), rank {args.rank}, {len(names)} matrices "
          f"compared, device {args.device}, torch threads {torch.get_num_threads()}")
    hdr = (f"{'tool':<34} {'wall s':>8} {'CPU s':>8} {'peak RssAnon GiB':>17} {'pooled rel err':>15} "
           f"{'max rel err':>12} {'out GB':>7}")
    print(hdr)
    print("-" * len(hdr))

    def row(label: str, t: float, c: float, m: int, errs: dict, out: Path) -> None:
        worst = max(v for k, v in errs.items() if k != "*")
        size = _dir_bytes(out) / 1e9
        print(f"{label:<34} {t:>8.1f} {c:>8.1f} {m / 2**30:>17.2f} {errs['*']:>15.6f} {worst:>12.6f} {size:>7.3f}")

    row(f"patchlab diff --rank {args.rank}", t_ours, c_ours, m_ours, e_ours, ours_out)
    if mk and e_mk:
        row(f"mergekit-extract-lora --max-rank {args.rank}", mk[0], mk[2], mk[1], e_mk, mk_out)
        print(f"\nspeed-up {mk[0] / t_ours:.1f}× wall, {mk[2] / c_ours:.1f}× CPU; error ratio patchlab/mergekit "
              f"{e_ours['*'] / e_mk['*']:.4f}; memory ratio {m_ours / max(mk[1], 1):.2f}")
    if e_exact is not None:
        ratio_ours = max(e_ours[n] / e_exact[n] for n in names if e_exact[n] > 0)
        worst = max((n for n in names if e_exact[n] > 0), key=lambda n: e_ours[n] / e_exact[n])
        print(
            f"\nexact truncated SVD (torch.linalg.svdvals, fp32 Δ): pooled rel err {e_exact['*']:.6f}; "
            f"patchlab/exact pooled {e_ours['*'] / e_exact['*']:.5f}, worst tensor {ratio_ours:.5f} ({worst}); "
            f"target <= 1.001 on every tensor: {'PASS' if ratio_ours <= 1.001 else 'FAIL'}"
        )
        if e_mk:
            r_mk = max(e_mk[n] / e_exact[n] for n in names if e_exact[n] > 0)
            print(f"mergekit/exact pooled {e_mk['*'] / e_exact['*']:.5f}, worst tensor {r_mk:.5f}")
    print(f"load average at the end: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
