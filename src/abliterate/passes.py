"""The three passes over prompts, each one `Trainer.predict`: residuals, reference, trial.

A pass names the prompt roles it reads, in order, handles their batches, and returns a typed
result. The module runs whichever pass is active (`AbliterationModule.running`); nothing is
left on the module when it ends.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from abliterate.data import RESIDUAL_ROLES
from abliterate.scorers import Observations, Scorer
from abliterate.scorers.base import Decode


@dataclass
class Residuals:
    """Per role, the last-prompt-token residual of every layer: [prompts, layers, hidden] (fp32)."""

    tensors: dict[str, Tensor]


@dataclass
class Reference:
    """The original model, as the scorers compare against it: their values, and per-prompt rows."""

    values: dict[str, float]
    tensors: dict[str, Tensor] = field(default_factory=dict)

    def to_tensors(self) -> dict[str, Tensor]:
        return {
            **self.tensors,
            **{f"value.{name}": torch.tensor(v, dtype=torch.float64) for name, v in self.values.items()},
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> "Reference":
        values = {k.removeprefix("value."): float(v) for k, v in tensors.items() if k.startswith("value.")}
        return cls(values, {k: v for k, v in tensors.items() if not k.startswith("value.")})


@dataclass
class TrialResult:
    """Each scorer's value for one ablated model, and this rank's harmful replies (for re-checks)."""

    values: dict[str, float]
    responses: list[str] = field(default_factory=list)


def scorer_roles(scorers: Sequence[Scorer]) -> tuple[str, ...]:
    """Roles the scorers read; roles with a scorer that has no `best_possible` value first (KL before
    refusals): until a role starts, pruning stands in its scorers' best possible values, so a trial
    whose KL is already dominated at 0 refusals stops before any reply is generated."""
    first = [s.role for s in scorers if s.best_possible() is None]
    return tuple(dict.fromkeys([*first, *(s.role for s in scorers)]))


def declared_decode(scorers: Sequence[Scorer], role: str, original: bool) -> Decode:
    """One greedy decode covering what the role's scorers read (a KL continuation, replies)."""
    decode = Decode()
    for scorer in scorers:
        if scorer.role == role:
            decode = decode | scorer.decodes(original)
    return decode


class Pass:
    roles: tuple[str, ...] = ()

    def start(self, module) -> None:
        self.rows: dict[str, list[tuple[Tensor, Tensor]]] = {}

    def step(self, module, batch: dict) -> None:
        raise NotImplementedError

    def keep(self, name: str, rows: Tensor, index: Tensor) -> None:
        self.rows.setdefault(name, []).append((rows, index))

    def finish(self, module) -> None:
        raise NotImplementedError


class ResidualPass(Pass):
    """Capture every layer's residual at the end of the prompt for the direction roles."""

    roles = RESIDUAL_ROLES

    def step(self, module, batch: dict) -> None:
        self.keep(batch["role"], module.prompt_end_residuals(batch), batch["index"])

    def finish(self, module) -> None:
        self.result = Residuals({role: module.gather(parts) for role, parts in self.rows.items()})


class ReferencePass(Pass):
    """Run every scorer on the original model: its values, and the rows trials compare against."""

    def __init__(self, scorers: Sequence[Scorer]):
        self.scorers = list(scorers)
        self.roles = scorer_roles(scorers)

    def start(self, module) -> None:
        super().start(module)
        for scorer in self.scorers:
            scorer.reset()

    def step(self, module, batch: dict) -> None:
        obs = Observations(module, batch, decode=declared_decode(self.scorers, batch["role"], original=True))
        for scorer in self.scorers:
            if scorer.role == batch["role"]:
                for name, rows in scorer.observe_original(obs).items():
                    self.keep(f"{scorer.name}.{name}", rows, batch["index"])

    def finish(self, module) -> None:
        tensors = {name: module.gather(parts).cpu() for name, parts in self.rows.items()}
        self.result = Reference({s.name: s.original_value() for s in self.scorers}, tensors)


class TrialPass(Pass):
    """Score the (already ablated) model with every scorer, or with the objectives only (`report=False`).

    Reported (non-objective) scorers see their batches at the end of the pass, so a trial that
    pruning stops early never pays for them: they describe completed trials only.
    """

    def __init__(self, scorers: Sequence[Scorer], reference: Reference, report: bool = True):
        self.scorers = [s for s in scorers if report or s.is_objective]
        self.reference = reference
        self.roles = scorer_roles(self.scorers)

    def start(self, module) -> None:
        super().start(module)
        self.responses: list[str] = []
        self.deferred: list[dict] = []
        for scorer in self.scorers:
            scorer.reset()

    def step(self, module, batch: dict) -> None:
        obs = self._observe(module, batch, [s for s in self.scorers if s.is_objective])
        if obs.generated_responses is not None:
            self.responses.extend(obs.generated_responses)
        if any(s.role == batch["role"] and not s.is_objective for s in self.scorers):
            self.deferred.append(batch)

    def _observe(self, module, batch: dict, scorers: Sequence[Scorer]) -> Observations:
        obs = Observations(
            module, batch, self.reference.tensors, declared_decode(scorers, batch["role"], original=False)
        )
        for scorer in scorers:
            if scorer.role == batch["role"]:
                scorer.update(obs)
        return obs

    def finish(self, module) -> None:
        reported = [s for s in self.scorers if not s.is_objective]
        for batch in self.deferred:  # the model is still edited here: ApplyAblation undoes it at predict end
            self._observe(module, batch, reported)
        self.deferred = []
        self.result = TrialResult({s.name: s.compute() for s in self.scorers}, self.responses)
