"""Localized fact editing by fine-tuning: LocFT-BF (Yang et al. 2025, "Fine-tuning Done Right in Model Editing").

All edits form one training set; epochs run over shuffled mini-batches of all of them (breadth-first), and
exactly one weight is trainable, by default the MLP down projection of one late layer. The loss is
cross-entropy on the target tokens only (target given a leading space when missing, EOS appended), the mean
over each edit's target tokens, then the batch mean. No token is added to the vocabulary: batches are padded
with any id and masked through ``attention_mask`` and ``labels = -100``.

Pure with respect to the registry: functions take a loaded ``transformers`` model and tokenizer, leave the
model's weights as they found them, and return an :class:`EditResult` holding the fp32 delta
(trained − original) of the trained weight. :func:`edited` applies a result for a ``with`` block.

Baselines for the measurement, with the same loss code: :func:`sequential_ft` (depth-first: each edit to
convergence, then the next, on the same weight) and :func:`full_ft` (breadth-first on every weight).
:func:`locate` picks the layer by trying each candidate on a share of the edits.

Edit files are JSONL, one edit a line (see ``fixtures/edits/README.md``)::

    {"id": str, "prompt": str, "target": str, "rephrasings": [str, ...], "locality": [str, ...],
     "kind": "counterfactual" | "new", ...}
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from patchlab.errors import (
    EditError,
    EditLocationError,
    EditTooLongError,
    UnsupportedArchitectureError,
)
from patchlab.io.edits import Edit, as_edits, edits_digest, load_edits, parse_edit  # noqa: F401

METHOD = "locft-bf"
DEFAULT_MODULE = "mlp.down_proj"
# The official configs put the edited down_proj late: Llama-3-8B layer 22 of 32 (~0.7 of the depth).
DEFAULT_DEPTH = 0.7
DEFAULTS: dict[str, Any] = {
    "lr": 5e-4,
    "weight_decay": 0.0,
    "batch_size": 100,
    "epochs": 25,
    "skip_below": 1e-2,
    "stop_below": 1e-2,
    "seed": 0,
}

Progress = Callable[[int, float, int], None]
"""``progress(epoch, loss, fitted)``: after each epoch (after each edit for :func:`sequential_ft`)."""

_LAYER_RE = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|layer|h|blocks))\.(?P<idx>\d+)\.(?P<rest>.+)$")


def check_architecture(model: Any) -> None:
    """Raise :class:`UnsupportedArchitectureError` unless ``model`` is a decoder-only causal LM."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    cfg = getattr(model, "config", None)
    name = type(model).__name__
    if cfg is None or not hasattr(model, "named_parameters"):
        raise UnsupportedArchitectureError(f"{name} is not a transformers model; LocFT-BF edits causal LMs")
    if getattr(cfg, "is_encoder_decoder", False):
        raise UnsupportedArchitectureError(
            f"{name} ({cfg.model_type}) is an encoder-decoder model; LocFT-BF edits decoder-only causal LMs"
        )
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if name not in causal and not name.endswith("ForCausalLM"):
        raise UnsupportedArchitectureError(
            f"{name} ({cfg.model_type}) is not a causal language model; load the checkpoint with "
            "AutoModelForCausalLM (LocFT-BF edits decoder-only causal LMs)"
        )


def layer_params(model: Any) -> tuple[str, dict[int, dict[str, str]]]:
    """(prefix, {layer: {module path inside the layer: full parameter name}}) of the decoder's layer stack."""
    stacks: dict[str, dict[int, dict[str, str]]] = {}
    for name, _ in model.named_parameters():
        m = _LAYER_RE.match(name)
        if m:
            stacks.setdefault(m["prefix"], {}).setdefault(int(m["idx"]), {})[m["rest"]] = name
    if not stacks:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__}: found no numbered layer stack (…layers.N.…) among its parameters"
        )
    prefix = max(stacks, key=lambda k: len(stacks[k]))
    return prefix, stacks[prefix]


def default_layer(n_layers: int) -> int:
    """The layer edited when none is given: ~0.7 of the depth (22 of 32, as the Llama-3-8B config)."""
    return round(DEFAULT_DEPTH * (n_layers - 1))


