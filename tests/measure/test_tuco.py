"""TuCo decomposition and α-steering on tiny real Llama checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from patchlab.errors import PatchlabError
from patchlab.io.hf import load_model
from patchlab.measure.evaluate import encode_choice
from patchlab.measure.tuco import IncompatibleModelsError, TuCo, TuCoReport, cumulative_tuco, tuco_value
from tests._tiny_llama import make_pair, make_tokenizer, save_model

PROMPTS = [
    "the capital of france is",
    "a cat",
    "question: what is two plus two? answer:",
    "the dog sat on the mat",
]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("tuco"), noise=0.2)


@pytest.fixture(scope="module")
def tuco(pair):
    t = TuCo.load(pair[0], pair[1], device="cpu")
    yield t
    t.close()


def encode(tok, prompts):
    enc = [tok(p)["input_ids"] for p in prompts]
    width = max(map(len, enc))
    ids = torch.zeros((len(enc), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, e in enumerate(enc):
        ids[r, : len(e)] = torch.tensor(e)
        mask[r, : len(e)] = 1
    return ids, mask


def test_kernel_hand_values():
    p = torch.tensor([1.0, -2.0])
    f = torch.tensor([0.5, 0.5])
    assert float(tuco_value(p, f)) == pytest.approx(1.0 / 4.0)
    assert float(tuco_value(torch.zeros(2), torch.zeros(2))) == 0.0
    per = cumulative_tuco(torch.tensor([[1.0, 0.0], [0.0, -2.0]]), torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    # after layer 0: F=1, P=1 -> 0.5; after layer 1: F=1, P=3 -> 0.25
    assert per.tolist() == pytest.approx([0.5, 0.25])


def test_identity_decomposition(tuco):
    ids, mask = encode(tuco.tokenizer, PROMPTS)
    d = tuco.decompose(ids, mask, full=True)
    assert d.ptc.shape[0] == 2 and d.ptc.dtype == torch.float32
    recon = d.x0 + d.ptc.sum(0) + d.ftc.sum(0)
    real = mask.bool()
    assert torch.allclose(recon[real], d.xL[real], atol=1e-5, rtol=1e-5)
    # xL is the fine-tuned model's own last hidden state: the head on it gives the model's logits
    head = tuco.model.lm_head(tuco.model.model.norm(d.xL))
    assert torch.allclose(head[real], d.logits[real], atol=1e-5)


def test_alpha_one_reproduces_finetuned_logits(pair, tuco):
    ft, tok = load_model(pair[1], device="cpu")
    ids, mask = encode(tok, PROMPTS)
    with torch.no_grad():
        want = ft(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(tuco.logits(ids, mask, alpha=1.0), want)
    # the x + PTC + α·FTC path itself (α just off 1) lands on the same logits
    near = tuco.logits(ids, mask, alpha=1.0 + 1e-7)
    assert torch.allclose(near[mask.bool()], want[mask.bool()], atol=1e-4)
    far = tuco.logits(ids, mask, alpha=1.5)
    assert not torch.allclose(far[mask.bool()], want[mask.bool()], atol=1e-3)


def test_alpha_zero_is_base_blocks_on_finetuned_embeddings(pair, tuco):
    hybrid, tok = load_model(pair[0], device="cpu")
    ft, _ = load_model(pair[1], device="cpu")
    with torch.no_grad():
        hybrid.model.embed_tokens.weight.copy_(ft.model.embed_tokens.weight)
        hybrid.model.norm.weight.copy_(ft.model.norm.weight)
        hybrid.lm_head.weight.copy_(ft.lm_head.weight)
        ids, mask = encode(tok, PROMPTS)
        want = hybrid(input_ids=ids, attention_mask=mask).logits
    got = tuco.logits(ids, mask, alpha=0.0)
    assert torch.allclose(got[mask.bool()], want[mask.bool()], atol=1e-5)


def test_tuco_of_model_against_itself_is_zero(pair):
    same = TuCo.load(pair[1], pair[1], device="cpu")
    rep = same.measure(PROMPTS)
    assert all(r.tuco == 0.0 and r.ftc_l1 == 0.0 and r.ptc_l1 > 0 for r in rep.results)
    assert all(v == 0.0 for r in rep.results for v in r.per_layer)


def test_tuco_values_and_padding_invariance(tuco):
    batched = tuco.measure(PROMPTS, batch_size=4)
    single = tuco.measure(PROMPTS, batch_size=1)
    for a, b in zip(batched.results, single.results, strict=True):
        assert 0.0 < a.tuco < 1.0
        assert a.tuco == pytest.approx(b.tuco, abs=1e-5)
        assert a.per_layer == pytest.approx(b.per_layer, abs=1e-5)
        assert a.ptc_l1 == pytest.approx(b.ptc_l1, rel=1e-5)
        assert len(a.per_layer) == 2 and a.per_layer[-1] == pytest.approx(a.tuco)
        assert a.tuco == pytest.approx(a.ftc_l1 / (a.ptc_l1 + a.ftc_l1))
    # the value at the last token of a padded row equals a direct computation on that row alone
    ids, mask = encode(tuco.tokenizer, PROMPTS[1:2])
    d = tuco.decompose(ids, mask, full=True)
    t = float(tuco_value(d.ptc[:, 0, -1].sum(0), d.ftc[:, 0, -1].sum(0)))
    assert batched.results[1].tuco == pytest.approx(t, abs=1e-5)
    again = TuCoReport.from_json(json.loads(batched.dumps()))
    assert again == batched


def test_refuses_different_depth_or_width(tmp_path, pair):
    from transformers import LlamaForCausalLM

    from tests._tiny_llama import llama_config

    tok = make_tokenizer()
    deep = save_model(LlamaForCausalLM(llama_config(len(tok), layers=3)), tok, tmp_path / "deep")
    wide = save_model(LlamaForCausalLM(llama_config(len(tok), hidden=48)), tok, tmp_path / "wide")
    with pytest.raises(IncompatibleModelsError, match="num_hidden_layers 2 \\(base\\) vs 3"):
        TuCo.load(pair[0], deep, device="cpu")
    with pytest.raises(IncompatibleModelsError, match="hidden_size 32 \\(base\\) vs 48"):
        TuCo.load(pair[0], wide, device="cpu")


def test_steered_scoring_and_generation(tmp_path, tuco):
    tok = tuco.tokenizer
    rows = [
        {
            "id": "m",
            "type": "multiple_choice",
            "prompt": "the capital of france is",
            "choices": [" paris", " cat"],
            "gold": 0,
        },
        {"id": "g", "type": "generation", "prompt": "a cat", "answer": "sat"},
    ]
    task = tmp_path / "mix.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    alpha = 1.25
    res = tuco.evaluate(alpha, task, max_new_tokens=5, stop=None)
    got = {i.id: i for i in res.instances}
    # manual α-scaled scoring
    want = []
    for c in rows[0]["choices"]:
        ctx, cont = encode_choice(tok, rows[0]["prompt"], c)
        lg = torch.log_softmax(tuco.logits(torch.tensor([ctx + cont]), alpha=alpha)[0], -1)
        want.append(sum(float(lg[len(ctx) - 1 + j, t]) for j, t in enumerate(cont)))
    assert got["m"].details["choice_logprobs"] == pytest.approx(want, abs=1e-4)
    # manual α-scaled greedy decoding, no cache
    ids = tok("a cat")["input_ids"]
    out: list[int] = []
    for _ in range(5):
        nxt = int(tuco.logits(torch.tensor([ids + out]), alpha=alpha)[0, -1].argmax())
        if nxt == tok.eos_token_id:
            break
        out.append(nxt)
    assert got["g"].details["raw_generation"] == tok.decode(out, skip_special_tokens=True)
    assert tuco.layers[0].alpha == 1.0  # restored after the block


def test_steered_generation_batched_equals_one_by_one(tmp_path, tuco):
    rows = [{"id": f"g{i}", "type": "generation", "prompt": p, "answer": "x"} for i, p in enumerate(PROMPTS)]
    task = tmp_path / "gen.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    one = tuco.evaluate(0.8, task, batch_size=1, max_new_tokens=4, stop=None)
    many = tuco.evaluate(0.8, task, batch_size=4, max_new_tokens=4, stop=None)
    assert [i.prediction for i in one.instances] == [i.prediction for i in many.instances]
    assert any(i.prediction for i in one.instances)


def test_prompt_longer_than_context_refused(tuco):
    from patchlab.measure.evaluate import PromptTooLongError

    with pytest.raises(PromptTooLongError, match="over the model's context length 64"):
        tuco.measure(["the cat sat on the mat " * 20])


def test_chat_template_prompts(tuco):
    with pytest.raises(PatchlabError, match="chat template"):
        tuco.measure(["a cat"], chat=True)
    tok = tuco.tokenizer
    tok.chat_template = "{% for m in messages %}question: {{ m['content'] }}\n{% endfor %}answer:"
    try:
        ids = tuco.encode("what is two plus two?", chat=True)
        assert tok.decode(ids) == "question: what is two plus two?\nanswer:"
        chat = tuco.measure(["what is two plus two?"], chat=True).results[0]
        plain = tuco.measure(["question: what is two plus two?\nanswer:"]).results[0]
        # same text; the plain prompt also gets the BOS token, so the values are close but measured separately
        assert chat.n_tokens == plain.n_tokens - 1 and 0.0 < chat.tuco < 1.0
    finally:
        tok.chat_template = None


def test_tokenizer_difference_is_reported(tmp_path):
    """TuCo across checkpoints whose tokenizers differ is defined (the fine-tune tokenises and embeds) and said."""
    from patchlab.measure.tuco import tokenizer_note
    from tests.factory import WORDS, make_model

    a = make_model(tmp_path / "a")
    b = make_model(tmp_path / "b", words=WORDS + ["extra"])
    c = make_model(tmp_path / "c", from_model=a, noise=0.01)
    assert tokenizer_note(a, c) is None
    note = tokenizer_note(a, b)
    assert note and "tokenizers differ" in note and "fine-tune" in note
