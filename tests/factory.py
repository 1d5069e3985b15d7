"""Tiny real Hugging Face Llama checkpoints made on the fly, for tests that need a specific variant
(dtype, sharding, tied embeddings, grown or reordered vocabulary) that the bundled family does not have."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = [f"w{i}" for i in range(60)]


def make_tokenizer(path: Path, words: list[str] | None = None) -> dict[str, int]:
    """A word-level tokenizer whose vocabulary is ``<s>``, ``</s>``, ``<unk>`` then ``words`` in order."""
    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2}
    for w in words or WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(path))
    return vocab


def make_model(
    path: Path,
    *,
    seed: int = 0,
    vocab: int | None = None,
    words: list[str] | None = None,
    tied: bool = False,
    dtype: torch.dtype = torch.float32,
    layers: int = 2,
    hidden: int = 32,
    shard_size: str | None = None,
    from_model: Path | None = None,
    noise: float = 0.0,
    chat_template: str | None = None,
) -> Path:
    """Save a tiny LlamaForCausalLM (random, or ``from_model`` plus seeded noise) with a real tokenizer."""
    path.mkdir(parents=True, exist_ok=True)
    v = make_tokenizer(path, words)
    n_vocab = vocab or len(v)
    torch.manual_seed(seed)
    if from_model is not None:
        model = LlamaForCausalLM.from_pretrained(str(from_model), torch_dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * noise)
    else:
        cfg = LlamaConfig(
            vocab_size=n_vocab,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=tied,
            bos_token_id=0,
            eos_token_id=1,
        )
        model = LlamaForCausalLM(cfg)
    model = model.to(dtype)
    kw = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(str(path), safe_serialization=True, **kw)
    if chat_template is not None:
        tc = json.loads((path / "tokenizer_config.json").read_text())
        tc["chat_template"] = chat_template
        (path / "tokenizer_config.json").write_text(json.dumps(tc))
    return path


def state(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, loaded with the safetensors library itself."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out
