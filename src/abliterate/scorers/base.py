"""Scorers: the search's objectives. Each sees the batches of one prompt role and yields one number.

A trial pass runs every scorer on the ablated model; the reference pass runs them once on the
original (to keep what they compare against, and to report the "before" value). The first
objective is the refusal rate that `study.refusal_target` and `min_kl_under` constrain.
"""

from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn
from torchmetrics.aggregation import SumMetric

from abliterate.decode import continuation_tensor, cut_at_eos, eos_token_ids
from abliterate.metrics import generate_responses, greedy_tokens, next_token_logprobs
from abliterate.thinking import ThinkingFormat, Thoughts, detect_thinking, extend, is_packed, pack, template_text, think
from abliterate.thinking import unpack as unpack_thoughts

Direction = Literal["minimize", "maximize", "report"]


def thinking_format(module) -> ThinkingFormat | None:
    """How the module's model thinks, from its chat template (the data's override if any) and
    `evaluation.thinking` / `think_tags`; None: replies are judged from their first token."""
    options = module.eval_options
    datamodule = getattr(getattr(module, "_trainer", None), "datamodule", None)
    template = template_text(module.tokenizer, getattr(datamodule, "chat_template", None))
    return detect_thinking(template, options.think_tags, options.thinking)


@dataclass(frozen=True)
class Decode:
    """Greedy tokens some scorers of a batch will read: a `through`-token continuation (runs past
    eos) and replies of up to `steps` tokens (cut at eos). One decode of the widest serves them all."""

    through: int = 0
    steps: int = 0

    def __or__(self, other: "Decode") -> "Decode":
        return Decode(max(self.through, other.through), max(self.steps, other.steps, self.through, other.through))


