"""Evaluation runner: score a causal LM checkpoint on JSONL tasks through ``transformers``.

- multiple choice: each choice is scored by the summed log-likelihood of its tokens after the prompt;
  prediction = argmax. Also length-normalised (log-likelihood / characters of the choice, like
  lm-eval's ``acc_norm``). Batched, right-padded.
- generation: greedy decoding, ``max_new_tokens``, cut at the first stop string; correct = exact match
  after SQuAD normalisation; score = SQuAD token F1. Batched, left-padded, grouped by stop strings.

Prompts that do not fit the model's context (``max_position_embeddings``) raise
:class:`PromptTooLongError` unless ``on_overflow="truncate"``, which drops prompt tokens from the left and
reports the count per instance (``truncated``) and per task (``n_truncated``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from patchlab.errors import PatchlabError, PromptTooLongError
from patchlab.measure.results import EvalResult, InstanceResult, summarise
from patchlab.measure.tasks import Instance, Task, cut_at_stop, exact_match, load_task, token_f1

OVERFLOW_POLICIES = ("error", "truncate")



def prompt_hash(prompt: str) -> str:
    """Stable hash of a prompt, stored with each result so flips can refuse changed prompts."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def context_length(model: Any) -> int | None:
    """Maximum sequence length of a model, from its config; None when the config does not say."""
    n = getattr(model.config, "max_position_embeddings", None)
    return int(n) if n else None


