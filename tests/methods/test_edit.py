"""LocFT-BF on the fixture family (fixtures/models/v1) and the edit set in fixtures/edits/.

The paper's defaults (lr 5e-4, batch 100) are tuned for 7-70B models and thousands of edits: on 16 edits
they give one Adam step an epoch and v1 (hidden size 64) barely moves. The tests use the fixture setting
documented in docs/edit.md: lr 5e-3, batch 4 (100 steps over 25 epochs, under a second on CPU).
"""

from __future__ import annotations

import json

import pytest
import torch

from fixtures import ROOT, model_path
from patchlab.errors import (
    EditFormatError,
    EditLocationError,
    EditTooLongError,
    EmptyTargetError,
    PatchlabError,
    UnsupportedArchitectureError,
)
from patchlab.io.hf import load_model
from patchlab.measure.edits import evaluate_edits, locality_baseline
from patchlab.methods.edit import edited, full_ft, load_edits, locate, locft_bf, resolve_weight, sequential_ft

EDITS = ROOT / "edits" / "edits.jsonl"
FIXTURE = dict(layer=2, lr=5e-3, batch_size=4, epochs=25, seed=0)
TARGET = "model.layers.2.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def v1():
    return load_model(model_path("v1"), device="cpu")


@pytest.fixture(scope="module")
def edits():
    return load_edits(EDITS)[:16]


@pytest.fixture(scope="module")
def trained(v1, edits):
    model, tok = v1
    seen_grad: list[list[str]] = []

    def progress(epoch: int, loss: float, fitted: int) -> None:
        seen_grad.append([n for n, p in model.named_parameters() if p.requires_grad])

    return locft_bf(model, tok, edits, progress=progress, **FIXTURE), seen_grad


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_only_the_chosen_weight_changes(v1, trained):
    model, _ = v1
    res, seen_grad = trained
    assert list(res.deltas) == [TARGET] and res.param_name == TARGET
    assert res.delta.dtype == torch.float32 and res.delta.abs().max() > 0
    assert seen_grad and all(names == [TARGET] for names in seen_grad)  # gradients for that weight only
    before = snapshot(model)
    with edited(model, res):
        during = snapshot(model)
    after = snapshot(model)
    changed = [n for n in before if not torch.equal(before[n], during[n])]
    assert changed == [TARGET]
    assert torch.equal(during[TARGET], res.trained[TARGET])  # the trained weight itself, not original + delta
    assert torch.allclose(during[TARGET], before[TARGET] + res.delta, rtol=0, atol=1e-6)
    assert all(torch.equal(before[n], after[n]) for n in before)  # restored bit for bit
    assert res.params["layer"] == 2 and res.method == "locft-bf"
    assert len(res.edits_sha256) == 64 and res.n_edits == 16


def test_reliability_and_locality(v1, edits, trained):
    model, tok = v1
    res, _ = trained
    base = locality_baseline(model, tok, edits)
    before = evaluate_edits(model, tok, edits, baseline=base)
    assert before.locality == 1.0 and before.reliability < 0.2
    with edited(model, res):
        after = evaluate_edits(model, tok, edits, baseline=base)
    assert after.reliability == 1.0
    # Measured: 0.875 (56 of 64 locality prompts unchanged), generalization 0.938. Unlocalized FT with the
    # same settings keeps 0.172 (see test_baselines). v1 has hidden size 64, so an edit of its one
    # 64x172 matrix disturbs a few other people's facts; 0.8 leaves room for float noise across machines
    # (one changed output is 1.6 points) and still fails anything as disruptive as full fine-tuning.
    assert after.locality >= 0.8
    assert json.loads(after.to_json())["reliability"] == 1.0


def test_reproducible_with_the_same_seed(v1, edits, trained):
    model, tok = v1
    res, _ = trained
    again = locft_bf(model, tok, edits, **FIXTURE)
    assert torch.equal(again.delta, res.delta) and again.losses == res.losses
    other = locft_bf(model, tok, edits, **{**FIXTURE, "seed": 1, "epochs": 2})
    assert not torch.equal(other.delta, res.delta)


