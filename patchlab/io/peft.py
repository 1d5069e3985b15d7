"""Read and write PEFT LoRA adapter directories as per-tensor ΔW terms of the base checkpoint.

Why: a LoRA adapter *is* a low-rank patch (PortLLM): ``ΔW = s·B·A`` with ``s = lora_alpha / r``
(``lora_alpha / √r`` with rsLoRA). Reading one gives patchlab entries keyed by base checkpoint tensor
names; writing one lets ``PeftModel.from_pretrained`` load a patchlab low-rank patch.

Conventions (the on-disk format written by PEFT; tested against peft 0.21):
- ``adapter_config.json`` + ``adapter_model.safetensors`` (or ``adapter_model.bin``); keys are prefixed
  ``base_model.model.``; Linear: ``<module>.lora_A.weight`` (r × in), ``<module>.lora_B.weight`` (out × r),
  optional ``<module>.lora_B.bias`` (``lora_bias``: Δbias = s·bias); Embedding: ``<module>.lora_embedding_A``
  (r × vocab), ``<module>.lora_embedding_B`` (hidden × r), ΔW = s·(B·A)ᵀ; ``fan_in_fan_out`` (GPT-2 Conv1D):
  ΔW = s·(B·A)ᵀ; ``modules_to_save`` / saved embedding layers: full weights under ``<module>.weight`` (or
  ``<module>.base_layer.weight`` for a LoRA-wrapped embedding).
- ``rank_pattern`` / ``alpha_pattern`` keys are regexes matched like peft's ``get_pattern_key``:
  ``re.match(rf"(.*\\.)?({pattern})$", module_name)``, first match in dict order wins.
- Everything is returned in patchlab's convention: ``ΔW = scale · B @ A`` with B (out, r), A (r, in) in
  the *base tensor's layout* (for embeddings out = vocab).
Nothing here touches patches or checkpoints: the caller validates shapes against a base (``check_shapes``)
and decides how entries are stored.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from patchlab.errors import (
    IncompatiblePatchError,
    PeftAdapterError,
    UnsupportedAdapterError,
)

__all__ = [
    "PeftAdapterError",
    "UnsupportedAdapterError",
    "PeftEntry",
    "PeftAdapter",
    "read_peft_adapter",
    "check_shapes",
    "ExportModule",
    "write_peft_adapter",
    "PREFIX",
]

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME_BIN = "adapter_model.bin"

# init_lora_weights values whose adapters only make sense on a *modified* base (the base weights are
# rewritten at initialisation, or quantised): their ΔW added to the original base is wrong.
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "lora-ga")




@dataclass(frozen=True)
class PeftEntry:
    """One base tensor's contribution from the adapter.

    ``kind`` is ``"lowrank"`` (ΔW = scale·B@A), ``"dense"`` (ΔW = ``delta``, e.g. a lora_B bias) or
    ``"full"`` (``delta`` is the full replacement weight of a modules_to_save layer: ΔW = delta − base).
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    A: torch.Tensor | None = None
    B: torch.Tensor | None = None
    scale: float = 1.0
    rank: int = 0
    delta: torch.Tensor | None = None
    source: str = ""


@dataclass
class PeftAdapter:
    """A parsed adapter: its config and entries keyed by base checkpoint tensor name."""

    path: Path
    config: dict
    entries: dict[str, PeftEntry] = field(default_factory=dict)
    #: full weights saved next to a LoRA-wrapped layer (``<module>.base_layer.weight``), by base tensor name
    base_layers: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def base_model_name_or_path(self) -> str | None:
        return self.config.get("base_model_name_or_path")


def _pattern_key(patterns: Mapping[str, object], module: str) -> str | None:
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def _load_config(adapter_dir: Path) -> dict:
    cfg_path = adapter_dir / CONFIG_NAME
    if not adapter_dir.is_dir():
        raise PeftAdapterError(f"PEFT adapter directory {adapter_dir} does not exist")
    if not cfg_path.is_file():
        raise PeftAdapterError(
            f"{adapter_dir} has no {CONFIG_NAME}; point at a directory written by peft's save_pretrained"
        )
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise PeftAdapterError(f"{cfg_path} is not valid JSON ({exc}); the adapter is damaged") from exc
    if not isinstance(cfg, dict):
        raise PeftAdapterError(f"{cfg_path} must hold a JSON object")
    return cfg


