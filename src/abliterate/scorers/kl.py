"""KL divergence from the original on harmless prompts, over the first n reply tokens."""

from torch import Tensor

from abliterate.metrics import KLDivergence
from abliterate.scorers.base import Observations, Scorer


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

    def update(self, obs: Observations) -> None:
        continuation = obs.reference(f"{self.name}.continuation")
        self.kl.update(obs.logprobs(continuation), obs.reference(f"{self.name}.logprobs"))

    def compute(self) -> float:
        return self.kl.compute().item()
