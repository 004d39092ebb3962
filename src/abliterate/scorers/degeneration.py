"""Degeneration: harmless replies that loop or run to the token limit where the original's did not.

KL over a few tokens barely sees a reply that repeats "Dear [Neighbor's Name]" six times; this does.
By default it is reported for the exported trial (`scorers.default_scorers`, `study.report_scorers`);
with report_scorers=completed, on every completed trial too. Pruned trials never pay for it
(`passes.TrialPass`).
"""

import torch
from torch import Tensor
from torchmetrics.aggregation import SumMetric

from abliterate.scorers.base import Decode, Observations, Scorer


def degenerate(tokens: list[int], limit: int, ngram: int, repeats: int) -> bool:
    """The reply ran to `limit` tokens, or it loops."""
    return len(tokens) >= limit or loops(tokens, ngram, repeats)


def loops(tokens: list[int], ngram: int = 4, repeats: int = 3) -> bool:
    """Some `ngram`-token sequence occurs `repeats` times in the reply."""
    counts: dict[tuple[int, ...], int] = {}
    for start in range(len(tokens) - ngram + 1):
        key = tuple(tokens[start : start + ngram])
        counts[key] = counts.get(key, 0) + 1
        if counts[key] >= repeats:
            return True
    return False


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
        flags = self._flags(obs.replies(self.max_new_tokens))
        self.new.update(flags.sum().float())
        self.total.update(float(len(flags)))
        return {"degenerate": flags}

    def original_value(self) -> float:
        # Counted against the original's own replies, the original adds no degenerate reply. (Its share
        # of looping or unfinished replies is a property of the prompts and max_new_tokens: 0.8 on
        # smollm2-refusal at 24 tokens, shown as "before" it read as if ablation had cured them.)
        return 0.0

    def decodes(self, original: bool) -> Decode:
        return Decode(steps=self.max_new_tokens)

    def update(self, obs: Observations) -> None:
        # Only prompts whose original reply did not degenerate can add one, so only they are decoded
        # (0.2 of smollm2-refusal's at 24 tokens). Plain greedy replies: checking the original's
        # replies in one teacher-forced pass first and generating only where a reply departs was 1.5x
        # slower on smollm2-refusal's ablated trials, whose replies mostly depart (docs/benchmarks.md).
        open_rows = (~obs.reference(f"{self.name}.degenerate").bool()).nonzero().flatten()
        new = self._flags(obs.select(open_rows).replies(self.max_new_tokens)).sum().float() if len(open_rows) else 0.0
        self.new.update(new)
        self.total.update(float(len(obs.ids)))

    def compute(self) -> float:
        total = float(self.total.compute())
        return float(self.new.compute()) / total if total else 0.0
