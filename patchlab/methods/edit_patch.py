"""An edit as a patch: ``edit(base, edits, out)`` trains LocFT-BF on a checkpoint and writes a one-tensor patch.

The patch is an ordinary patch (``patchlab.io.patch``): one ``add`` entry for the trained weight, method
``locft-bf`` in its provenance with the training parameters, the sha256 digest of the ordered edit set and
the edit file's path; the base is described as ``extract`` describes it. With the default dense fp32
storage it is exact: ``apply(patch, base)`` writes the base with that one tensor replaced by the trained
weight cast to the checkpoint's dtype, bit for bit (Δ = trained − base in fp32; the few elements where
``cast(base + Δ)`` rounds differently are stored as fixups, as ``extract`` does). ``rank=R`` stores Δ as
rank-R factors (the ``lowrank`` codec) instead: smaller, not exact. ``port`` carries either to a new base.

:func:`evaluate_edit` measures an edited model with the WILD protocol plus general ability on task files;
:func:`patched` puts a stored patch onto a loaded model for a ``with`` block (what ``apply`` would write).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from patchlab.encodings import dense_entry
from patchlab.engine.devices import resolve_device
from patchlab.engine.executor import atomic_output, check_output
from patchlab.errors import EditError, UnsupportedArchitectureError
from patchlab.io.checkpoint import META_FILES, Checkpoint
from patchlab.io.edits import Edit, as_edits
from patchlab.io.hf import load_causal_lm, load_tokenizer
from patchlab.io.patch import Patch, PatchWriter, tensor_digest
from patchlab.kernels.delta import DeltaStats, bits
from patchlab.measure.edits import EditScores, check_context, evaluate_edits, locality_baseline
from patchlab.measure.tasks import load_task
from patchlab.methods.edit import (
    DEFAULT_MODULE,
    DEFAULTS,
    METHOD,
    EditResult,
    LocateResult,
    Progress,
    check_architecture,
    edited,
    encode_edits,
    locft_bf,
    resolve_weight,
)
from patchlab.methods.edit import (
    locate as locate_layer,
)

__all__ = ["EditEvaluation", "EditedPatch", "check_config", "edit", "evaluate_edit", "evaluate_model", "patched"]

GENERAL_MAX_NEW_TOKENS = 8
GENERAL_STOP = ("\n", ".")


def check_config(config: Mapping[str, Any], where: str) -> None:
    """Refuse a checkpoint whose ``config.json`` is not a decoder-only causal LM, before loading it."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    mtype = config.get("model_type")
    if config.get("is_encoder_decoder"):
        raise UnsupportedArchitectureError(
            f"{where} ({mtype}) is an encoder-decoder model; LocFT-BF edits decoder-only causal LMs"
        )
    archs = config.get("architectures") or []
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if archs and not any(a in causal or a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise UnsupportedArchitectureError(
            f"{where} is a {', '.join(archs)} ({mtype}), not a causal language model; LocFT-BF edits "
            "decoder-only causal LMs"
        )
    if mtype is not None and mtype not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UnsupportedArchitectureError(
            f"{where}: transformers has no causal-LM class for model type {mtype!r}; LocFT-BF edits decoder-only "
            "causal LMs"
        )


# ---- evaluation ---------------------------------------------------------------------------------------


@dataclass
class EditEvaluation:
    """WILD figures of an edited model and, when task files were given, its general ability on them."""

    wild: EditScores
    general: Any = None  # patchlab.measure.results.EvalResult, or None
    edits_sha256: str = ""

    def figures(self) -> dict[str, Any]:
        """The headline numbers: reliability, generalization, locality and accuracy per general task."""
        out: dict[str, Any] = {
            "reliability": self.wild.reliability,
            "generalization": self.wild.generalization,
            "locality": self.wild.locality,
            "n_edits": self.wild.n_edits,
        }
        if self.general is not None:
            out["general"] = {t: s.accuracy for t, s in self.general.tasks.items()}
        return out

    def to_json(self) -> dict[str, Any]:
        return {**self.figures(), "edits_sha256": self.edits_sha256}


def evaluate_edit(
    model: Any,
    tokenizer: Any,
    edits: str | Path | Iterable[Edit | dict],
    *,
    baseline: Mapping[str, str] | None = None,
    tasks: Sequence[str | Path] = (),
    batch_size: int = 32,
) -> EditEvaluation:
    """WILD reliability / generalization / locality of ``model`` (locality needs the unedited ``baseline``,
    from :func:`patchlab.measure.edits.locality_baseline`) and its accuracy on each task file of ``tasks``
    (greedy, 8 new tokens, stop at newline or "." for generation items; multiple choice by log-likelihood)."""
    from patchlab.io.edits import edits_digest
    from patchlab.measure.evaluate import evaluate

    edit_list = as_edits(edits)
    wild = evaluate_edits(model, tokenizer, edit_list, baseline=baseline, batch_size=batch_size)
    general = None
    if tasks:
        general = evaluate(model, [str(t) for t in tasks], tokenizer=tokenizer,
                           max_new_tokens=GENERAL_MAX_NEW_TOKENS, stop=GENERAL_STOP)
    return EditEvaluation(wild, general, edits_digest(edit_list))


@contextlib.contextmanager
def patched(model: Any, patch: str | Path | Patch) -> Iterator[Any]:
    """Within the block, ``model`` carries ``cast(W + Δ)`` for every ``add`` entry of ``patch`` (with its
    fixups where ``W`` is the exact tensor the patch was made on): what ``apply`` writes. Restored after."""
    p = Patch.open(patch)
    params = dict(model.named_parameters())
    saved: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for e in p.entries():
                if e.op != "add":
                    raise EditError(f"{p.path}: entry {e.name!r} is a {e.op!r}; only 'add' entries apply in memory")
                w = params.get(e.name)
                if w is None or tuple(w.shape) != e.shape:
                    raise EditError(f"{p.path}: the model has no tensor {e.name!r} of shape {list(e.shape)}")
                saved[e.name] = w.detach().clone()
                digest = tensor_digest(w.detach().cpu())
                new = (w.float() + e.dense(w.device)).to(w.dtype)
                if e.fix and e.fix["base_digest"] == digest:
                    idx, vals = e.fixups()
                    flat = new.reshape(-1)
                    bits(flat)[idx.to(flat.device)] = bits(vals.to(w.dtype)).to(flat.device)
                w.copy_(new)
        yield model
    finally:
        with torch.no_grad():
            for name, orig in saved.items():
                params[name].copy_(orig)


# ---- the edit as a patch ------------------------------------------------------------------------------


@dataclass
class EditedPatch:
    """What :func:`edit` made: the patch, the training result, the location table (``locate``) and, when
    asked, the evaluation of the edited model."""

    patch: Patch
    result: EditResult
    located: LocateResult | None = None
    evaluation: EditEvaluation | None = None

    @property
    def path(self) -> Path:
        return self.patch.path


def edit(
    base: str | Path | Checkpoint,
    edits: str | Path | Iterable[Edit | dict],
    out: str | Path,
    *,
    layer: int | None = None,
    module: str = DEFAULT_MODULE,
    locate: bool = False,
    locate_epochs: int = 5,
    epochs: int = DEFAULTS["epochs"],
    lr: float = DEFAULTS["lr"],
    batch_size: int = DEFAULTS["batch_size"],
    seed: int = DEFAULTS["seed"],
    rank: int | None = None,
    device: str = "auto",
    overwrite: bool = False,
    progress: Progress | None = None,
    evaluate: bool = False,
    tasks: Sequence[str | Path] = (),
) -> EditedPatch:
    """Train LocFT-BF on ``base`` with ``edits`` and write the edit as a one-tensor patch at ``out``.

    ``base`` is a checkpoint directory, loaded through ``patchlab.io.hf`` on ``device`` (``auto``: CUDA when
    there is one, with a bf16 forward and an fp32 master copy of the trained weight; fp32 on CPU). ``layer``
    / ``module`` choose the weight (default: ``mlp.down_proj`` of the layer at ~0.7 of the depth); ``locate``
    picks the layer instead by trying each on a share of the edits for ``locate_epochs`` epochs. ``rank``
    stores Δ as rank-``rank`` factors. ``progress(epoch, loss, fitted)`` is called after each epoch.
    ``evaluate`` measures the edited model (WILD, against the unedited outputs, plus accuracy on the
    ``tasks`` files) into ``EditedPatch.evaluation``.

    Everything is checked before training and before anything is written: the output, the edit set, the
    architecture, the location, the context length (of the evaluation prompts too when ``evaluate``) and the
    rank. A failure leaves no output directory behind.
    """
    out = Path(out)
    check_output(out, overwrite)
    if locate and layer is not None:
        raise EditError("give a layer or ask to locate one, not both")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise EditError(f"rank must be a positive integer, got {rank!r}")
    edit_list = as_edits(edits)
    edits_file = str(Path(edits).resolve()) if isinstance(edits, (str, Path)) else None
    ck = Checkpoint.open(base)
    check_config(ck.config, str(ck.path))
    for t in tasks:
        load_task(t)
    dev = resolve_device(device)
    model = load_causal_lm(ck.path, dev)
    tok = load_tokenizer(ck.path)
    check_architecture(model)
    name = resolve_weight(model, layer, module)  # module/layer errors before any training, with locate too
    encode_edits(tok, model, edit_list)
    if evaluate:
        check_context(model, tok, edit_list)
    if name not in ck:
        raise EditError(f"{ck.path}: the model's {name!r} is not a tensor of the checkpoint files; cannot patch it")
    if rank is not None and rank > min(ck.info(name).shape):
        shape = ck.info(name).shape
        raise EditError(f"rank {rank} is larger than {name} ({shape[0]}×{shape[1]}) allows (at most {min(shape)})")

    located = None
    if locate:
        located = locate_layer(model, tok, edit_list, module=module, epochs=locate_epochs, seed=seed, lr=lr,
                               batch_size=batch_size)
        layer = located.layer
    baseline = locality_baseline(model, tok, edit_list) if evaluate else None
    res = locft_bf(model, tok, edit_list, layer=layer, module=module, epochs=epochs, lr=lr,
                   batch_size=batch_size, seed=seed, progress=progress)
    name = res.param_name

    t0 = time.perf_counter()
    base_t = ck.tensor(name)
    trained = res.trained[name]
    delta = trained - base_t.float()
    params: dict[str, Any] = {
        **res.params,
        "edits_sha256": res.edits_sha256,
        "edits_file": edits_file,
        "n_edits": res.n_edits,
        "losses": res.losses,
        "fitted": res.fitted,
        "stopped_early": res.stopped_early,
        "train_seconds": round(res.seconds, 3),
        "rank": rank,
        "storage_dtype": "float32",
        "exact": rank is None,
    }
    if located is not None:
        params["locate"] = {"layer": located.layer, "epochs": locate_epochs, "table": located.table,
                            "sample_ids": located.sample_ids}
    with atomic_output(out, overwrite) as tmp:
        writer = PatchWriter(tmp)
        stats = DeltaStats()
        stats.update(delta, base_t)
        entry: dict[str, Any] = {
            "op": "add",
            "shape": list(base_t.shape),
            "dtype": str(base_t.dtype).removeprefix("torch."),
            "stats": stats.result(),
        }
        if rank is None:
            # Exact: elements where cast(base + Δ) does not give the edited checkpoint's tensor back (Δ rounds,
            # and so does adding it back) are stored verbatim as fixups, as extract does.
            want = trained.to(base_t.dtype)
            back = (base_t.float() + delta).to(base_t.dtype)
            bad = (bits(back) != bits(want)).reshape(-1).nonzero().squeeze(1)
            fields, tensors = dense_entry(name, delta, torch.float32)
            if bad.numel():
                entry["fix"] = writer.add_fixups(name, bad, want.reshape(-1)[bad], tensor_digest(base_t))
        else:
            from patchlab.methods.compress import EncodingRequest, encode_tensor

            req = EncodingRequest(rank=rank, dense_fallback=False, seed=seed)
            fields, tensors = encode_tensor(name, delta, req, torch.float32)
            params["compression"] = req.to_json()
        entry.update(fields)
        entry["file"] = writer.add(tensors)
        writer.copy_files(ck.path, META_FILES)
        provenance = {
            "base": ck.describe(),
            "finetuned": {"source": f"{METHOD} edits {edits_file or '(in memory)'}", "edits_sha256": res.edits_sha256,
                          "tied": ck.tied},
            "method": METHOD,
            "parameters": json.loads(json.dumps(params, default=str)),
        }
        writer.finish(provenance, {name: entry})
    res.extra["write_seconds"] = time.perf_counter() - t0

    evaluation = None
    if evaluate:
        with edited(model, res):
            evaluation = evaluate_edit(model, tok, edit_list, baseline=baseline, tasks=tasks)
    return EditedPatch(Patch.open(out), res, located, evaluation)


def evaluate_model(
    model: str | Path,
    edits: str | Path | Iterable[Edit | dict],
    *,
    base: str | Path | None = None,
    patch: str | Path | Patch | None = None,
    tasks: Sequence[str | Path] = (),
    device: str = "auto",
) -> EditEvaluation:
    """WILD figures (and accuracy on ``tasks``) of a checkpoint on ``edits``, loaded on ``device``.

    Locality compares against the unedited outputs: with ``patch``, ``model`` is the base the patch goes
    onto and is measured both without and with it (applied in memory, as ``apply`` would write it); else
    ``base`` (optional) names the unedited checkpoint. Everything is checked before a model is loaded.
    """
    edit_list = as_edits(edits)
    for t in tasks:
        load_task(t)
    p = Patch.open(patch) if patch is not None else None
    dev = resolve_device(device)
    m = load_causal_lm(model, dev)
    tok = load_tokenizer(model)
    check_context(m, tok, edit_list)
    baseline = None
    if p is not None:
        baseline = locality_baseline(m, tok, edit_list)
        with patched(m, p):
            return evaluate_edit(m, tok, edit_list, baseline=baseline, tasks=tasks)
    if base is not None:
        b = load_causal_lm(base, dev)
        baseline = locality_baseline(b, load_tokenizer(base), edit_list)
        del b
    return evaluate_edit(m, tok, edit_list, baseline=baseline, tasks=tasks)
