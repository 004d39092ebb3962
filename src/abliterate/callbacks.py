"""Callbacks that turn a `predict` pass into one trial: apply the ablation, prune early."""

import logging
from collections.abc import Sequence

import lightning as L
import optuna
import torch
from torch import Tensor
from typing_extensions import override

from abliterate.ablation import AblationParams

log = logging.getLogger("abliterate.callbacks")

Point = tuple[float, float]  # (refusal rate, KL)


def strictly_dominates(a: Point, b: Point) -> bool:
    """a is no worse than b on both objectives and better on one (both minimised)."""
    return a[0] <= b[0] and a[1] <= b[1] and (a[0] < b[0] or a[1] < b[1])


def prunable(bound: Point, completed: Sequence[Point]) -> bool:
    """Sound pruning test.

    `bound` is (refusals so far / all prompts, final KL). Refusals only grow as more prompts are
    generated, so the trial's final point is (r >= bound[0], bound[1]). If a completed trial
    strictly dominates the bound it also strictly dominates the final point, so the trial can
    never reach the Pareto front.
    """
    return any(strictly_dominates(point, bound) for point in completed)


class ApplyAblation(L.Callback):
    """Edit the weights for this pass and restore the originals afterwards, even on errors."""

    def __init__(self, params: AblationParams, directions: Tensor):
        self.params = params
        self.directions = directions

    @override
    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.weight_editor().apply(self.params, self.directions)

    @override
    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.weight_editor().reset()

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        pl_module.weight_editor().reset()


class RefusalPruning(L.Callback):
    """After each harmful-prompt batch, record the running refusals on the trial and prune if dominated.

    Optuna's `trial.report`/`should_prune` raise in multi-objective studies, so the intermediate
    values go into trial user attributes and pruning raises `optuna.TrialPruned` directly.
    """

    def __init__(self, trial: optuna.Trial, completed: Sequence[Point], n_harmful: int, enabled: bool = True):
        self.trial = trial
        self.completed = list(completed)
        self.n_harmful = n_harmful
        self.enabled = enabled
        self.kl: float | None = None

    @override
    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch["role"] != "eval_harmful":
            return
        if self.kl is None:
            # KL is final: the harmless prompts ran first.
            self.kl = float(pl_module.kl_divergence.compute())
            self.trial.set_user_attr("kl", self.kl)
        counts = torch.stack([pl_module.refusal_rate.refusals, pl_module.refusal_rate.total]).float()
        refusals, seen = (int(v) for v in trainer.strategy.reduce(counts, reduce_op="sum"))
        bound = (refusals / self.n_harmful, self.kl)
        self.trial.set_user_attr("refusals_so_far", refusals)
        self.trial.set_user_attr("prompts_seen", seen)
        decision = self.enabled and seen < self.n_harmful and prunable(bound, self.completed)
        # Every rank must agree, so rank 0 decides.
        if trainer.strategy.broadcast(decision, src=0):
            self.trial.set_user_attr("refusal_lower_bound", bound[0])
            raise optuna.TrialPruned(
                f"after {seen}/{self.n_harmful} prompts: refusals >= {bound[0]:.3f} at KL {bound[1]:.4f} is dominated"
            )
