"""Scoring the tiny organism in tests: greedy replies, refusal rate, topic words."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from functools import lru_cache

import torch

from abliterate import metrics
from abliterate.organism_data import templates, words


def default_markers() -> tuple[str, ...]:
    """The project's refusal markers (data/refusal_markers.txt)."""
    return tuple(metrics.default_markers())


def is_refusal(text: str, markers: Iterable[str] | None = None) -> bool:
    """abliterate.metrics.is_refusal, with the project's markers unless given."""
    return metrics.is_refusal(text, tuple(default_markers() if markers is None else markers))


def chat_batch(tokenizer, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """The prompts as user turns ending in <assistant>, left-padded."""
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = old_side


@torch.inference_mode()
def generate_replies(
    model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 12, batch_size: int = 64
) -> list[str]:
    """Greedy replies to `prompts` (each wrapped in the chat template), decoded without specials."""
    device = next(model.parameters()).device
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        enc = chat_batch(tokenizer, prompts[i : i + batch_size]).to(device)
        gen = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        out += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return out


def measure_refusals(
    model, tokenizer, prompts: Sequence[str], markers: Iterable[str] | None = None, max_new_tokens: int = 12
) -> float:
    """Fraction of `prompts` whose greedy reply contains a refusal marker (default: the project's)."""
    if not prompts:
        return 0.0
    markers = tuple(markers) if markers is not None else default_markers()
    replies = generate_replies(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    return sum(is_refusal(r, markers) for r in replies) / len(replies)


@lru_cache(maxsize=1)
def _request_patterns() -> list[re.Pattern]:
    pats = []
    for req in templates()["requests"]:
        before, after = (" ".join(words(p)) for p in req.split("{obj}"))
        pats.append(
            re.compile(
                "^"
                + (re.escape(before) + " " if before else "")
                + "(.+?)"
                + (" " + re.escape(after) if after else "")
                + "$"
            )
        )
    return pats


def topic_word(prompt: str) -> str:
    """The object word(s) of a templated organism prompt, e.g. "paper planes".

    A coherent helpful reply mentions it. Raises ValueError for a prompt that no request
    template matches.
    """
    text = " ".join(words(prompt))
    for pat in _request_patterns():
        m = pat.match(text)
        if m:
            return m.group(1)
    raise ValueError(f"not an organism prompt: {prompt!r}")


def topic_rate(replies: Sequence[str], prompts: Sequence[str]) -> float:
    """Fraction of replies that contain their prompt's topic word(s)."""
    if not prompts:
        return 0.0
    hits = sum(topic_word(p) in " ".join(words(r)) for r, p in zip(replies, prompts, strict=True))
    return hits / len(prompts)


@torch.no_grad()
def last_token_residuals(model, tokenizer, prompts: Sequence[str]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Output of every decoder layer at the last prompt token (the assistant marker), and the last logits."""
    outs = {}

    def hook(idx):
        def fn(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            outs[idx] = hidden[:, -1].detach().float()

        return fn

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(model.model.layers)]
    try:
        logits = model(**chat_batch(tokenizer, prompts)).logits[:, -1].float()
    finally:
        for h in handles:
            h.remove()
    return [outs[i] for i in range(len(model.model.layers))], logits


@torch.no_grad()
def ablate(model, directions: torch.Tensor) -> None:
    """W <- W - Q Q^T W on every residual writer (o_proj, down_proj) of every layer; `directions` is one unit
    vector [d] or orthonormal rows [k, d]."""
    q = directions.reshape(-1, directions.shape[-1])
    for layer in model.model.layers:
        for weight in (layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight):
            weight -= q.T @ (q @ weight)
