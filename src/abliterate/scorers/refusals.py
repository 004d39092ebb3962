"""Refusal rate by markers: the default first objective."""

import torch

from abliterate.metrics import RefusalRate
from abliterate.scorers.base import Observations, Scorer


class MarkerRefusals(Scorer):
    """Share of harmful prompts whose greedy reply contains a refusal marker (`evaluation.markers`)."""

    name = "refusals"
    role = "eval_harmful"
    is_refusal_rate = True

    def __init__(self, markers: list[str] | None = None, direction: str = "minimize"):
        """
        Args:
            markers: refusal marker substrings; None uses the module's (`evaluation.markers`).
            direction: minimize, maximize, or report.
        """
        super().__init__(direction)
        self.markers = markers
        self.rate = RefusalRate(markers)

    def update(self, obs: Observations) -> None:
        self.rate.update(obs.responses())

    def compute(self) -> float:
        return self.rate.compute().item()

    def bound(self, strategy, total: int) -> float:
        # Refusals only grow as more prompts are answered: refusals so far / all prompts is a lower bound.
        counts = torch.stack([self.rate.refusals, self.rate.total]).float()
        refusals, _ = (int(v) for v in strategy.reduce(counts, reduce_op="sum"))
        return refusals / total
