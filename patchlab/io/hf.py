"""The one place patchlab loads a ``transformers`` model, its config and its tokenizer."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch

from patchlab.errors import CheckpointNotFoundError, ModelLoadError, PatchlabError

# transformers' from_pretrained swaps class attributes (PreTrainedModel.tie_weights, init_weights and torch's
# init functions) for no-ops and puts them back on exit; two threads loading at once can leave the no-ops in
# place for the whole process (tied heads stop tying, "newly initialized" weights stay uninitialized memory).
# Upgrades run patches in threads, so every load here goes through this lock.
_LOAD_LOCK = threading.RLock()

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json", "spiece.model")


def checkpoint_dir(path: str | Path) -> Path:
    """``path`` as a Hugging Face checkpoint directory; refused when it has no config.json."""
    p = Path(path)
    if not p.is_dir():
        what = "is a file, not a model directory" if p.exists() else "does not exist"
        raise CheckpointNotFoundError(f"{p} {what} (no config.json); pass a Hugging Face model directory")
    if not (p / "config.json").is_file():
        raise CheckpointNotFoundError(f"{p}: not a Hugging Face checkpoint directory (no config.json)")
    return p


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


def load_config(path: str | Path) -> Any:
    from transformers import AutoConfig

    p = checkpoint_dir(path)
    try:
        with _LOAD_LOCK:
            return AutoConfig.from_pretrained(p)
    except Exception as exc:  # JSONDecodeError, ValueError (unknown model_type), KeyError...
        raise ModelLoadError(
            f"{p / 'config.json'} cannot be read as a model config ({_first_line(exc)}); fix it or copy the "
            "config.json of the model these weights came from"
        ) from exc


def load_tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer

    p = checkpoint_dir(path)
    if not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise ModelLoadError(
            f"{p} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); copy the tokenizer files of the model "
            "it was made from into it"
        )
    try:
        with _LOAD_LOCK:
            return AutoTokenizer.from_pretrained(p)
    except Exception as exc:
        raise ModelLoadError(
            f"the tokenizer in {p} cannot be loaded ({_first_line(exc)}); its tokenizer files are damaged or "
            "incomplete: copy them again from the model it was made from"
        ) from exc


def load_causal_lm(
    path: str | Path,
    device: torch.device,
    dtype: torch.dtype | str | None = None,
    attn_implementation: str | None = None,
) -> Any:
    """A causal LM from ``path`` on ``device`` in eval mode. ``dtype`` None: fp32 on CPU, the checkpoint's on CUDA."""
    from transformers import AutoModelForCausalLM

    from patchlab.io.checkpoint import Checkpoint

    p = checkpoint_dir(path)
    load_config(p)  # a bad config is named as such
    Checkpoint.open(p).close()  # missing, truncated or garbage weights: our reader names the file
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else "auto"
    kw: dict[str, Any] = {"dtype": dtype}
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    try:
        with _LOAD_LOCK:
            model = AutoModelForCausalLM.from_pretrained(p, **kw)
    except PatchlabError:
        raise
    except Exception as exc:
        text = str(exc)
        if "size mismatch" in text or "shape" in text.lower():
            raise ModelLoadError(
                f"the weights in {p} do not fit its config.json ({_first_line(exc)}); the config belongs to "
                "another model: copy the config.json these weights were saved with"
            ) from exc
        raise ModelLoadError(f"cannot load the model in {p} ({_first_line(exc)})") from exc
    return model.to(device).eval()


def load_model(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None
) -> tuple[Any, Any]:
    """A causal LM (eval mode, on ``device``: resolve ``auto`` first) and its tokenizer from a checkpoint."""
    return load_causal_lm(path, torch.device(device), dtype), load_tokenizer(path)
