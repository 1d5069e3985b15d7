"""PEFT LoRA adapters read by patchlab equal peft's own merge; adapters written by patchlab load in peft."""

from __future__ import annotations

import json

import pytest
import torch

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

from patchlab.errors import IncompatiblePatchError, OutputExistsError  # noqa: E402
from patchlab.io import peft as peft_io  # noqa: E402


def tiny_llama(seed: int = 0, vocab: int = 96) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


def make_adapter(tmp_path, name: str, model_fn=tiny_llama, **cfg) -> tuple[dict, dict, object]:
    """Save a peft adapter with random non-zero weights; return (base state dict, merged state dict, dir)."""
    base = model_fn()
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    pm = get_peft_model(base, LoraConfig(init_lora_weights=False, **cfg))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "modules_to_save" in n:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            elif "lora_" in n:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    out = tmp_path / name
    pm.save_pretrained(out)
    merged = {k: v.clone() for k, v in pm.merge_and_unload().state_dict().items()}
    return base_sd, merged, out


def apply_entries(base_sd: dict, adapter: peft_io.PeftAdapter) -> dict:
    out = {k: v.clone() for k, v in base_sd.items()}
    for name, e in adapter.entries.items():
        if e.kind == "lowrank":
            w = adapter.base_layers.get(name, base_sd[name])
            out[name] = w + e.scale * (e.B @ e.A)
        elif e.kind == "dense":
            out[name] = base_sd[name] + e.delta
        else:
            out[name] = e.delta
    return out


def assert_same(ours: dict, merged: dict) -> None:
    assert set(merged) <= set(ours)
    for k, v in merged.items():
        assert torch.allclose(ours[k], v, atol=1e-5, rtol=1e-5), k


def test_lora_with_patterns_embedding_and_modules_to_save_equals_peft_merge(tmp_path):
    base_sd, merged, ad = make_adapter(
        tmp_path,
        "ad",
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
        modules_to_save=["lm_head"],
        rank_pattern={"layers.1.self_attn.q_proj": 2, "down_proj": 6},
        alpha_pattern={"v_proj": 3},
    )
    adapter = peft_io.read_peft_adapter(ad)
    e = adapter.entries
    assert e["model.layers.1.self_attn.q_proj.weight"].rank == 2
    assert e["model.layers.0.mlp.down_proj.weight"].rank == 6
    assert e["model.layers.0.self_attn.v_proj.weight"].scale == pytest.approx(3 / 4)
    assert e["model.layers.0.self_attn.q_proj.weight"].scale == pytest.approx(8 / 4)
    emb = e["model.embed_tokens.weight"]
    assert emb.kind == "lowrank" and emb.B.shape == (96, 4) and emb.A.shape == (4, 32)
    assert e["lm_head.weight"].kind == "full"
    assert not any(torch.equal(merged[k], base_sd[k]) for k in e)  # every entry really changes a weight
    assert_same(apply_entries(base_sd, adapter), merged)
    peft_io.check_shapes(adapter, {k: tuple(v.shape) for k, v in base_sd.items()})


