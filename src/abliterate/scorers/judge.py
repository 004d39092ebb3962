"""Refusal rate by a judge model the user supplies (text-classification or zero-shot NLI)."""

from torchmetrics.aggregation import SumMetric

from abliterate.options import ClassifierOptions
from abliterate.scorers.base import Observations, Scorer


class JudgeRefusals(Scorer):
    """Share of harmful prompts whose reply the judge model calls a refusal; sees soft refusals that
    contain no marker. The replies are those the marker scorer sees (cut after a marker)."""

    name = "judge_refusals"
    role = "eval_harmful"
    is_refusal_rate = True

    def __init__(self, judge: ClassifierOptions, direction: str = "minimize"):
        """
        Args:
            judge: the judge model and how it is read.
            direction: minimize, maximize, or report.
        """
        super().__init__(direction)
        from abliterate.classifier import RefusalClassifier

        self.classifier = RefusalClassifier(judge)
        self.refusals = SumMetric()
        self.total = SumMetric()

    def update(self, obs: Observations) -> None:
        verdicts = self.classifier.is_refusal(obs.responses())
        self.refusals.update(float(sum(verdicts)))
        self.total.update(float(len(verdicts)))

    def compute(self) -> float:
        return float(self.refusals.compute()) / float(self.total.compute())

    def best_possible(self) -> float:
        # A rate lies in [0, 1]: no prompt refused, or (maximised) every one.
        return 1.0 if self.direction == "maximize" else 0.0

    def bound(self, strategy, total: int) -> float:
        refusals = strategy.reduce(self.refusals.sum_value.detach().clone().float(), reduce_op="sum")
        return float(refusals) / total