def resolve_weight(model: Any, layer: int | None = None, module: str = DEFAULT_MODULE) -> str:
    """Full parameter name of ``module`` in decoder layer ``layer``, matched exactly (layer 2 is never 20).

    ``module`` is the path inside the layer, with or without ``.weight`` (``mlp.down_proj``,
    ``self_attn.o_proj.weight``). Unknown layers/modules raise :class:`EditLocationError` listing the valid ones.
    """
    prefix, layers = layer_params(model)
    valid = sorted(layers)
    if layer is None:
        layer = valid[default_layer(len(valid))]
    if isinstance(layer, bool) or not isinstance(layer, int) or layer not in layers:
        raise EditLocationError(
            f"layer {layer!r} does not exist in {type(model).__name__}; valid layers: {valid[0]}..{valid[-1]}"
        )
    rests = layers[layer]
    for cand in (module, f"{module}.weight"):
        if cand in rests:
            return rests[cand]
    names = sorted({r.removesuffix(".weight") for r in rests})
    raise EditLocationError(
        f"module {module!r} does not exist in layer {layer} ({prefix}.{layer}); valid modules: {', '.join(names)}"
    )


# ---- Encoding and the loss --------------------------------------------------------------------------------


def _encode(tokenizer: Any, model: Any, edits: Sequence[Edit]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, target ids + EOS) per edit, tokenised separately; raises if one does not fit the context."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise EditError("the tokenizer has no EOS token; LocFT-BF appends EOS to every target")
    ctx = getattr(model.config, "max_position_embeddings", None)
    out = []
    for e in edits:
        target = e.target if e.target.startswith(" ") else " " + e.target
        p = tokenizer(e.prompt)["input_ids"]
        t = tokenizer(target, add_special_tokens=False)["input_ids"] + [eos]
        if ctx is not None and len(p) + len(t) > ctx:
            raise EditTooLongError(
                f"edit {e.id!r}: prompt + target are {len(p) + len(t)} tokens ({len(p)} + {len(t)} with EOS), "
                f"over the model's context of {ctx}; shorten the prompt"
            )
        out.append((p, t))
    return out


