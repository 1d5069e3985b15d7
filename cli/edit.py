"""``edit`` and ``eval-edits``: fact edits (LocFT-BF) as a one-tensor patch, registered on its base, and their
WILD measurement (reliability, generalization, locality, general ability), stored in the registry."""

# No "from __future__ import annotations": typer evaluates the option annotations.

import shutil
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from cli.common import (
    STATE,
    CliInputError,
    DeviceOpt,
    JsonOpt,
    NoRegisterOpt,
    OverwriteOpt,
    RegistryOpt,
    console,
    err_console,
    escape,
    fmt_float,
    handled,
    is_ref,
    open_registry,
    print_json,
    print_table,
    quiet_transformers,
    status,
)

app = typer.Typer()

EditsOpt = Annotated[
    Path, typer.Option("--edits", help="Edit set: JSONL, one edit a line (see fixtures/edits/README.md).")
]
TaskOpt = Annotated[
    list[Path] | None,
    typer.Option("--task", help="A task file for general ability (repeatable), e.g. fixtures/eval/general.jsonl."),
]


class EpochProgress:
    """A rich progress bar for LocFT-BF's ``progress(epoch, loss, fitted)``: epoch, loss and edits fitted.

    On stderr, terminals only, and never with ``-q`` (``console`` lets a test force it on)."""

    def __init__(self, epochs: int, n_edits: int, enabled: bool, console: Any = None) -> None:
        self.epochs, self.n_edits = epochs, n_edits
        self.console = console
        self.enabled = enabled and not STATE.quiet and (console is not None or sys.stderr.isatty())
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self):
        if not self.enabled:
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("training"),
            BarColumn(),
            TextColumn("epoch"),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  fitted {task.fields[fitted]}/{task.fields[n]}"),
            TimeElapsedColumn(),
            console=self.console or err_console(),
            transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task("train", total=self.epochs, loss="–", fitted=0, n=self.n_edits)
        return self.update

    def update(self, epoch: int, loss: float, fitted: int) -> None:
        self._progress.update(self._task, completed=epoch, loss=f"{loss:.4f}", fitted=fitted)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()


def _figures_rows(fig: dict) -> list[tuple[str, str]]:
    rows = [(k, fmt_float(fig.get(k))) for k in ("reliability", "generalization", "locality")]
    for task, acc in (fig.get("general") or {}).items():
        rows.append((f"general: {task}", fmt_float(acc)))
    return rows


def _print_locate(located: Any) -> None:
    rows = [
        (
            f"{r['layer']}{' (chosen)' if r['layer'] == located.layer else ''}",
            fmt_float(r["reliability"]),
            fmt_float(r["generalization"]),
            fmt_float(r["locality"]),
            f"{r['final_loss']:.4f}",
            f"{r['seconds']:.1f}",
        )
        for r in located.table
    ]
    console().print(f"locate: {len(located.sample_ids)} edits, each candidate layer trained alone")
    print_table(("layer", "reliability", "generalization", "locality", "final loss", "seconds"), rows)