def test_module_names_match_exactly(v1):
    from transformers import LlamaConfig, LlamaForCausalLM

    model, tok = v1
    cfg = LlamaConfig(
        vocab_size=320,
        hidden_size=8,
        intermediate_size=12,
        num_hidden_layers=22,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    deep = LlamaForCausalLM(cfg).eval()
    assert resolve_weight(deep, 2) == "model.layers.2.mlp.down_proj.weight"
    assert resolve_weight(deep, 2, "self_attn.o_proj.weight") == "model.layers.2.self_attn.o_proj.weight"
    assert resolve_weight(deep) == "model.layers.15.mlp.down_proj.weight"  # default: ~0.7 of the depth
    res = locft_bf(deep, tok, load_edits(EDITS)[:2], layer=2, epochs=1, lr=1e-2)
    assert list(res.deltas) == ["model.layers.2.mlp.down_proj.weight"]
    assert resolve_weight(model) == TARGET


def test_unknown_location_lists_the_valid_ones(v1, edits):
    model, tok = v1
    with pytest.raises(EditLocationError, match=r"layer 4 .*valid layers: 0\.\.3"):
        locft_bf(model, tok, edits, layer=4)
    with pytest.raises(EditLocationError, match=r"'mlp.down'.*valid modules: .*mlp\.down_proj.*self_attn\.q_proj"):
        locft_bf(model, tok, edits, module="mlp.down")


def write(tmp_path, lines: list[str]):
    p = tmp_path / "edits.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


GOOD = json.dumps({"id": "a", "prompt": "sopu lives in", "target": "rome", "kind": "counterfactual"})


def test_bad_inputs_raise_clear_errors(v1, tmp_path):
    model, tok = v1
    before = snapshot(model)
    with pytest.raises(EditFormatError, match=r"edits\.jsonl:3: not valid JSON"):
        locft_bf(model, tok, write(tmp_path, [GOOD, "", '{"id": "b", "prompt": "x"']))
    with pytest.raises(EditFormatError, match=r"edits\.jsonl:2: missing field\(s\) \['target'\]"):
        locft_bf(model, tok, write(tmp_path, [GOOD, '{"id": "b", "prompt": "kugu lives in"}']))
    with pytest.raises(EditFormatError, match=r"edits\.jsonl:2: duplicate id 'a'"):
        locft_bf(model, tok, write(tmp_path, [GOOD, GOOD]))
    with pytest.raises(EmptyTargetError, match=r"edits\.jsonl:2 \(id 'b'\): the target is empty"):
        locft_bf(model, tok, write(tmp_path, [GOOD, '{"id": "b", "prompt": "kugu lives in", "target": " "}']))
    long = {"id": "c", "prompt": "sopu lives in " * 60, "target": "rome"}
    with pytest.raises(EditTooLongError, match=r"edit 'c': prompt \+ target are \d+ tokens .* context of 128"):
        locft_bf(model, tok, [long])
    with pytest.raises(EditTooLongError, match="context of 128"):
        evaluate_edits(model, tok, [{**long, "prompt": "sopu lives in " * 35}])
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # nothing trained
    assert issubclass(EmptyTargetError, EditFormatError) and issubclass(EditFormatError, PatchlabError)


def test_non_decoder_architectures_are_refused(v1):
    from transformers import BertConfig, BertForMaskedLM, T5Config, T5ForConditionalGeneration

    _, tok = v1
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=320, d_model=8, d_kv=4, d_ff=8, num_layers=1, num_heads=2))
    with pytest.raises(UnsupportedArchitectureError, match="encoder-decoder"):
        locft_bf(t5, tok, [json.loads(GOOD)], layer=0, module="layer.1.DenseReluDense.wo")
    bert = BertForMaskedLM(
        BertConfig(vocab_size=320, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    )
    with pytest.raises(UnsupportedArchitectureError, match="not a causal language model"):
        full_ft(bert, tok, [json.loads(GOOD)])


def test_baselines_and_non_fp32_weights(v1, edits):
    model, tok = v1
    full = full_ft(model, tok, edits, lr=5e-3, batch_size=4, epochs=25)
    assert len(full.deltas) == len(dict(model.named_parameters()))
    base = locality_baseline(model, tok, edits)
    with edited(model, full):
        s = evaluate_edits(model, tok, edits, baseline=base)
    assert s.reliability == 1.0 and s.locality < 0.5  # measured 0.172: why the locality threshold above is 0.8
    seq = sequential_ft(model, tok, edits[:3], layer=2, lr=5e-3, steps_per_edit=5)
    assert list(seq.deltas) == [TARGET] and len(seq.losses) == 3 and seq.method == "sequential-ft"
    # A bf16 model trains through an fp32 master copy: the delta is fp32 and the model is left as it was.
    import copy

    half = copy.deepcopy(model).to(torch.bfloat16)
    before = snapshot(half)
    res = locft_bf(half, tok, edits[:4], layer=2, lr=1e-2, batch_size=4, epochs=3, precision="bf16")
    assert res.delta.dtype == torch.float32 and res.delta.abs().max() > 0
    assert all(torch.equal(before[n], p) for n, p in half.named_parameters())


def test_locate_reports_its_table(v1, edits):
    model, tok = v1
    found = locate(model, tok, edits, layers=[1, 2], share=0.5, epochs=3, lr=1e-2, batch_size=4)
    assert [r["layer"] for r in found.table] == [1, 2] and found.layer in (1, 2)
    assert len(found.sample_ids) == 8 and "(chosen)" in found.markdown()
    with pytest.raises(EditLocationError):
        locate(model, tok, edits, layers=[1, 9])


def test_edit_files_are_generated_deterministically():
    from fixtures.make_edits import make_edits

    rows = make_edits()
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
    assert EDITS.read_text() == text
    kinds = [r["kind"] for r in rows]
    assert kinds.count("counterfactual") == 144 and kinds.count("new") == 160
    edited_subjects = {r["subject"] for r in rows}
    for r in rows:  # locality prompts are about people no edit touches
        assert r["rephrasings"] and r["locality"]
        assert not any(s in p.split() for p in r["locality"] for s in edited_subjects)
        assert r["target"] != r["original"]
