"""patchlab.io.hf: loads stay correct when threads load at once (upgrade --jobs N does)."""

from __future__ import annotations

import threading

import torch
from transformers import PreTrainedModel
from transformers.initialization import TORCH_INIT_FUNCTIONS

from fixtures import model_path
from patchlab.io.hf import load_causal_lm


def test_concurrent_loads_leave_transformers_tying_and_init_intact() -> None:
    # from_pretrained swaps PreTrainedModel.tie_weights / init_weights and torch.nn.init's functions for no-ops
    # while it runs; unserialized threads can leave the no-ops installed for the rest of the process.
    tie, init = PreTrainedModel.tie_weights, PreTrainedModel.init_weights
    inits = {name: getattr(torch.nn.init, name) for name in TORCH_INIT_FUNCTIONS if hasattr(torch.nn.init, name)}
    models: list = []
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def load() -> None:
        try:
            start.wait()
            for _ in range(3):
                models.append(load_causal_lm(model_path("tied-v1"), torch.device("cpu")))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert PreTrainedModel.tie_weights is tie and PreTrainedModel.init_weights is init
    assert {n: getattr(torch.nn.init, n) for n in inits} == inits
    assert len(models) == 18
    for m in models:
        assert m.lm_head.weight is m.model.embed_tokens.weight
    ids = torch.tensor([[0, 5, 9, 17]])
    with torch.no_grad():
        assert torch.isfinite(load_causal_lm(model_path("tied-v1"), torch.device("cpu"))(input_ids=ids).logits).all()
