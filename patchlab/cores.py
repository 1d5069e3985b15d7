"""How many worker threads to use: ``PATCHLAB_WORKERS``, else one per core this process may run on.

Torch-free, so that code which only reads and hashes files (fingerprints) can size its pool too.
"""

from __future__ import annotations

import os

from patchlab.errors import DeviceError

ENV = "PATCHLAB_WORKERS"


def worker_count() -> int:
    """Worker threads, the calling one included: ``PATCHLAB_WORKERS``, else one per core this process may use."""
    env = os.environ.get(ENV, "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            n = 0
        if n < 1:
            raise DeviceError(f"{ENV} must be a positive integer, got {env!r}")
        return n
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)
