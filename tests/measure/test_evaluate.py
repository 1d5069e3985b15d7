"""Evaluation runner on a tiny real Llama checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from patchlab.io.hf import load_model
from patchlab.measure.evaluate import PromptTooLongError, encode_choice, evaluate
from patchlab.measure.flips import compare
from patchlab.measure.results import EvalResult
from patchlab.measure.tasks import TaskFormatError, exact_match, load_task, normalize_answer, token_f1
from tests._tiny_llama import make_pair


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def loaded(pair):
    return load_model(pair[0], device="cpu")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


MC_ROWS = [
    {
        "id": "q1",
        "type": "multiple_choice",
        "prompt": "the capital of france is",
        "choices": [" paris", " cat", " mat"],
        "gold": 0,
    },
    {
        "id": "q2",
        "type": "multiple_choice",
        "prompt": "two plus two is ",
        "choices": ["four", "a dog on the log"],
        "gold": 0,
    },
    {
        "id": "q3",
        "type": "multiple_choice",
        "prompt": "the dog sat on the",
        "choices": [" log", " mat", " m"],
        "gold": 1,
    },
]


def manual_logprob(model, tok, prompt, choice):
    ctx, cont = encode_choice(tok, prompt, choice)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    return sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))


def manual_greedy(model, tok, prompt, n):
    ids = tok(prompt)["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            out.append(nxt)
    return tok.decode(out, skip_special_tokens=True)


def test_multiple_choice_matches_manual_loglikelihood(tmp_path, pair, loaded):
    model, tok = loaded
    task = write_jsonl(tmp_path / "general.jsonl", MC_ROWS)
    res = evaluate(pair[0], task, batch_size=4, device="cpu")
    assert list(res.tasks) == ["general"] and res.tasks["general"].n == 3
    for row, inst in zip(MC_ROWS, res.instances, strict=True):
        want = [manual_logprob(model, tok, row["prompt"], c) for c in row["choices"]]
        assert inst.details["choice_logprobs"] == pytest.approx(want, abs=1e-4)
        assert inst.prediction == max(range(len(want)), key=want.__getitem__)
        assert inst.correct == (inst.prediction == row["gold"])
        norm = [w / len(c) for w, c in zip(want, row["choices"], strict=True)]
        assert inst.details["prediction_norm"] == max(range(len(norm)), key=norm.__getitem__)
        assert inst.score == pytest.approx(want[inst.prediction], abs=1e-4)
    acc = sum(i.correct for i in res.instances) / 3
    assert res.tasks["general"].accuracy == pytest.approx(acc)


def test_batching_does_not_change_results(tmp_path, loaded):
    model, tok = loaded
    task = write_jsonl(tmp_path / "general.jsonl", MC_ROWS)
    one = evaluate(model, task, tokenizer=tok, batch_size=1)
    many = evaluate(model, task, tokenizer=tok, batch_size=8)
    for a, b in zip(one.instances, many.instances, strict=True):
        assert a.prediction == b.prediction
        assert a.details["choice_logprobs"] == pytest.approx(b.details["choice_logprobs"], abs=1e-4)


def test_generation_greedy_exact_match_and_stop(tmp_path, loaded):
    model, tok = loaded
    prompts = ["the capital of france is", "question: what is two plus two? answer:", "a cat"]
    greedy = [manual_greedy(model, tok, p, 6) for p in prompts]
    rows = [
        {"id": "g0", "type": "generation", "prompt": prompts[0], "answer": greedy[0]},
        {"id": "g1", "type": "generation", "prompt": prompts[1], "answer": ["zzz", "qqq"]},
        {"id": "g2", "type": "generation", "prompt": prompts[2], "answer": greedy[2], "max_new_tokens": 3},
    ]
    task = write_jsonl(tmp_path / "task.jsonl", rows)
    res = evaluate(model, task, tokenizer=tok, batch_size=3, max_new_tokens=6, stop=None)
    got = {i.id: i for i in res.instances}
    assert got["g0"].details["raw_generation"] == greedy[0]
    assert got["g0"].prediction == greedy[0].strip()
    if normalize_answer(greedy[0]):
        assert got["g0"].correct and got["g0"].score == 1.0
    assert not got["g1"].correct and got["g1"].gold == ["zzz", "qqq"]
    # per-instance budget: 3 new tokens only
    assert got["g2"].details["raw_generation"] == manual_greedy(model, tok, prompts[2], 3)
    # stop strings cut the text at the first occurrence
    text = greedy[1]
    assert len(text) >= 2, "the tiny model should produce some text"
    stop_at = text[1]
    rows2 = [{"id": "s", "type": "generation", "prompt": prompts[1], "answer": "x", "stop": [stop_at]}]
    res2 = evaluate(model, write_jsonl(tmp_path / "stop.jsonl", rows2), tokenizer=tok, max_new_tokens=6)
    assert res2.instances[0].details["raw_generation"] == text[: text.index(stop_at)]
    # decoding stops early once the stop string appears
    from patchlab.measure.evaluate import greedy_generate

    full = greedy_generate(model, tok, [tok(prompts[1])["input_ids"]], 6)[0]
    early = greedy_generate(model, tok, [tok(prompts[1])["input_ids"]], 6, stop=[stop_at])[0]
    assert early == full[: len(early)] and len(early) < len(full)
    assert stop_at in tok.decode(early) and stop_at not in tok.decode(early[:-1])


def test_generation_batched_equals_one_by_one(tmp_path, loaded):
    model, tok = loaded
    rows = [
        {"id": f"g{i}", "type": "generation", "prompt": p, "answer": "x"}
        for i, p in enumerate(["the capital", "question: what is two plus two? answer:", "a", "the dog sat on"])
    ]
    task = write_jsonl(tmp_path / "gen.jsonl", rows)
    a = evaluate(model, task, tokenizer=tok, batch_size=1, max_new_tokens=5, stop=None)
    b = evaluate(model, task, tokenizer=tok, batch_size=4, max_new_tokens=5, stop=None)
    assert [i.prediction for i in a.instances] == [i.prediction for i in b.instances]


def test_prompt_too_long(tmp_path, loaded):
    model, tok = loaded
    long_prompt = "the cat sat on the mat " * 20  # well over 64 tokens
    rows = [{"id": "long", "type": "multiple_choice", "prompt": long_prompt, "choices": [" a", " b"], "gold": 0}]
    task = write_jsonl(tmp_path / "long.jsonl", rows)
    with pytest.raises(PromptTooLongError, match="over the model's context budget of 65"):
        evaluate(model, task, tokenizer=tok)
    res = evaluate(model, task, tokenizer=tok, on_overflow="truncate")
    assert res.instances[0].truncated > 0 and res.tasks["long"].n_truncated == 1
    grow = [{"id": "long", "type": "generation", "prompt": long_prompt, "answer": "x"}]
    gtask = write_jsonl(tmp_path / "glong.jsonl", grow)
    with pytest.raises(PromptTooLongError, match="new tokens"):
        evaluate(model, gtask, tokenizer=tok, max_new_tokens=4)
    res = evaluate(model, gtask, tokenizer=tok, max_new_tokens=4, on_overflow="truncate")
    assert res.instances[0].truncated == len(tok(long_prompt)["input_ids"]) - (64 - 4)
    with pytest.raises(PromptTooLongError, match="lower max_new_tokens"):
        evaluate(model, gtask, tokenizer=tok, max_new_tokens=64, on_overflow="truncate")


@pytest.mark.parametrize(
    "row, message",
    [
        ({"id": "1", "type": "ranking", "prompt": "p"}, "unknown task type 'ranking'"),
        ({"id": "1", "prompt": "p", "answer": "a"}, "unknown task type None"),
        ({"id": "1", "type": "multiple_choice", "prompt": "p", "choices": ["a"], "gold": 0}, "at least two"),
        (
            {"id": "1", "type": "multiple_choice", "prompt": "p", "choices": ["a", "b"], "gold": 2},
            "choice index",
        ),
        ({"id": "1", "type": "generation", "prompt": "", "answer": "a"}, "non-empty string"),
        ({"id": "1", "type": "generation", "prompt": "p", "answer": 3}, '"answer" must be'),
        ({"id": "1", "type": "generation", "prompt": "p", "answer": "a", "max_new_tokens": 0}, "positive"),
    ],
)
def test_task_validation(tmp_path, row, message):
    f = write_jsonl(tmp_path / "t.jsonl", [row])
    with pytest.raises(TaskFormatError, match=message) as e:
        load_task(f)
    assert "line 1" in str(e.value)


def test_task_file_errors(tmp_path):
    with pytest.raises(TaskFormatError, match="unknown task file format '.csv'"):
        (tmp_path / "t.csv").write_text("a,b\n")
        load_task(tmp_path / "t.csv")
    f = tmp_path / "dup.jsonl"
    write_jsonl(f, [{"id": "1", "type": "generation", "prompt": "p", "answer": "a"}] * 2)
    with pytest.raises(TaskFormatError, match="duplicate id '1'"):
        load_task(f)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(TaskFormatError, match="no instances"):
        load_task(tmp_path / "empty.jsonl")


def test_squad_normalisation():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert exact_match("an apple.", ["Apple"]) and not exact_match("apples", ["apple"])
    assert token_f1("the big red dog", ["red dog"]) == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert token_f1("", [""]) == 1.0 and token_f1("x", ["y"]) == 0.0


def test_results_round_trip_and_flips(tmp_path, pair):
    task = write_jsonl(tmp_path / "general.jsonl", MC_ROWS)
    old = evaluate(pair[0], task, device="cpu")
    new = evaluate(pair[1], task, device="cpu")
    path = old.save(tmp_path / "old.json")
    again = EvalResult.load(path)
    assert again == old
    rep = compare(old.flip_records(), new.flip_records())
    s = rep.groups["general"]
    assert s.n == 3
    assert s.accuracy_old == pytest.approx(old.tasks["general"].accuracy)
    assert s.accuracy_new == pytest.approx(new.tasks["general"].accuracy)
    nf = sorted(i.id for i, j in zip(old.instances, new.instances, strict=True) if i.correct and not j.correct)
    assert s.negative_flip_ids == nf


def test_bad_arguments(tmp_path, loaded):
    from patchlab.errors import CheckpointNotFoundError, PatchlabError
    from patchlab.measure.tuco import TuCo

    model, tok = loaded
    task = write_jsonl(tmp_path / "general.jsonl", MC_ROWS)
    with pytest.raises(CheckpointNotFoundError, match="no config.json"):
        evaluate(tmp_path / "nowhere", task)
    with pytest.raises(CheckpointNotFoundError, match="no config.json"):
        TuCo.load(tmp_path / "nowhere", tmp_path / "nowhere")
    with pytest.raises(PatchlabError, match="on_overflow"):
        evaluate(model, task, tokenizer=tok, on_overflow="drop")
    with pytest.raises(PatchlabError, match="tokenizer"):
        evaluate(model, task)
    with pytest.raises(TaskFormatError, match="not found"):
        evaluate(model, tmp_path / "missing.jsonl", tokenizer=tok)