@app.command("edit")
@handled
def edit_cmd(
    base: Annotated[str, typer.Argument(help="Base checkpoint: a directory or family@version.")],
    edits: EditsOpt,
    layer: Annotated[int | None, typer.Option(help="Decoder layer to edit (default: ~0.7 of the depth).")] = None,
    module: Annotated[str, typer.Option(help="Module inside the layer, matched exactly.")] = "mlp.down_proj",
    locate: Annotated[bool, typer.Option("--locate", help="Choose the layer by trying each; print the table.")] = False,
    epochs: Annotated[int, typer.Option(help="At most this many epochs over all edits.")] = 25,
    lr: Annotated[float, typer.Option(help="Adam learning rate (the paper's 5e-4 is for 7B+ models).")] = 5e-4,
    batch_size: Annotated[int, typer.Option(help="Edits per mini-batch.")] = 100,
    rank: Annotated[int | None, typer.Option(help="Store the delta as rank-R factors (not exact).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the shuffle (and of --rank's SVD).")] = 0,
    name: Annotated[str | None, typer.Option(help="Register as this name (default: the output dir name).")] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Patch directory to write (default: ./NAME or ./edit-EDITS).")
    ] = None,
    evaluate: Annotated[
        bool, typer.Option("--eval", help="Measure the edited model (WILD, --task files) and store the figures.")
    ] = False,
    task: TaskOpt = None,
    device: DeviceOpt = "auto",
    overwrite: OverwriteOpt = False,
    no_register: NoRegisterOpt = False,
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Edit facts into BASE with LocFT-BF and write the edit as a patch touching one tensor; register it."""
    import patchlab

    if task and not evaluate:
        raise CliInputError("--task files are for --eval; add --eval or drop --task")
    out = out if out is not None else Path(name or f"edit-{edits.stem}")
    quiet_transformers()
    reg = None if no_register and not is_ref(base) else open_registry(registry)
    try:
        base_path = reg.checkpoint_path(base) if reg is not None else base
        n_edits = len(_load_edits(edits))
        with EpochProgress(epochs, n_edits, not json_out) as progress:
            made = patchlab.edit(
                base_path,
                edits,
                out,
                layer=layer,
                module=module,
                locate=locate,
                epochs=epochs,
                lr=lr,
                batch_size=batch_size,
                seed=seed,
                rank=rank,
                device=device,
                overwrite=overwrite,
                progress=progress,
                evaluate=evaluate,
                tasks=task or (),
            )
        info = None
        recorded: list = []
        if reg is not None and not no_register:
            try:
                info = reg.add_patch(made.path, name=name, base=base if is_ref(base) else None)
            except BaseException:  # nothing written, nothing registered: the patch goes with the failure
                shutil.rmtree(made.path, ignore_errors=True)
                raise
            if made.evaluation is not None:
                recorded = reg.record_edit_evaluation(
                    info.ref,
                    made.evaluation,
                    kind="patch",
                    model=f"{info.ref} on {info.base}",
                    settings={"edits_file": str(edits.resolve())},
                )
    finally:
        if reg is not None:
            reg.close()
    res = made.result
    if json_out:
        return print_json(
            {
                "path": str(made.path),
                "patch": info.to_dict() if info else None,
                "tensor": res.param_name,
                "edits_sha256": res.edits_sha256,
                "losses": res.losses,
                "fitted": res.fitted,
                "locate": made.located.table if made.located else None,
                "layer": res.params.get("layer"),
                "evaluation": made.evaluation.to_json() if made.evaluation else None,
                "recorded": [e.to_dict() for e in recorded],
            }
        )
    if made.located is not None:
        _print_locate(made.located)
    last = f"loss {res.losses[-1]:.4f}, {res.fitted[-1]}/{res.n_edits} fitted after {len(res.losses)} epochs"
    msg = f"wrote {escape(str(made.path))} ({escape(res.param_name)}; {last})"
    if info:
        msg += f"; registered [bold]{escape(info.ref)}[/] on {escape(info.base or '?')}"
    status(msg)
    if made.evaluation is not None:
        print_table(("figure", "value"), _figures_rows(made.evaluation.figures()))
        if recorded:
            status(f"stored evaluations {', '.join(str(e.id) for e in recorded)} against {escape(info.ref)}")
    return None


def _load_edits(path: Path) -> list:
    from patchlab.io.edits import load_edits

    return load_edits(path)


@app.command("eval-edits")
@handled
def eval_edits_cmd(
    model: Annotated[
        str, typer.Argument(help="A model directory, family@version, derived:N, or an edit patch (ref or directory).")
    ],
    edits: EditsOpt,
    base: Annotated[
        str | None,
        typer.Option(help="The unedited model, for locality (a patch: the base it goes onto; default: its own)."),
    ] = None,
    task: TaskOpt = None,
    device: DeviceOpt = "auto",
    no_record: Annotated[bool, typer.Option("--no-record", help="Do not store the figures in the registry.")] = False,
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """WILD figures of a model on an edit set: reliability, generalization, locality (against --base), and
    accuracy on --task files. Stored in the registry against MODEL when it is a reference."""
    from patchlab.methods.edit_patch import evaluate_model

    _load_edits(edits)  # a bad edit file fails before any registry or model is touched
    quiet_transformers()
    model_is_ref = is_ref(model)
    patch_dir = Path(model) if not model_is_ref and (Path(model) / "patch.json").is_file() else None
    needs_reg = model_is_ref or (base is not None and is_ref(base))
    reg = open_registry(registry) if needs_reg else None
    recorded: list = []
    try:
        target = None
        base_path = reg.checkpoint_path(base) if (reg is not None and base is not None) else base
        if model_is_ref:
            t = reg.resolve(model)
            target = t.label
            if t.kind == "patch":
                info = reg.get_patch(t.label)
                patch_dir = reg.patch_path(t.label)
                if base_path is None:
                    if info.base is None:
                        raise CliInputError(f"patch {t.label} has no registered base; pass --base")
                    base_path = reg.checkpoint_path(info.base)
                model_path = base_path
            else:
                model_path, _ = reg.model_path(model)
                if base_path is None and t.kind == "derived":
                    d = reg.get_derived(t.label)
                    base_path = reg.checkpoint_path(d.base) if d.base else None
        elif patch_dir is not None:
            if base_path is None:
                raise CliInputError(f"{model} is a patch directory; pass --base, the model it goes onto")
            model_path = base_path
        else:
            model_path = Path(model)
        if patch_dir is not None:
            ev = evaluate_model(model_path, edits, patch=patch_dir, tasks=task or (), device=device)
        else:
            ev = evaluate_model(model_path, edits, base=base_path, tasks=task or (), device=device)
        if target is not None and not no_record:
            recorded = reg.record_edit_evaluation(target, ev, settings={"edits_file": str(edits.resolve())})
    finally:
        if reg is not None:
            reg.close()
    if json_out:
        return print_json({**ev.to_json(), "recorded": [e.to_dict() for e in recorded]})
    print_table(("figure", "value"), _figures_rows(ev.figures()))
    if ev.wild.locality is None:
        status("locality: not measured (pass --base, the unedited model)")
    if recorded:
        status(f"stored evaluations {', '.join(str(e.id) for e in recorded)} against {escape(target)}")
    return None


__all__ = ["EpochProgress", "app", "edit_cmd", "eval_edits_cmd"]
