"""PEFT adapters as patchlab patches, both ways, against real peft (merge_and_unload and from_pretrained)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

import patchlab  # noqa: E402
from patchlab.errors import IncompatiblePatchError  # noqa: E402
from patchlab.io.peft import UnsupportedAdapterError  # noqa: E402
from patchlab.methods.compress import compress  # noqa: E402
from patchlab.methods.peft import export_peft, import_peft  # noqa: E402
from tests.factory import make_model, state  # noqa: E402

IDS = torch.tensor([[0, 5, 9, 17, 33, 44, 12, 3]])


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("peftfam")
    base = make_model(root / "base", seed=0, hidden=64)
    small = make_model(root / "small", seed=0, hidden=32)
    ft = make_model(root / "ft", seed=1, from_model=base, noise=0.01)
    return root, base, small, ft


def _adapter(base, out, **cfg):
    """A peft adapter on ``base`` with random non-zero weights; returns its merge_and_unload() state dict."""
    model = LlamaForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    pm = get_peft_model(model, LoraConfig(init_lora_weights=False, **cfg))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "modules_to_save" in n:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
            elif "lora_" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(str(out))
    return {k: v.clone() for k, v in pm.merge_and_unload().state_dict().items()}


def _logits(path_or_model):
    m = path_or_model
    if not isinstance(m, torch.nn.Module):
        m = LlamaForCausalLM.from_pretrained(str(m), dtype=torch.float32)
    with torch.no_grad():
        return m.eval()(IDS).logits


@pytest.mark.parametrize(
    "cfg",
    [
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "gate_proj", "embed_tokens"],
            modules_to_save=["lm_head"],
            rank_pattern={"layers.1.self_attn.q_proj": 2, "gate_proj": 6},
            alpha_pattern={"v_proj": 3, r"layers\.0\.mlp\.gate_proj": 20},
        ),
        dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["o_proj", "down_proj", "k_proj"]),
    ],
    ids=["patterns-embedding-modules_to_save", "rslora"],
)
def test_imported_adapter_applied_equals_peft_merge(fam, tmp_path, cfg):
    root, base, small, ft = fam
    merged = _adapter(base, tmp_path / "ad", **cfg)
    p = import_peft(tmp_path / "ad", base, tmp_path / "ad.patch")
    enc = {e.name: e.encoding for e in p.entries()}
    if "embed_tokens" in cfg["target_modules"]:
        assert enc["model.embed_tokens.weight"] == "lowrank" and enc["lm_head.weight"] == "dense"
        assert p.manifest["tensors"]["model.layers.1.self_attn.q_proj.weight"]["rank"] == 2
    assert all(v == "lowrank" for k, v in enc.items() if not k.startswith("lm_head"))
    patchlab.apply(p, base, tmp_path / "applied", device="cpu")
    out = state(tmp_path / "applied")
    b = state(base)
    changed = 0
    for k, v in merged.items():
        assert torch.allclose(out[k], v, atol=1e-5, rtol=1e-5), k
        changed += not torch.equal(v, b[k])
    assert changed == len(p.names)  # every imported entry really changes its weight


def test_exported_adapter_loads_in_peft_with_same_logits(fam, tmp_path):
    root, base, small, ft = fam
    dense = patchlab.extract(base, ft, tmp_path / "dense.patch")
    p = compress(dense, tmp_path / "r6.patch", rank=6, embeddings="encode")
    patchlab.apply(p, base, tmp_path / "applied", device="cpu")
    with pytest.raises(IncompatiblePatchError, match="modules_to_save .* pass base="):
        export_peft(p, tmp_path / "nobase")
    assert not (tmp_path / "nobase").exists()
    out = export_peft(p, tmp_path / "adapter", base=base)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 6 and "model.norm" in cfg["modules_to_save"]
    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(str(base), dtype=torch.float32), out)
    ref = _logits(tmp_path / "applied")
    assert torch.allclose(_logits(peft_model), ref, atol=1e-4)
    assert not torch.allclose(_logits(base), ref, atol=1e-3)  # the patch does change the model
    # and back: importing the exported adapter gives the same applied model
    back = import_peft(out, base, tmp_path / "back.patch")
    patchlab.apply(back, base, tmp_path / "applied2", device="cpu")
    a, b2 = state(tmp_path / "applied"), state(tmp_path / "applied2")
    for k in a:
        assert torch.allclose(a[k], b2[k], atol=1e-5), k


def test_skip_dense_exports_only_the_lowrank_part(fam, tmp_path):
    root, base, small, ft = fam
    dense = patchlab.extract(base, ft, tmp_path / "dense.patch")
    p = compress(dense, tmp_path / "r4.patch", rank=4)
    out = export_peft(p, tmp_path / "adapter", skip_dense=True)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] is None and len(cfg["target_modules"]) == 14


def test_adapter_for_another_base_is_refused(fam, tmp_path):
    root, base, small, ft = fam
    _adapter(small, tmp_path / "ad", r=2, target_modules=["q_proj"])
    with pytest.raises(IncompatiblePatchError, match=r"q_proj.weight: adapter ΔW is \(32, 32\), base tensor is \(64"):
        import_peft(tmp_path / "ad", base, tmp_path / "x.patch")
    assert not (tmp_path / "x.patch").exists()


def test_dora_adapter_is_refused(fam, tmp_path):
    root, base, small, ft = fam
    _adapter(base, tmp_path / "dora", r=2, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(UnsupportedAdapterError, match="DoRA"):
        import_peft(tmp_path / "dora", base, tmp_path / "x.patch")
    assert not (tmp_path / "x.patch").exists()
