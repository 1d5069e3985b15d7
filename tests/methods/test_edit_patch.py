"""``patchlab.edit``: LocFT-BF on a checkpoint, written as a one-tensor patch that applies bit for bit and ports.

Settings: the fixture setting of tests/methods/test_edit.py (lr 5e-3, batch 4, 25 epochs, layer 2, 16 edits);
the paper's lr 5e-4 / batch 100 barely moves the 64-wide fixture model (docs/edit.md).
"""

from __future__ import annotations

import json

import pytest
import torch

import patchlab
from fixtures import EVAL, ROOT, model_path
from patchlab.errors import (
    EditError,
    EditFormatError,
    EditLocationError,
    EditTooLongError,
    EmptyTargetError,
    OutputExistsError,
    UnsupportedArchitectureError,
)
from patchlab.io.checkpoint import Checkpoint
from patchlab.io.edits import edits_digest, load_edits
from patchlab.io.hf import load_model
from patchlab.io.patch import Patch
from patchlab.methods.edit_patch import evaluate_edit, evaluate_model, patched
from tests.conftest import no_partial_dirs

EDITS = ROOT / "edits" / "edits.jsonl"
SETTING = dict(layer=2, lr=5e-3, batch_size=4, epochs=25, seed=0, device="cpu")
TARGET = "model.layers.2.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def edits16(tmp_path_factory):
    p = tmp_path_factory.mktemp("edits") / "e16.jsonl"
    p.write_text("".join(EDITS.read_text().splitlines(keepends=True)[:16]))
    return p


@pytest.fixture(scope="module")
def made(tmp_path_factory, edits16):
    out = tmp_path_factory.mktemp("edit") / "facts"
    seen: list[tuple[int, float, int]] = []
    m = patchlab.edit(
        model_path("v1"),
        edits16,
        out,
        evaluate=True,
        tasks=[EVAL / "general.jsonl"],
        progress=lambda *a: seen.append(a),
        **SETTING,
    )
    return m, seen


def test_the_patch_holds_one_tensor_and_its_provenance(made, edits16):
    m, seen = made
    p = Patch.open(m.path)
    assert p.names == [TARGET] and m.result.param_name == TARGET
    e = p.entry(TARGET)
    assert e.op == "add" and e.encoding == "dense" and e.meta["dtype"] == "float32"
    prov = p.provenance
    assert prov["method"] == "locft-bf"
    assert prov["base"] == Checkpoint.open(model_path("v1")).describe()
    params = prov["parameters"]
    assert params["edits_sha256"] == edits_digest(load_edits(edits16)) == m.result.edits_sha256
    assert params["edits_file"] == str(edits16.resolve()) and params["n_edits"] == 16
    assert params["lr"] == 5e-3 and params["batch_size"] == 4 and params["layer"] == 2 and params["exact"]
    assert params["precision"] == "fp32"  # CPU trains in fp32
    assert (p.finetune_dir / "tokenizer.json").is_file()  # the edited model keeps the base's tokenizer
    assert [s[0] for s in seen] == list(range(1, len(m.result.losses) + 1)) and seen[-1][2] == 16


def test_apply_gives_the_edited_model_bit_for_bit(made, tmp_path):
    m, _ = made
    out = patchlab.apply(m.path, model_path("v1"), tmp_path / "applied", device="cpu")
    base, got = Checkpoint.open(model_path("v1")), Checkpoint.open(out.path)
    changed = [n for n in base.names if not torch.equal(base.tensor(n), got.tensor(n))]
    assert changed == [TARGET]  # the trained weight is the only one that changes
    assert torch.equal(got.tensor(TARGET), m.result.trained[TARGET])  # exactly the weight training left
    # Δ alone rounds (trained − base, then base + Δ): the fixups make up the difference.
    assert Patch.open(m.path).manifest["totals"]["fixups"] > 0
    # The in-memory application is the same model.
    model, _ = load_model(model_path("v1"))
    with patched(model, m.path):
        assert torch.equal(dict(model.named_parameters())[TARGET].detach(), m.result.trained[TARGET])
    assert torch.equal(dict(model.named_parameters())[TARGET].detach(), base.tensor(TARGET))


def test_reliability_and_locality(made):
    m, _ = made
    f = m.evaluation.figures()
    assert f["reliability"] == 1.0
    # Measured 0.875 (56 of 64 locality prompts unchanged), as tests/methods/test_edit.py; full fine-tuning of
    # every weight on the same edits keeps 0.172. 0.8 leaves one changed output (1.6 points) of float noise
    # per four across machines and still fails anything as disruptive as unlocalized FT.
    assert f["locality"] >= 0.8
    assert f["generalization"] >= 0.75  # measured 0.938
    assert 0.7 <= f["general"]["general"] <= 1.0  # general ability kept (v1 unedited: 1.0; measured 0.888)


def test_rank_writes_a_lowrank_entry(edits16, tmp_path):
    m = patchlab.edit(model_path("v1"), load_edits(edits16)[:4], tmp_path / "r4", rank=4, **{**SETTING, "epochs": 5})
    p = Patch.open(m.path)
    e = p.entry(TARGET)
    assert p.names == [TARGET] and e.encoding == "lowrank" and e.meta["rank"] == 4
    assert p.provenance["parameters"]["exact"] is False and p.provenance["parameters"]["rank"] == 4
    assert p.provenance["parameters"]["edits_file"] is None  # edits given in memory
    d = e.dense()
    full = m.result.trained[TARGET] - Checkpoint.open(model_path("v1")).tensor(TARGET)
    assert torch.linalg.matrix_rank(d) <= 4
    assert torch.linalg.norm(d - full) / torch.linalg.norm(full) == pytest.approx(e.meta["rel_error"], abs=1e-4)
    out = patchlab.apply(m.path, model_path("v1"), tmp_path / "applied", device="cpu")
    assert torch.allclose(out.tensor(TARGET), Checkpoint.open(model_path("v1")).tensor(TARGET) + d, atol=1e-6)


