"""Callbacks that turn a trial pass into one trial: apply the ablation, prune early."""

import sys
import time
from collections.abc import Sequence

import lightning as L
import optuna
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from torch import Tensor
from typing_extensions import override

from abliterate.ablation import AblationParams
from abliterate.pareto import Point, prunable
from abliterate.scorers import Scorer


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


class Pruning(L.Callback):
    """Bound the trial's final values and prune once a completed trial dominates them: when a role
    starts, and after each batch.

    Roles are read in order (passes.scorer_roles), so the scorers of earlier roles are final when a
    later role's batches run. When a role starts, every scorer not yet final contributes its
    `best_possible` value (e.g. 0 refusals): a trial already dominated then is pruned before that
    role's work (generation) begins. After each batch, a scorer of the current role contributes its
    running `bound` (KL: the prompts' KL so far over all prompts), a later role's scorer its
    `best_possible`: a trial whose KL alone is dominated stops part-way through the KL pass.
    Optuna's `trial.report`/`should_prune` raise in multi-objective studies, so where the trial
    stopped (its bound, role and prompts seen) goes into its user attributes and pruning raises
    `optuna.TrialPruned` directly.
    """

    def __init__(
        self,
        trial,
        objectives: Sequence[Scorer],
        completed: Sequence[Point],
        totals: dict[str, int],
        enabled: bool = True,
        heartbeat: bool = False,
    ):
        self.trial = trial
        self.objectives = list(objectives)
        self.signs = [-1 if s.direction == "maximize" else 1 for s in self.objectives]
        self.completed = list(completed)
        self.totals = totals
        self.enabled = enabled
        self.heartbeat = heartbeat  # a shared storage: other nodes must see this trial is alive
        self.started: list[str] = []
        self.final: dict[str, float] = {}
        self.seen: dict[str, int] = {}

    @override
    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        role = batch["role"]
        if not self.enabled or role in self.started:
            return
        # Roles run one after another: the scorers of the roles before this one are final.
        for scorer in self.objectives:
            if scorer.role in self.started and scorer.name not in self.final:
                self.final[scorer.name] = scorer.compute()
        self.started.append(role)
        self.seen[role] = 0
        bound = [self.final.get(s.name, s.best_possible()) for s in self.objectives]
        if None not in bound:
            self._prune_if_dominated(trainer, role, bound, seen=0)

    @override
    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.heartbeat:
            self.trial.set_user_attr("alive_at", time.time())
        if not self.enabled:
            return
        role = batch["role"]
        self.seen[role] += len(batch["index"])
        bound = []
        for scorer in self.objectives:
            value = self.final.get(scorer.name)
            if value is None:  # the current role's running bound, or a later role's best possible
                value = (
                    scorer.bound(trainer.strategy, self.totals[role]) if scorer.role == role else scorer.best_possible()
                )
            if value is None:
                return  # nothing known yet about this objective: no bound
            bound.append(value)
        seen = int(
            trainer.strategy.reduce(torch.tensor(float(self.seen[role]), device=pl_module.device), reduce_op="sum")
        )
        self._prune_if_dominated(trainer, role, bound, seen)

    def _prune_if_dominated(self, trainer, role: str, bound: list[float], seen: int) -> None:
        point = tuple(v * s for v, s in zip(bound, self.signs, strict=True))
        decision = seen < self.totals[role] and prunable(point, self.completed)
        # Every rank must agree, so rank 0 decides.
        if trainer.strategy.broadcast(decision, src=0):
            # Written once, when pruned: not a storage write per batch.
            self.trial.set_user_attr("bound", bound)
            self.trial.set_user_attr("pruned_in", role)
            self.trial.set_user_attr("prompts_seen", seen)
            raise optuna.TrialPruned(f"after {seen}/{self.totals[role]} {role} prompts: bound {bound} is dominated")


class StderrProgressBar(TQDMProgressBar):
    """Lightning's predict bar, on stderr: stdout carries only results."""

    @override
    def init_predict_tqdm(self) -> Tqdm:
        return Tqdm(
            desc=self.predict_description,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stderr,
            smoothing=0,
            bar_format=self.BAR_FORMAT,
        )
