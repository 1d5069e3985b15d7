"""CLI commands for compatibility: ``eval``, ``flips``, ``tuco``, ``diagnose``, ``report`` (thin shells).

They parse, resolve registry references, call the library (``patchlab.measure.evaluate``, ``patchlab.measure.flips``,
``patchlab.measure.tuco``, ``patchlab.measure.diagnose``, ``patchlab.report.compat``) and print; no tensor math, no SQL.
"""

# No "from __future__ import annotations": typer evaluates the option annotations.

import json
import re
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from cli.common import (
    CliInputError,
    DeviceOpt,
    JsonOpt,
    RegistryOpt,
    VocabPolicyOpt,
    console,
    err_console,
    escape,
    fmt_float,
    fmt_pct,
    handled,
    is_ref,
    open_registry,
    print_json,
    quiet_transformers,
)

EVAL_PREFIX = "eval:"
REPORT_FORMATS = ("md", "json", "html")
SHOWN_IDS = 5

BatchOpt = Annotated[int, typer.Option("--batch-size", help="Instances per forward pass.")]
MaxNewOpt = Annotated[int, typer.Option("--max-new-tokens", help="Generation budget when a task sets none.")]
SourceOpt = Annotated[str | None, typer.Option(help="The patch's own base (default: the path in its provenance).")]
IntrudersOpt = Annotated[bool, typer.Option(help="Analyse intruder dimensions (two SVDs per matrix).")]
AllowMissingOpt = Annotated[
    bool, typer.Option("--allow-missing", help="Compare on the instances both sides have; report the rest.")
]


# ---- helpers (no registry access unless given one) ------------------------------------------------------


def parse_eval_spec(spec: str) -> tuple[list[int] | None, str | None]:
    """``eval:12`` / ``eval:12,14`` → ids; ``eval:REF`` → a model reference (its newest evaluation per task)."""
    body = spec[len(EVAL_PREFIX) :].strip()
    if not body:
        raise CliInputError(
            f"{spec!r}: write eval:ID[,ID...] (ids from `patchlab evals ls`) or eval:REF (a model's newest evaluations)"
        )
    if re.fullmatch(r"\d+(\s*,\s*\d+)*", body):
        return [int(x) for x in body.split(",")], None
    return None, body


def load_flip_side(
    spec: str,
    *,
    registry: str | None,
    tasks: list[str] | None,
    metric: str | None,
    score_metric: str | None,
) -> tuple[list[Any], str]:
    """Flip records of one side of ``patchlab flips`` and a description of where they came from.

    ``eval:...`` reads the registry; a JSON file in patchlab's results format is an ``EvalResult``; any
    other file or directory is lm-evaluation-harness ``--log_samples`` output."""
    from patchlab.measure.lmeval import read_samples, read_samples_dir
    from patchlab.measure.results import RESULTS_FORMAT, EvalResult

    if spec.startswith(EVAL_PREFIX):
        ids, ref = parse_eval_spec(spec)
        with open_registry(registry) as reg:
            res = reg.evaluations_result(ids) if ids is not None else reg.eval_result(ref, tasks=tasks)
        return _only_tasks(res.flip_records(), tasks, spec), f"registry {spec} ({res.model})"
    p = Path(spec)
    if not p.exists():
        raise CliInputError(
            f"{spec}: no such file or directory; pass a patchlab results file (patchlab eval -o), an lm-eval "
            "samples file or directory, or eval:ID / eval:REF for evaluations stored in the registry"
        )
    if p.is_file() and p.suffix == ".json":
        import json

        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CliInputError(
                f"{p}: not readable JSON ({exc}); pass a results file from `patchlab eval -o`"
            ) from None
        if isinstance(data, dict) and data.get("format") == RESULTS_FORMAT:
            try:
                res = EvalResult.from_json(data)
            except (ValueError, KeyError, TypeError) as exc:
                raise CliInputError(f"{p}: not a readable patchlab evaluation result ({exc})") from None
            return _only_tasks(res.flip_records(), tasks, spec), f"results file {p} ({res.model})"
        fmt = data.get("format") if isinstance(data, dict) else None
        raise CliInputError(
            f"{p}: a JSON file that is not a patchlab evaluation result (format={fmt!r}); "
            "lm-eval samples are .jsonl files"
        )
    kw = {"metric": metric, "score_metric": score_metric}
    if p.is_dir():
        return read_samples_dir(p, tasks=tasks, **kw), f"lm-eval samples {p}"
    named = tasks[0] if tasks and len(tasks) == 1 else None  # a file named otherwise: --task names its task
    return _only_tasks(read_samples(p, task=named, **kw), tasks, spec), f"lm-eval samples {p}"