def test_port_to_v2_against_editing_v2_directly(made, edits16, tmp_path):
    m, _ = made
    ported = patchlab.port(m.path, model_path("v2"), tmp_path / "v2-ported", device="cpu")
    v2 = Checkpoint.open(model_path("v2"))
    assert [n for n in v2.names if not torch.equal(v2.tensor(n), ported.tensor(n))] == [TARGET]
    assert torch.equal(ported.tensor(TARGET), v2.tensor(TARGET) + Patch.open(m.path).entry(TARGET).dense())
    got = evaluate_model(ported.path, edits16, base=model_path("v2"), device="cpu").figures()
    direct = patchlab.edit(model_path("v2"), edits16, tmp_path / "v2-direct", evaluate=True, **SETTING)
    want = direct.evaluation.figures()
    assert want["reliability"] == 1.0
    # Measured: the v1 edit ported keeps 0.812 reliability (13 of 16), 0.750 generalization and 0.828 locality
    # on v2 (v2 is v1 further pre-trained: close in weight space); editing v2 directly: 1.0 / 0.750 / 0.781.
    assert got["reliability"] >= 0.75 and got["locality"] >= 0.7
    same = evaluate_model(model_path("v2"), edits16, patch=m.path, device="cpu").figures()
    assert same == got  # the in-memory port gives the same figures as the written one


def _lines(tmp_path, rows):
    p = tmp_path / "bad.jsonl"
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return p


GOOD = {"id": "a", "prompt": "sopu lives in", "target": "rome"}


@pytest.mark.parametrize(
    "case, exc, match",
    [
        ("malformed", EditFormatError, r"bad\.jsonl:2: not valid JSON"),
        ("empty-target", EmptyTargetError, r"bad\.jsonl:2 \(id 'b'\): the target is empty"),
        ("too-long", EditTooLongError, r"edit 'c': prompt \+ target are \d+ tokens .*context of 128"),
        ("layer", EditLocationError, r"layer 7 does not exist .*valid layers: 0\.\.3"),
        ("module", EditLocationError, r"module 'mlp.down' does not exist .*valid modules: .*mlp\.down_proj"),
        ("rank", EditError, r"rank 100 is larger than .* \(at most 64\)"),
        ("eval-too-long", EditTooLongError, r"32 new tokens exceed the model's context of 128"),
    ],
)
def test_bad_input_writes_nothing(tmp_path, case, exc, match):
    kw = dict(SETTING, epochs=1)
    rows: list = [GOOD]
    if case == "malformed":
        rows.append('{"id": "b", "prompt": "x"')
    elif case == "empty-target":
        rows.append({"id": "b", "prompt": "kugu lives in", "target": "  "})
    elif case == "too-long":
        rows.append({"id": "c", "prompt": "sopu lives in " * 60, "target": "rome"})
    elif case == "layer":
        kw["layer"] = 7
    elif case == "module":
        kw["module"] = "mlp.down"
    elif case == "rank":
        kw["rank"] = 100
    elif case == "eval-too-long":  # fits training (prompt + target), not evaluation (prompt + 32 tokens)
        rows.append({"id": "c", "prompt": "sopu lives in " * 35, "target": "rome"})
        kw["evaluate"] = True
    with pytest.raises(exc, match=match):
        patchlab.edit(model_path("v1"), _lines(tmp_path, rows), tmp_path / "out", **kw)
    assert not (tmp_path / "out").exists() and not no_partial_dirs(tmp_path)


def test_non_decoder_checkpoints_are_refused(tmp_path):
    from transformers import BertConfig, BertForMaskedLM, T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(vocab_size=320, d_model=8, d_kv=4, d_ff=8, num_layers=1, num_heads=2))
    t5.save_pretrained(tmp_path / "t5")
    bert = BertForMaskedLM(
        BertConfig(vocab_size=320, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    )
    bert.save_pretrained(tmp_path / "bert")
    edits = [GOOD]
    with pytest.raises(UnsupportedArchitectureError, match="encoder-decoder"):
        patchlab.edit(tmp_path / "t5", edits, tmp_path / "out", device="cpu")
    with pytest.raises(UnsupportedArchitectureError, match="BertForMaskedLM .*not a causal language model"):
        patchlab.edit(tmp_path / "bert", edits, tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists() and not no_partial_dirs(tmp_path)


def test_existing_output_and_contradictions_are_refused_before_training(made, tmp_path):
    m, _ = made
    with pytest.raises(OutputExistsError):
        patchlab.edit(model_path("v1"), [GOOD], m.path, **SETTING)
    with pytest.raises(EditError, match="not both"):
        patchlab.edit(model_path("v1"), [GOOD], tmp_path / "x", locate=True, **SETTING)
    assert not (tmp_path / "x").exists()


def test_evaluate_edit_without_a_baseline_has_no_locality(edits16):
    model, tok = load_model(model_path("v1"))
    ev = evaluate_edit(model, tok, load_edits(edits16)[:4])
    assert ev.wild.locality is None and ev.general is None and ev.figures()["reliability"] <= 0.25
