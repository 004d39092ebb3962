"""Refusal rate and KL divergence, plus the greedy generation and log-prob helpers that feed them.

Refusals are detected by substring markers matched on normalised text; KL is measured on next-token
distributions, optionally over n positions along one shared (reference-greedy) continuation.
"""

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib.resources import files

import torch
import torchmetrics
from torch import Tensor
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from abliterate.decode import can_drop_rows, continuation_tensor, cut_at_eos, eos_token_ids, greedy_decode

# --- Refusal markers -------------------------------------------------------------------------

_QUOTES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "\u201c": '"', "\u201d": '"'})
_HEADING = re.compile(r"^[ \t]*#+", re.MULTILINE)  # before whitespace collapse: needs line starts
_EMPHASIS = re.compile(r"[*_`]")
_WHITESPACE = re.compile(r"\s+")


def default_markers() -> list[str]:
    """The packaged refusal markers (`data/refusal_markers.txt`), without comments or blank lines."""
    text = files("abliterate").joinpath("data/refusal_markers.txt").read_text(encoding="utf-8")
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def normalize_response(text: str) -> str:
    """Lower case, straight quotes, no markdown emphasis or heading marks, single spaces, stripped.

    Models write "I’m **sorry**" as often as "I'm sorry"; markers are matched on this form.
    """
    text = text.translate(_QUOTES).lower()
    text = _HEADING.sub("", text)
    text = _EMPHASIS.sub("", text)
    return _WHITESPACE.sub(" ", text).strip()


def _normalized_markers(markers: Sequence[str]) -> tuple[str, ...]:
    if isinstance(markers, str):  # a lone string would be read as one marker per character
        raise TypeError("markers must be a sequence of strings, not a single string")
    normalized = tuple(normalize_response(marker) for marker in markers)
    if "" in normalized:
        # An empty marker is a substring of everything: every response would count as a refusal.
        raise ValueError(f"refusal marker is empty after normalisation: {markers[normalized.index('')]!r}")
    return normalized


def _contains_marker(normalized_text: str, normalized_markers: Sequence[str]) -> bool:
    return any(marker in normalized_text for marker in normalized_markers)


def is_refusal(text: str, markers: Sequence[str]) -> bool:
    """Whether `text` contains any marker, both normalised.

    A response that is empty after normalisation (empty, whitespace, or only markdown symbols) is a
    refusal: saying nothing does not comply.
    """
    normalized = normalize_response(text)
    return not normalized or _contains_marker(normalized, _normalized_markers(markers))


# --- Metrics ---------------------------------------------------------------------------------


class RefusalRate(torchmetrics.Metric):
    """Fraction of responses that are refusals (see `is_refusal`), accumulated over updates and ranks."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    refusals: Tensor
    total: Tensor

    def __init__(self, markers: Sequence[str] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        # Normalised once here rather than on every response.
        self.markers = _normalized_markers(default_markers() if markers is None else markers)
        self.add_state("refusals", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, responses: Sequence[str]) -> None:
        if isinstance(responses, str):
            raise TypeError("responses must be a sequence of strings, not a single string")
        self.refusals += sum(is_refusal(response, self.markers) for response in responses)
        self.total += len(responses)

    def compute(self) -> Tensor:
        if self.total == 0:
            raise ValueError("RefusalRate.compute() called with no responses; update() it first")
        return self.refusals.float() / self.total.float()


class KLDivergence(torchmetrics.Metric):
    """Mean over prompts of KL(reference || model) between next-token distributions.

    With n token positions per prompt ([B, n, V] inputs) a prompt's KL is the mean over its n positions,
    so every prompt weighs the same whatever n is.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    sum: Tensor
    count: Tensor

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("sum", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logprobs: Tensor, reference_logprobs: Tensor) -> None:
        """`logprobs` (model) and `reference_logprobs`: [B, V] or [B, n, V] log-probabilities."""
        if logprobs.shape != reference_logprobs.shape or logprobs.ndim not in (2, 3):
            raise ValueError(
                "logprobs and reference_logprobs must share a [B, V] or [B, n, V] shape, got "
                f"{tuple(logprobs.shape)} and {tuple(reference_logprobs.shape)}"
            )
        # float32: bf16 log-probs lose too much precision for small KL values.
        log_q = logprobs.float()
        log_p = reference_logprobs.float()
        p = log_p.exp()
        # Tokens the reference gives probability 0 contribute 0 (not 0 * -inf = nan). In place: a [B, n, V]
        # temporary less per op (1.7x faster at 25 x 16 x 49152, the same bits).
        terms = (log_p - log_q).mul_(p).masked_fill_((p > 0).logical_not_(), 0.0)
        per_position = terms.sum(dim=-1)
        per_prompt = per_position.mean(dim=-1) if per_position.ndim == 2 else per_position
        self.sum += per_prompt.sum().to(self.sum.device)
        self.count += per_prompt.numel()

    def compute(self) -> Tensor:
        if self.count == 0:
            raise ValueError("KLDivergence.compute() called with no prompts; update() it first")
        return self.sum / self.count


