"""Calibrate the port-verdict thresholds on a model family: prints diagnostics beside port accuracy.

    python bench/compat_calibrate.py [--family fixtures/models] [--eval fixtures/eval]

Extracts Δ = ft-v1 − v1 and ports it onto targets that walk from v2 (further pre-training of v1) towards
an untrained model of the same shape (an earlier training stage): ``(1 − λ)·v2 + λ·v0``. For each target
it prints the weight-space diagnostics (drift/‖Δ‖, relative drift, worst layer), the verdict the current
``Thresholds`` give, and the ported model's accuracy on the task the patch taught and on general
knowledge, next to the ft-v2 oracle. Thresholds belong where the port's task accuracy drops.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import patchlab  # noqa: E402
from patchlab.measure.diagnose import diagnose  # noqa: E402
from patchlab.measure.evaluate import evaluate  # noqa: E402


def main() -> None:
    root = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", type=Path, default=root / "fixtures" / "models")
    ap.add_argument("--eval", type=Path, default=root / "fixtures" / "eval")
    ap.add_argument("--lambdas", default="0,0.1,0.2,0.3,0.45,0.6,1")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    fam = a.family
    tasks = [a.eval / "task.jsonl", a.eval / "general.jsonl"]
    for need in [fam / "v1", fam / "v2", fam / "ft-v1", fam / "ft-v2", *tasks]:
        if not need.exists():
            sys.exit(f"{need} is missing: build the fixture family first (python -m fixtures.build)")
    kw = {"device": "cpu", "batch_size": 16, "max_new_tokens": 8}

    def acc(path: Path) -> str:
        r = evaluate(path, tasks, **kw)
        return f"task {r.tasks['task'].accuracy:.3f}  general {r.tasks['general'].accuracy:.3f}"

    print(f"oracle ft-v2: {acc(fam / 'ft-v2')}   ft-v1: {acc(fam / 'ft-v1')}   v2 alone: {acc(fam / 'v2')}")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        patch = patchlab.extract(fam / "v1", fam / "ft-v1", tmp / "ft-v1.patch", device="cpu")
        from transformers import AutoConfig, LlamaForCausalLM

        torch.manual_seed(7)
        v0 = LlamaForCausalLM(AutoConfig.from_pretrained(fam / "v1")).state_dict()
        v2 = load_file(str(fam / "v2" / "model.safetensors"))
        print(f"{'λ':>5} {'drift/Δ':>8} {'drift/base':>10} {'worst layer':>11}  {'verdict':<15} port accuracy")
        for lam in [float(x) for x in a.lambdas.split(",")]:
            tgt = tmp / f"target-{lam}"
            shutil.copytree(fam / "v2", tgt)
            mixed = {k: ((1 - lam) * v2[k].float() + lam * v0[k].float()).to(v2[k].dtype).contiguous() for k in v2}
            save_file(mixed, str(tgt / "model.safetensors"), metadata={"format": "pt"})
            diag = diagnose(patch, tgt, device="cpu", intruders=False)
            o = diag.overall
            worst = max(v.drift_rel_delta or 0.0 for v in diag.per_layer.values())
            out = tmp / f"port-{lam}"
            patchlab.port(patch, tgt, out, device="cpu")
            print(
                f"{lam:>5} {o.drift_rel_delta:>8.3f} {o.drift_rel_base:>10.3f} {worst:>11.2f}  "
                f"{diag.verdict.level:<15} {acc(out)}"
            )
            shutil.rmtree(out)
            shutil.rmtree(tgt)


if __name__ == "__main__":
    main()
