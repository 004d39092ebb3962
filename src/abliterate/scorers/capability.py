"""Capability: multiple-choice accuracy by log-likelihood, a quick check (no lm-eval) that an
ablated model still knows what the original knew.

Each question is chat-formatted as one user turn; each choice is scored by the sum of its tokens'
log-probs as the reply (per token with `length_normalized`), and the best-scored choice is the
model's answer (ties: the first). The questions come from a JSON Lines file, one
`{"question": ..., "choices": [...], "answer": index}` a line; the default is the packaged
`data/capability/everyday.jsonl` (30 everyday facts).

The questions are not a prompt role: the scorer runs its own batched forward passes the first
time a pass hands it a batch (of `eval_harmless`, so its value is final before refusals are
counted and pruning can use it), and ignores that role's later batches. Under DDP each rank
scores every world-size-th question and the counts are summed.
"""

import hashlib
import json
import os
from dataclasses import dataclass
from importlib.resources import files

import torch
from torch import Tensor
from torchmetrics.aggregation import SumMetric

from abliterate.errors import AbliterateError
from abliterate.prompts import format_chat
from abliterate.scorers.base import Observations, Scorer

PACKAGED_QUESTIONS = "data/capability/everyday.jsonl"
FORMAT = '{"question": text, "choices": [two or more texts], "answer": index of the right choice from 0}'


@dataclass(frozen=True)
class Question:
    question: str
    choices: tuple[str, ...]
    answer: int
    line: int


def _question(name: str, number: int, line: str) -> Question:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise AbliterateError(
            f"{name} line {number} is not valid JSON ({error.msg} at column {error.colno}); "
            "fix that line (JSON Lines: one object per line)"
        ) from None
    question = row.get("question") if isinstance(row, dict) else None
    choices = row.get("choices") if isinstance(row, dict) else None
    answer = row.get("answer") if isinstance(row, dict) else None
    if (
        not isinstance(question, str)
        or not question.strip()
        or not isinstance(choices, list)
        or len(choices) < 2
        or not all(isinstance(c, str) and c.strip() for c in choices)
        or not isinstance(answer, int)
        or isinstance(answer, bool)
    ):
        raise AbliterateError(f"{name} line {number} is not a multiple-choice question; write it as {FORMAT}")
    if not 0 <= answer < len(choices):
        raise AbliterateError(
            f"{name} line {number}: answer {answer} is out of range for {len(choices)} choices; "
            f"give the right choice's index, 0 to {len(choices) - 1}"
        )
    return Question(question, tuple(choices), answer, number)


def load_questions(path: str | None = None) -> tuple[list[Question], str]:
    """The questions of a JSON Lines file (None: the packaged everyday set) and the file's sha256."""
    if path is None:
        name, resource = f"abliterate/{PACKAGED_QUESTIONS}", files("abliterate").joinpath(PACKAGED_QUESTIONS)
        raw = resource.read_bytes()
    else:
        name = path
        try:
            with open(path, "rb") as file:
                raw = file.read()
        except FileNotFoundError:
            raise AbliterateError(f"capability questions {name}: no such file; give a JSON Lines file") from None
        except IsADirectoryError:
            raise AbliterateError(f"capability questions {name} is a directory; give a JSON Lines file") from None
        except OSError as error:
            raise AbliterateError(f"capability questions {name}: cannot read it ({error.strerror})") from None
    questions = []
    for number, line in enumerate(raw.split(b"\n"), 1):
        try:
            text = line.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as error:
            raise AbliterateError(
                f"{name} line {number} is not UTF-8 (at column {error.start + 1}); save the file as UTF-8"
            ) from None
        if text.strip():
            questions.append(_question(name, number, text))
    if not questions:
        raise AbliterateError(f"{name} holds no questions; write one a line as {FORMAT}")
    return questions, hashlib.sha256(raw).hexdigest()


