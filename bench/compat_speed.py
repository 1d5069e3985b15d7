"""Speed of the compatibility tools on a small random Llama (CPU unless --device cuda): prints figures.

    python bench/compat_speed.py [--hidden 256] [--layers 4] [--n 64] [--device auto] [--threads 1]

Measures: multiple-choice scoring (instances/s, 4 choices), greedy generation (tokens/s), TuCo
(prompts/s), the α-steered generation (tokens/s, no KV cache) and the streaming port diagnostics
(MB of fp32 weights per second, with and without intruder SVDs).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import patchlab  # noqa: E402
from patchlab.measure.diagnose import diagnose  # noqa: E402
from patchlab.measure.evaluate import evaluate  # noqa: E402
from patchlab.measure.tuco import TuCo  # noqa: E402
from tests._tiny_llama import make_pair  # noqa: E402

WORDS = "the cat sat on a mat and dog log capital of france is paris two plus four".split()


def prompt(i: int, n: int = 24) -> str:
    g = torch.Generator().manual_seed(i)
    return " ".join(WORDS[int(j)] for j in torch.randint(len(WORDS), (n,), generator=g))


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        base, ft = make_pair(root, hidden=a.hidden, layers=a.layers, max_pos=512, noise=0.05)
        mc = root / "mc.jsonl"
        mc.write_text(
            "".join(
                json.dumps(
                    {
                        "id": str(i),
                        "type": "multiple_choice",
                        "prompt": prompt(i),
                        "gold": 0,
                        "choices": [" cat", " dog on the log", " paris", " two plus four"],
                    }
                )
                + "\n"
                for i in range(a.n)
            )
        )
        gen = root / "gen.jsonl"
        gen.write_text(
            "".join(
                json.dumps({"id": str(i), "type": "generation", "prompt": prompt(i), "answer": "x"}) + "\n"
                for i in range(a.n)
            )
        )
        from patchlab.engine.devices import resolve_device
        from patchlab.io.hf import load_model

        model, tok = load_model(ft, device=resolve_device(a.device))
        dev = next(model.parameters()).device
        print(
            f"model: hidden {a.hidden}, layers {a.layers}, {sum(p.numel() for p in model.parameters()):,} params, "
            f"device {dev}, torch threads {torch.get_num_threads()}"
        )
        evaluate(model, mc, tokenizer=tok, batch_size=16)  # warm-up
        _, t = timed(lambda: evaluate(model, mc, tokenizer=tok, batch_size=16))
        print(f"multiple choice: {a.n} instances x 4 choices in {t:.2f}s = {a.n / t:.1f} instances/s (batch 16)")
        _, t = timed(lambda: evaluate(model, gen, tokenizer=tok, batch_size=16, max_new_tokens=a.new_tokens, stop=None))
        print(f"generation: {a.n} x {a.new_tokens} tokens in {t:.2f}s = {a.n * a.new_tokens / t:.0f} tokens/s")
        tc = TuCo.load(base, ft, device=a.device)
        prompts = [prompt(i) for i in range(a.n)]
        _, t = timed(lambda: tc.measure(prompts, batch_size=16))
        print(f"TuCo: {a.n} prompts in {t:.2f}s = {a.n / t:.1f} prompts/s (batch 16)")
        _, t = timed(lambda: tc.evaluate(1.25, gen, batch_size=16, max_new_tokens=a.new_tokens, stop=None))
        print(f"steered generation (alpha 1.25, no KV cache): {a.n * a.new_tokens / t:.0f} tokens/s")
        patch = patchlab.extract(base, ft, root / "ft.patch", device=a.device)
        target = make_pair(root / "t", hidden=a.hidden, layers=a.layers, max_pos=512, seed=0, noise=0.0)[0]
        mb = sum(p.numel() for p in model.parameters()) * 4 * 3 / 1e6  # three fp32 inputs streamed
        _, t = timed(lambda: diagnose(patch, target, device=a.device, intruders=False))
        print(f"diagnostics (drift only): {t:.2f}s = {mb / t:.0f} MB/s of base_s+base_t+delta")
        _, t = timed(lambda: diagnose(patch, target, device=a.device))
        print(f"diagnostics with intruder SVDs: {t:.2f}s")


if __name__ == "__main__":
    main()
