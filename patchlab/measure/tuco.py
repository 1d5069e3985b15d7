"""TuCo: how much of a fine-tuned model's response to a prompt is owed to fine-tuning (Nuti et al. 2025).

On the fine-tuned model's own trajectory ``x_l`` (its hidden states), decoder block ``l`` splits into

- ``PTC_l = f_PT(x_l)`` with ``f_PT(x) = layer_PT(x) − x``: the *pre-trained* block applied to the FT state,
- ``FTC_l = f_FT(x_l) − PTC_l = layer_FT(x_l) − layer_PT(x_l)``,

so that ``x_L = x_0 + Σ_l PTC_l + Σ_l FTC_l`` exactly (up to fp32 rounding), and
``TuCo = ‖Σ FTC[last]‖₁ / (‖Σ PTC[last]‖₁ + ‖Σ FTC[last]‖₁)`` at the last (non-pad) prompt token.
``x_0`` is the fine-tuned model's embedding output and ``x_L`` the last block's output before the final
norm: changes fine-tuning made to the embeddings, final norm and LM head are not attributed.

The α-scaled forward runs ``x_{l+1} = x_l + PTC_l + α·FTC_l`` in every layer (α = 1 is the fine-tuned
model, α = 0 the pre-trained blocks on the fine-tuned embeddings/head).

Implementation: every decoder layer of the fine-tuned ``transformers`` model is wrapped in a
:class:`SteeredLayer` that holds the fine-tuned and the pre-trained layer. ``LlamaModel.forward`` itself
still embeds, builds the causal mask and the rotary embeddings and calls the layers, so masks, positions
and attention kernels are exactly those of transformers; both layers receive the same arguments.
Works for decoder-only models laid out as ``model.model.layers`` (Llama, Mistral, Qwen2, ...).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from patchlab.errors import IncompatibleModelsError, PatchlabError

# ---- pure kernels -----------------------------------------------------------------------------------


def tuco_value(ptc_sum: torch.Tensor, ftc_sum: torch.Tensor) -> torch.Tensor:
    """TuCo from summed components ``[..., hidden]``: ‖F‖₁ / (‖P‖₁ + ‖F‖₁) in fp32 (0 when both are 0)."""
    p = ptc_sum.float().abs().sum(-1)
    f = ftc_sum.float().abs().sum(-1)
    den = p + f
    return torch.where(den > 0, f / den.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(den))


def cumulative_tuco(ptc: torch.Tensor, ftc: torch.Tensor) -> torch.Tensor:
    """TuCo after each layer from per-layer components ``[L, ..., hidden]``: value l uses layers 0..l."""
    return tuco_value(ptc.float().cumsum(0), ftc.float().cumsum(0))


def last_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-pad token of each row (right or left padding alike)."""
    if not bool((attention_mask.sum(-1) > 0).all()):
        raise PatchlabError("a prompt has no tokens (all-pad row); give non-empty prompts")
    pos = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (attention_mask.long() * (pos + 1)).argmax(-1)


SUMMARY_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def tuco_summary(values: Sequence[float]) -> dict[str, float]:
    """Summary of per-prompt TuCo values: ``n``, ``mean``, ``min``, ``max`` and the quantiles ``p10``,
    ``p25``, ``p50``, ``p75``, ``p90`` (linear interpolation, numpy's default). ``values`` is non-empty."""
    from patchlab.measure.results import quantile

    v = sorted(values)
    if not v:
        raise PatchlabError("no TuCo values to summarise; measure at least one prompt")
    return {
        "n": len(v),
        "mean": sum(values) / len(v),
        "min": v[0],
        "max": v[-1],
        **{f"p{round(q * 100)}": quantile(v, q) for q in SUMMARY_QUANTILES},
    }


# ---- the steered layer --------------------------------------------------------------------------------


class _Recorder:
    """Collects fp32 components of each layer: at the given row positions, or all positions when full."""

    def __init__(self, last: torch.Tensor | None, full: bool):
        self.last = last
        self.full = full
        self.ptc: list[torch.Tensor] = []
        self.ftc: list[torch.Tensor] = []
        self.x0: torch.Tensor | None = None
        self.xL: torch.Tensor | None = None

    def take(self, t: torch.Tensor) -> torch.Tensor:
        if self.full or self.last is None:
            return t.detach().clone()
        return t[torch.arange(t.shape[0], device=t.device), self.last.to(t.device)].detach().clone()