def test_rslora_and_lora_bias_equal_peft_merge(tmp_path):
    base_sd, merged, ad = make_adapter(
        tmp_path,
        "rs",
        r=8,
        lora_alpha=4,
        use_rslora=True,
        target_modules=["o_proj", "up_proj"],
    )
    adapter = peft_io.read_peft_adapter(ad)
    assert adapter.entries["model.layers.0.self_attn.o_proj.weight"].scale == pytest.approx(4 / 8**0.5)
    assert_same(apply_entries(base_sd, adapter), merged)

    def gpt2():
        torch.manual_seed(0)
        cfg = GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64, n_positions=32)
        return GPT2LMHeadModel(cfg).eval()

    # GPT-2's Conv1D stores weights (in, out): fan_in_fan_out; lora_bias adds s·bias to the layer bias.
    base_sd, merged, ad = make_adapter(
        tmp_path,
        "gpt2",
        model_fn=gpt2,
        r=4,
        lora_alpha=16,
        fan_in_fan_out=True,
        target_modules=["c_attn", "c_fc"],
        lora_bias=True,
    )
    adapter = peft_io.read_peft_adapter(ad)
    assert "transformer.h.0.attn.c_attn.bias" in adapter.entries
    assert adapter.entries["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)
    assert_same(apply_entries(base_sd, adapter), merged)


def test_exported_adapter_loads_in_peft_with_same_logits(tmp_path):
    base = tiny_llama()
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    g = torch.Generator().manual_seed(3)
    mods, want = [], dict(base_sd)
    for i, name in enumerate(
        ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.gate_proj.weight", "model.embed_tokens.weight"]
    ):
        out_f, in_f = base_sd[name].shape
        r = 3 if i == 1 else 5
        A, B = torch.randn(r, in_f, generator=g), torch.randn(out_f, r, generator=g)
        mods.append(peft_io.ExportModule(name, A, B, 0.05, embedding=name.startswith("model.embed")))
        want[name] = base_sd[name] + 0.05 * B @ A
    head = base_sd["lm_head.weight"] + 0.1
    want["lm_head.weight"] = head
    out = peft_io.write_peft_adapter(
        tmp_path / "exp", mods, full_weights={"lm_head.weight": head}, base_model_name_or_path="tiny"
    )
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 5 and list(cfg["rank_pattern"].values()) == [3]
    ids = torch.tensor([[1, 5, 9, 17, 33, 64]])
    loaded = PeftModel.from_pretrained(tiny_llama(), out).eval()
    ref = tiny_llama()
    ref.load_state_dict(want)
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, ref(ids).logits, atol=1e-5)
    # and reading it back gives the same ΔW
    back = peft_io.read_peft_adapter(out)
    assert_same(apply_entries(base_sd, back), want)
    with pytest.raises(OutputExistsError):
        peft_io.write_peft_adapter(out, mods)


def test_unsupported_adapters_are_refused(tmp_path):
    _, _, ad = make_adapter(tmp_path, "dora", r=2, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(peft_io.UnsupportedAdapterError, match="DoRA"):
        peft_io.read_peft_adapter(ad)
    from peft import LoHaConfig

    pm = get_peft_model(tiny_llama(), LoHaConfig(r=2, target_modules=["q_proj"]))
    pm.save_pretrained(tmp_path / "loha")
    with pytest.raises(peft_io.UnsupportedAdapterError, match="LOHA PEFT adapter; patchlab imports plain"):
        peft_io.read_peft_adapter(tmp_path / "loha")


def test_damaged_and_mismatched_adapters_are_refused(tmp_path):
    base_sd, _, ad = make_adapter(tmp_path, "ad", r=4, target_modules=["q_proj"])
    with pytest.raises(peft_io.PeftAdapterError, match="no adapter_config.json"):
        peft_io.read_peft_adapter(tmp_path)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["r"] = 3
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(peft_io.PeftAdapterError, match="rank 4 in its tensors but .* gives rank 3"):
        peft_io.read_peft_adapter(ad)
    cfg["r"] = 4
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    adapter = peft_io.read_peft_adapter(ad)
    other = tiny_llama(vocab=96)
    other_shapes = {k: tuple(v.shape) for k, v in other.state_dict().items()}
    other_shapes["model.layers.0.self_attn.q_proj.weight"] = (64, 32)
    with pytest.raises(IncompatiblePatchError, match=r"q_proj.weight: adapter ΔW is \(32, 32\), base"):
        peft_io.check_shapes(adapter, other_shapes)
    del other_shapes["model.layers.1.self_attn.q_proj.weight"]
    with pytest.raises(IncompatiblePatchError, match="not in the base checkpoint"):
        peft_io.check_shapes(adapter, other_shapes)
    (ad / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(peft_io.PeftAdapterError, match="cannot be read"):
        peft_io.read_peft_adapter(ad)
