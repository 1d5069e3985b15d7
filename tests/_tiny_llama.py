"""Tiny real Llama checkpoints and a byte-level BPE tokenizer for the compatibility tests (no network)."""

from __future__ import annotations

from pathlib import Path

import torch

CORPUS = [
    "the capital of france is paris.",
    "question: what is two plus two? answer: four",
    "a cat sat on the mat and the dog sat on the log.",
    "patchlab ports fine-tuning patches to newer base models.",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\"-\n",
]


def make_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer with <s>, </s>, <pad>, trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", padding_side="right"
    )


def llama_config(vocab_size: int, *, hidden: int = 32, layers: int = 2, max_pos: int = 64, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden + 8,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_pos,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
        **kw,
    )


def save_model(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def make_pair(root: Path, *, seed: int = 0, noise: float = 0.05, **cfg_kw) -> tuple[Path, Path]:
    """A random tiny base model and a 'fine-tune' of it (every weight perturbed), saved as HF dirs."""
    from transformers import LlamaForCausalLM

    tok = make_tokenizer()
    torch.manual_seed(seed)
    cfg = llama_config(len(tok), **cfg_kw)
    base = LlamaForCausalLM(cfg).eval()
    ft = LlamaForCausalLM(cfg).eval()
    ft.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(noise * torch.randn(p.shape, generator=g) * (p.std() if p.numel() > 1 else 1.0))
    return save_model(base, tok, root / "base"), save_model(ft, tok, root / "ft")
