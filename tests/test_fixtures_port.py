"""patchlab's own extract + port on the fixture family reproduces the port that fixtures/measure.py reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import patchlab
from fixtures import EVAL, model_path
from fixtures.measure import load, ported, read_jsonl, task_scores


@pytest.mark.parametrize(
    ("family", "b1", "f1", "b2", "policy"),
    [
        ("untied", "v1", "ft-v1", "v2", None),
        ("vocab", "v1", "ft-v1", "v2-vocab", "pad-zero"),
    ],
)
def test_patchlab_port_matches_measured_port(
    tmp_path: Path, family: str, b1: str, f1: str, b2: str, policy: str | None
) -> None:
    patch = patchlab.extract(model_path(b1), model_path(f1), tmp_path / "patch", device="cpu")
    patchlab.port(patch, model_path(b2), tmp_path / "port", vocab_policy=policy, device="cpu")
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "port", dtype=torch.float32).eval()
    want = ported(*(load(n)[0] for n in (b2, b1, f1)))
    for (name, a), (_, b) in zip(got.state_dict().items(), want.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    tok = AutoTokenizer.from_pretrained(tmp_path / "port")
    assert len(tok) == got.config.vocab_size == load(b2)[0].config.vocab_size
    assert (
        "chat_template" in json.loads((tmp_path / "port" / "tokenizer_config.json").read_text())
        or (tmp_path / "port" / "chat_template.jinja").is_file()
    )
    scores = task_scores(got, tok, read_jsonl(EVAL / "task.jsonl"))
    measured = json.loads((EVAL / "measured.json").read_text())["families"][family]["rows"]["v2+Δ(v1)"]
    assert sum(scores.values()) / len(scores) == pytest.approx(measured["task"], abs=1e-3)
