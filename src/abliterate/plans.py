"""A trial's plan: which directions, ablated how, as sampled from (or rebuilt from) an Optuna trial.

The same `sample_plan` rebuilds a finished trial's plan from its stored params, since a
FrozenTrial's `suggest_*` returns the recorded value.
"""

from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial

from abliterate.ablation import AblationParams, ComponentKernel
from abliterate.errors import AbliterateError
from abliterate.options import DirectionOptions, SearchSpace


@dataclass
class TrialPlan:
    """What one trial does: which directions, ablated how."""

    directions: DirectionOptions
    ablation: AblationParams


def sample_plan(trial: optuna.Trial | FrozenTrial, space: SearchSpace, n_layers: int) -> TrialPlan:
    last = max(n_layers - 1, 1)
    method = trial.suggest_categorical("direction_method", space.direction_methods)
    if method == "contrastive_pca":
        k = trial.suggest_int("k", *space.k)
        alpha = trial.suggest_float("alpha", *space.alpha)
        decay = trial.suggest_float("direction_decay", *space.direction_decay)
    else:
        k, alpha, decay = 1, 1.0, 1.0
    projected = trial.suggest_categorical("projected", space.projected)
    # Only a real choice becomes a parameter: studies made before it existed still rebuild.
    winsorize = (
        trial.suggest_categorical("winsorize", space.winsorize) if len(space.winsorize) > 1 else space.winsorize[0]
    )
    scope = trial.suggest_categorical("direction_scope", space.direction_scope)
    index = None
    if scope == "global":
        lo, hi = space.direction_index
        index = trial.suggest_float("direction_index", lo * last, hi * last)
    components = {}
    for name in space.components:
        max_weight = trial.suggest_float(f"{name}.max_weight", *space.max_weight)
        lo, hi = space.max_weight_position
        position = trial.suggest_float(f"{name}.max_weight_position", lo * last, hi * last)
        min_fraction = trial.suggest_float(f"{name}.min_weight", *space.min_weight)
        lo, hi = space.min_weight_distance
        distance = trial.suggest_float(f"{name}.min_weight_distance", max(1.0, lo * last), max(1.0, hi * last))
        components[name] = ComponentKernel(max_weight, position, min_fraction * max_weight, distance)
    norm_preserving = trial.suggest_categorical("norm_preserving", space.norm_preserving)
    return TrialPlan(
        directions=DirectionOptions(method=method, k=k, alpha=alpha, projected=projected, winsorize=winsorize),
        ablation=AblationParams(
            components=components, direction_index=index, direction_decay=decay, norm_preserving=norm_preserving
        ),
    )


def rebuild_plan(trial: FrozenTrial, space: SearchSpace, n_layers: int) -> TrialPlan:
    """A finished trial's plan, from its stored parameters."""
    try:
        return sample_plan(trial, space, n_layers)
    except ValueError as error:  # a parameter the current sampler asks for was never stored
        raise AbliterateError(
            f"trial {trial.number} cannot be rebuilt from its stored parameters ({error}); it was made "
            "by another abliterate version or search space: search again with a new --output_dir"
        ) from error