def _only_tasks(records: list[Any], tasks: list[str] | None, spec: str) -> list[Any]:
    if not tasks:
        return records
    have = {r.task for r in records}
    if absent := set(tasks) - have:
        raise CliInputError(f"{spec}: no results for task(s) {sorted(absent)}; it has {sorted(have)}")
    return [r for r in records if r.task in tasks]


def _check_replaceable_result(path: Path) -> None:
    """``eval -o`` replaces only an earlier patchlab result: never a file of the user's own."""
    from patchlab.measure.results import RESULTS_FORMAT

    try:
        ok = path.is_file() and json.loads(path.read_text(encoding="utf-8")).get("format") == RESULTS_FORMAT
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise CliInputError(
            f"-o {path}: it exists and is not a patchlab evaluation result; choose another -o file "
            "(an earlier result is replaced)"
        )


def write_report_files(report: dict, out_dir: Path, formats: tuple[str, ...]) -> list[Path]:
    """Render ``report`` in each format into ``out_dir/report.<ext>``; each file appears whole (temp + rename)."""
    from patchlab.io.outputs import check_output, new_marker, read_marker, write_marker
    from patchlab.report.render import render

    check_output(out_dir, True, "report")  # only an empty directory or an earlier report is written into
    texts = {fmt: render(report, fmt) for fmt in formats}  # render everything before writing anything
    written = []
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if read_marker(out_dir) is None:
            write_marker(out_dir, new_marker("report"))
        for fmt, text in texts.items():
            dest = out_dir / f"report.{fmt}"
            tmp = dest.with_name(dest.name + ".partial")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(dest)
            written.append(dest)
    except OSError as exc:
        raise CliInputError(f"cannot write the report into {out_dir} ({exc}); pick another -o directory") from None
    return written


# ---- commands -----------------------------------------------------------------------------------------


app = typer.Typer()


