"""Render the compatibility report for the fine-tune ported v1 -> v2 and screenshot its HTML.

    python bench/render_report.py [--out DIR] [--limit N] [--prompts K] [--device cpu]

Builds Δ = ft-v1 − v1 from the bundled family (``fixtures/``), runs ``patchlab.report.compat.compatibility_report``
onto v2 with the task and general eval sets (the first N instances of each, all by default) and K task
prompts for TuCo, writes report.md / report.json / report.html into DIR and, when ``chromium`` is on PATH,
screenshots report.html headless at 1200×2400 into report.png. Prints timings, the figures and what the
screenshot holds (size, share of non-background pixels, whether the verdict box and the SVG bars show).
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

WINDOW = (1200, 2400)
VERDICT_RGB = {  # the verdict box backgrounds of patchlab.report.render's CSS
    "safe to port": (0xE3, 0xF6, 0xE5),
    "port with care": (0xFF, 0xF4, 0xD6),
    "do not port": (0xFD, 0xE2, 0xE1),
}
BAR_RGB = (0x4E, 0x79, 0xA7)  # the first series colour of patchlab.report.render's SVG charts


def screenshot(html: Path, png: Path, size: tuple[int, int] = WINDOW, timeout: float = 120.0) -> Path:
    """Open ``html`` in headless Chromium and save a ``size`` screenshot to ``png`` (no network, temp profile)."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        raise FileNotFoundError("chromium is not installed (Debian: apt-get install -y chromium)")
    with tempfile.TemporaryDirectory(prefix="patchlab-chromium-") as profile:
        cmd = [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--screenshot={png}",
            f"--window-size={size[0]},{size[1]}",
            Path(html).resolve().as_uri(),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not png.is_file():
        raise RuntimeError(f"chromium failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return png


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else b if pb <= pc else c


def read_png(path: Path):
    """Decode an 8-bit RGB/RGBA, non-interlaced PNG into a (height, width, channels) uint8 numpy array."""
    import numpy as np

    data = Path(path).read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path}: not a PNG file")
    pos, idat, ihdr = 8, bytearray(), None
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        pos += 12 + n
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
    if ihdr is None:
        raise ValueError(f"{path}: no IHDR chunk")
    w, h, depth, color, _, _, interlace = ihdr
    if depth != 8 or color not in (2, 6) or interlace:
        raise ValueError(f"{path}: only 8-bit RGB/RGBA non-interlaced PNGs are read (got {ihdr})")
    bpp = 3 if color == 2 else 4
    stride = w * bpp
    raw = np.frombuffer(zlib.decompress(bytes(idat)), dtype=np.uint8).reshape(h, stride + 1)
    out = np.zeros((h, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.uint8)
    for y in range(h):
        f, line = raw[y, 0], raw[y, 1:]
        if f == 0:
            cur = line.copy()
        elif f == 1:  # Sub: running sum per channel
            cur = (np.cumsum(line.reshape(w, bpp).astype(np.int64), axis=0) % 256).astype(np.uint8).reshape(-1)
        elif f == 2:  # Up
            cur = line + prev
        else:  # Average / Paeth depend on the reconstructed left neighbour: sequential
            cur = bytearray(stride)
            ln, up = line.tolist(), prev.tolist()
            for i in range(stride):
                a = cur[i - bpp] if i >= bpp else 0
                b = up[i]
                if f == 3:
                    cur[i] = (ln[i] + ((a + b) >> 1)) & 0xFF
                else:
                    c = up[i - bpp] if i >= bpp else 0
                    cur[i] = (ln[i] + _paeth(a, b, c)) & 0xFF
            cur = np.frombuffer(bytes(cur), dtype=np.uint8)
        out[y] = cur
        prev = cur
    return out.reshape(h, w, bpp)


def screenshot_stats(png: Path, verdict: str | None = None) -> dict:
    """Size and content of a screenshot: share of pixels off the page background, and whether the verdict
    box colour and the chart bar colour appear (pixel counts)."""
    import numpy as np

    img = read_png(png)[..., :3]
    h, w = img.shape[:2]
    white = np.all(img == 255, axis=-1)

    def count(rgb: tuple[int, int, int]) -> int:
        return int(np.all(img == np.array(rgb, dtype=np.uint8), axis=-1).sum())

    return {
        "width": w,
        "height": h,
        "non_background_share": float(1.0 - white.mean()),
        "distinct_colours": int(len(np.unique(img.reshape(-1, 3), axis=0))),
        "verdict_box_pixels": count(VERDICT_RGB[verdict]) if verdict in VERDICT_RGB else None,
        "bar_pixels": count(BAR_RGB),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "report-v1-v2")
    ap.add_argument("--limit", type=int, default=0, help="first N instances of each eval set (0: all)")
    ap.add_argument("--prompts", type=int, default=16, help="task prompts used for TuCo")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-screenshot", action="store_true")
    args = ap.parse_args(argv)

    from transformers.utils import logging as hf_logging

    import patchlab
    from fixtures import EVAL, model_path
    from patchlab.report.compat import compatibility_report
    from patchlab.report.render import render

    hf_logging.disable_progress_bar()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="patchlab-render-") as tmp:
        tmp = Path(tmp)
        tasks = []
        for name in ("task", "general"):
            lines = (EVAL / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
            lines = [x for x in lines if x.strip()]
            if args.limit:
                lines = lines[: args.limit]
            dest = tmp / f"{name}.jsonl"
            dest.write_text("\n".join(lines) + "\n", encoding="utf-8")
            tasks.append(dest)
        prompt_rows = [json.loads(x) for x in (EVAL / "task.jsonl").read_text(encoding="utf-8").splitlines() if x]
        prompt_rows = prompt_rows[: args.prompts]
        t0 = time.perf_counter()
        patch = patchlab.extract(model_path("v1"), model_path("ft-v1"), tmp / "ft-v1.patch", device=args.device)
        t1 = time.perf_counter()
        rep = compatibility_report(
            patch,
            model_path("v2"),
            tasks=tasks,
            prompts=[r["prompt"] for r in prompt_rows],
            prompt_ids=[r["id"] for r in prompt_rows],
            device=args.device,
            title="Porting the ft-v1 patch onto v2",
        )
        t2 = time.perf_counter()
    rep["meta"]["patch"] = "ft-v1 − v1 (extracted)"
    for fmt in ("md", "json", "html"):
        (args.out / f"report.{fmt}").write_text(render(rep, fmt), encoding="utf-8")
    verdict = rep["diagnostics"]["verdict"]["level"]
    print(f"extract {t1 - t0:.1f}s, compatibility_report {t2 - t1:.1f}s; wrote {args.out}/report.{{md,json,html}}")
    print(f"verdict: {verdict}")
    for name, ev in rep["evaluations"].items():
        print(f"  {name:14s} " + "  ".join(f"{t} {s['accuracy']:.3f} (n={s['n']})" for t, s in ev["tasks"].items()))
    for g, s in rep["flips"]["groups"].items():
        print(f"  flips {g:8s} NFR {s['nfr']:.3f} PFR {s['pfr']:.3f} NFR_mc {s['nfr_mc']:.3f}")
    print(f"  TuCo mean {rep['tuco']['mean_tuco']:.4f} over {len(rep['tuco']['results'])} prompts")
    if args.no_screenshot:
        return 0
    if shutil.which("chromium") is None and shutil.which("chromium-browser") is None:
        print("chromium not found: no screenshot (apt-get install -y chromium)")
        return 0
    t3 = time.perf_counter()
    png = screenshot(args.out / "report.html", args.out / "report.png")
    t4 = time.perf_counter()
    stats = screenshot_stats(png, verdict)
    print(f"screenshot {png} in {t4 - t3:.1f}s: {json.dumps(stats)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
