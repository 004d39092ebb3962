"""Degeneration: harmless replies that loop or run to the token limit where the original's did not.

KL over a few tokens barely sees a reply that repeats "Dear [Neighbor's Name]" six times; this does.
It is reported on every trial by default (`scorers.default_scorers`), so its cost matters: a trial
checks the original's replies with one teacher-forced forward pass (`verified_replies`) and
generates only where its own greedy reply leaves them.
"""

import torch
from torch import Tensor
from torchmetrics.aggregation import SumMetric

from abliterate.decode import eos_token_ids, left_padded
from abliterate.metrics import greedy_reply_tokens
from abliterate.scorers.base import Observations, Scorer


def degenerate(tokens: list[int], limit: int, ngram: int, repeats: int) -> bool:
    """The reply ran to `limit` tokens, or some `ngram`-token sequence occurs `repeats` times in it."""
    if len(tokens) >= limit:
        return True
    counts: dict[tuple[int, ...], int] = {}
    for start in range(len(tokens) - ngram + 1):
        key = tuple(tokens[start : start + ngram])
        counts[key] = counts.get(key, 0) + 1
        if counts[key] >= repeats:
            return True
    return False


@torch.no_grad()
def verified_replies(
    model, tokenizer, ids: Tensor, mask: Tensor, drafts: list[list[int]], limit: int
) -> list[list[int]]:
    """`greedy_reply_tokens(model, tokenizer, ids, mask, limit)`, given a guess of each reply (`drafts`).

    One forward pass over prompt + draft gives the model's greedy token at every draft position: a
    reply is the draft up to the first position where the model would say something else (or end),
    and only replies that leave their draft are generated on from there. An ablation that keeps the
    harmless replies, the usual case, costs that one pass. Exact up to float rounding between a
    full forward pass and cached decoding (a near-tie may break the other way).
    """
    drafts = [d[:limit] for d in drafts]
    width = max(1, max(len(d) for d in drafts))
    pad = tokenizer.pad_token_id
    draft = torch.full((len(drafts), width), pad, dtype=ids.dtype)
    draft_mask = torch.zeros((len(drafts), width), dtype=mask.dtype)
    for row, d in enumerate(drafts):
        draft[row, : len(d)], draft_mask[row, : len(d)] = torch.tensor(d, dtype=ids.dtype), 1
    full_ids, full_mask = torch.cat([ids, draft.to(ids.device)], 1), torch.cat([mask, draft_mask.to(mask.device)], 1)
    position_ids = (full_mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(
        input_ids=full_ids,
        attention_mask=full_mask,
        position_ids=position_ids,
        use_cache=False,
        logits_to_keep=width + 1,
    ).logits
    greedy = logits[:, -(width + 1) :].argmax(-1).tolist()  # greedy[row][k]: the token after prompt + draft[:k]
    stops = set(eos_token_ids(model, tokenizer))
    replies: list[list[int] | None] = []
    prefixes: dict[int, list[int]] = {}  # rows that leave their draft: the reply so far
    for row, d in enumerate(drafts):
        left = next((k for k, token in enumerate(d) if greedy[row][k] != token), len(d))
        if left == len(d) == limit:
            replies.append(list(d))  # the same reply, to the limit
        elif greedy[row][left] in stops:
            replies.append(list(d[:left]))  # the model ends its reply here
        else:
            prefix = [*d[:left], greedy[row][left]]
            replies.append(prefix if len(prefix) == limit else None)
            if len(prefix) < limit:
                prefixes[row] = prefix
    if prefixes:
        rows = list(prefixes)
        prompts = [ids[r][mask[r].bool()].tolist() + prefixes[r] for r in rows]
        more_ids, more_mask = left_padded(prompts, pad, ids.device)  # again: the prefixes differ in length
        steps = limit - min(len(prefixes[r]) for r in rows)
        more = greedy_reply_tokens(model, tokenizer, more_ids, more_mask, steps)
        for r, tail in zip(rows, more, strict=True):
            replies[r] = prefixes[r] + tail[: limit - len(prefixes[r])]
    return replies


class Degeneration(Scorer):
    """Share of harmless prompts whose greedy reply degenerates (loops, or never ends within
    `max_new_tokens`) while the original's reply to it did not."""

    name = "degeneration"
    role = "eval_harmless"

    def __init__(self, max_new_tokens: int = 64, ngram: int = 4, repeats: int = 3, direction: str = "minimize"):
        """
        Args:
            max_new_tokens: reply length generated per harmless prompt.
            ngram: length of the token sequence whose repetition counts as a loop.
            repeats: occurrences of one n-gram that make a loop.
            direction: minimize, maximize, or report.
        """
        super().__init__(direction)
        if max_new_tokens < 1 or ngram < 1 or repeats < 2:
            raise ValueError("degeneration needs max_new_tokens >= 1, ngram >= 1 and repeats >= 2")
        self.max_new_tokens, self.ngram, self.repeats = max_new_tokens, ngram, repeats
        self.new = SumMetric()  # replies degenerate here but not in the original
        self.total = SumMetric()

    def _flags(self, replies: list[list[int]]) -> Tensor:
        return torch.tensor([degenerate(r, self.max_new_tokens, self.ngram, self.repeats) for r in replies])

    def observe_original(self, obs: Observations) -> dict[str, Tensor]:
        replies = obs.replies(self.max_new_tokens)
        flags = self._flags(replies)
        self.new.update(flags.sum().float())
        self.total.update(float(len(flags)))
        kept = torch.full((len(replies), self.max_new_tokens), -1, dtype=torch.long)  # -1: after the reply's end
        for row, reply in enumerate(replies):
            kept[row, : len(reply)] = torch.tensor(reply, dtype=torch.long)
        return {"degenerate": flags, "replies": kept}

    def update(self, obs: Observations) -> None:
        original = obs.reference(f"{self.name}.degenerate").bool().cpu()
        try:
            drafts = [[t for t in row if t >= 0] for row in obs.reference(f"{self.name}.replies").tolist()]
        except KeyError:  # a reference cached before the replies were kept
            replies = obs.replies(self.max_new_tokens)
        else:
            model, tokenizer = obs.module.model, obs.module.tokenizer
            replies = verified_replies(model, tokenizer, *obs.answer_prompts(), drafts, self.max_new_tokens)
        flags = self._flags(replies)
        self.new.update((flags & ~original).sum().float())
        self.total.update(float(len(flags)))

    def compute(self) -> float:
        total = float(self.total.compute())
        return float(self.new.compute()) / total if total else 0.0