def _batch_loss(
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    rows: Sequence[tuple[list[int], list[int]]],
    pad_id: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(batch loss, per-edit losses, per-edit fitted flags); right-padded, prompt and padding masked."""
    width = max(len(p) + len(t) for p, t in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for r, (p, t) in enumerate(rows):
        ids[r, : len(p) + len(t)] = torch.tensor(p + t)
        mask[r, : len(p) + len(t)] = 1
        labels[r, len(p) : len(p) + len(t)] = torch.tensor(t)
    ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
    logits = forward(ids, mask)[:, :-1]
    gold = labels[:, 1:]
    on = gold != -100
    sel = logits[on].float()  # only target positions: never a (batch, width, vocab) fp32 copy
    ce = torch.nn.functional.cross_entropy(sel, gold[on], reduction="none")
    row = on.nonzero()[:, 0]
    n_tok = on.sum(1).to(ce.dtype)
    per_edit = torch.zeros(len(rows), dtype=ce.dtype, device=ce.device).index_add(0, row, ce) / n_tok
    wrong = torch.zeros(len(rows), dtype=torch.long, device=ce.device).index_add(
        0, row, (sel.argmax(-1) != gold[on]).long()
    )
    return per_edit.mean(), per_edit.detach(), wrong == 0


def encode_edits(tokenizer: Any, model: Any, edits: Sequence[Edit]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, target ids + EOS) per edit, as training sees them; raises :class:`EditTooLongError` when
    one does not fit the model's context (a check to run before anything else happens)."""
    return _encode(tokenizer, model, edits)


# ---- Training ---------------------------------------------------------------------------------------------


@dataclass
class EditResult:
    """What an edit run produced: fp32 deltas (trained − original, on CPU) and how they were made."""

    method: str
    deltas: dict[str, torch.Tensor]
    params: dict[str, Any]
    losses: list[float]
    fitted: list[int]
    edits_sha256: str
    n_edits: int
    seconds: float
    stopped_early: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    trained: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    """The trained weights themselves (fp32, on CPU), kept by the localized methods: ``original + delta``
    rounds, so the exact edited model (and an exact patch) is built from these."""

    @property
    def param_name(self) -> str:
        """The one trained parameter (for the localized methods)."""
        if len(self.deltas) != 1:
            raise EditError(f"{self.method} trained {len(self.deltas)} weights, not one; use .deltas")
        return next(iter(self.deltas))

    @property
    def delta(self) -> torch.Tensor:
        """The fp32 delta of the one trained parameter."""
        return self.deltas[self.param_name]

    @property
    def edits_per_second(self) -> float:
        return self.n_edits / self.seconds if self.seconds > 0 else float("inf")

    def manifest(self) -> dict[str, Any]:
        """JSON-ready description (for a patch manifest): method, tensors, parameters, losses, digest."""
        return {
            "method": self.method,
            "tensors": sorted(self.deltas),
            "params": self.params,
            "losses": self.losses,
            "fitted": self.fitted,
            "edits_sha256": self.edits_sha256,
            "n_edits": self.n_edits,
            "seconds": round(self.seconds, 3),
            "stopped_early": self.stopped_early,
        }


@contextlib.contextmanager
def edited(model: Any, result: EditResult, alpha: float = 1.0) -> Iterator[Any]:
    """Within the block, ``model`` carries the edit (in its own dtype); restored after.

    With ``alpha`` 1 and the trained weights at hand, the trained weight itself (cast to the model's dtype):
    the model that was trained, bit for bit, and what ``apply`` of the edit's patch gives. Otherwise
    ``original + alpha * delta``.
    """
    params = dict(model.named_parameters())
    saved = {}
    try:
        with torch.no_grad():
            for name, d in result.deltas.items():
                p = params[name]
                saved[name] = p.detach().clone()
                w = result.trained.get(name) if alpha == 1.0 else None
                if w is not None:
                    p.copy_(w.to(p.device, p.dtype))
                else:
                    p.copy_((p.float() + alpha * d.to(p.device)).to(p.dtype))
        yield model
    finally:
        with torch.no_grad():
            for name, orig in saved.items():
                params[name].copy_(orig)


def _check_hparams(hp: dict[str, Any]) -> None:
    for key in ("lr", "batch_size", "epochs"):
        if not hp[key] > 0:
            raise EditError(f"{key} must be > 0, got {hp[key]!r}")


def _train(
    method: str,
    model: Any,
    tokenizer: Any,
    edits: str | Path | Iterable[Edit | dict],
    names: list[str] | None,
    hp: dict[str, Any],
    depth_first: bool,
    precision: str,
    progress: Progress | None,
    extra_params: dict[str, Any],
    keep_weights: bool = False,
) -> EditResult:
    """Shared trainer: validate everything, train ``names`` (None: all weights), restore, return deltas."""
    check_architecture(model)
    _check_hparams(hp)
    edit_list = as_edits(edits)
    rows = _encode(tokenizer, model, edit_list)
    params = dict(model.named_parameters())
    names = list(params) if names is None else names
    device = next(model.parameters()).device
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16"):
        raise EditError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # fp32 weights train in place; others through an fp32 master copy substituted into the forward.
    flags = {n: p.requires_grad for n, p in params.items()}
    saved = {n: params[n].detach().clone() for n in names}
    masters: dict[str, torch.Tensor] = {}
    for n in names:
        p = params[n]
        masters[n] = p if p.dtype == torch.float32 else p.detach().float().clone()
    was_training = model.training
    t0 = time.perf_counter()
    losses: list[float] = []
    fitted: list[int] = []
    stopped = False
    try:
        for p in params.values():
            p.requires_grad_(False)
        for m in masters.values():
            m.requires_grad_(True)
        model.eval()  # no dropout: edits are reproducible
        cast = {n: m for n, m in masters.items() if m is not params[n]}

        def forward(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                if cast:
                    subst = {n: m.to(params[n].dtype) for n, m in cast.items()}
                    out = torch.func.functional_call(model, subst, (), {"input_ids": ids, "attention_mask": mask})
                else:
                    out = model(input_ids=ids, attention_mask=mask, use_cache=False)
            return out.logits

        def new_opt() -> torch.optim.Optimizer:
            return torch.optim.Adam(list(masters.values()), lr=hp["lr"], weight_decay=hp["weight_decay"])

        if depth_first:
            done = 0
            for i, row in enumerate(rows):
                opt = new_opt()
                for _ in range(hp["steps_per_edit"]):
                    loss, _, ok = _batch_loss(forward, [row], pad_id, device)
                    if loss.item() < hp["stop_below"]:
                        break
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                with torch.no_grad():
                    loss, _, ok = _batch_loss(forward, [row], pad_id, device)
                done += int(ok.all())
                losses.append(float(loss))
                fitted.append(done)
                if progress:
                    progress(i + 1, float(loss), done)
        else:
            gen = torch.Generator().manual_seed(int(hp["seed"]))
            opt = new_opt()
            bs = int(hp["batch_size"])
            for epoch in range(int(hp["epochs"])):
                order = torch.randperm(len(rows), generator=gen).tolist()
                total, n_ok = 0.0, 0
                for b0 in range(0, len(order), bs):
                    loss, per_edit, ok = _batch_loss(forward, [rows[i] for i in order[b0 : b0 + bs]], pad_id, device)
                    total += float(per_edit.sum())
                    n_ok += int(ok.sum())
                    if loss.item() < hp["skip_below"]:
                        continue
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                mean = total / len(rows)
                losses.append(mean)
                fitted.append(n_ok)
                if progress:
                    progress(epoch + 1, mean, n_ok)
                if mean < hp["stop_below"]:
                    stopped = epoch + 1 < int(hp["epochs"])
                    break
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            deltas = {n: (masters[n].detach().float() - saved[n].float()).cpu() for n in names}
            trained = {n: masters[n].detach().float().cpu().clone() for n in names} if keep_weights else {}
    finally:
        with torch.no_grad():
            for n in names:
                masters[n].requires_grad_(False)
                if masters[n] is params[n]:
                    params[n].copy_(saved[n])
            for n, p in params.items():
                p.requires_grad_(flags[n])
        model.train(was_training)
    return EditResult(
        method=method,
        deltas=deltas,
        params={**hp, **extra_params, "precision": precision},
        losses=losses,
        fitted=fitted,
        edits_sha256=edits_digest(edit_list),
        n_edits=len(edit_list),
        seconds=seconds,
        stopped_early=stopped,
        trained=trained,
    )


def locft_bf(
    model: Any,
    tokenizer: Any,
    edits: str | Path | Iterable[Edit | dict],
    *,
    layer: int | None = None,
    module: str = DEFAULT_MODULE,
    lr: float = DEFAULTS["lr"],
    weight_decay: float = DEFAULTS["weight_decay"],
    batch_size: int = DEFAULTS["batch_size"],
    epochs: int = DEFAULTS["epochs"],
    skip_below: float = DEFAULTS["skip_below"],
    stop_below: float = DEFAULTS["stop_below"],
    seed: int = DEFAULTS["seed"],
    precision: str = "auto",
    progress: Progress | None = None,
) -> EditResult:
    """LocFT-BF: breadth-first fine-tuning of one weight on all edits; returns its fp32 delta.

    Everything is validated (edits, location, context, architecture) before any weight moves; the model's
    weights are restored on return. ``precision`` auto: bf16 autocast forward with fp32 master weights on
    CUDA, fp32 on CPU.
    """
    check_architecture(model)
    name = resolve_weight(model, layer, module)
    hp = dict(lr=lr, weight_decay=weight_decay, batch_size=batch_size, epochs=epochs, skip_below=skip_below,
              stop_below=stop_below, seed=seed)
    return _train(METHOD, model, tokenizer, edits, [name], hp, False, precision, progress,
                  {"layer": _layer_of(model, name), "module": module, "tensor": name}, keep_weights=True)


def sequential_ft(
    model: Any,
    tokenizer: Any,
    edits: str | Path | Iterable[Edit | dict],
    *,
    layer: int | None = None,
    module: str = DEFAULT_MODULE,
    lr: float = DEFAULTS["lr"],
    weight_decay: float = DEFAULTS["weight_decay"],
    steps_per_edit: int = 25,
    stop_below: float = DEFAULTS["stop_below"],
    precision: str = "auto",
    progress: Progress | None = None,
) -> EditResult:
    """Depth-first baseline: each edit in file order trained alone (fresh Adam) until its loss < ``stop_below``
    or ``steps_per_edit`` steps, then the next; same weight and loss as :func:`locft_bf`.

    ``losses``/``fitted`` hold, per edit, its loss after training and the edits fitted so far.
    """
    check_architecture(model)
    name = resolve_weight(model, layer, module)
    if steps_per_edit < 1:
        raise EditError(f"steps_per_edit must be >= 1, got {steps_per_edit}")
    hp = dict(lr=lr, weight_decay=weight_decay, batch_size=1, epochs=1, steps_per_edit=steps_per_edit,
              skip_below=stop_below, stop_below=stop_below, seed=0)
    return _train("sequential-ft", model, tokenizer, edits, [name], hp, True, precision, progress,
                  {"layer": _layer_of(model, name), "module": module, "tensor": name}, keep_weights=True)


def full_ft(
    model: Any,
    tokenizer: Any,
    edits: str | Path | Iterable[Edit | dict],
    *,
    lr: float = DEFAULTS["lr"],
    weight_decay: float = DEFAULTS["weight_decay"],
    batch_size: int = DEFAULTS["batch_size"],
    epochs: int = DEFAULTS["epochs"],
    skip_below: float = DEFAULTS["skip_below"],
    stop_below: float = DEFAULTS["stop_below"],
    seed: int = DEFAULTS["seed"],
    precision: str = "auto",
    progress: Progress | None = None,
) -> EditResult:
    """Unlocalized baseline: the breadth-first schedule of :func:`locft_bf` on every weight."""
    check_architecture(model)
    hp = dict(lr=lr, weight_decay=weight_decay, batch_size=batch_size, epochs=epochs, skip_below=skip_below,
              stop_below=stop_below, seed=seed)
    return _train("full-ft", model, tokenizer, edits, None, hp, False, precision, progress, {})


def _layer_of(model: Any, name: str) -> int:
    m = _LAYER_RE.match(name)
    return int(m["idx"]) if m else -1


# ---- Choosing the location --------------------------------------------------------------------------------


@dataclass
class LocateResult:
    """The layer :func:`locate` chose and the table it chose from (one row per candidate layer)."""

    layer: int
    module: str
    table: list[dict[str, Any]]
    sample_ids: list[str]

    def markdown(self) -> str:
        lines = ["| layer | reliability | generalization | locality | final loss | seconds |",
                 "|---:|---:|---:|---:|---:|---:|"]
        for r in self.table:
            mark = " (chosen)" if r["layer"] == self.layer else ""
            lines.append(f"| {r['layer']}{mark} | {r['reliability']:.3f} | {r['generalization']:.3f} | "
                         f"{r['locality']:.3f} | {r['final_loss']:.4f} | {r['seconds']:.1f} |")
        return "\n".join(lines)


def locate(
    model: Any,
    tokenizer: Any,
    edits: str | Path | Iterable[Edit | dict],
    *,
    layers: Sequence[int] | None = None,
    module: str = DEFAULT_MODULE,
    share: float = 0.2,
    max_sample: int = 200,
    epochs: int = 5,
    seed: int = DEFAULTS["seed"],
    progress: Callable[[dict[str, Any]], None] | None = None,
    **train_kwargs: Any,
) -> LocateResult:
    """Try each candidate layer (default: all) with LocFT-BF for ``epochs`` on a seeded ``share`` of the edits
    (at most ``max_sample``); pick the best by WILD reliability, then locality, then the lower layer."""
    from patchlab.measure.edits import evaluate_edits, locality_baseline

    check_architecture(model)
    edit_list = as_edits(edits)
    _, stack = layer_params(model)
    candidates = sorted(stack) if layers is None else list(layers)
    for layer in candidates:
        resolve_weight(model, layer, module)  # every candidate validated before any training
    if not 0 < share <= 1:
        raise EditError(f"share must be in (0, 1], got {share}")
    n = max(1, min(max_sample, round(share * len(edit_list))))
    gen = torch.Generator().manual_seed(int(seed))
    sample = [edit_list[i] for i in sorted(torch.randperm(len(edit_list), generator=gen)[:n].tolist())]
    _encode(tokenizer, model, sample)
    baseline = locality_baseline(model, tokenizer, sample)
    table = []
    for layer in candidates:
        res = locft_bf(model, tokenizer, sample, layer=layer, module=module, epochs=epochs, seed=seed, **train_kwargs)
        with edited(model, res):
            s = evaluate_edits(model, tokenizer, sample, baseline=baseline)
        row = {"layer": layer, "reliability": s.reliability, "generalization": s.generalization,
               "locality": s.locality if s.locality is not None else 1.0,
               "final_loss": res.losses[-1], "seconds": res.seconds}
        table.append(row)
        if progress:
            progress(row)
    best = max(table, key=lambda r: (r["reliability"], r["locality"], -r["layer"]))
    return LocateResult(layer=best["layer"], module=module, table=table, sample_ids=[e.id for e in sample])
