"""Plain per-shard torch port: ``out = target + (ft - src)``, the way one would write it by hand.

For every shard of ``target``: ``load_file`` it and the shards of ``src`` and ``ft`` holding the same
tensors, compute in fp32, cast back to the target's dtype, ``save_file``. This is the reference contender
in ``bench/run_port.py``; it holds whole shards in memory, which is what a simple script does.

    python bench/baseline_torch.py --src S --ft F --target T --out O
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

INDEX_NAME = "model.safetensors.index.json"


def weight_map(ckpt: Path) -> dict[str, str]:
    """Tensor name -> shard file of an HF safetensors checkpoint (sharded or single-file)."""
    index = ckpt / INDEX_NAME
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    single = ckpt / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{ckpt} has neither {INDEX_NAME} nor model.safetensors")
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return {k: "model.safetensors" for k in f.keys()}


def port(src: Path, ft: Path, target: Path, out: Path) -> None:
    src_map, ft_map, tgt_map = weight_map(src), weight_map(ft), weight_map(target)
    out.mkdir(parents=True)
    for shard in sorted(set(tgt_map.values())):
        tgt = load_file(str(target / shard))
        need_src = sorted({src_map[n] for n in tgt})
        need_ft = sorted({ft_map[n] for n in tgt})
        srcs: dict[str, torch.Tensor] = {}
        for f in need_src:
            srcs.update(load_file(str(src / f)))
        fts: dict[str, torch.Tensor] = {}
        for f in need_ft:
            fts.update(load_file(str(ft / f)))
        result = {}
        for name, t in tgt.items():
            if t.is_floating_point():
                result[name] = (t.float() + (fts[name].float() - srcs[name].float())).to(t.dtype)
            else:
                result[name] = t
        del srcs, fts, tgt
        save_file(result, str(out / shard), metadata={"format": "pt"})
        del result
    for extra in ("config.json", INDEX_NAME, "generation_config.json"):
        if (target / extra).is_file():
            shutil.copy2(target / extra, out / extra)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, required=True)
    ap.add_argument("--ft", type=Path, required=True)
    ap.add_argument("--target", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    port(a.src, a.ft, a.target, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
