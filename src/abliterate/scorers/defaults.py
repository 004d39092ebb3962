"""The scorers a run uses when `module.scorers` is not set: one list, read wherever defaults matter
(the module, the study's record, the run's config.yaml)."""

from abliterate.options import EvalOptions
from abliterate.scorers.base import Scorer
from abliterate.scorers.degeneration import Degeneration
from abliterate.scorers.kl import KL
from abliterate.scorers.refusals import MarkerRefusals


def default_scorers(evaluation: EvalOptions) -> list[Scorer]:
    """Refusals by markers and KL over `evaluation.kl_tokens` (the objectives), and Degeneration
    reported beside them (stored on every trial, never optimised: the sampler does not see it)."""
    return [MarkerRefusals(evaluation.markers), KL(evaluation.kl_tokens), Degeneration(direction="report")]
