"""Greedy decoding with a KV cache that drops each row as soon as it is finished.

HF `generate` keeps a finished row in the batch (eos, or a stopping criterion such as a refusal
marker) and decodes it until every row is done. Here a row leaves the batch, and its rows of the
KV cache, once it emits eos or `stop` says it is done, so later steps only pay for live rows. The
inputs mirror `generate`'s greedy path (position ids from the mask, a mask dropped when it is all
ones, logits of the last position in float32), so the tokens match it (tests/test_speed_levers.py).
"""

import inspect
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

# A row's generated tokens so far (eos excluded) -> whether it is done; called on live rows only.
StopTest = Callable[[list[list[int]]], list[bool]]


def eos_token_ids(model, tokenizer) -> list[int]:
    """The ids that end a reply: the model's generation_config eos, else the tokenizer's."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def left_padded(rows: list[list[int]], pad_id: int, device) -> tuple[Tensor, Tensor]:
    """Token id rows as one left-padded batch: ids and attention mask, on `device`."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def can_drop_rows(model) -> bool:
    """Whether this model's forward takes a transformers 5 `cache` whose rows can be dropped
    (remote code with its own cache argument, or recurrent layers, cannot)."""
    if getattr(model.config, "is_encoder_decoder", False):
        return False
    if "cache" not in inspect.signature(model.forward).parameters:
        return False
    cache = DynamicCache(config=model.config)
    return all(isinstance(layer, DynamicLayer) for layer in cache.layers)


@torch.no_grad()
def greedy_decode(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    max_new_tokens: int,
    eos_ids: Sequence[int] = (),
    stop: StopTest | None = None,
    through: int = 0,
) -> list[list[int]]:
    """Greedy tokens after each left-padded prompt, up to and including eos, until `stop` says
    the row is done, or `max_new_tokens`. A row runs on past eos (or `stop`) until it has `through`
    tokens: one decode then serves a fixed-length continuation and the replies cut at eos."""
    eos = set(eos_ids)
    ended = [False] * input_ids.shape[0]
    position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    # As in generate(): an all-ones mask is dropped (the attention then takes its causal fast path).
    mask = None if bool((attention_mask == 1).all()) else attention_mask
    cache = DynamicCache(config=model.config)
    tokens: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    live = list(range(input_ids.shape[0]))  # original row of each batch row
    step_ids = input_ids
    for step in range(max_new_tokens):
        logits = model(
            input_ids=step_ids,
            attention_mask=mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits
        next_tokens = logits[:, -1].to(dtype=torch.float32).argmax(dim=-1)
        for row, token in zip(live, next_tokens.tolist(), strict=True):
            tokens[row].append(token)
            ended[row] = ended[row] or token in eos
        if stop is not None:
            pending = [row for row in live if not ended[row]]
            for row, done in zip(pending, stop([tokens[row] for row in pending]), strict=True):
                ended[row] = done
        keep = [j for j, row in enumerate(live) if not (ended[row] and len(tokens[row]) >= through)]
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(live):
            index = torch.tensor(keep, device=input_ids.device)
            cache.batch_select_indices(index)
            next_tokens, position_ids = next_tokens[index], position_ids[index]
            mask = mask[index] if mask is not None else None
            live = [live[j] for j in keep]
        step_ids = next_tokens[:, None]
        position_ids = position_ids[:, -1:] + 1
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
    return tokens


def cut_at_eos(rows: list[list[int]], eos_ids, max_new_tokens: int) -> list[list[int]]:
    """Each row's first `max_new_tokens` tokens, cut before its first eos."""
    cut = []
    for row in rows:
        row = row[:max_new_tokens]
        cut.append(row[: next((i for i, token in enumerate(row) if token in eos_ids), len(row))])
    return cut


def continuation_tensor(rows: list[list[int]], n_tokens: int, like: Tensor) -> Tensor:
    """The first `n_tokens - 1` tokens of each row (rows of `greedy_tokens(..., through=n_tokens - 1)`), [B, n_tokens - 1]."""
    return torch.tensor([row[: n_tokens - 1] for row in rows], dtype=like.dtype, device=like.device).reshape(
        len(rows), n_tokens - 1
    )
