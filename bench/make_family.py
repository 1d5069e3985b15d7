"""Write a synthetic Llama-shaped checkpoint family for the port/extract benchmark.

Three HF-layout checkpoints (config.json, sharded ``model-0000i-of-0000N.safetensors`` and
``model.safetensors.index.json``) with TinyLlama-1.1B shapes in bf16 and random weights:

- ``src``: random weights (the base a fine-tune was made on);
- ``ft``: ``src`` + a rank-16 update on every 2-D matrix + small noise (the fine-tune);
- ``target``: ``src`` + a small drift (the newer base to port onto);
- with ``--extra-ft N``: ``ft2`` … ``ft{N+1}``, more fine-tunes of ``src`` made like ``ft`` (each its own
  rank-16 update and noise, from its own seed salt), for the merge benchmark (``bench/merge_bench.py``).

Generated shard by shard (one shard of each checkpoint in memory at a time) with per-tensor seeds, so the
same arguments always give the same bytes. A checkpoint whose index already matches is not rewritten.

    python bench/make_family.py --out /work/bench-data/llama-1b            # ~6.6 GB, 1.1B params each
    python bench/make_family.py --out /tmp/family-2l --layers 2             # quick smoke-test family
    python bench/make_family.py --out /work/bench-data/llama-1b --extra-ft 2   # + ft2, ft3 (~2.2 GB each)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

KINDS = ("src", "ft", "target")
MAX_EXTRA_FT = 8


def extra_ft_kinds(n: int) -> tuple[str, ...]:
    """``ft2`` … ``ft{n+1}``: the fine-tunes beyond ``ft`` (merge benchmark)."""
    return tuple(f"ft{i}" for i in range(2, n + 2))
INIT_STD = 0.02  # weight scale of the random base
LOWRANK_RANK = 16
LOWRANK_RMS = 2e-3  # RMS of the fine-tune's low-rank update
FT_NOISE_STD = 2e-4  # dense noise on top of the fine-tune's low-rank update
DRIFT_STD = 1e-3  # dense noise that turns src into target
NORM_NOISE_STD = 1e-2  # perturbation of RMSNorm weights (around 1.0)
INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class Shape:
    """Llama hyper-parameters of the family (TinyLlama-1.1B by default)."""

    hidden: int = 2048
    layers: int = 22
    intermediate: int = 5632
    heads: int = 32
    kv_heads: int = 4
    vocab: int = 32000

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def tensor_specs(shape: Shape) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a LlamaForCausalLM state dict, in HF order (untied lm_head)."""
    h, kv = shape.hidden, shape.kv_heads * shape.head_dim
    specs: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (shape.vocab, h))]
    for i in range(shape.layers):
        p = f"model.layers.{i}"
        specs += [
            (f"{p}.self_attn.q_proj.weight", (h, h)),
            (f"{p}.self_attn.k_proj.weight", (kv, h)),
            (f"{p}.self_attn.v_proj.weight", (kv, h)),
            (f"{p}.self_attn.o_proj.weight", (h, h)),
            (f"{p}.mlp.gate_proj.weight", (shape.intermediate, h)),
            (f"{p}.mlp.up_proj.weight", (shape.intermediate, h)),
            (f"{p}.mlp.down_proj.weight", (h, shape.intermediate)),
            (f"{p}.input_layernorm.weight", (h,)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
        ]
    specs += [("model.norm.weight", (h,)), ("lm_head.weight", (shape.vocab, h))]
    return specs


def plan_shards(specs: list[tuple[str, tuple[int, ...]]], shard_bytes: int) -> list[list[str]]:
    """Pack tensors in order into shards of at most ``shard_bytes`` (bf16), like HF's sharding."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shp in specs:
        nbytes = 2 * _numel(shp)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def shard_file(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _numel(shp: tuple[int, ...]) -> int:
    n = 1
    for d in shp:
        n *= d
    return n


def _gen(seed: int, name: str, salt: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(f"{salt}:{name}".encode()))


def _finetuned(
    src32: torch.Tensor, shp: tuple[int, ...], seed: int, name: str, salt: str, ft_noise: float = FT_NOISE_STD
) -> torch.Tensor:
    """``src`` + a fine-tune's update (norm noise for 1-D; rank-16 update + dense noise for 2-D)."""
    if len(shp) == 1:
        return src32 + NORM_NOISE_STD * torch.randn(shp, generator=_gen(seed, name, salt))
    g = _gen(seed, name, salt)
    b = torch.randn((shp[0], LOWRANK_RANK), generator=g)
    a = torch.randn((LOWRANK_RANK, shp[1]), generator=g)
    # Entries of b @ a have variance LOWRANK_RANK; scale them to an RMS of LOWRANK_RMS.
    ft32 = (b @ a).mul_(LOWRANK_RMS / LOWRANK_RANK**0.5)
    return ft32.add_(torch.randn(shp, generator=g), alpha=ft_noise).add_(src32)


def make_tensors(
    name: str, shp: tuple[int, ...], seed: int, kinds: tuple[str, ...] = KINDS, ft_noise: float = FT_NOISE_STD
) -> dict[str, torch.Tensor]:
    """The bf16 tensor ``name`` of each of ``kinds`` (deterministic in ``seed`` and ``name``; a kind's bytes
    do not depend on which other kinds are asked for)."""
    if len(shp) == 1:
        src32 = 1.0 + NORM_NOISE_STD * torch.randn(shp, generator=_gen(seed, name, "src"))
    else:
        src32 = torch.randn(shp, generator=_gen(seed, name, "src")).mul_(INIT_STD)
    out = {}
    for k in kinds:
        if k == "src":
            out[k] = src32.to(torch.bfloat16)
        elif k == "target":
            if len(shp) == 1:
                t32 = src32 + NORM_NOISE_STD * torch.randn(shp, generator=_gen(seed, name, "target"))
            else:
                t32 = torch.randn(shp, generator=_gen(seed, name, "target")).mul_(DRIFT_STD).add_(src32)
            out[k] = t32.to(torch.bfloat16)
            del t32
        else:  # "ft", "ft2", ...
            f32 = _finetuned(src32, shp, seed, name, k, ft_noise)
            out[k] = f32.to(torch.bfloat16)
            del f32
    return out


def llama_config(shape: Shape) -> dict:
    """A LlamaConfig dict (written with transformers when available, so every field is genuine)."""
    fields = dict(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    try:
        import transformers
        from transformers import LlamaConfig
    except ImportError:
        return dict(
            fields, architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", torch_dtype="bfloat16"
        )
    cfg = LlamaConfig(**fields)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.dtype = torch.bfloat16  # written as "dtype" by transformers 5, "torch_dtype" by 4.x
    d = cfg.to_dict()
    d.setdefault("transformers_version", transformers.__version__)
    return d


def expected_index(
    specs: list[tuple[str, tuple[int, ...]]],
    shards: list[list[str]],
    kind: str,
    seed: int,
    shape: Shape,
    ft_noise: float = FT_NOISE_STD,
) -> dict:
    n = len(shards)
    total = sum(2 * _numel(s) for _, s in specs)
    weight_map = {name: shard_file(i, n) for i, names in enumerate(shards) for name in names}
    fam = {"kind": kind, "seed": seed, **shape.__dict__}
    if ft_noise != FT_NOISE_STD:  # recorded only when not the default, so existing families stay complete
        fam["ft_noise"] = ft_noise
    meta = {"total_size": total, "bench_family": fam}
    return {"metadata": meta, "weight_map": weight_map}


def is_complete(ckpt: Path, index: dict) -> bool:
    """True when ``ckpt`` already holds exactly the checkpoint ``index`` describes."""
    try:
        have = json.loads((ckpt / INDEX_NAME).read_text())
    except (OSError, ValueError):
        return False
    if have != index or not (ckpt / "config.json").is_file():
        return False
    by_file: dict[str, set[str]] = {}
    for name, f in index["weight_map"].items():
        by_file.setdefault(f, set()).add(name)
    for f, names in by_file.items():
        try:
            with safe_open(str(ckpt / f), framework="pt") as sf:
                if set(sf.keys()) != names:
                    return False
        except Exception:  # missing or truncated shard
            return False
    return True


def generate(
    out: Path,
    *,
    layers: int = 22,
    seed: int = 0,
    shard_mb: int = 1000,
    force: bool = False,
    quiet: bool = False,
    ft_noise: float = FT_NOISE_STD,
    extra_ft: int = 0,
) -> dict[str, Path]:
    """Write (or keep, when already complete) ``out/{src,ft,target}`` (and ``ft2``… with ``extra_ft``);
    return their paths.

    ``ft_noise``: std of the dense noise on the fine-tune's update (default 2e-4; 2e-3 gives noise of the
    update's own energy: a spectrum flat past rank 16, the hard case for a randomized SVD)."""
    shape = Shape(layers=layers)
    specs = tensor_specs(shape)
    shards = plan_shards(specs, shard_mb * 1_000_000)
    kinds = KINDS + extra_ft_kinds(extra_ft)
    paths = {k: out / k for k in kinds}
    indexes = {k: expected_index(specs, shards, k, seed, shape, ft_noise) for k in kinds}
    todo = [k for k in kinds if force or not is_complete(paths[k], indexes[k])]
    log = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    config = json.dumps(llama_config(shape), indent=2) + "\n"
    for k in kinds:
        if k not in todo and (paths[k] / "config.json").read_text() != config:
            (paths[k] / "config.json").write_text(config)  # cheap to refresh; the weights are kept
    if not todo:
        log(f"family at {out} is complete ({layers} layers); nothing to do")
        return paths
    shapes = dict(specs)
    t0 = time.perf_counter()
    for k in todo:
        # The index is written last: a directory without it (or with a stale one) is regenerated whole.
        if paths[k].exists():
            shutil.rmtree(paths[k])
        paths[k].mkdir(parents=True)
    for i, names in enumerate(shards):
        parts: dict[str, dict[str, torch.Tensor]] = {k: {} for k in todo}
        for name in names:
            for k, t in make_tensors(name, shapes[name], seed, tuple(todo), ft_noise).items():
                parts[k][name] = t
        for k in todo:
            tmp = paths[k] / (shard_file(i, len(shards)) + ".tmp")
            save_file(parts[k], str(tmp), metadata={"format": "pt"})
            os.chmod(tmp, 0o644)
            os.replace(tmp, paths[k] / shard_file(i, len(shards)))
        del parts
        log(f"shard {i + 1}/{len(shards)} written for {', '.join(todo)} ({time.perf_counter() - t0:.0f} s)")
    for k in todo:
        (paths[k] / "config.json").write_text(config)
        tmp = paths[k] / (INDEX_NAME + ".tmp")
        tmp.write_text(json.dumps(indexes[k], indent=2) + "\n")
        os.replace(tmp, paths[k] / INDEX_NAME)
    n_params = sum(_numel(s) for _, s in specs)
    log(
        f"wrote {', '.join(todo)} under {out}: {n_params / 1e9:.3f}B params each, {len(shards)} shards, "
        f"{time.perf_counter() - t0:.0f} s"
    )
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="family directory (gets src/, ft/, target/)")
    ap.add_argument("--layers", type=int, default=22, help="decoder layers (22 = TinyLlama-1.1B)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-mb", type=int, default=1000, help="maximum shard size in MB (default 1000)")
    ap.add_argument("--force", action="store_true", help="regenerate even if the family is complete")
    ap.add_argument(
        "--ft-noise",
        type=float,
        default=FT_NOISE_STD,
        help=f"std of the fine-tune's dense noise (default {FT_NOISE_STD:g}; 2e-3 = the update's energy: flat tail)",
    )
    ap.add_argument(
        "--extra-ft", type=int, default=0, help="also write ft2..ft{N+1}: more fine-tunes of src (merge benchmark)"
    )
    args = ap.parse_args(argv)
    if args.layers < 1:
        ap.error("--layers must be at least 1")
    if not 0 <= args.extra_ft <= MAX_EXTRA_FT:
        ap.error(f"--extra-ft must be between 0 and {MAX_EXTRA_FT}")
    generate(
        args.out,
        layers=args.layers,
        seed=args.seed,
        shard_mb=args.shard_mb,
        force=args.force,
        ft_noise=args.ft_noise,
        extra_ft=args.extra_ft,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
