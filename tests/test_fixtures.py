"""The committed fixture family: loads offline, has the documented shape, and tells the story it claims."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from fixtures import EVAL, MODELS, NAMES, model_path

TIED = [n for n in NAMES if n.startswith("tied-")]
FINETUNED = [n for n in NAMES if "ft-" in n]


def _keys(name: str) -> set[str]:
    with safe_open(str(model_path(name) / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.mark.parametrize("name", NAMES)
def test_every_fixture_loads_offline_and_runs(name: str) -> None:
    path = model_path(name)
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (path / f).is_file(), f"{name} lacks {f}"
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == "llama"
    assert next(model.parameters()).dtype == torch.float32
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    assert tok.bos_token_id == model.config.bos_token_id and tok.eos_token_id == model.config.eos_token_id
    assert tok.pad_token_id == tok.eos_token_id, "pad must be eos, not a separate token"
    assert len(tok) == model.config.vocab_size
    ids = tok("alpha beta.", return_tensors="pt")["input_ids"]
    assert ids[0, 0].item() == tok.bos_token_id
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", TIED)
def test_tied_fixtures_store_no_lm_head(name: str) -> None:
    config = json.loads((model_path(name) / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    keys = _keys(name)
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys


@pytest.mark.parametrize("name", [n for n in NAMES if n not in TIED])
def test_untied_fixtures_store_lm_head(name: str) -> None:
    assert json.loads((model_path(name) / "config.json").read_text())["tie_word_embeddings"] is False
    assert "lm_head.weight" in _keys(name)


@pytest.mark.parametrize("name", FINETUNED)
def test_finetunes_carry_generation_config_and_chat_template(name: str) -> None:
    path = model_path(name)
    tok_cfg = json.loads((path / "tokenizer_config.json").read_text())
    assert "{{" in tok_cfg["chat_template"] or "{%" in tok_cfg["chat_template"]
    gen = json.loads((path / "generation_config.json").read_text())
    assert gen["max_new_tokens"] > 0 and gen["do_sample"] is False
    tok = AutoTokenizer.from_pretrained(path)
    text = tok.apply_chat_template([{"role": "user", "content": "where does bo live?"}], tokenize=False)
    assert text.startswith(tok.bos_token + "question: where does bo live?\nanswer:")


def test_bases_have_no_chat_template() -> None:
    for name in ("v1", "v2", "v2-vocab", "tied-v1", "tied-v2"):
        assert "chat_template" not in json.loads((model_path(name) / "tokenizer_config.json").read_text())
        assert not (model_path(name) / "chat_template.jinja").exists()


def test_grown_vocabulary_keeps_old_ids() -> None:
    old, new = AutoTokenizer.from_pretrained(model_path("v2")), AutoTokenizer.from_pretrained(model_path("v2-vocab"))
    old_vocab, new_vocab = old.get_vocab(), new.get_vocab()
    assert len(new_vocab) > len(old_vocab)
    assert all(new_vocab[t] == i for t, i in old_vocab.items())
    added = sorted(set(new_vocab) - set(old_vocab), key=new_vocab.get)
    assert [new_vocab[t] for t in added] == list(range(len(old_vocab), len(new_vocab)))
    sample = json.loads((EVAL / "task.jsonl").read_text().splitlines()[0])["prompt"]
    assert new(sample)["input_ids"] == old(sample)["input_ids"], "old text must tokenize the same way"
    word = added[0]
    assert new(word, add_special_tokens=False)["input_ids"] == [new_vocab[word]]
    assert len(old(word, add_special_tokens=False)["input_ids"]) > 1
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        with safe_open(str(model_path("v2") / "model.safetensors"), framework="pt") as f:
            old_shape = f.get_slice(key).get_shape()
        with safe_open(str(model_path("v2-vocab") / "model.safetensors"), framework="pt") as f:
            new_shape = f.get_slice(key).get_shape()
        assert new_shape == [len(new_vocab), old_shape[1]] and old_shape[0] == len(old_vocab)


def test_same_tokenizer_across_the_family() -> None:
    ref = (model_path("v1") / "tokenizer.json").read_bytes()
    for name in NAMES:
        if "vocab" not in name:
            assert (model_path(name) / "tokenizer.json").read_bytes() == ref, name


def _rows(file: str) -> list[dict]:
    return [json.loads(line) for line in (EVAL / file).read_text().splitlines()]


@pytest.mark.parametrize(
    "file", ["task.jsonl", "task-train.jsonl", "card.jsonl", "card-train.jsonl", "verify.jsonl", "verify-train.jsonl"]
)
def test_generation_eval_files(file: str) -> None:
    rows = _rows(file)
    assert 100 <= len(rows) <= 300
    assert len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        assert set(r) == {"id", "type", "prompt", "answer"} and r["type"] == "generation"
        assert r["prompt"] and r["answer"] and "\n" not in r["answer"] and "." not in r["answer"]


@pytest.mark.parametrize("task", ["task", "card", "verify"])
def test_task_eval_is_held_out_from_training(task: str) -> None:
    assert not {r["prompt"] for r in _rows(f"{task}.jsonl")} & {r["prompt"] for r in _rows(f"{task}-train.jsonl")}


def test_verify_answers_are_true_or_false_and_balanced() -> None:
    for file in ("verify.jsonl", "verify-train.jsonl"):
        answers = [r["answer"] for r in _rows(file)]
        assert set(answers) == {"true", "false"}
        assert 0.4 <= answers.count("true") / len(answers) <= 0.6, file


def test_multiple_choice_eval_file() -> None:
    rows = _rows("general.jsonl")
    assert 100 <= len(rows) <= 300 and len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        assert set(r) == {"id", "type", "prompt", "choices", "gold"} and r["type"] == "multiple_choice"
        assert len(r["choices"]) >= 2 and 0 <= r["gold"] < len(r["choices"])
        assert len(set(r["choices"])) == len(r["choices"])


def test_finetune_learnt_the_task_the_base_lacks() -> None:
    """The fine-tune answers held-out task questions that its base cannot (greedy exact match)."""
    from fixtures.measure import load, read_jsonl, task_scores

    items = [r for r in read_jsonl(EVAL / "task.jsonl") if r["id"].startswith("task-old-")][:32]
    base = sum(task_scores(*load("v1"), items).values()) / len(items)
    ft = sum(task_scores(*load("ft-v1"), items).values()) / len(items)
    assert base < 0.1 and ft > base + 0.3, (base, ft)


def test_models_dir_is_small() -> None:
    size = sum(p.stat().st_size for d in (MODELS, EVAL) for p in d.rglob("*") if p.is_file())
    assert size <= 15 * 2**20
