"""KL divergence from the original on harmless prompts, over the first n reply tokens."""

import torch
from torch import Tensor

from abliterate.metrics import KLDivergence
from abliterate.scorers.base import Decode, Observations, Scorer

ROUNDING = 1e-6
"""How far under 0 float rounding may put one prompt's KL (fp32 sums over a vocabulary)."""


class KL(Scorer):
    """KL(original || model) averaged over the first `tokens` reply positions, teacher-forced on the
    original's greedy reply, so a reply that drifts after a good first token costs KL."""

    name = "kl"
    role = "eval_harmless"

    def __init__(self, tokens: int = 16, direction: str = "minimize"):
        """
        Args:
            tokens: reply positions averaged (1: first token only, as heretic).
            direction: minimize, maximize, or report.
        """
        super().__init__(direction)
        if tokens < 1:
            raise ValueError(f"KL tokens must be >= 1, got {tokens}")
        self.tokens = tokens
        self.kl = KLDivergence()

    def observe_original(self, obs: Observations) -> dict[str, Tensor]:
        continuation = obs.continuation(self.tokens)
        return {"logprobs": obs.logprobs(continuation), "continuation": continuation}

    def original_value(self) -> float:
        return 0.0

    def decodes(self, original: bool) -> Decode:
        return Decode(self.tokens - 1, self.tokens - 1) if original else Decode()

    def update(self, obs: Observations) -> None:
        continuation = obs.reference(f"{self.name}.continuation")
        self.kl.update(obs.logprobs(continuation), obs.reference(f"{self.name}.logprobs"))

    def compute(self) -> float:
        return self.kl.compute().item()

    def bound(self, strategy, total: int) -> float:
        # A prompt's KL is >= 0, so the KL summed so far over all prompts bounds the mean from below.
        # Float rounding can leave an identical distribution's KL a hair under 0: allow that per prompt.
        # In float32 like compute(), so that once every prompt is seen the bound is the final value to the bit.
        so_far = torch.stack([self.kl.sum.detach().float(), self.kl.count.detach().float()])
        kl_sum, seen = strategy.reduce(so_far, reduce_op="sum")
        return ((kl_sum - ROUNDING * (total - seen)) / total).item()
