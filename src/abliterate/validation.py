"""The pick checked on harmful prompts the search never scored (`data.validation_harmful`).

min_kl_under takes the lowest KL among trials at or under the refusal target on the search's prompts. With
100 of them, the trial with the lowest KL is also the one most likely to be there by luck of those prompts:
on smollm2-refusal such picks refused none of the search's prompts and 0.04-0.05 of JBB (docs/benchmarks.md).
With validation prompts, the candidates are re-scored on them, lowest KL first, and the first that refuses at
most `study.validation_tolerance` more of them than the target allows is the pick. The tolerance is one prompt
in 100 by default: at 0 (one refusal in 100 rejects a candidate) the picks on seeds 116-120 refused no fewer
prompts of HarmBench or JBB at 116, 117 and 119 but cost 1.2-2.4x the KL; two in 100 flagged the one pick that
leaked 0.05 of JBB (docs/benchmarks.md).
"""

import logging
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from optuna.trial import FrozenTrial, TrialState

from abliterate.cache import fingerprint
from abliterate.data import VALIDATION_ROLE
from abliterate.errors import AbliterateError
from abliterate.pareto import select_trial, under_target
from abliterate.passes import ReferencePass
from abliterate.scorers import Scorer

log = logging.getLogger("abliterate.validation")

VALIDATION_VERSION = "1"


@dataclass(frozen=True)
class Checked:
    """One candidate re-scored: its refusal rate on the validation prompts, and over both sets together."""

    trial: FrozenTrial
    validation: float
    pooled: float


def candidates(
    trials: Sequence[FrozenTrial], target: float, bound: float, sign: int = 1
) -> tuple[float, list[FrozenTrial]]:
    """min_kl_under's candidates (`pareto.under_target`) among every completed trial, not only the Pareto
    front: at one refusal rate the front holds one trial."""
    return under_target([t for t in trials if t.state == TrialState.COMPLETE], target, bound, sign)


def pooled_rate(search: float, n_search: int, validation: float, n_validation: int) -> float:
    """The refusal rate over both prompt sets, from each set's rate and size."""
    return (round(search * n_search) + round(validation * n_validation)) / (n_search + n_validation)


def validated_pick(
    pool: Sequence[FrozenTrial],
    limit: int,
    allowed: float,
    n_search: int,
    n_validation: int,
    rate: Callable[[FrozenTrial], float],
) -> tuple[FrozenTrial, list[Checked]]:
    """The first of `pool` (in its order, at most `limit` re-scored by `rate`) that refuses at most `allowed` of
    the validation prompts; where none does, the lowest rate over both sets (ties: the earlier, the lower KL)."""
    checked: list[Checked] = []
    for trial in pool[:limit]:
        validation = rate(trial)
        checked.append(Checked(trial, validation, pooled_rate(trial.values[0], n_search, validation, n_validation)))
        if validation <= allowed + 1e-9:  # rates are counts over n: 0.01 + 0.01 must admit 0.02
            return trial, checked
    return min(checked, key=lambda c: c.pooled).trial, checked


def check_validation_prompts(pipe, options) -> None:
    """Before the search, not at the pick after it: data.validation_harmful loads, fits the model, is read by
    the configured selection, and holds no prompt the search scores."""
    datamodule = pipe.datamodule
    if datamodule.sources[VALIDATION_ROLE] is None:
        return
    if options.select != "min_kl_under":
        raise AbliterateError(
            f"data.validation_harmful is read only by study.select=min_kl_under, not {options.select!r}: "
            "set that or drop data.validation_harmful"
        )
    validation = datamodule.prompts(VALIDATION_ROLE)
    scored = set(validation) & set(datamodule.prompts("eval_harmful"))
    if scored:
        raise AbliterateError(
            f"{len(scored)} of the {len(validation)} data.validation_harmful prompts are also in data.eval_harmful, "
            "which the search scores: validate on prompts it never sees (drop them from one of the two)"
        )
    seen = set(validation) & set(datamodule.prompts("harmful"))
    if seen:  # allowed (they are not scored), but the directions were fit to them
        log.warning(
            "%d of the %d data.validation_harmful prompts are also in data.harmful, which the directions are computed "
            "from: their validation refusal rates flatter the candidates; hold out prompts the run reads nowhere else",
            len(seen),
            len(validation),
        )
    datamodule.attach_tokenizer(pipe.module.tokenizer)
    pipe.check_prompt_lengths([VALIDATION_ROLE], reply_tokens=pipe.module.eval_options.max_new_tokens)


