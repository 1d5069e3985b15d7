import pytest
import torch

torch.set_num_threads(1)  # tiny models: threads only add OpenMP spin, most of all on a shared 2-core machine


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Force many uneven row chunks so every test exercises the streaming path, not one big read."""
    import patchlab.engine.executor

    monkeypatch.setattr(patchlab.engine.executor, "CHUNK_ELEMS", 1000)


def no_partial_dirs(parent):
    return [p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]
