"""Refusal rate by a judge model the user supplies (text-classification or zero-shot NLI)."""

from abliterate.options import ClassifierOptions
from abliterate.scorers.base import CountedRefusals, Observations


class JudgeRefusals(CountedRefusals):
    """Share of harmful prompts whose reply the judge model calls a refusal; sees soft refusals that
    contain no marker. The replies are those the marker scorer sees (cut after a marker)."""

    name = "judge_refusals"

    def __init__(self, judge: ClassifierOptions, direction: str = "minimize"):
        """
        Args:
            judge: the judge model and how it is read.
            direction: minimize, maximize, or report.
        """
        super().__init__(direction)
        from abliterate.classifier import RefusalClassifier

        self.classifier = RefusalClassifier(judge)

    def update(self, obs: Observations) -> None:
        self.count(self.classifier.is_refusal(obs.responses()))
