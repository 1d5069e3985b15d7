"""patchlab: extract, apply, port, merge and measure fine-tuning patches across base-model releases.

The library works on plain directories with no database and no CLI::

    import patchlab
    patch = patchlab.extract("llama-v1", "llama-v1-chat", "chat.patch")
    patchlab.port(patch, "llama-v2", "llama-v2-chat")

Names are imported on first use, so ``import patchlab`` (and every CLI command that only reads the
registry) does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Checkpoint": "io.checkpoint",
    "Fingerprint": "io.checkpoint",
    "TensorInfo": "io.checkpoint",
    "Patch": "io.patch",
    "PatchTensor": "io.patch",
    "Plan": "plan",
    "Step": "plan",
    "PatchlabError": "errors",
    "extract": "methods.extract",
    "apply": "methods.port",
    "port": "methods.port",
    "port_fused": "methods.port",
    "merge": "methods.merge",
    "edit": "methods.edit_patch",
}

__all__ = [  # noqa: F822 (names resolved lazily by __getattr__)
    "Checkpoint",
    "Fingerprint",
    "TensorInfo",
    "Patch",
    "PatchTensor",
    "Plan",
    "Step",
    "PatchlabError",
    "extract",
    "apply",
    "port",
    "port_fused",
    "merge",
    "edit",
    "__version__",
]


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'patchlab' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from patchlab.errors import PatchlabError
    from patchlab.io.checkpoint import Checkpoint, Fingerprint, TensorInfo
    from patchlab.io.patch import Patch, PatchTensor
    from patchlab.methods.edit_patch import edit
    from patchlab.methods.extract import extract
    from patchlab.methods.merge import merge
    from patchlab.methods.port import apply, port, port_fused
    from patchlab.plan import Plan, Step