class Observations:
    """What one batch shows about the model; each view is computed once, on first use, and shared.
    `decode`: the greedy tokens its scorers declared (`Scorer.decodes`), decoded once for all of them.

    For a thinking model (`thinking_format`) the replies are answers: each prompt's thought is
    generated first (up to `evaluation.think_tokens`, closed by force at the budget), and the
    reply views continue prompt + thought; `thoughts()` holds the thoughts.
    """

    def __init__(self, module, batch: dict, reference: dict[str, Tensor] | None = None, decode: Decode = Decode()):
        self.module = module
        self.batch = batch
        self._reference = reference or {}
        self._decode = decode
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

    def select(self, rows: Tensor) -> "Observations":
        """The same observations for some of the batch's rows (their padding columns trimmed), for a
        scorer whose value the other rows cannot change."""
        rows = rows.to(self.ids.device)
        mask = self.mask[rows]
        width = int(mask.sum(-1).max()) if len(rows) else 0
        batch = {**self.batch, "index": self.index[rows.to(self.index.device)]}
        batch.update(input_ids=self.ids[rows][:, -width:], attention_mask=mask[:, -width:])
        return Observations(self.module, batch, self._reference, self._decode)

    def reference(self, name: str) -> Tensor:
        """This batch's rows of a tensor the reference pass kept (e.g. "kl.logprobs")."""
        return self._reference[name][self.index.cpu()].to(self.ids.device)

    def _view(self, key: str, make):
        if key not in self._views:
            self._views[key] = make()
        return self._views[key]

    @property
    def thinking(self) -> ThinkingFormat | None:
        """The model's thinking format; None: replies are judged from their first token."""
        return self._view("thinking", lambda: thinking_format(self.module))

    def thoughts(self) -> Thoughts | None:
        """The greedy thoughts before the answers (None for a model scored from the first token)."""
        fmt, module = self.thinking, self.module
        if fmt is None:
            return None
        budget = module.eval_options.think_tokens
        return self._view("thoughts", lambda: think(module.model, module.tokenizer, self.ids, self.mask, fmt, budget))

    def thought_texts(self) -> list[str]:
        """Each prompt's thought, "" where there is none."""
        thoughts = self.thoughts()
        return thoughts.texts if thoughts is not None else [""] * len(self.ids)

    def answer_prompts(self) -> tuple[Tensor, Tensor]:
        """(ids, mask) that replies continue: the prompts, with each one's thought for a thinking model."""
        thoughts = self.thoughts()
        if thoughts is None:
            return self.ids, self.mask
        pad = self.module.tokenizer.pad_token_id
        return self._view("answer_prompts", lambda: extend(self.ids, self.mask, thoughts.prefixes, pad))

    def responses(self) -> list[str]:
        """Greedy replies (answers, after the thought), each cut right after a refusal marker (enough to judge it)."""
        module = self.module
        return self._view(
            "responses",
            lambda: generate_responses(
                module.model,
                module.tokenizer,
                *self.answer_prompts(),
                max_new_tokens=module.eval_options.max_new_tokens,
                markers=module.markers,
            ),
        )

    @property
    def generated_responses(self) -> list[str] | None:
        """The replies if a scorer asked for them, else None."""
        return self._views.get("responses")

    def _greedy(self, need: Decode) -> list[list[int]]:
        """Greedy answer tokens covering `need`: the declared decode where it covers it, so a
        continuation and the replies of the same prompts come from one decode."""
        if self._decode.through >= need.through and self._decode.steps >= need.steps:
            need = self._decode
        module = self.module
        return self._view(
            f"greedy{need.through}/{need.steps}",
            lambda: greedy_tokens(module.model, module.tokenizer, *self.answer_prompts(), need.steps, need.through),
        )

    def replies(self, max_new_tokens: int) -> list[list[int]]:
        """Greedy reply tokens without marker stops, up to eos or `max_new_tokens` (eos not included)."""
        eos = set(eos_token_ids(self.module.model, self.module.tokenizer))
        return cut_at_eos(self._greedy(Decode(steps=max_new_tokens)), eos, max_new_tokens)

    def continuation(self, n_tokens: int) -> Tensor:
        """The first n_tokens - 1 greedy reply tokens; for a thinking model, the thought packed before
        the answer's (`thinking.pack`), so `logprobs` scores the answer after the same thought."""
        return self._view(f"continuation{n_tokens}", lambda: self._continuation(n_tokens))

    def _continuation(self, n_tokens: int) -> Tensor:
        module = self.module
        ids = self.answer_prompts()[0]
        answer = ids.new_empty((ids.shape[0], 0))
        if n_tokens > 1:
            answer = continuation_tensor(self._greedy(Decode(n_tokens - 1, n_tokens - 1)), n_tokens, ids)
        thoughts = self.thoughts()
        if thoughts is None:
            return answer
        force = module.tokenizer(self.thinking.force, add_special_tokens=False)["input_ids"]
        return pack(thoughts.prefixes, module.eval_options.think_tokens + len(force), answer)

    def logprobs(self, continuation: Tensor) -> Tensor:
        """Log-probs at the n reply positions along `continuation` (after its thought, when packed)."""
        if not is_packed(continuation):
            return next_token_logprobs(self.module.model, self.ids, self.mask, continuation)
        thoughts, answer = unpack_thoughts(continuation)
        ids, mask = extend(self.ids, self.mask, thoughts, self.module.tokenizer.pad_token_id)
        return next_token_logprobs(self.module.model, ids, mask, answer)


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

    def decodes(self, original: bool) -> Decode:
        """The greedy continuation and replies this scorer reads from its batches' `Observations`
        (on the original model, or a trial's), so one decode can serve every scorer of a batch."""
        return Decode()

    def bound(self, strategy, total: int) -> float | None:
        """A value the final one can be no better than, from the batches seen so far; None: none known."""
        return None

    def best_possible(self) -> float | None:
        """A value the final one can be no better than before any batch is seen, so pruning can stop a
        trial before this scorer's batches run; None: none known. A refusal rate lies in [0, 1]: no
        prompt refused, or (maximised) every one."""
        if self.is_refusal_rate:
            return 1.0 if self.direction == "maximize" else 0.0
        return None

    def extra_repr(self) -> str:
        return f"direction={self.direction}"


class CountedRefusals(Scorer):
    """A refusal rate from per-reply verdicts (a judge model, a probe): subclasses call `count`."""

    role = "eval_harmful"
    is_refusal_rate = True

    def __init__(self, direction: Direction = "minimize"):
        super().__init__(direction)
        self.refusals = SumMetric()
        self.total = SumMetric()

    def count(self, verdicts: list[bool]) -> None:
        self.refusals.update(float(sum(verdicts)))
        self.total.update(float(len(verdicts)))

    def compute(self) -> float:
        return float(self.refusals.compute()) / float(self.total.compute())

    def bound(self, strategy, total: int) -> float:
        # Refusals only grow as more prompts are judged: refusals so far / all prompts is a lower bound.
        refusals = strategy.reduce(self.refusals.sum_value.detach().clone().float(), reduce_op="sum")
        return float(refusals) / total