class SteeredLayer(nn.Module):
    """A decoder layer computing ``x + PTC + α·FTC`` from a fine-tuned and a pre-trained layer.

    At α = 1 without recording it returns the fine-tuned layer's output untouched (KV cache allowed);
    otherwise both layers run on the same input and no KV cache may be passed (the pre-trained
    layer would write into the fine-tuned layer's cache slot).
    """

    def __init__(self, finetuned: nn.Module, pretrained: nn.Module, index: int):
        super().__init__()
        self.finetuned = finetuned
        self.pretrained = pretrained
        self.index = index
        self.alpha = 1.0
        self.recorder: _Recorder | None = None
        self.is_last = False

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        ft_out = self.finetuned(hidden_states, *args, **kwargs)
        if self.alpha == 1.0 and self.recorder is None:
            return ft_out
        if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            raise PatchlabError(
                "the α-steered model runs without a KV cache; call generate(..., use_cache=False) "
                "(patchlab.measure.evaluate does this for you)"
            )
        pt_out = self.pretrained(hidden_states, *args, **kwargs)
        x = hidden_states.float()
        ptc = pt_out.float() - x
        ftc = ft_out.float() - pt_out.float()
        rec = self.recorder
        if rec is not None:
            if self.index == 0:
                rec.x0 = rec.take(x)
            rec.ptc.append(rec.take(ptc))
            # the steered model's fine-tuning component is α·FTC (α = 1: the fine-tune's own)
            rec.ftc.append(rec.take(ftc if self.alpha == 1.0 else self.alpha * ftc))
        out = ft_out if self.alpha == 1.0 else (x + ptc + self.alpha * ftc).to(hidden_states.dtype)
        if rec is not None and self.is_last:
            rec.xL = rec.take(out.float())
        return out


# ---- results ------------------------------------------------------------------------------------------


@dataclass
class TuCoResult:
    """TuCo of one prompt, with the L1 norms it is made of and the cumulative value after each layer."""

    id: str
    tuco: float
    ptc_l1: float
    ftc_l1: float
    per_layer: list[float]
    n_tokens: int


@dataclass
class TuCoReport:
    base: str
    finetuned: str
    results: list[TuCoResult]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def mean(self) -> float:
        return sum(r.tuco for r in self.results) / len(self.results) if self.results else float("nan")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean_tuco"] = self.mean
        return d

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TuCoReport:
        return cls(
            base=data["base"],
            finetuned=data["finetuned"],
            results=[TuCoResult(**r) for r in data["results"]],
            settings=dict(data.get("settings", {})),
        )

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=True)


@dataclass
class Decomposition:
    """Raw components of one forward: ``ptc``/``ftc`` are ``[L, B, hidden]`` at the last tokens (or
    ``[L, B, T, hidden]`` when full); ``x0``/``xL`` likewise without the layer axis; ``logits`` of the FT
    model ``[B, T, V]``."""

    ptc: torch.Tensor
    ftc: torch.Tensor
    x0: torch.Tensor
    xL: torch.Tensor
    last: torch.Tensor
    logits: torch.Tensor


# ---- the model pair -----------------------------------------------------------------------------------


def _layers(model: nn.Module, which: str) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise IncompatibleModelsError(
            f"the {which} model ({type(model).__name__}) has no model.layers decoder stack; TuCo supports "
            "decoder-only models laid out like LlamaForCausalLM"
        )
    return layers


def check_compatible(base_config: Any, ft_config: Any) -> None:
    """Refuse pairs whose depth or width differ (no layer-by-layer correspondence)."""
    problems = []
    for key in ("num_hidden_layers", "hidden_size"):
        a, b = getattr(base_config, key, None), getattr(ft_config, key, None)
        if a != b:
            problems.append(f"{key} {a} (base) vs {b} (fine-tuned)")
    if problems:
        raise IncompatibleModelsError(
            "the base and fine-tuned models do not correspond layer by layer: "
            + "; ".join(problems)
            + ". TuCo needs the fine-tune's own base model."
        )