def encode_choice(tokenizer: Any, prompt: str, choice: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids of one choice.

    Trailing whitespace of the prompt moves to the continuation; the pair is encoded whole and split
    after the context's tokens (as lm-eval does), falling back to separate encoding if the tokenizer
    merges across the boundary.
    """
    n_sp = len(prompt) - len(prompt.rstrip())
    if n_sp:
        choice = prompt[-n_sp:] + choice
        prompt = prompt[:-n_sp]
    whole = tokenizer(prompt + choice)["input_ids"]
    ctx = tokenizer(prompt)["input_ids"]
    if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        return ctx, whole[len(ctx) :]
    return ctx, tokenizer(choice, add_special_tokens=False)["input_ids"]


def _batches(order: Sequence[int], size: int) -> Iterable[list[int]]:
    for i in range(0, len(order), size):
        yield list(order[i : i + size])


@torch.no_grad()
def sequence_logprobs(
    model: Any, seqs: Sequence[Sequence[int]], n_conts: Sequence[int], *, batch_size: int = 8
) -> list[float]:
    """Summed log-probability of the last ``n_conts[i]`` tokens of each sequence given the rest.

    Right-padded batches (longest first); positions are 0..len-1 per row, so padding does not change
    the values beyond float noise.
    """
    dev = next(model.parameters()).device
    out = [0.0] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    for idx in _batches(order, batch_size):
        width = max(len(seqs[i]) for i in idx) - 1
        inp = torch.zeros((len(idx), width), dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            s = seqs[i]
            inp[r, : len(s) - 1] = torch.tensor(s[:-1])
            mask[r, : len(s) - 1] = 1
        logits = model(input_ids=inp.to(dev), attention_mask=mask.to(dev), use_cache=False).logits
        for r, i in enumerate(idx):
            s, n = seqs[i], n_conts[i]
            lg = logits[r, len(s) - 1 - n : len(s) - 1].float()
            tgt = torch.tensor(s[len(s) - n :], device=lg.device)
            out[i] = float(torch.log_softmax(lg, dim=-1).gather(-1, tgt[:, None]).sum())
    return out


def _fit(ids: list[int], budget: int, where: str, on_overflow: str, what: str) -> tuple[list[int], int]:
    """Drop tokens from the left of ``ids`` to fit ``budget``, or raise, per the overflow policy."""
    if len(ids) <= budget:
        return ids, 0
    if on_overflow == "error":
        raise PromptTooLongError(
            f"{where}: {what} is {len(ids)} tokens, over the model's context budget of {budget}; "
            "shorten the prompt or pass on_overflow='truncate' (--truncate) to drop prompt tokens from "
            "the left (the count is reported per instance)"
        )
    return ids[len(ids) - budget :], len(ids) - budget


def _run_multiple_choice(
    model: Any, tokenizer: Any, task: str, items: list[Instance], batch_size: int, on_overflow: str
) -> list[InstanceResult]:
    max_len = context_length(model)
    seqs: list[list[int]] = []
    n_conts: list[int] = []
    owner: list[tuple[int, int]] = []
    truncated = [0] * len(items)
    for k, inst in enumerate(items):
        for c, choice in enumerate(inst.choices):
            ctx, cont = encode_choice(tokenizer, inst.prompt, choice)
            where = f"task {task!r} id {inst.id!r} choice {c}"
            if not ctx:
                raise PromptTooLongError(f"{where}: the prompt encodes to no tokens; give a non-blank prompt")
            if not cont:
                raise PatchlabError(f"{where}: the choice encodes to no tokens; give a non-empty choice")
            seq = ctx + cont
            if max_len is not None:
                # the last token is never an input: a sequence of max_len + 1 tokens fits
                if len(cont) >= max_len:
                    raise PromptTooLongError(
                        f"{where}: the choice alone is {len(cont)} tokens, not less than the context "
                        f"length {max_len}; it cannot be scored even with truncation"
                    )
                seq, cut = _fit(seq, max_len + 1, where, on_overflow, "prompt + choice")
                truncated[k] = max(truncated[k], cut)
            seqs.append(seq)
            n_conts.append(len(cont))
            owner.append((k, c))
    lps = sequence_logprobs(model, seqs, n_conts, batch_size=batch_size)
    per_item: list[list[float]] = [[0.0] * len(inst.choices) for inst in items]
    for (k, c), lp in zip(owner, lps, strict=True):
        per_item[k][c] = lp
    results = []
    for k, inst in enumerate(items):
        lp = per_item[k]
        norm = [v / len(ch) for v, ch in zip(lp, inst.choices, strict=True)]
        pred = max(range(len(lp)), key=lambda i: lp[i])
        pred_n = max(range(len(norm)), key=lambda i: norm[i])
        results.append(
            InstanceResult(
                task=task,
                id=inst.id,
                type=inst.type,
                prediction=pred,
                gold=inst.gold,
                correct=pred == inst.gold,
                score=lp[pred],
                truncated=truncated[k],
                prompt_hash=prompt_hash(inst.prompt),
                details={
                    "choice_logprobs": lp,
                    "choice_logprobs_norm": norm,
                    "prediction_norm": pred_n,
                    "correct_norm": pred_n == inst.gold,
                },
            )
        )
    return results


class _StopOnStrings:
    """Stops a row once its decoded continuation contains a stop string (the text is cut afterwards).

    transformers' own ``stop_strings`` needs a tokenizer whose vocabulary round-trips through
    ``convert_tokens_to_string``, which word-level tokenizers do not; decoding is exact for every tokenizer.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str], prompt_width: int):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.width = prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.width :].tolist(), skip_special_tokens=True)
        done = [any(s in t for s in self.stop) for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def greedy_generate(
    model: Any,
    tokenizer: Any,
    prompts_ids: Sequence[list[int]],
    max_new_tokens: int,
    *,
    stop: Sequence[str] | None = None,
    batch_size: int = 8,
    use_cache: bool = True,
) -> list[list[int]]:
    """Greedy continuation token ids of each prompt (up to, not including, EOS), left-padded batches.

    ``use_cache=False`` decodes without a KV cache (an α-steered TuCo model must: see ``TuCo.evaluate``).
    """
    from transformers import GenerationConfig, StoppingCriteriaList

    dev = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    cfg = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=eos,
        use_cache=use_cache,
    )
    out: list[list[int]] = [[] for _ in prompts_ids]
    order = sorted(range(len(prompts_ids)), key=lambda i: -len(prompts_ids[i]))
    for idx in _batches(order, batch_size):
        width = max(len(prompts_ids[i]) for i in idx)
        inp = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            p = prompts_ids[i]
            inp[r, width - len(p) :] = torch.tensor(p)
            mask[r, width - len(p) :] = 1
        criteria = StoppingCriteriaList([_StopOnStrings(tokenizer, stop, width)]) if stop else None
        gen = model.generate(
            input_ids=inp.to(dev), attention_mask=mask.to(dev), generation_config=cfg, stopping_criteria=criteria
        )
        new = gen[:, width:].tolist()
        for r, i in enumerate(idx):
            toks = []
            for t in new[r]:
                if t in eos_ids:
                    break
                toks.append(t)
            out[i] = toks[:max_new_tokens]
    return out


