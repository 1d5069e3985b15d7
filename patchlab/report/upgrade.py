"""The summary of an upgrade run (every patch of a family moved to a new base): Markdown, JSON and a
self-contained HTML page (inline CSS and SVG bars; no JavaScript, no external references).

Pure functions of the summary dict ``registry.workflows.upgrade.summarise_run`` builds.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping
from typing import Any

from patchlab.report.render import _CSS, hbar_svg

SUMMARY_FORMAT = "patchlab-upgrade-summary"
COLUMNS = ("patch", "verdict", "accuracy old", "accuracy new", "NFR", "gate", "alias moved", "report")


def _f(x: Any, pct: bool = False) -> str:
    if x is None:
        return "–"
    return f"{100 * x:.1f}%" if pct else f"{x:.3f}"


def _cells(p: Mapping[str, Any]) -> list[str]:
    moved = f"yes ({p['alias']})" if p.get("alias_moved") else "no"
    return [
        f"{p['source']} → {p.get('new') or '?'}",
        p.get("verdict") or "–",
        _f(p.get("accuracy_old"), True),
        _f(p.get("accuracy_new"), True),
        _f(p.get("nfr"), True),
        {"pass": "PASS", "fail": "FAIL"}.get(p.get("gate", ""), str(p.get("gate", "")).upper()),
        moved,
    ]


def _title(s: Mapping[str, Any]) -> str:
    return f"Upgrade of {s['family']} to {s['to']} (run {s['run']})"


def _why(p: Mapping[str, Any]) -> str | None:
    return p.get("reason") if not p.get("alias_moved") else None


def render_markdown(s: Mapping[str, Any]) -> str:
    lines = [f"# {_title(s)}", ""]
    lines.append(f"{s['passed']} of {len(s['patches'])} patches passed their gates; state: {s['state']}.")
    lines.append("")
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|" + "---|" * len(COLUMNS))
    for p in s["patches"]:
        link = f"[report]({p['reports']['md']})" if p.get("reports", {}).get("md") else "–"
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in _cells(p) + [link]) + " |")
    why = [(p["patch"], _why(p)) for p in s["patches"] if _why(p)]
    if why:
        lines += ["", "## Why aliases did not move", ""]
        lines += [f"- **{n}**: {w}" for n, w in why]
    return "\n".join(lines) + "\n"


def render_html(s: Mapping[str, Any]) -> str:
    e = html.escape
    body = [f"<h1>{e(_title(s))}</h1>"]
    ok = s["passed"] == len(s["patches"])
    body.append(
        f'<div class="verdict {"safe" if ok else "care"}">{s["passed"]} of {len(s["patches"])} patches passed their '
        f"gates; state: {e(str(s['state']))}</div>"
    )
    rows = []
    for p in s["patches"]:
        cells = "".join(f"<td>{e(c)}</td>" for c in _cells(p))
        links = " ".join(f'<a href="{e(path)}">{e(fmt)}</a>' for fmt, path in sorted((p.get("reports") or {}).items()))
        cls = "safe" if p.get("gate") == "pass" else "stop"
        rows.append(f'<tr class="{cls}" data-patch="{e(p["patch"])}">{cells}<td>{links or "–"}</td></tr>')
    body.append(
        '<table id="summary"><tr>' + "".join(f"<th>{e(c)}</th>" for c in COLUMNS) + "</tr>" + "".join(rows) + "</table>"
    )
    why = [(p["patch"], _why(p)) for p in s["patches"] if _why(p)]
    if why:
        body.append("<h2>Why aliases did not move</h2><ul>")
        body += [f"<li><b>{e(n)}</b>: {e(w or '')}</li>" for n, w in why]
        body.append("</ul>")
    labels = [p["patch"] for p in s["patches"]]
    if labels:
        body.append(
            hbar_svg(
                labels,
                {
                    "previous": [p.get("accuracy_old") for p in s["patches"]],
                    "ported": [p.get("accuracy_new") for p in s["patches"]],
                },
                title="Suite accuracy, previous version vs ported",
                fmt="{:.1%}",
            )
        )
        body.append(
            hbar_svg(
                labels,
                {"NFR": [p.get("nfr") for p in s["patches"]]},
                title="Negative flip rate against the previous version",
                fmt="{:.1%}",
                colors=("#e15759",),
            )
        )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{e(_title(s))}</title><style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def render_summary(summary: Mapping[str, Any], fmt: str = "md") -> str:
    if summary.get("format") != SUMMARY_FORMAT:
        raise ValueError(f"not an upgrade summary (format={summary.get('format')!r})")
    if fmt == "json":
        return json.dumps(summary, indent=2, sort_keys=True, default=str)
    if fmt in ("md", "markdown"):
        return render_markdown(summary)
    if fmt == "html":
        return render_html(summary)
    raise ValueError(f"unknown summary format {fmt!r}; use md, json or html")