def _validate_config(cfg: dict, where: Path) -> None:
    ptype = str(cfg.get("peft_type", "")).upper()
    if ptype != "LORA":
        raise UnsupportedAdapterError(
            f"{where} is a {ptype or 'untyped'} PEFT adapter; patchlab imports plain LoRA adapters only "
            "(merge other adapter types with peft's merge_and_unload and extract a diff with `patchlab diff`)"
        )
    if cfg.get("use_dora"):
        raise UnsupportedAdapterError(
            f"{where} is a DoRA adapter (use_dora=true): its update rescales each column by a learned "
            "magnitude that depends on the base weight, so it is not a portable ΔW = s·B·A; merge it with "
            "peft (merge_and_unload) and extract a diff with `patchlab diff` instead"
        )
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS):
        raise UnsupportedAdapterError(
            f"{where} was initialised with init_lora_weights={init!r}, which rewrites the base weights; "
            "convert it to a plain LoRA first (peft save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...))"
        )
    unsupported = {
        "target_parameters": "LoRA on raw parameters (target_parameters)",
        "trainable_token_indices": "trainable token rows (trainable_token_indices)",
        "layer_replication": "layer replication",
        "use_qalora": "QALoRA",
        "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens), whose update is conditional",
        "arrow_config": "Arrow routing",
        "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    }
    for key, what in unsupported.items():
        if cfg.get(key):
            raise UnsupportedAdapterError(
                f"{where} uses {what}; patchlab imports plain LoRA only: merge it with peft's "
                "merge_and_unload and extract a diff with `patchlab diff` instead"
            )


def _load_weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    st = adapter_dir / WEIGHTS_NAME
    if st.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(st))
        except (SafetensorError, OSError, ValueError) as exc:
            raise PeftAdapterError(f"{st} cannot be read ({exc}); the adapter is damaged") from exc
    binf = adapter_dir / WEIGHTS_NAME_BIN
    if binf.is_file():
        try:
            sd = torch.load(str(binf), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for damaged pickles
            raise PeftAdapterError(f"{binf} cannot be read ({exc}); the adapter is damaged") from exc
        if not isinstance(sd, dict):
            raise PeftAdapterError(f"{binf} does not hold a state dict")
        return sd
    raise PeftAdapterError(f"{adapter_dir} has neither {WEIGHTS_NAME} nor {WEIGHTS_NAME_BIN}")


_LORA_RE = re.compile(r"^(?P<mod>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|"
                      r"lora_embedding_A|lora_embedding_B)$")


def read_peft_adapter(adapter_dir: str | os.PathLike) -> PeftAdapter:
    """Parse and validate a PEFT LoRA adapter directory into ΔW entries keyed by base tensor name.

    Raises ``UnsupportedAdapterError`` for DoRA and non-LoRA types, ``PeftAdapterError`` when files are
    missing or config and tensors disagree (e.g. a rank that does not match ``rank_pattern``).
    """
    path = Path(adapter_dir)
    cfg = _load_config(path)
    _validate_config(cfg, path)
    sd = _load_weights(path)
    if not sd:
        raise PeftAdapterError(f"{path} holds no tensors")

    parts: dict[str, dict[str, torch.Tensor]] = {}
    full: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        k = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if "lora_magnitude_vector" in k:
            raise UnsupportedAdapterError(
                f"{path} holds DoRA magnitude vectors ({key}); DoRA is not a portable ΔW: merge it with peft "
                "and extract a diff with `patchlab diff` instead"
            )
        m = _LORA_RE.match(k)
        if m:
            parts.setdefault(m["mod"], {})[m["part"]] = t
            continue
        if re.search(r"\.lora_[A-Za-z_]+", k) or ".modules_to_save." in k:
            raise UnsupportedAdapterError(
                f"{path}: tensor {key!r} is not part of a plain LoRA layer patchlab understands"
            )
        if k.endswith(".base_layer.weight") or k.endswith(".base_layer.bias"):
            k = k.replace(".base_layer.", ".")
        full[k] = t

    r_default = cfg.get("r", 8)
    alpha_default = cfg.get("lora_alpha", 8)
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    rslora = bool(cfg.get("use_rslora", False))
    fifo = bool(cfg.get("fan_in_fan_out", False))

    adapter = PeftAdapter(path=path, config=cfg)
    for mod, p in sorted(parts.items()):
        emb = "lora_embedding_A" in p or "lora_embedding_B" in p
        a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A.weight", "lora_B.weight")
        if a_key not in p or b_key not in p:
            missing = a_key if a_key not in p else b_key
            raise PeftAdapterError(f"{path}: module {mod!r} has no {missing}; the adapter is incomplete")
        a, b = p[a_key].float(), p[b_key].float()
        if a.ndim != 2 or b.ndim != 2:
            raise UnsupportedAdapterError(
                f"{path}: module {mod!r} has {a.ndim}-D LoRA factors (a convolution?); patchlab imports "
                "LoRA on Linear and Embedding layers only"
            )
        r = a.shape[0]
        if b.shape[1] != r:
            raise PeftAdapterError(
                f"{path}: module {mod!r} has A of shape {tuple(a.shape)} and B of shape {tuple(b.shape)}; "
                "their ranks differ, the adapter is damaged"
            )
        rk = _pattern_key(rank_pattern, mod)
        r_cfg = rank_pattern[rk] if rk is not None else r_default
        if int(r_cfg) != r:
            via = f"rank_pattern {rk!r}" if rk is not None else "r"
            raise PeftAdapterError(
                f"{path}: module {mod!r} has rank {r} in its tensors but adapter_config.json gives rank "
                f"{r_cfg} ({via}); peft would refuse to load it too: fix the config"
            )
        ak = _pattern_key(alpha_pattern, mod)
        alpha = float(alpha_pattern[ak] if ak is not None else alpha_default)
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        if emb:
            # ΔW (vocab, hidden) = s·(B_e @ A_e)ᵀ = s·A_eᵀ @ B_eᵀ
            B_, A_ = a.T.contiguous(), b.T.contiguous()
            source = "lora_embedding"
        elif fifo:
            B_, A_ = a.T.contiguous(), b.T.contiguous()
            source = "lora_fan_in_fan_out"
        else:
            B_, A_ = b, a
            source = "lora"
        name = mod + ".weight"
        adapter.entries[name] = PeftEntry(
            name=name, kind="lowrank", shape=(B_.shape[0], A_.shape[1]), A=A_, B=B_, scale=scale, rank=r,
            source=source,
        )
        if "lora_B.bias" in p:
            bias = p["lora_B.bias"].float() * scale
            adapter.entries[mod + ".bias"] = PeftEntry(
                name=mod + ".bias", kind="dense", shape=tuple(bias.shape), delta=bias, source="lora_bias"
            )
    for name, t in sorted(full.items()):
        if name in adapter.entries and adapter.entries[name].kind == "lowrank":
            # A LoRA-wrapped embedding saved with its base layer (peft's save_embedding_layers): loading
            # replaces the base weight with it, so ΔW = (saved − base) + s·B·A; the caller compares.
            adapter.base_layers[name] = t.float()
            continue
        if name in adapter.entries:
            raise PeftAdapterError(f"{path}: tensor {name!r} appears twice in the adapter")
        adapter.entries[name] = PeftEntry(
            name=name, kind="full", shape=tuple(t.shape), delta=t.float(), source="modules_to_save"
        )
    return adapter


def check_shapes(
    adapter: PeftAdapter, base_shapes: Mapping[str, tuple[int, ...]], *, tied: bool = False
) -> None:
    """Raise ``IncompatiblePatchError`` for each adapter tensor the base lacks or has another shape for."""
    problems = []
    for name, e in adapter.entries.items():
        if name not in base_shapes:
            tied_head = tied and name.startswith("lm_head")
            hint = " (the base ties lm_head to the input embeddings)" if tied_head else ""
            problems.append(f"{name}: not in the base checkpoint{hint}")
        elif tuple(base_shapes[name]) != tuple(e.shape):
            problems.append(
                f"{name}: adapter ΔW is {tuple(e.shape)}, base tensor is {tuple(base_shapes[name])}"
            )
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... {len(problems) - 8} more" if len(problems) > 8 else "")
        trained = f" ({adapter.base_model_name_or_path})" if adapter.base_model_name_or_path else ""
        raise IncompatiblePatchError(
            f"PEFT adapter {adapter.path} does not fit the base: {shown}. Import it against the base model "
            f"it was trained on{trained}"
        )


@dataclass(frozen=True)
class ExportModule:
    """A low-rank ΔW of one base tensor to write as a LoRA module (patchlab convention: ΔW = scale·B@A)."""

    name: str  # base tensor name, ending in ".weight"
    A: torch.Tensor
    B: torch.Tensor
    scale: float
    embedding: bool = False


def write_peft_adapter(
    out: str | os.PathLike,
    modules: list[ExportModule],
    *,
    full_weights: Mapping[str, torch.Tensor] | None = None,
    base_model_name_or_path: str | None = None,
    task_type: str | None = "CAUSAL_LM",
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a PEFT LoRA adapter directory loadable by ``PeftModel.from_pretrained``; atomic (temp + rename).

    The scale is folded into B (``lora_alpha = r`` per module, so s = 1); the most common rank becomes ``r``,
    the others go to ``rank_pattern``/``alpha_pattern`` keyed by the escaped full module name.
    ``full_weights`` (base tensor name → full weight) become ``modules_to_save``.
    """
    from safetensors.torch import save_file

    from patchlab.io.outputs import atomic_output, check_output

    out = Path(out)
    check_output(out, overwrite, "adapter")
    full_weights = dict(full_weights or {})
    if not modules and not full_weights:
        raise PeftAdapterError("nothing to export: the patch has no low-rank tensors")
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    targets: list[str] = []
    for m in modules:
        if not m.name.endswith(".weight"):
            raise PeftAdapterError(f"{m.name}: only '.weight' tensors of Linear/Embedding layers can be LoRA")
        mod = m.name[: -len(".weight")]
        a, b = m.A.float(), m.B.float() * m.scale
        r = a.shape[0]
        if m.embedding:
            tensors[f"{PREFIX}{mod}.lora_embedding_A"] = b.T.contiguous()  # (r, vocab)
            tensors[f"{PREFIX}{mod}.lora_embedding_B"] = a.T.contiguous()  # (hidden, r)
        else:
            tensors[f"{PREFIX}{mod}.lora_A.weight"] = a.contiguous()
            tensors[f"{PREFIX}{mod}.lora_B.weight"] = b.contiguous()
        ranks[mod] = r
        targets.append(mod)
    save_modules: list[str] = []
    for name, w in full_weights.items():
        mod, _, leaf = name.rpartition(".")
        tensors[f"{PREFIX}{name}"] = w.contiguous()
        if mod not in save_modules:
            save_modules.append(mod)
    overlap = set(save_modules) & set(targets)
    if overlap:
        raise PeftAdapterError(f"modules {sorted(overlap)} cannot be both LoRA targets and modules_to_save")
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    r_main = Counter(ranks.values()).most_common(1)[0][0] if ranks else 8
    pattern = {re.escape(mod): r for mod, r in ranks.items() if r != r_main}
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r_main,
        "lora_alpha": r_main,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": sorted(targets),
        "modules_to_save": save_modules or None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    with atomic_output(out, overwrite, "adapter") as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return out