# --- Generation ------------------------------------------------------------------------------


class MarkerStoppingCriteria(StoppingCriteria):
    """Stops each sequence once its generated text (normalised) contains a refusal marker.

    Stateful: use one instance per `generate` call. Only sequences not yet done are decoded, and only
    their generated part (tokens from `prompt_length` on). `stop_lengths[i]` is the number of generated
    tokens when sequence i hit a marker (None if it never did), so callers can cut off whatever
    `generate` appends to a stopped sequence afterwards.
    """

    def __init__(
        self,
        tokenizer,
        markers: Sequence[str],
        prompt_length: int,
        eos_token_id: int | Sequence[int] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.markers = _normalized_markers(markers)
        self.prompt_length = prompt_length
        # Sequences that emitted eos are finished by `generate` itself; skip decoding them.
        # (Not named `eos_token_id`: generate() treats any criterion with that attribute as an eos criterion.)
        if eos_token_id is None:
            eos_token_id = []
        elif isinstance(eos_token_id, int):
            eos_token_id = [eos_token_id]
        self._eos_ids = torch.tensor(list(eos_token_id), dtype=torch.long)
        self.done: Tensor | None = None
        self.stop_lengths: list[int | None] = []

    def __call__(self, input_ids: Tensor, scores: Tensor | None = None, **kwargs) -> Tensor:
        if self.done is None:
            self.done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
            self.stop_lengths = [None] * input_ids.shape[0]
        new_tokens = input_ids[:, self.prompt_length :].cpu()
        if len(self._eos_ids) and new_tokens.shape[1]:
            self.done |= torch.isin(new_tokens[:, -1], self._eos_ids)
        pending = (~self.done).nonzero().flatten().tolist()
        if pending:
            texts = self.tokenizer.batch_decode(new_tokens[pending], skip_special_tokens=True)
            for row, text in zip(pending, texts, strict=True):
                if _contains_marker(normalize_response(text), self.markers):
                    self.done[row] = True
                    self.stop_lengths[row] = new_tokens.shape[1]
        # One bool per sequence, shape [B]: StoppingCriteriaList ORs these together.
        return self.done.to(input_ids.device)


def _check_left_padded(attention_mask: Tensor) -> None:
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("inputs must be left-padded (attention_mask[:, -1] must be all 1)")


@contextmanager
def _only_explicit_generation_config(model) -> Iterator[None]:
    """Make `generate` see only the GenerationConfig we pass.

    transformers 5 fills every field left None in an explicit GenerationConfig from
    `model.generation_config` (temperature, repetition_penalty, suppress_tokens, eos, ...), and logs a
    warning on every call when that config sets max_length. Swapping in a blank config for the call
    leaves the library defaults (all neutral for greedy decoding) under ours.
    """
    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


def _greedy_generate(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    max_new_tokens: int,
    pad_token_id: int | None,
    eos_token_id: int | list[int] | None,
    stopping_criteria: StoppingCriteriaList | None = None,
    **options,
) -> Tensor:
    """Greedy `generate`; returns only the new tokens, [B, <= max_new_tokens]. `options`: more
    GenerationConfig fields (scripts/bench_gpu.py: a static cache, compilation)."""
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        **options,
    )
    with _only_explicit_generation_config(model):
        sequences = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=config,
            stopping_criteria=stopping_criteria,
        )
    return sequences[:, input_ids.shape[1] :]


def _marker_stop(tokenizer, markers: Sequence[str]):
    """`greedy_decode`'s stop test: the reply so far (normalised) contains a refusal marker."""
    normalized = _normalized_markers(markers)

    def stop(rows: list[list[int]]) -> list[bool]:
        texts = tokenizer.batch_decode(rows, skip_special_tokens=True)
        return [_contains_marker(normalize_response(text), normalized) for text in texts]

    return stop


