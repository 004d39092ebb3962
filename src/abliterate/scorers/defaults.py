"""The scorers a run uses when `module.scorers` is not set: one list, read wherever defaults matter
(the module, the study's record, the run's config.yaml)."""

from abliterate.options import EvalOptions
from abliterate.scorers.base import Scorer
from abliterate.scorers.degeneration import Degeneration
from abliterate.scorers.kl import KL
from abliterate.scorers.refusals import MarkerRefusals


def default_scorers(evaluation: EvalOptions) -> list[Scorer]:
    """Refusals by markers and KL over `evaluation.kl_tokens` (the objectives), and Degeneration
    reported beside them (measured for the exported trial, or on every completed trial with
    study.report_scorers=completed; never optimised: the sampler does not see it). Degeneration
    replies are `evaluation.max_new_tokens` long, as the refusal replies: at its own default of 64 a
    completed smollm2-refusal trial took 136-177 s against 15 s for a pruned one."""
    degeneration = Degeneration(max_new_tokens=evaluation.max_new_tokens, direction="report")
    return [MarkerRefusals(evaluation.markers), KL(evaluation.kl_tokens), degeneration]