@torch.no_grad()
def continuation_logprobs(
    model, prompts: list[list[int]], continuations: list[list[int]], pad_token_id: int, batch_size: int
) -> Tensor:
    """float64 [n]: the sum of log p(continuation tokens | prompt) of each (prompt, continuation) pair.

    Pairs run `batch_size` at a time, longest first, left-padded with positions counting real
    tokens only; only the logits of the continuation positions are computed.
    """
    order = sorted(range(len(prompts)), key=lambda i: -(len(prompts[i]) + len(continuations[i])))
    sums = torch.empty(len(prompts), dtype=torch.float64)
    device = model.device
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        sequences = [prompts[i] + continuations[i] for i in rows]
        lengths = torch.tensor([len(continuations[i]) for i in rows])
        width, m = max(len(s) for s in sequences), int(lengths.max())
        ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            ids[row, width - len(sequence) :] = torch.tensor(sequence)
            mask[row, width - len(sequence) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        # The logits at the last m + 1 positions: the first m predict the last m tokens.
        logits = model(
            input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False, logits_to_keep=m + 1
        ).logits[:, -(m + 1) : -1]
        token_logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, -m:, None])[..., 0].cpu()
        mine = torch.arange(m) >= (m - lengths)[:, None]  # each row's own continuation tokens
        sums[rows] = torch.where(mine, token_logprobs, 0.0).double().sum(-1)
    return sums


def answer_questions(
    model,
    tokenizer,
    questions: list[Question],
    *,
    source: str,
    length_normalized: bool = False,
    batch_size: int = 32,
    system_prompt: str | None = None,
    chat_template: str | None = None,
) -> list[int]:
    """The index of each question's best-scored choice. Choices are scored as the direct reply:
    a template with a thinking switch gets enable_thinking=False."""
    if not questions:
        return []
    texts = format_chat(
        tokenizer,
        [q.question for q in questions],
        system_prompt=system_prompt,
        chat_template=chat_template,
        enable_thinking=False,
    )
    prompt_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]  # the template holds any BOS
    prompts, continuations = [], []
    for question, ids in zip(questions, prompt_ids, strict=True):
        for choice in question.choices:
            tokens = tokenizer(choice, add_special_tokens=False)["input_ids"]
            if not tokens:
                raise AbliterateError(f"{source} line {question.line}: choice {choice!r} has no tokens; reword it")
            prompts.append(ids)
            continuations.append(tokens)
    scores = continuation_logprobs(model, prompts, continuations, tokenizer.pad_token_id, batch_size)
    if length_normalized:
        scores = scores / torch.tensor([len(c) for c in continuations], dtype=torch.float64)
    picks, start = [], 0
    for question in questions:
        picks.append(int(scores[start : start + len(question.choices)].argmax()))  # ties: the first
        start += len(question.choices)
    return picks


class Capability(Scorer):
    """Share of multiple-choice questions whose right choice the model scores highest (log-likelihood
    accuracy); maximised by default. Runs once per pass, on the first eval_harmless batch."""

    name = "capability"
    role = "eval_harmless"

    def __init__(self, questions: str | None = None, length_normalized: bool = False, direction: str = "maximize"):
        """
        Args:
            questions: JSON Lines file, one {"question", "choices", "answer": index} a line; None:
                the packaged 30 everyday-fact questions.
            length_normalized: score a choice by its mean token log-prob instead of the sum.
            direction: maximize, minimize, or report.
        """
        super().__init__(direction)
        self.questions = None if questions is None else os.fspath(questions)
        self._items, self.questions_sha256 = load_questions(self.questions)  # the hash keys caches and the study
        self.length_normalized = length_normalized
        self.correct = SumMetric()
        self.total = SumMetric()
        self._scored = False

    def reset(self) -> None:
        super().reset()
        self._scored = False

    def update(self, obs: Observations) -> None:
        if self._scored:  # one score per pass: the role's later batches add nothing
            return
        self._scored = True
        module = obs.module
        trainer = getattr(module, "_trainer", None)
        datamodule = getattr(trainer, "datamodule", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        mine = self._items[rank::world]
        picks = answer_questions(
            module.model,
            module.tokenizer,
            mine,
            source=self.questions or f"abliterate/{PACKAGED_QUESTIONS}",
            length_normalized=self.length_normalized,
            batch_size=getattr(datamodule, "eval_batch_size", 32),
            system_prompt=getattr(datamodule, "system_prompt", None),
            chat_template=getattr(datamodule, "chat_template", None),
        )
        self.correct.update(float(sum(p == q.answer for p, q in zip(picks, mine, strict=True))))
        self.total.update(float(len(mine)))

    def compute(self) -> float:
        total = float(self.total.compute())
        return float(self.correct.compute()) / total if total else 0.0