@app.command("eval")
@handled
def eval_cmd(
    model: Annotated[str, typer.Argument(help="A model directory, family@version or derived:N.")],
    tasks: Annotated[list[Path], typer.Argument(help="JSONL task files (the task name is the file stem).")],
    batch_size: BatchOpt = 8,
    max_new_tokens: MaxNewOpt = 32,
    device: DeviceOpt = "auto",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the full result (every instance) as JSON.")
    ] = None,
    record: Annotated[
        str | None,
        typer.Option(help="Store the result in the registry against this reference (automatic for references)."),
    ] = None,
    no_record: Annotated[bool, typer.Option("--no-record", help="Never store the result in the registry.")] = False,
    truncate: Annotated[
        bool, typer.Option("--truncate", help="Drop prompt tokens from the left when a prompt is over the context.")
    ] = False,
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Evaluate a model on task files and print per-task accuracy; store it in the registry."""
    from patchlab.measure.evaluate import evaluate
    from patchlab.measure.tasks import load_task

    if record is not None and no_record:
        raise CliInputError("--record and --no-record contradict each other; pass one")
    if output is not None and not output.parent.is_dir():
        raise CliInputError(f"-o {output}: directory {output.parent} does not exist; create it first")
    if output is not None and output.exists():
        _check_replaceable_result(output)
    for t in tasks:  # every task file problem before any model is loaded or registry opened
        load_task(t)
    quiet_transformers()
    model_is_ref = is_ref(model)
    target = record if record is not None else (model if model_is_ref and not no_record else None)
    reg = open_registry(registry) if (model_is_ref or target is not None) else None
    try:
        if model_is_ref:
            path, label = reg.model_path(model)
        else:
            path, label = Path(model), model
        if target is not None:  # a bad --record reference fails before the evaluation, not after
            target = reg.resolve(target).label
        res = evaluate(
            path,
            [str(t) for t in tasks],
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            device=device,
            model_name=label,
            on_overflow="truncate" if truncate else "error",
        )
        if output is not None:
            res.save(output)
        recorded = reg.record_eval_result(target, res) if target is not None else []
    finally:
        if reg is not None:
            reg.close()
    if json_out:
        return print_json(
            {
                "model": res.model,
                "tasks": {k: vars(v) for k, v in res.tasks.items()},
                "settings": res.settings,
                "output": str(output) if output else None,
                "recorded": [e.to_dict() for e in recorded],
            }
        )
    t = Table("task", "n", "correct", "accuracy", "acc_norm", "mean F1", "truncated", title=f"{label}")
    for name, s in res.tasks.items():
        t.add_row(
            escape(name),
            str(s.n),
            str(s.n_correct),
            fmt_pct(s.accuracy),
            fmt_pct(s.accuracy_norm),
            fmt_float(s.mean_score),
            str(s.n_truncated),
        )
    out = console()
    out.print(t)
    if output is not None:
        out.print(f"wrote {escape(str(output))}")
    for e in recorded:
        out.print(f"recorded evaluation {e.id}: {escape(e.target)} on {escape(e.dataset)}")
    return None


@app.command("flips")
@handled
def flips_cmd(
    old: Annotated[str, typer.Argument(help="Old side: results.json, lm-eval samples file/dir, eval:ID or eval:REF.")],
    new: Annotated[str, typer.Argument(help="New side, the same kinds as OLD.")],
    task: Annotated[list[str] | None, typer.Option("--task", help="Only this task (repeatable).")] = None,
    allow_missing: AllowMissingOpt = False,
    tolerance: Annotated[float, typer.Option(help="MUSCLE: |D| at or below this is no change.")] = 0.0,
    metric: Annotated[
        str | None, typer.Option(help="lm-eval: the correctness metric (default: acc, exact_match...).")
    ] = None,
    score_metric: Annotated[str | None, typer.Option(help="lm-eval: the metric used as the MUSCLE score.")] = None,
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Negative flips between two evaluations of the same instances: NFR, PFR, NFR_mc, BTC, BEC, MUSCLE."""
    from patchlab.measure.flips import compare

    kw = {"registry": registry, "tasks": task or None, "metric": metric, "score_metric": score_metric}
    old_recs, old_src = load_flip_side(old, **kw)
    new_recs, new_src = load_flip_side(new, **kw)
    rep = compare(old_recs, new_recs, allow_missing=allow_missing, tolerance=tolerance)
    if json_out:
        return print_json({"old": old_src, "new": new_src, **rep.to_json()})
    out = console()
    out.print(f"old: {escape(old_src)}\nnew: {escape(new_src)}")
    groups = [*rep.groups.items(), ("overall", rep.overall)]
    t = Table(
        "task", "N", "acc old", "acc new", "NFR", "PFR", "NFR_mc", "BTC", "BEC",
        "both ✓", "✓→✗", "✗→✓", "both ✗", "missing old/new",
        title="negative flips (old → new)",
    )  # fmt: skip
    for g, s in groups:
        t.add_row(
            escape(g),
            str(s.n),
            fmt_pct(s.accuracy_old),
            fmt_pct(s.accuracy_new),
            fmt_pct(s.nfr),
            fmt_pct(s.pfr),
            fmt_pct(s.nfr_mc),
            fmt_float(s.btc),
            fmt_float(s.bec),
            str(len(s.both_correct_ids)),
            str(s.n_negative_flips),
            str(s.n_positive_flips),
            str(len(s.both_wrong_ids)),
            f"{s.n_only_old}/{s.n_only_new}",
        )
    out.print(t)
    scored = [(g, s.muscle) for g, s in groups if s.muscle is not None]
    if scored:
        m = Table(
            "task", "N", "PFR_D", "NFR_D", "mean gain", "mean regression", "mean D",
            title=f"generative score changes (MUSCLE, D = S(new) − S(old), tolerance {tolerance:g})",
        )  # fmt: skip
        for g, ms in scored:
            m.add_row(
                escape(g),
                str(ms.n),
                fmt_pct(ms.pfr),
                fmt_pct(ms.nfr),
                fmt_float(ms.mean_gain),
                fmt_float(ms.mean_regression),
                fmt_float(ms.mean_difference),
            )
        out.print(m)
    for g, s in rep.groups.items():
        if s.negative_flip_ids:
            more = len(s.negative_flip_ids) - SHOWN_IDS
            ids = ", ".join(s.negative_flip_ids[:SHOWN_IDS]) + (f" (+{more} more)" if more > 0 else "")
            out.print(f"{escape(g)}: negative flips {escape(ids)}")
    if rep.overall.n_only_old or rep.overall.n_only_new:
        out.print(
            f"[yellow]compared on the intersection:[/] {rep.overall.n_only_old} instances only in old, "
            f"{rep.overall.n_only_new} only in new (--json lists them)"
        )
    return None