def _run_generation(
    model: Any,
    tokenizer: Any,
    task: str,
    items: list[Instance],
    batch_size: int,
    on_overflow: str,
    default_max_new: int,
    default_stop: Sequence[str] | None,
    use_cache: bool = True,
) -> list[InstanceResult]:
    max_len = context_length(model)
    prompts: list[list[int]] = []
    truncated: list[int] = []
    budgets: list[int] = []
    stops: list[tuple[str, ...]] = []
    for inst in items:
        mnt = inst.max_new_tokens or default_max_new
        where = f"task {task!r} id {inst.id!r}"
        ids = tokenizer(inst.prompt)["input_ids"]
        if not ids:
            raise PromptTooLongError(f"{where}: the prompt encodes to no tokens; give a non-blank prompt")
        cut = 0
        if max_len is not None:
            if mnt >= max_len:
                raise PromptTooLongError(
                    f"{where}: max_new_tokens={mnt} leaves no room for the prompt in the context length "
                    f"{max_len}; lower max_new_tokens"
                )
            ids, cut = _fit(ids, max_len - mnt, where, on_overflow, f"the prompt (+ {mnt} new tokens)")
        prompts.append(ids)
        truncated.append(cut)
        budgets.append(mnt)
        stops.append(tuple(inst.stop) if inst.stop is not None else tuple(default_stop or ()))
    # One generate call per (stop strings, budget): a row must never stop on another row's stop string.
    texts: list[str] = [""] * len(items)
    groups: dict[tuple[tuple[str, ...], int], list[int]] = {}
    for k in range(len(items)):
        groups.setdefault((stops[k], budgets[k]), []).append(k)
    for (stop, mnt), ks in groups.items():
        gen = greedy_generate(
            model, tokenizer, [prompts[k] for k in ks], mnt, stop=stop, batch_size=batch_size, use_cache=use_cache
        )
        for k, toks in zip(ks, gen, strict=True):
            texts[k] = cut_at_stop(tokenizer.decode(toks, skip_special_tokens=True), stop)
    results = []
    for k, inst in enumerate(items):
        pred = texts[k].strip()
        results.append(
            InstanceResult(
                task=task,
                id=inst.id,
                type=inst.type,
                prediction=pred,
                gold=inst.gold_value,
                correct=exact_match(pred, inst.answers),
                score=token_f1(pred, inst.answers),
                truncated=truncated[k],
                prompt_hash=prompt_hash(inst.prompt),
                details={"raw_generation": texts[k], "max_new_tokens": budgets[k], "stop": list(stops[k])},
            )
        )
    return results


def _as_tasks(tasks: Task | str | Path | Iterable[Task | str | Path]) -> list[Task]:
    if isinstance(tasks, (Task, str, Path)):
        tasks = [tasks]
    out = [t if isinstance(t, Task) else load_task(t) for t in tasks]
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        raise PatchlabError(f"two tasks share a name ({names}); rename one of the files")
    if not out:
        raise PatchlabError("no tasks given; pass at least one JSONL task file")
    return out


def evaluate(
    model: Any,
    tasks: Task | str | Path | Iterable[Task | str | Path],
    *,
    tokenizer: Any = None,
    batch_size: int = 8,
    device: str = "auto",
    dtype: torch.dtype | str | None = None,
    max_new_tokens: int = 32,
    stop: Sequence[str] | None = ("\n",),
    on_overflow: str = "error",
    model_name: str | None = None,
    use_cache: bool = True,
) -> EvalResult:
    """Evaluate a checkpoint directory (or a loaded model + tokenizer) on task files.

    ``stop`` and ``max_new_tokens`` are defaults for generation instances that set none. Task files are
    validated before the model is loaded. ``device``/``dtype`` apply when loading from a path; a loaded
    model is used where it is. ``use_cache=False`` generates without a KV cache.
    """
    if on_overflow not in OVERFLOW_POLICIES:
        raise PatchlabError(f"on_overflow must be one of {OVERFLOW_POLICIES}, got {on_overflow!r}")
    if batch_size < 1:
        raise PatchlabError(f"batch_size must be >= 1, got {batch_size}")
    task_list = _as_tasks(tasks)
    if isinstance(model, (str, Path)):
        name = model_name or str(model)
        from patchlab.engine.devices import resolve_device
        from patchlab.io.hf import load_model

        model, loaded_tok = load_model(model, device=resolve_device(device), dtype=dtype)
        tokenizer = tokenizer or loaded_tok
    else:
        name = model_name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        if tokenizer is None:
            raise PatchlabError("a loaded model needs its tokenizer: pass tokenizer=...")
    was_training = model.training
    model.eval()
    instances: list[InstanceResult] = []
    try:
        for task in task_list:
            mc = [i for i in task.instances if i.type == "multiple_choice"]
            gen = [i for i in task.instances if i.type == "generation"]
            got: dict[str, InstanceResult] = {}
            if mc:
                for r in _run_multiple_choice(model, tokenizer, task.name, mc, batch_size, on_overflow):
                    got[r.id] = r
            if gen:
                for r in _run_generation(
                    model, tokenizer, task.name, gen, batch_size, on_overflow, max_new_tokens, stop, use_cache
                ):
                    got[r.id] = r
            instances.extend(got[i.id] for i in task.instances)
    finally:
        model.train(was_training)
    dev = next(model.parameters()).device
    return EvalResult(
        model=name,
        tasks=summarise(instances),
        instances=instances,
        settings={
            "batch_size": batch_size,
            "device": str(dev),
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "max_new_tokens": max_new_tokens,
            "stop": list(stop) if stop else [],
            "on_overflow": on_overflow,
            "context_length": context_length(model),
            "task_sources": {t.name: t.source for t in task_list},
            "length_normalisation": "characters of the choice",
        },
    )
