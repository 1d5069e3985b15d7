"""Time listing a registry of 10,000 patches (the call `patchlab ls` makes), and registering patches.

    PYTHONPATH=. python bench/registry_ls.py [--patches 10000] [--real 200] [--keep DIR]

The first ``--real`` patches are registered through ``Registry.add_patch`` from real patch directories
(blobs, manifest, lineage, tags) to time registration; the rest are bulk-inserted with the same shape
(files, parents, tags, aliases) so the listing runs over a registry of the requested size. Prints figures.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from sqlalchemy import func, insert, select

from registry import Registry
from registry.rows import AliasRow, PatchFileRow, PatchParentRow, PatchRow, TagRow, utcnow


def make_patch_dir(path: Path, seed: int, base_content: str) -> Path:
    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    delta = torch.randn(64, 64, generator=g) * 0.01
    save_file({"w": delta}, str(path / "delta-00001.safetensors"))
    stats = {
        "norm": float(delta.norm()),
        "rel_norm": 0.01,
        "max_abs": float(delta.abs().max()),
        "changed_frac": 1,
    }
    manifest = {
        "format": "patchlab.io.patch",
        "format_version": 1,
        "provenance": {
            "base": {"content": base_content},
            "finetuned": {"path": f"/ft/{seed}"},
            "method": "diff",
            "parameters": {"seed": seed},
        },
        "tensors": {
            "w": {
                "op": "add",
                "dtype": "float32",
                "keys": {"delta": "w"},
                "encoding": "dense",
                "shape": [64, 64],
                "file": "delta-00001.safetensors",
                "stats": stats,
            }
        },
        "totals": {"tensors": 1},
    }
    (path / "patch.json").write_text(json.dumps(manifest))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patches", type=int, default=10_000)
    ap.add_argument("--real", type=int, default=200)
    ap.add_argument("--keep", type=Path, default=None, help="build the registry here and keep it")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="patchlab-bench-"))
    home = args.keep or work / "home"
    try:
        reg = Registry.init(home)
        content = "ab" * 32
        base_dir = work / "base"
        base_dir.mkdir()
        reg.add_base("llama", "v1", base_dir, content=content, fingerprint=False)
        reg.add_base("llama", "v2", "org/llama-v2", revision="0" * 40, content="cd" * 32)

        dirs = [make_patch_dir(work / f"p{i}", i, content) for i in range(args.real)]
        t0 = time.perf_counter()
        prev = None
        for i, d in enumerate(dirs):
            info = reg.add_patch(
                d,
                name=f"task{i % 50}",
                parents=[prev] if prev and i % 3 else [],
                tags=["bench"] if i % 4 == 0 else [],
            )
            prev = info.ref
        t_add = time.perf_counter() - t0

        # bulk-insert the rest with the same shape
        rng = random.Random(0)
        with reg.db.write() as s:
            bid = s.execute(select(func.min(PatchRow.base_version_id))).scalar_one()
            next_version = dict(
                s.execute(select(PatchRow.name, func.max(PatchRow.version)).group_by(PatchRow.name)).all()
            )
            top = s.execute(select(func.max(PatchRow.id))).scalar_one()
            rows, files, parents, tags = [], [], [], []
            now = utcnow()
            stats = {"w": {"op": "add", "encoding": "dense", "shape": [64, 64], "stats": {"norm": 1.0}}}
            for k in range(args.patches - args.real):
                pid = top + 1 + k
                name = f"task{rng.randrange(500)}"
                next_version[name] = next_version.get(name, 0) + 1
                digest = f"{pid:064x}"
                rows.append(
                    dict(
                        id=pid,
                        name=name,
                        version=next_version[name],
                        digest=digest,
                        size=16_500,
                        base_version_id=bid,
                        base_content=content,
                        finetuned=f"/ft/{pid}",
                        encoding="dense",
                        method="diff",
                        parameters={"seed": pid},
                        num_tensors=1,
                        format_version="1",
                        totals={"tensors": 1},
                        stats=stats,
                        created_at=now,
                    )
                )
                files += [
                    dict(patch_id=pid, name="patch.json", digest=f"{pid:063x}a", size=500),
                    dict(patch_id=pid, name="delta-00001.safetensors", digest=f"{pid:063x}b", size=16_000),
                ]
                if k and k % 3:
                    parents.append(dict(child_id=pid, parent_id=pid - 1, relation="port", position=0))
                if k % 4 == 0:
                    tags.append(dict(tag="bench", patch_id=pid))
            for table, data in ((PatchRow, rows), (PatchFileRow, files), (PatchParentRow, parents), (TagRow, tags)):
                for i in range(0, len(data), 5000):
                    s.execute(insert(table), data[i : i + 5000])
            one_per_name = {r["name"]: r["id"] for r in rows}  # one `prod` alias per patch name
            s.execute(
                insert(AliasRow),
                [
                    dict(name="prod", scope_kind="patch", scope=n, patch_id=pid, updated_at=now)
                    for n, pid in one_per_name.items()
                ],
            )
        reg.close()

        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            with Registry(home) as r:  # as the CLI does: open, list, close
                listed = r.list_patches()
            times.append(time.perf_counter() - t0)
        with Registry(home) as r:
            t0 = time.perf_counter()
            latest = r.list_patches(all_versions=False)
            t_latest = time.perf_counter() - t0
            t0 = time.perf_counter()
            tagged = r.list_patches(tag="bench")
            t_tag = time.perf_counter() - t0
            t0 = time.perf_counter()
            one = r.get_patch("task7")
            t_get = time.perf_counter() - t0
        assert len(listed) == args.patches, len(listed)
        from typer.testing import CliRunner

        from cli.app import app

        cli_times = {}
        for label, extra in (("ls --json", ["--json"]), ("ls (table)", [])):
            t0 = time.perf_counter()
            res = CliRunner().invoke(app, ["--registry", str(home), "ls", *extra])
            cli_times[label] = time.perf_counter() - t0
            assert res.exit_code == 0, res.output
        print(f"registry: {home} ({(home / 'registry.db').stat().st_size / 1e6:.1f} MB database)")
        print(
            f"add_patch (real dirs, blobs + row): {args.real} patches in {t_add:.2f} s = "
            f"{1000 * t_add / max(args.real, 1):.1f} ms/patch"
        )
        print(
            f"list_patches() over {len(listed)} patches incl. open: median {statistics.median(times):.3f} s, "
            f"min {min(times):.3f} s (5 runs)"
        )
        print(f"list_patches(all_versions=False): {len(latest)} names in {t_latest:.3f} s")
        print(f"list_patches(tag='bench'): {len(tagged)} in {t_tag:.3f} s")
        print(f"get_patch('task7') -> {one.ref}: {1000 * t_get:.1f} ms")
        for label, t in cli_times.items():
            print(f"`patchlab {label}` in-process (imports excluded): {t:.3f} s")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