@app.command("tuco")
@handled
def tuco_cmd(
    base: Annotated[str, typer.Argument(help="The pre-trained model: a directory or family@version.")],
    finetuned: Annotated[str, typer.Argument(help="The fine-tuned model: a directory or derived:N.")],
    prompts: Annotated[
        Path,
        typer.Option("--prompts", help='Prompts: a text file (one per line) or JSONL with "prompt" (and "id").'),
    ],
    alpha: Annotated[float, typer.Option(help="Measure the α-steered model x + PTC + α·FTC (1: the fine-tune).")] = 1.0,
    chat: Annotated[
        bool, typer.Option("--chat", help="Wrap each prompt as a user turn with the chat template.")
    ] = False,
    batch_size: BatchOpt = 8,
    device: DeviceOpt = "auto",
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Tuning Contribution (TuCo) of a fine-tune per prompt, with mean and quantiles."""
    from patchlab.measure.tasks import load_prompts
    from patchlab.measure.tuco import TuCo, tuco_summary

    ids, texts = load_prompts(prompts)
    quiet_transformers()
    paths = []
    if is_ref(base) or is_ref(finetuned):
        with open_registry(registry) as reg:
            paths = [reg.model_path(m)[0] if is_ref(m) else Path(m) for m in (base, finetuned)]
    else:
        paths = [Path(base), Path(finetuned)]
    tc = TuCo.load(paths[0], paths[1], device=device)
    try:
        rep = tc.measure(texts, ids=ids, batch_size=batch_size, chat=chat, alpha=alpha)
    finally:
        tc.close()
    summary = tuco_summary([r.tuco for r in rep.results])
    if json_out:
        return print_json({**rep.to_json(), "summary": summary, "tokenizer_note": tc.tokenizer_note})
    if tc.tokenizer_note:
        err_console().print(f"note: {tc.tokenizer_note}")
    t = Table("prompt", "TuCo", "‖ΣPTC‖₁", "‖ΣFTC‖₁", "tokens", title=f"TuCo of {finetuned} over {base}")
    for r in rep.results:
        t.add_row(escape(r.id), f"{r.tuco:.4f}", f"{r.ptc_l1:.4g}", f"{r.ftc_l1:.4g}", str(r.n_tokens))
    out = console()
    out.print(t)
    out.print(
        f"{summary['n']} prompts: mean [bold]{summary['mean']:.4f}[/], min {summary['min']:.4f}, "
        f"p10 {summary['p10']:.4f}, p25 {summary['p25']:.4f}, median {summary['p50']:.4f}, "
        f"p75 {summary['p75']:.4f}, p90 {summary['p90']:.4f}, max {summary['max']:.4f}"
        + (f" (α = {alpha:g})" if alpha != 1.0 else "")
    )
    return None


def recorded_drift(registry: str | None, patch: str, target: str, source_base: str | None) -> Any:
    """The drift ``base add`` recorded from a registered patch's base to a registered TARGET release
    (``measure.diagnose.BaseDrift``, with the registry's paths of both), or None: a diagnosis on it need not read
    the patch's base. None as well when ``--source-base`` names another base, or either side is a directory."""
    if source_base is not None or not (is_ref(patch) and is_ref(target)):
        return None
    with open_registry(registry) as reg:
        base = reg.get_patch(patch).base
        to = reg.resolve(target)
        if base is None or to.kind != "base":
            return None
        return reg.base_drift(base, to.label)


def resolve_patch_and_target(registry: str | None, patch: str, target: str, source_base: str | None):
    """Directories for PATCH, TARGET and the optional source base (absolute: the report shows them)."""
    if not (is_ref(patch) or is_ref(target) or (source_base and is_ref(source_base))):
        s = Path(source_base).resolve() if source_base else None
        return Path(patch).resolve(), Path(target).resolve(), s
    with open_registry(registry) as reg:
        p = reg.resolve_patch_path(patch)
        t = reg.model_path(target)[0] if is_ref(target) else Path(target)
        s = None
        if source_base is not None:
            s = reg.model_path(source_base)[0] if is_ref(source_base) else Path(source_base)
    return p.resolve(), t.resolve(), s.resolve() if s is not None else None


@app.command("diagnose")
@handled
def diagnose_cmd(
    patch: Annotated[str, typer.Argument(help="A patch directory or registered patch reference.")],
    target: Annotated[str, typer.Argument(help="The new base: a directory or family@version.")],
    source_base: SourceOpt = None,
    intruders: IntrudersOpt = True,
    device: DeviceOpt = "auto",
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Weight-space diagnostics of porting PATCH onto TARGET, and a verdict with its reasons."""
    from patchlab.measure.diagnose import diagnose

    p, t, s = resolve_patch_and_target(registry, patch, target, source_base)
    pair = recorded_drift(registry, patch, target, source_base)
    if pair is not None:  # the diagnosis reads the target and the patch; the old base not at all
        s = Path(pair.source)
    d = diagnose(p, t, source_base=s, intruders=intruders, device=device, base_pair=pair)
    if json_out:
        return print_json(d.to_json())
    out = console()
    color = {"safe to port": "green", "port with care": "yellow"}.get(d.verdict.level, "red")
    out.print(f"verdict: [bold {color}]{d.verdict.level}[/]")
    for r in d.verdict.reasons:
        out.print(f"  - {escape(r)}")
    o = d.overall
    ov = Table("drift ‖base_t − base_s‖", "‖Δ‖", "drift / ‖Δ‖", "drift / ‖base_s‖", "cos(drift, Δ)", "parameters",
               title=f"overall: {escape(d.source)} → {escape(d.target)}")  # fmt: skip
    ov.add_row(fmt_float(o.drift_norm, 4), fmt_float(o.delta_norm, 4), fmt_float(o.drift_rel_delta),
               fmt_float(o.drift_rel_base), fmt_float(o.cos_drift_delta), f"{o.numel:,}")  # fmt: skip
    out.print(ov)
    pl = Table("layer", "drift / ‖Δ‖", "drift / ‖base_s‖", "cos(drift, Δ)", "parameters", title="per layer")
    for k, v in d.per_layer.items():
        pl.add_row(
            k, fmt_float(v.drift_rel_delta), fmt_float(v.drift_rel_base), fmt_float(v.cos_drift_delta), f"{v.numel:,}"
        )
    out.print(pl)
    structural = [x for x in d.tensors if x.status != "compared"]
    for x in structural:
        out.print(f"[yellow]{x.status}[/] {escape(x.name)} {escape(x.note)}")
    for n in d.only_in_target:
        out.print(f"[yellow]only in target[/] {escape(n)}")
    if d.intruder_matrices:
        n = d.matrices_with_intruders
        out.print(f"intruder dimensions: {n} of {d.intruder_matrices} analysed matrices carry some")
    return None


@app.command("report")
@handled
def report_cmd(
    patch: Annotated[str, typer.Argument(help="A patch directory or registered patch reference.")],
    target: Annotated[str, typer.Argument(help="The new base: a directory or family@version.")],
    eval_files: Annotated[
        list[Path] | None, typer.Option("--eval", help="A JSONL task file to evaluate (repeatable).")
    ] = None,
    prompts: Annotated[Path | None, typer.Option("--prompts", help="Prompts for TuCo (text or JSONL).")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for report.md/.json/.html.")] = Path(
        "patchlab-report"
    ),
    fmt: Annotated[str, typer.Option("--format", help="md, json, html or all.")] = "all",
    source_base: SourceOpt = None,
    old_model: Annotated[
        str | None, typer.Option(help="The old fine-tune (default: the patch applied to its own base).")
    ] = None,
    ported: Annotated[
        str | None, typer.Option(help="An already ported model (default: built as TARGET + α·Δ).")
    ] = None,
    alpha: Annotated[float, typer.Option(help="Scale of the patch in the port.")] = 1.0,
    vocab_policy: VocabPolicyOpt = None,
    allow_missing: AllowMissingOpt = False,
    intruders: IntrudersOpt = True,
    batch_size: BatchOpt = 8,
    max_new_tokens: MaxNewOpt = 32,
    title: Annotated[str | None, typer.Option(help="Report title.")] = None,
    device: DeviceOpt = "auto",
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Compatibility report of porting PATCH onto TARGET: plan, diagnostics, and with --eval/--prompts
    accuracy, negative flips (ported vs old fine-tune) and TuCo; writes report.md/.json/.html."""
    from patchlab.measure.tasks import load_prompts, load_task
    from patchlab.report.compat import compatibility_report

    formats = REPORT_FORMATS if fmt == "all" else (fmt,)
    if fmt != "all" and fmt not in REPORT_FORMATS:
        raise CliInputError(f"unknown --format {fmt!r}; use md, json, html or all")
    if output.exists() and not output.is_dir():
        raise CliInputError(f"{output} exists and is not a directory; -o names a directory for the report files")
    from patchlab.io.outputs import check_output

    check_output(output, True, "report")  # before the work: only an empty dir or an earlier report
    for f in eval_files or ():
        load_task(f)
    ids, texts = load_prompts(prompts) if prompts is not None else (None, [])
    quiet_transformers()
    p, t, s = resolve_patch_and_target(registry, patch, target, source_base)
    if (old_model and is_ref(old_model)) or (ported and is_ref(ported)):
        with open_registry(registry) as reg:
            old_model = str(reg.model_path(old_model)[0]) if old_model and is_ref(old_model) else old_model
            ported = str(reg.model_path(ported)[0]) if ported and is_ref(ported) else ported
    rep = compatibility_report(
        p,
        t,
        tasks=[str(f) for f in eval_files or ()],
        prompts=texts,
        prompt_ids=ids,
        source_base=s,
        old_model=old_model,
        ported=ported,
        alpha=alpha,
        vocab_policy=vocab_policy,
        allow_missing=allow_missing,
        intruders=intruders,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        device=device,
        title=title or (f"Porting {patch} onto {target}" if is_ref(patch) or is_ref(target) else None),
    )
    for what, ref in (("patch reference", patch), ("target reference", target)):
        if is_ref(ref):
            rep["meta"][what] = ref
    written = write_report_files(rep, output, formats)
    verdict = (rep.get("diagnostics") or {}).get("verdict", {}).get("level")
    if json_out:
        return print_json({"written": [str(w) for w in written], "verdict": verdict, "report": rep})
    out = console()
    color = {"safe to port": "green", "port with care": "yellow"}.get(verdict or "", "red")
    out.print(f"verdict: [bold {color}]{verdict}[/]")
    ev = rep.get("evaluations") or {}
    for task_name in sorted({k for e in ev.values() for k in e["tasks"]}):
        accs = ", ".join(
            f"{n} {fmt_pct(e['tasks'][task_name]['accuracy'])}" for n, e in ev.items() if task_name in e["tasks"]
        )
        nfr = (rep.get("flips") or {}).get("groups", {}).get(task_name, {}).get("nfr")
        out.print(f"{escape(task_name)}: {escape(accs)}; NFR {fmt_pct(nfr)}")
    if rep.get("tuco"):
        out.print(f"TuCo mean {rep['tuco']['mean_tuco']:.4f} over {len(rep['tuco']['results'])} prompts")
    for w in written:
        out.print(f"wrote {escape(str(w))}")
    return None
