"""patchlab: extract, apply, port, merge and measure fine-tuning patches across base-model releases.

The library works on plain directories with no database and no CLI::

    import patchlab
    patch = patchlab.extract("llama-v1", "llama-v1-chat", "chat.patch")
    patchlab.port(patch, "llama-v2", "llama-v2-chat")
"""

__version__ = "0.1.0"

from .checkpoint import Checkpoint, Fingerprint, TensorInfo  # noqa: E402
from .errors import PatchlabError  # noqa: E402
from .ops import apply, extract, port, port_fused  # noqa: E402
from .patch import Patch, PatchTensor  # noqa: E402
from .plan import Plan, Step  # noqa: E402

__all__ = [
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
    "__version__",
]