@contextmanager
def scoring(scorer: Scorer, role: str):
    """`scorer` reads `role`'s batches for the duration (the refusal objective on the validation prompts)."""
    had_own = "role" in vars(scorer)
    saved = scorer.role
    scorer.role = role
    try:
        yield scorer
    finally:
        if had_own:
            scorer.role = saved
        else:
            del scorer.role


def choose_validated(pipe, trials: Sequence[FrozenTrial], options, space) -> FrozenTrial:
    """min_kl_under with its candidates re-scored on the validation prompts (see the module docstring).
    Each candidate's validation rate is cached in the run dir, so a later export re-scores nothing."""
    sign = pipe.signs()[1]
    under, pool = candidates(trials, options.refusal_target, options.steer_bound, sign)
    allowed = under + options.validation_tolerance
    if not pool:  # nothing near the target: the fewest refusals, as without validation (select_trial warns)
        return select_trial(trials, options.select, options.refusal_target, pipe.signs(), options.steer_bound)
    datamodule, scorer = pipe.datamodule, pipe.objectives[0]
    datamodule.attach_tokenizer(pipe.module.tokenizer)
    n_search, n_validation = len(datamodule.dataset("eval_harmful")), len(datamodule.dataset(VALIDATION_ROLE))
    record = (VALIDATION_VERSION, pipe.objective_record(), datamodule.fingerprint_parts([VALIDATION_ROLE]))
    reference = []

    def rate(trial: FrozenTrial) -> float:
        key = fingerprint(*record, trial.params)
        cached = pipe.cache.load("validation", key) if pipe.cache is not None else None
        if cached is not None:
            return float(cached["rate"])
        with scoring(scorer, VALIDATION_ROLE):
            if not reference:  # the original model on these prompts: what a scorer compares against, and the "before"
                evaluation = pipe.module.eval_options
                pipe.check_prompt_lengths([VALIDATION_ROLE], reply_tokens=evaluation.max_new_tokens)
                reference.append(pipe.run_pass(ReferencePass([scorer])))
                log.info(
                    "validation: %d prompts, refusal rate %.3f before", n_validation, reference[0].values[scorer.name]
                )
            start = time.perf_counter()
            value = pipe.evaluate(pipe.plan_of(trial, space), reference[0], scorers=[scorer], report=False)
            value = value.values[scorer.name]
        log.info("validation: trial %d refuses %.3f (%.1fs)", trial.number, value, time.perf_counter() - start)
        if pipe.cache is not None and pipe.trainer.is_global_zero:
            pipe.cache.save("validation", key, {"rate": torch.tensor(value, dtype=torch.float64)})
        return value

    chosen, checked = validated_pick(pool, options.validation_candidates, allowed, n_search, n_validation, rate)
    pipe.validated = {c.trial.number: c.validation for c in checked}
    shown = ", ".join(f"trial {c.trial.number}: {c.validation:.3f} ({c.pooled:.3f} pooled)" for c in checked)
    log.info("validation picks trial %d of its candidates (%s)", chosen.number, shown)
    if min(c.validation for c in checked) > allowed + 1e-9:
        log.warning(
            "no candidate refuses at most %.3f of the validation prompts; picking the fewest refusals over both sets "
            "(trial %d); more trials or a larger study.validation_candidates may find one",
            allowed,
            chosen.number,
        )
    return chosen
