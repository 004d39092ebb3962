"""Pareto maths over trial values, all objectives minimised (negate a maximised one first).

Values are tuples in objective order; the first objective is the refusal rate.
"""

import logging
import math
from collections.abc import Sequence

from optuna.trial import FrozenTrial, TrialState

from abliterate.errors import AbliterateError

log = logging.getLogger("abliterate.pareto")

Point = tuple[float, ...]


def strictly_dominates(a: Point, b: Point) -> bool:
    """a is no worse than b on every objective and better on one (all minimised)."""
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(x < y for x, y in zip(a, b, strict=True))


def prunable(bound: Point, completed: Sequence[Point]) -> bool:
    """Sound pruning test.

    `bound` holds, per objective, a value the trial's final value can be no better than (refusals
    so far / all prompts; a finished scorer's final value). If a completed trial strictly dominates
    the bound it also dominates the final point, so the trial can never reach the Pareto front.
    """
    return any(strictly_dominates(point, bound) for point in completed)


def minimised(values: Sequence[float], signs: Sequence[int]) -> Point:
    return tuple(v * s for v, s in zip(values, signs, strict=True))


def pareto_front(trials: Sequence[FrozenTrial], signs: Sequence[int] | None = None) -> list[FrozenTrial]:
    """Completed trials not strictly dominated by another, sorted by their values."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        return []
    signs = signs or [1] * len(complete[0].values)
    points = {t.number: minimised(t.values, signs) for t in complete}
    front = [t for t in complete if not any(strictly_dominates(points[o.number], points[t.number]) for o in complete)]
    return sorted(front, key=lambda t: (*points[t.number], t.number))


def knee(front: Sequence[FrozenTrial], signs: Sequence[int] | None = None) -> FrozenTrial:
    """Two objectives: the front point farthest from the chord joining its ends. More: the point
    nearest the ideal point. Objectives are scaled to [0, 1] over the front."""
    if len(front) <= 2:
        return min(front, key=lambda t: (sum(t.values[:2]), t.number))
    signs = signs or [1] * len(front[0].values)
    raw = [minimised(t.values, signs) for t in front]
    lows = [min(p[i] for p in raw) for i in range(len(signs))]
    spans = [(max(p[i] for p in raw) - lows[i]) or 1.0 for i in range(len(signs))]
    pts = [tuple((p[i] - lows[i]) / spans[i] for i in range(len(signs))) for p in raw]
    if len(signs) > 2:
        return front[min(range(len(front)), key=lambda i: (math.hypot(*pts[i]), i))]
    (x0, y0), (x1, y1) = pts[0], pts[-1]
    norm = math.hypot(x1 - x0, y1 - y0) or 1.0
    dist = [abs((y1 - y0) * x - (x1 - x0) * y + x1 * y0 - y1 * x0) / norm for x, y in pts]
    return front[max(range(len(front)), key=lambda i: (dist[i], -i))]


def under_target(
    trials: Sequence[FrozenTrial], target: float, fallback_target: float | None = None, sign: int = 1
) -> tuple[float, list[FrozenTrial]]:
    """min_kl_under's candidates: (the limit they are under, the trials at or under `target` refusals, or where
    none is, at or under `fallback_target`), lowest second objective first (with `sign`, highest for a
    maximised one); no trial under either: (target, [])."""
    for limit in (target, fallback_target):
        under = [t for t in trials if limit is not None and t.values[0] <= limit]
        if under:
            return limit, sorted(under, key=lambda t: (sign * t.values[1], t.number))
    return target, []


def within_budget(trials: Sequence[FrozenTrial], index: int, budget: float, name: str) -> list[FrozenTrial]:
    """The completed trials whose objective `index` (`name`) is at most `budget`; none: one line naming the lowest."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    kept = [t for t in complete if t.values[index] <= budget]
    if complete and not kept:
        lowest = min(complete, key=lambda t: (t.values[index], t.number))
        raise AbliterateError(
            f"no completed trial has {name} <= {budget} (study.max_kl); the lowest is trial {lowest.number} at "
            f"{lowest.values[index]:.4f}: raise study.max_kl, or run more trials"
        )
    log.info("study.max_kl=%g: the pick is made among %d of %d completed trials", budget, len(kept), len(complete))
    return kept


def select_trial(
    trials: Sequence[FrozenTrial],
    policy: str,
    refusal_target: float,
    signs: Sequence[int] | None = None,
    fallback_target: float | None = None,
) -> FrozenTrial:
    """Pick the trial to export: min_kl_under (default: the lowest second objective among front
    trials at or under the refusal target; where none is, among those at or under fallback_target;
    else the fewest refusals), knee, or an explicit trial number."""
    if policy.lstrip("-").isdigit():
        number = int(policy)
        for t in trials:
            if t.number == number:
                if t.state != TrialState.COMPLETE:
                    raise AbliterateError(f"trial {policy} is {t.state.name}, not COMPLETE; pick a completed trial")
                return t
        raise AbliterateError(f"no trial {policy} in the study; see trials.csv for trial numbers")
    front = pareto_front(trials, signs)
    if not front:
        raise AbliterateError("the study has no completed trial yet; run more trials (--study.n_trials)")
    if policy == "knee":
        return knee(front, signs)
    limit, under = under_target(front, refusal_target, fallback_target, signs[1] if signs else 1)
    if under and limit == refusal_target:
        return under[0]
    if under:
        chosen = under[0]
        log.warning(
            "no trial reaches refusal rate <= %.3f; picking the lowest KL at <= %.3f (refusal_target + "
            "steer_margin; trial %d: %.3f)",
            refusal_target,
            fallback_target,
            chosen.number,
            chosen.values[0],
        )
        return chosen
    best = front[0]
    log.warning(
        "no trial reaches refusal rate <= %.3f; picking the fewest refusals (trial %d: %.3f)",
        refusal_target,
        best.number,
        best.values[0],
    )
    return best