class TuCo:
    """A fine-tuned model and its base, wired for TuCo decomposition and α-steered forwards.

    The fine-tuned model's decoder layers are wrapped in place (undo with :meth:`close`); at α = 1 the
    wrapped model behaves exactly as the fine-tuned model. Use fp32 models for the decomposition.
    """

    def __init__(self, base: nn.Module, finetuned: nn.Module, tokenizer: Any, *, names: tuple[str, str] = ("", "")):
        check_compatible(base.config, finetuned.config)
        b_impl = getattr(base.config, "_attn_implementation", None)
        f_impl = getattr(finetuned.config, "_attn_implementation", None)
        if b_impl != f_impl:
            raise IncompatibleModelsError(
                f"the models use different attention implementations ({b_impl} vs {f_impl}); load both "
                "with the same attn_implementation"
            )
        dev_b = next(base.parameters()).device
        dev_f = next(finetuned.parameters()).device
        if dev_b != dev_f:
            raise IncompatibleModelsError(f"the models are on different devices ({dev_b} vs {dev_f})")
        self.base = base.eval()
        self.model = finetuned.eval()
        self.tokenizer = tokenizer
        # Set when base and fine-tune tokenizers differ: TuCo is still defined (prompts are tokenised and
        # embedded by the fine-tune; the base contributes only its blocks), but the user is told.
        self.tokenizer_note: str | None = None
        self.names = names
        pt_layers = _layers(base, "base")
        ft_layers = _layers(finetuned, "fine-tuned")
        if len(pt_layers) != len(ft_layers):
            raise IncompatibleModelsError(f"{len(pt_layers)} base layers vs {len(ft_layers)} fine-tuned layers")
        self._original = list(ft_layers)
        self.layers: list[SteeredLayer] = []
        for i, (ft_l, pt_l) in enumerate(zip(ft_layers, pt_layers, strict=True)):
            s = SteeredLayer(ft_l, pt_l, i)
            s.is_last = i == len(ft_layers) - 1
            ft_layers[i] = s
            self.layers.append(s)
        self.set_alpha(1.0)

    @classmethod
    def load(
        cls,
        base: str | Path,
        finetuned: str | Path,
        *,
        device: str = "auto",
        attn_implementation: str = "sdpa",
    ) -> TuCo:
        """Load both checkpoints in fp32 on ``device`` (refusing mismatched configs before the weights)."""
        from patchlab.engine.devices import resolve_device
        from patchlab.io.hf import checkpoint_dir, load_causal_lm, load_config, load_tokenizer

        dev = resolve_device(device)
        for p in (base, finetuned):
            checkpoint_dir(p)
        check_compatible(load_config(base), load_config(finetuned))
        b = load_causal_lm(base, dev, torch.float32, attn_implementation)
        f = load_causal_lm(finetuned, dev, torch.float32, attn_implementation)
        tok = load_tokenizer(finetuned)
        tc = cls(b, f, tok, names=(str(base), str(finetuned)))
        tc.tokenizer_note = tokenizer_note(Path(base), Path(finetuned))
        return tc

    def close(self) -> None:
        """Put the fine-tuned model's own layers back."""
        ft_layers = _layers(self.model, "fine-tuned")
        for i, layer in enumerate(self._original):
            ft_layers[i] = layer

    def set_alpha(self, alpha: float) -> None:
        """Scale the fine-tuning component by α in every layer (α = 1: the fine-tuned model)."""
        for s in self.layers:
            s.alpha = float(alpha)

    @contextmanager
    def steer(self, alpha: float) -> Iterator[nn.Module]:
        """The fine-tuned ``transformers`` model running ``x + PTC + α·FTC``; pass it to ``evaluate``."""
        old = self.layers[0].alpha
        self.set_alpha(alpha)
        try:
            yield self.model
        finally:
            self.set_alpha(old)

    def evaluate(self, alpha: float, tasks: Any, **kwargs: Any) -> Any:
        """``patchlab.measure.evaluate`` of the α-steered model (α ≠ 1 decodes without a KV cache, whose
        entries the steered layers do not keep)."""
        from patchlab.measure.evaluate import evaluate

        with self.steer(alpha) as m:
            return evaluate(m, tasks, tokenizer=self.tokenizer, use_cache=float(alpha) == 1.0, **kwargs)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, alpha: float = 1.0):
        """Logits of the α-scaled forward (fp32 models give fp32 logits)."""
        with self.steer(alpha) as m:
            return m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    @torch.no_grad()
    def decompose(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        full: bool = False,
        alpha: float = 1.0,
    ) -> Decomposition:
        """PTC/FTC of every layer on the fine-tuned trajectory for one right-padded batch; with α ≠ 1, on
        the α-steered trajectory ``x + PTC + α·FTC``, whose fine-tuning component is α·FTC."""
        dev = next(self.model.parameters()).device
        input_ids = input_ids.to(dev)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(dev)
        last = last_positions(attention_mask)
        rec = _Recorder(last, full)
        old = self.layers[0].alpha
        self.set_alpha(alpha)
        for s in self.layers:
            s.recorder = rec
        try:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        finally:
            for s in self.layers:
                s.recorder = None
            self.set_alpha(old)
        assert rec.x0 is not None and rec.xL is not None
        return Decomposition(
            ptc=torch.stack(rec.ptc), ftc=torch.stack(rec.ftc), x0=rec.x0, xL=rec.xL, last=last, logits=logits
        )

    def encode(self, prompt: str, *, chat: bool = False) -> list[int]:
        """Token ids of a prompt; ``chat`` wraps it as one user turn with the fine-tune's chat template and
        the generation prompt (the position the model answers from), as chat models see prompts."""
        if not chat:
            return list(self.tokenizer(prompt)["input_ids"])
        if not getattr(self.tokenizer, "chat_template", None):
            raise PatchlabError(
                "chat=True needs a tokenizer with a chat template; this fine-tune has none (measure raw prompts)"
            )
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def measure(
        self,
        prompts: Sequence[str],
        *,
        ids: Sequence[str] | None = None,
        batch_size: int = 8,
        chat: bool = False,
        alpha: float = 1.0,
    ) -> TuCoReport:
        """TuCo of each prompt (tokenised with the fine-tune's tokenizer, right-padded batches); ``chat``
        applies the chat template first (see :meth:`encode`); ``alpha`` measures the α-steered model."""
        if ids is not None and len(ids) != len(prompts):
            raise PatchlabError(f"{len(ids)} ids for {len(prompts)} prompts")
        names = [str(i) for i in ids] if ids is not None else [str(i) for i in range(len(prompts))]
        from patchlab.measure.evaluate import PromptTooLongError, context_length

        max_len = context_length(self.model)
        out: list[TuCoResult] = []
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            enc = [self.encode(p, chat=chat) for p in chunk]
            for j, e in enumerate(enc):
                if not e:
                    raise PatchlabError(f"prompt {names[start + j]!r} encodes to no tokens")
                if max_len is not None and len(e) > max_len:
                    raise PromptTooLongError(
                        f"prompt {names[start + j]!r} is {len(e)} tokens, over the model's context length "
                        f"{max_len}; shorten it (TuCo is measured at the prompt's last token, so it is not truncated)"
                    )
            width = max(len(e) for e in enc)
            inp = torch.zeros((len(enc), width), dtype=torch.long)
            mask = torch.zeros((len(enc), width), dtype=torch.long)
            for r, e in enumerate(enc):
                inp[r, : len(e)] = torch.tensor(e)
                mask[r, : len(e)] = 1
            d = self.decompose(inp, mask, alpha=alpha)
            p_sum, f_sum = d.ptc.sum(0), d.ftc.sum(0)
            values = tuco_value(p_sum, f_sum)
            per_layer = cumulative_tuco(d.ptc, d.ftc)
            for r in range(len(enc)):
                out.append(
                    TuCoResult(
                        id=names[start + r],
                        tuco=float(values[r]),
                        ptc_l1=float(p_sum[r].abs().sum()),
                        ftc_l1=float(f_sum[r].abs().sum()),
                        per_layer=[float(v) for v in per_layer[:, r]],
                        n_tokens=len(enc[r]),
                    )
                )
        return TuCoReport(
            base=self.names[0],
            finetuned=self.names[1],
            results=out,
            settings={
                "chat_template": chat,
                "alpha": float(alpha),
                "dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
                "norm": "L1",
                "token": "last non-pad",
            },
        )


def tokenizer_note(base: Path, finetuned: Path) -> str | None:
    """A one-line note when the two checkpoints' tokenizers differ, else None."""
    from patchlab.io.checkpoint import load_vocab
    from patchlab.kernels.vocab import same_ids

    vb, vf = load_vocab(base), load_vocab(finetuned)
    if vb is None or vf is None or (len(vb) == len(vf) and same_ids(vb, vf)):
        return None
    return (
        f"tokenizers differ (base {len(vb)} tokens, fine-tune {len(vf)}"
        + ("" if same_ids(vb, vf) else ", some ids moved")
        + "): prompts are tokenised and embedded by the fine-tune; the base contributes only its blocks"
    )
