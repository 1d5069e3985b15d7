"""The one place patchlab loads a ``transformers`` model, its config and its tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from patchlab.errors import CheckpointNotFoundError


def checkpoint_dir(path: str | Path) -> Path:
    """``path`` as a Hugging Face checkpoint directory; refused when it has no config.json."""
    p = Path(path)
    if not (p / "config.json").is_file():
        raise CheckpointNotFoundError(f"{p}: not a Hugging Face checkpoint directory (no config.json)")
    return p


def load_config(path: str | Path) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(checkpoint_dir(path))


def load_tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint_dir(path))


def load_causal_lm(
    path: str | Path,
    device: torch.device,
    dtype: torch.dtype | str | None = None,
    attn_implementation: str | None = None,
) -> Any:
    """A causal LM from ``path`` on ``device`` in eval mode. ``dtype`` None: fp32 on CPU, the checkpoint's on CUDA."""
    from transformers import AutoModelForCausalLM

    p = checkpoint_dir(path)
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else "auto"
    kw: dict[str, Any] = {"dtype": dtype}
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    return AutoModelForCausalLM.from_pretrained(p, **kw).to(device).eval()


def load_model(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None
) -> tuple[Any, Any]:
    """A causal LM (eval mode, on ``device``: resolve ``auto`` first) and its tokenizer from a checkpoint."""
    return load_causal_lm(path, torch.device(device), dtype), load_tokenizer(path)