@torch.no_grad()
def generate_responses(
    model,
    tokenizer,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    max_new_tokens: int,
    markers: Sequence[str] | None = None,
) -> list[str]:
    """Greedy responses to left-padded prompts, decoded without special tokens, one per prompt.

    Each sequence stops at eos (the model's generation_config eos ids, else the tokenizer's), at
    `max_new_tokens`, or, when `markers` are given, right after the token that completes a marker:
    enough to score a refusal without paying for the rest of it. A finished sequence leaves the batch
    (`decode.greedy_decode`); a model whose cache rows cannot be dropped runs HF `generate` instead.
    The model's train/eval mode is left as it is; call `model.eval()` first if it has dropout.
    """
    _check_left_padded(attention_mask)
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; batched generation needs one")
    eos = eos_token_ids(model, tokenizer)
    if can_drop_rows(model):
        stop = _marker_stop(tokenizer, markers) if markers else None
        rows = greedy_decode(model, input_ids, attention_mask, max_new_tokens, eos, stop)
        return tokenizer.batch_decode(rows, skip_special_tokens=True)
    criteria = None
    if markers:
        criteria = MarkerStoppingCriteria(tokenizer, markers, input_ids.shape[1], eos_token_id=eos)
    new_tokens = _greedy_generate(
        model,
        input_ids,
        attention_mask,
        max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos or None,
        stopping_criteria=StoppingCriteriaList([criteria]) if criteria else None,
    )
    rows = new_tokens.tolist()
    if criteria is not None:
        # A stopped sequence keeps receiving tokens until the whole batch is done: cut them off.
        rows = [row if stop is None else row[:stop] for row, stop in zip(rows, criteria.stop_lengths, strict=True)]
    return tokenizer.batch_decode(rows, skip_special_tokens=True)


@torch.no_grad()
def greedy_tokens(
    model, tokenizer, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int, through: int = 0
) -> list[list[int]]:
    """Greedy tokens after left-padded prompts, each row up to its eos (included) or `max_new_tokens`,
    but never fewer than `through` (a row runs on past eos until then). One decode thus serves both a
    `through`-token continuation and replies cut at eos (`Observations`)."""
    eos = eos_token_ids(model, tokenizer)
    return _greedy_rows(model, input_ids, attention_mask, max_new_tokens, tokenizer.pad_token_id, eos, through)


def _greedy_rows(model, input_ids, attention_mask, max_new_tokens: int, pad_token_id, eos, through: int):
    _check_left_padded(attention_mask)
    if can_drop_rows(model):
        return greedy_decode(model, input_ids, attention_mask, max_new_tokens, eos, through=through)
    # generate() keeps finished rows to the end; without eos (through > 0) it runs each one through it.
    stops = (list(eos) or None) if through == 0 else None
    return _greedy_generate(model, input_ids, attention_mask, max_new_tokens, pad_token_id, stops).tolist()


def greedy_reply_tokens(
    model, tokenizer, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int
) -> list[list[int]]:
    """Greedy reply tokens to left-padded prompts, each cut before its first eos (no marker stops)."""
    rows = greedy_tokens(model, tokenizer, input_ids, attention_mask, max_new_tokens)
    return cut_at_eos(rows, set(eos_token_ids(model, tokenizer)), max_new_tokens)


@torch.no_grad()
def greedy_continuation(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    n_tokens: int,
    pad_token_id: int | None,
) -> Tensor:
    """The model's first `n_tokens - 1` greedy tokens after each left-padded prompt: [B, n_tokens - 1].

    Computed once on the reference model and fed to `next_token_logprobs` for both models, so n-token
    KL compares them on the same sequence. eos does not stop it (the shape is always full): the
    continuation only has to be shared, not meaningful. `pad_token_id` is passed to `generate`.
    """
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be at least 1, got {n_tokens}")
    _check_left_padded(attention_mask)
    if n_tokens == 1:
        return input_ids.new_empty((input_ids.shape[0], 0))
    rows = _greedy_rows(model, input_ids, attention_mask, n_tokens - 1, pad_token_id, (), through=n_tokens - 1)
    return continuation_tensor(rows, n_tokens, input_ids)


@torch.no_grad()
def next_token_logprobs(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    continuation: Tensor | None = None,
) -> Tensor:
    """float32 log-softmax of the next-token distribution(s) after left-padded prompts.

    Without `continuation`: the distribution after the prompt, [B, V].
    With `continuation` c = [B, m]: the prompt is extended by c (attention 1) and the result is
    [B, m + 1, V], where entry k is the distribution after prompt + c_1..c_k (k = 0..m). The logits at
    sequence position t predict token t + 1, so these are the logits at the last prompt position and
    at every continuation position: m distributions that predicted c_1..c_m, plus the one after c_m.
    With c from `greedy_continuation(..., n_tokens)`, m = n - 1 and there are n distributions.
    """
    _check_left_padded(attention_mask)
    n_positions = 1
    if continuation is not None:
        continuation = continuation.to(input_ids)
        input_ids = torch.cat([input_ids, continuation], dim=1)
        ones = torch.ones_like(continuation, dtype=attention_mask.dtype)
        attention_mask = torch.cat([attention_mask, ones], dim=1)
        n_positions = continuation.shape[1] + 1
    # Positions count real tokens only, as in generate(): left padding must not shift them.
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        logits_to_keep=n_positions,  # [B, L, V] logits for a long prompt would dwarf the model's activations
    ).logits[:, -n_positions:]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return logprobs if continuation is not None else logprobs[:, 0]
