"""Reasoning models: where a reply's thinking block ends, and generation with a thinking budget.

A thinking model's reply is `open thought close answer`. The block is opened by the model
(Qwen3: it writes `<think>`; gpt-oss: `<|channel|>analysis<|message|>`) or by the template
(DeepSeek-R1: the generation prompt ends in `<think>`); with Qwen3's `enable_thinking=False`
the template closes an empty block itself and the reply is all answer. Judging a reply from its
first token judges the thought: refusal markers in a deliberation count as refusals, and a
refusal after a long thought is never reached within `max_new_tokens`.

So when a template thinks (`detect_thinking`), a reply is generated in two steps (`think`):
the thought, greedily, up to `evaluation.think_tokens`, stopped at the close tag (or the close
tag appended when the budget runs out); then the answer, from prompt + thought, which the
refusal scorers judge and the KL scorer teacher-forces on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor
from transformers import StoppingCriteria, StoppingCriteriaList

from abliterate.decode import eos_token_ids
from abliterate.metrics import _greedy_generate

PAD_MARK, SEP_MARK = -1, -2
"""Packed continuations (`pack`) pad thoughts with PAD_MARK and end them with SEP_MARK: never token ids."""


@dataclass(frozen=True)
class ThinkingFormat:
    """How one model marks its thinking block."""

    open: str
    close: str
    force: str
    """appended when the budget runs out before the close tag."""


def template_text(tokenizer, chat_template: str | None = None) -> str:
    """The chat template the prompts are rendered with (the override, else every template the tokenizer has)."""
    from abliterate.prompts import _template_text

    own = getattr(tokenizer, "chat_template", None)
    if chat_template and isinstance(own, dict) and chat_template in own:  # one of the tokenizer's, by name
        return str(own[chat_template])
    template = _template_text(chat_template) if chat_template else own
    if isinstance(template, dict):
        return "\n".join(str(t) for t in template.values())
    if isinstance(template, list):  # [{"name": ..., "template": ...}]
        return "\n".join(str(t.get("template", "")) for t in template if isinstance(t, dict))
    return template or ""


@lru_cache(maxsize=64)
def _detect(template: str, tags: tuple[tuple[str, ...], ...], mode: bool | None) -> ThinkingFormat | None:
    if mode is False or not tags:
        return None
    formats = [ThinkingFormat(t[0], t[1], t[2] if len(t) > 2 else t[1]) for t in tags]
    for fmt in formats:
        if fmt.open in template or fmt.close in template:
            return fmt
    if mode is True or "enable_thinking" in template:
        return formats[0]
    return None


def detect_thinking(template: str, tags: Sequence[Sequence[str]], mode: bool | None = None) -> ThinkingFormat | None:
    """The thinking format of a chat template, or None for a model scored from its first reply token.

    `mode` None (auto): a template that mentions a tag of `tags` (open or close) thinks in that
    format; one that mentions `enable_thinking` thinks in the first format. True: think, in the
    format the template mentions, else the first. False: never (replies judged from their first token).
    """
    return _detect(template, tuple(tuple(t) for t in tags), mode)


@dataclass
class Thoughts:
    """The thinking part of greedy replies to a batch of prompts."""

    prefixes: list[list[int]]
    """per prompt, the reply tokens up to and with the close tag (forced or not); [] for no thought."""
    texts: list[str]
    """per prompt, the thought between the tags ("" for none)."""
    forced: list[bool]
    """per prompt, whether the budget ran out and the close tag was appended."""


class _ThoughtStop(StoppingCriteria):
    """Stops a row when its thought closes, or at once when its reply does not start a thought."""

    def __init__(self, tokenizer, fmt: ThinkingFormat, prompt_length: int, inside: list[bool], eos_ids: set[int]):
        self.tokenizer, self.fmt, self.prompt_length, self.eos_ids = tokenizer, fmt, prompt_length, eos_ids
        self.start: list[int | None] = [0 if i else None for i in inside]  # where the thought starts in the text
        self.cut: list[int | None] = [None] * len(inside)  # reply tokens that make the thinking part
        self.closed = [False] * len(inside)
        self.done = torch.zeros(len(inside), dtype=torch.bool)

    def __call__(self, input_ids: Tensor, scores: Tensor | None = None, **kwargs) -> Tensor:
        new = input_ids[:, self.prompt_length :].cpu()
        n = new.shape[1]
        for row in (~self.done).nonzero().flatten().tolist():
            if int(new[row, -1]) in self.eos_ids:  # an answer-less end: inside a thought, close it
                self.done[row] = True
                self.cut[row] = n - 1 if self.start[row] is not None else 0
                continue
            text = self.tokenizer.decode(new[row], skip_special_tokens=False)
            if self.start[row] is None:
                head = text.lstrip()
                if head.startswith(self.fmt.open):
                    self.start[row] = text.index(self.fmt.open) + len(self.fmt.open)
                elif not self.fmt.open.startswith(head):  # an answer, no thought
                    self.done[row] = True
                    self.cut[row] = 0
                    continue
            if self.start[row] is not None and self.fmt.close in text[self.start[row] :]:
                self.done[row], self.cut[row], self.closed[row] = True, n, True
        return self.done.to(input_ids.device)


def opened_by_prompt(tokenizer, fmt: ThinkingFormat, input_ids: Tensor, attention_mask: Tensor) -> list[bool]:
    """Per prompt, whether it ends inside an open thinking block (the template opened it)."""
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(input_ids.cpu(), attention_mask.cpu(), strict=True)]
    texts = tokenizer.batch_decode(rows, skip_special_tokens=False)
    return [text.rfind(fmt.open) > text.rfind(fmt.close) if fmt.open in text else False for text in texts]


def _thought_text(tokenizer, fmt: ThinkingFormat, tokens: list[int]) -> str:
    text = tokenizer.decode(tokens, skip_special_tokens=False)
    if fmt.open in text:
        text = text.split(fmt.open, 1)[1]
    text = text.split(fmt.close, 1)[0]
    for special in tokenizer.all_special_tokens:
        text = text.replace(special, " ")
    return " ".join(text.split())


@torch.no_grad()
def think(model, tokenizer, input_ids: Tensor, attention_mask: Tensor, fmt: ThinkingFormat, budget: int) -> Thoughts:
    """Greedy thoughts after left-padded prompts: each stops at its close tag; one still open after
    `budget` reply tokens (or at eos) gets `fmt.force` appended; a reply that does not open a
    thought (and a prompt that did not) has none. The answer is the greedy continuation of
    prompt + prefix (`extend`)."""
    if budget < 1:
        raise ValueError(f"the thinking budget must be >= 1 token, got {budget}")
    inside = opened_by_prompt(tokenizer, fmt, input_ids, attention_mask)
    eos = set(eos_token_ids(model, tokenizer))
    stop = _ThoughtStop(tokenizer, fmt, input_ids.shape[1], inside, eos)
    new = _greedy_generate(
        model,
        input_ids,
        attention_mask,
        budget,
        tokenizer.pad_token_id,
        sorted(eos) or None,
        StoppingCriteriaList([stop]),
    ).tolist()
    force_ids = tokenizer(fmt.force, add_special_tokens=False)["input_ids"]
    prefixes, texts, forced = [], [], []
    for row, tokens in enumerate(new):
        cut = stop.cut[row]
        if cut is None:  # the budget ran out: inside a thought, or still undecided (blank)
            cut = len(tokens) if stop.start[row] is not None else 0
        opened = stop.start[row] is not None
        prefix = tokens[:cut] + (force_ids if opened and not stop.closed[row] else [])
        prefixes.append(prefix)
        texts.append(_thought_text(tokenizer, fmt, prefix) if opened else "")
        forced.append(opened and not stop.closed[row])
    return Thoughts(prefixes, texts, forced)


def extend(input_ids: Tensor, attention_mask: Tensor, suffixes: Sequence[Sequence[int]], pad_token_id: int):
    """Left-padded prompts with each row's `suffixes` appended, left-padded again: (ids, mask)."""
    rows = [
        ids[mask.bool()].tolist() + list(suffix)
        for ids, mask, suffix in zip(input_ids.cpu(), attention_mask.cpu(), suffixes, strict=True)
    ]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_token_id, dtype=input_ids.dtype)
    mask = torch.zeros((len(rows), width), dtype=attention_mask.dtype)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=input_ids.dtype)
        mask[i, width - len(row) :] = 1
    return ids.to(input_ids.device), mask.to(attention_mask.device)


