"""Scorers: the search's objectives. Each sees the batches of one prompt role and yields one number.

A trial pass runs every scorer on the ablated model; the reference pass runs them once on the
original (to keep what they compare against, and to report the "before" value). The first
objective is the refusal rate that `study.refusal_target` and `min_kl_under` constrain.
"""

from typing import Literal

from torch import Tensor, nn

from abliterate.metrics import generate_responses, greedy_continuation, greedy_reply_tokens, next_token_logprobs

Direction = Literal["minimize", "maximize", "report"]


class Observations:
    """What one batch shows about the model; each view is computed once, on first use, and shared."""

    def __init__(self, module, batch: dict, reference: dict[str, Tensor] | None = None):
        self.module = module
        self.batch = batch
        self._reference = reference or {}
        self._views: dict[str, object] = {}

    @property
    def ids(self) -> Tensor:
        return self.batch["input_ids"]

    @property
    def mask(self) -> Tensor:
        return self.batch["attention_mask"]

    @property
    def index(self) -> Tensor:
        return self.batch["index"]

    def reference(self, name: str) -> Tensor:
        """This batch's rows of a tensor the reference pass kept (e.g. "kl.logprobs")."""
        return self._reference[name][self.index.cpu()].to(self.ids.device)

    def _view(self, key: str, make):
        if key not in self._views:
            self._views[key] = make()
        return self._views[key]

    def responses(self) -> list[str]:
        """Greedy replies, each cut right after a refusal marker (enough to judge it)."""
        module = self.module
        return self._view(
            "responses",
            lambda: generate_responses(
                module.model,
                module.tokenizer,
                self.ids,
                self.mask,
                max_new_tokens=module.eval_options.max_new_tokens,
                markers=module.markers,
            ),
        )

    @property
    def generated_responses(self) -> list[str] | None:
        """The replies if a scorer asked for them, else None."""
        return self._views.get("responses")

    def replies(self, max_new_tokens: int) -> list[list[int]]:
        """Greedy reply tokens without marker stops, up to eos or `max_new_tokens` (eos not included)."""
        module = self.module
        return self._view(
            f"replies{max_new_tokens}",
            lambda: greedy_reply_tokens(module.model, module.tokenizer, self.ids, self.mask, max_new_tokens),
        )

    def continuation(self, n_tokens: int) -> Tensor:
        module = self.module
        return self._view(
            f"continuation{n_tokens}",
            lambda: greedy_continuation(module.model, self.ids, self.mask, n_tokens, module.tokenizer.pad_token_id),
        )

    def logprobs(self, continuation: Tensor) -> Tensor:
        return next_token_logprobs(self.module.model, self.ids, self.mask, continuation)


class Scorer(nn.Module):
    """One objective (or reported figure) of a trial.

    Subclasses set `name` and `role`, and implement `update` and `compute`. A scorer that keeps
    per-prompt data from the original model overrides `observe_original`; one whose running value
    bounds its final value (refusals only grow) overrides `bound`, which lets pruning stop a trial
    early. It is an nn.Module so that its torchmetrics state follows the module's device and syncs
    across DDP ranks.
    """

    name: str = "scorer"
    role: str = "eval_harmful"
    """prompt role whose batches this scorer sees."""
    is_refusal_rate: bool = False
    """True for a refusal rate, which may be the first objective."""

    def __init__(self, direction: Direction = "minimize"):
        super().__init__()
        if direction not in ("minimize", "maximize", "report"):
            raise ValueError(f"direction must be minimize, maximize or report, got {direction!r}")
        self.direction = direction

    @property
    def is_objective(self) -> bool:
        return self.direction != "report"

    def reset(self) -> None:
        for child in self.children():
            if hasattr(child, "reset"):
                child.reset()

    def observe_original(self, obs: Observations) -> dict[str, Tensor]:
        """On the original model: score it, and return per-prompt rows to keep for trials (keyed without the scorer name)."""
        self.update(obs)
        return {}

    def original_value(self) -> float:
        """The original model's value, after `observe_original` saw every batch."""
        return self.compute()

    def update(self, obs: Observations) -> None:
        raise NotImplementedError

    def compute(self) -> float:
        raise NotImplementedError

    def bound(self, strategy, total: int) -> float | None:
        """A value the final one can be no better than, from the batches seen so far; None: none known."""
        return None

    def extra_repr(self) -> str:
        return f"direction={self.direction}"