def pack(prefixes: Sequence[Sequence[int]], width: int, answer: Tensor) -> Tensor:
    """One tensor per prompt for a reference cache: the thought (left-padded to `width` with
    PAD_MARK), SEP_MARK, then the answer tokens. Rows of every batch have the same width."""
    out = torch.full((len(prefixes), width + 1), PAD_MARK, dtype=torch.long)
    out[:, width] = SEP_MARK
    for i, prefix in enumerate(prefixes):
        if len(prefix) > width:
            raise ValueError(f"a thought of {len(prefix)} tokens does not fit the packed width {width}")
        if prefix:
            out[i, width - len(prefix) : width] = torch.tensor(list(prefix), dtype=torch.long)
    return torch.cat([out.to(answer.device), answer.long()], dim=1)


def is_packed(continuation: Tensor) -> bool:
    return bool(continuation.numel()) and bool((continuation == SEP_MARK).any())


def unpack(packed: Tensor) -> tuple[list[list[int]], Tensor]:
    """The thoughts and the answer tokens of a `pack`ed tensor."""
    sep = int((packed[0] == SEP_MARK).nonzero()[0])
    thoughts = [[t for t in row if t != PAD_MARK] for row in packed[:, :sep].tolist()]
    return thoughts, packed[:, sep + 1 :]
