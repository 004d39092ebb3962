"""PromptDataModule: prompt roles, chat formatting, tokenisation and length-sorted batches."""

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from typing_extensions import override

from abliterate.errors import AbliterateError
from abliterate.prompts import PromptSource, PromptSourceLike, as_source, format_chat, load_prompts

log = logging.getLogger("abliterate.data")

ROLES = ("harmful", "harmless", "unhelpful", "eval_harmful", "eval_harmless", "validation_harmful")
RESIDUAL_ROLES = ("harmful", "harmless", "unhelpful")
EVAL_ROLES = ("eval_harmless", "eval_harmful")  # KL first, then refusals (pruning needs KL)
VALIDATION_ROLE = "validation_harmful"  # read at selection only: the search never scores it


class TokenizedPrompts(Dataset):
    """Tokenised prompts of one role, longest first so padding waste is small and OOM shows early."""

    def __init__(self, role: str, input_ids: list[list[int]]):
        self.role = role
        self.order = sorted(range(len(input_ids)), key=lambda i: -len(input_ids[i]))
        self.input_ids = input_ids

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, position: int) -> dict:
        index = self.order[position]
        return {"index": index, "input_ids": self.input_ids[index]}


def left_pad_collate(pad_token_id: int, role: str):
    def collate(items: list[dict]) -> dict:
        width = max(len(item["input_ids"]) for item in items)
        ids = torch.full((len(items), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            ids[row, width - n :] = torch.tensor(item["input_ids"])
            mask[row, width - n :] = 1
        return {
            "role": role,
            "index": torch.tensor([i["index"] for i in items]),
            "input_ids": ids,
            "attention_mask": mask,
        }

    return collate


class PromptDataModule(L.LightningDataModule):
    """Streams harmful, harmless and unhelpful prompts (for directions) and the eval sets (for trials).

    The tokenizer comes from the LightningModule (`trainer.lightning_module.tokenizer`), so
    the chat template applied here always matches the model being ablated.
    """

    def __init__(
        self,
        harmful: PromptSourceLike = PromptSource("mlabonne/harmful_behaviors", split="train[:400]", column="text"),
        harmless: PromptSourceLike = PromptSource("mlabonne/harmless_alpaca", split="train[:400]", column="text"),
        unhelpful: PromptSourceLike | None = None,
        eval_harmful: PromptSourceLike = PromptSource("mlabonne/harmful_behaviors", split="test[:100]", column="text"),
        eval_harmless: PromptSourceLike = PromptSource("mlabonne/harmless_alpaca", split="test[:100]", column="text"),
        validation_harmful: PromptSourceLike | None = None,
        system_prompt: str | None = None,
        chat_template: str | None = None,
        enable_thinking: bool | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
    ):
        """
        Args:
            harmful: prompts the model refuses (for directions).
            harmless: prompts the model answers (for directions).
            unhelpful: optional raw text (e.g. C4 `en`, streamed); refusal directions are made
                orthogonal to mean(harmless) - mean(unhelpful).
            eval_harmful: prompts whose refusal rate a trial minimises.
            eval_harmless: prompts whose KL divergence from the original a trial minimises.
            validation_harmful: optional harmful prompts the search never scores, disjoint from the others: the
                pick re-scores its lowest-KL candidates on them (`study.validation_candidates`), so a trial
                that refuses none of eval_harmful only by luck of those prompts is not exported.
            system_prompt: system prompt for every role without its own; None keeps the template's default.
            chat_template: Jinja template (string or file) for models without one.
            enable_thinking: passed to the chat template (Qwen3-style thinking switch).
            batch_size: prompts per batch for residual collection.
            eval_batch_size: prompts per batch for trials (a pruning check runs after each); default batch_size.
        """
        super().__init__()
        self.sources = {
            "harmful": as_source(harmful, "harmful"),
            "harmless": as_source(harmless, "harmless"),
            "unhelpful": as_source(unhelpful, "unhelpful"),
            "eval_harmful": as_source(eval_harmful, "eval_harmful"),
            "eval_harmless": as_source(eval_harmless, "eval_harmless"),
            VALIDATION_ROLE: as_source(validation_harmful, VALIDATION_ROLE),
        }
        self.system_prompt = system_prompt
        self.chat_template = chat_template
        self.enable_thinking = enable_thinking
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise AbliterateError("data.batch_size and data.eval_batch_size must be >= 1")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.tokenizer = None
        self._datasets: dict[str, TokenizedPrompts] = {}

    def roles_present(self, roles: Sequence[str]) -> tuple[str, ...]:
        return tuple(role for role in roles if self.sources[role] is not None)

    def pass_roles(self) -> tuple[str, ...]:
        """The configured roles the running pass reads, in its order (residual roles outside a Trainer)."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        roles = module.current_pass.roles if module is not None else RESIDUAL_ROLES
        return self.roles_present(roles)

    def fingerprint_parts(self, roles: Sequence[str]) -> dict:
        """What determines the tokenised prompts of `roles`, for cache keys."""
        return {
            "sources": {r: asdict(self.sources[r]) if self.sources[r] else None for r in roles},
            "system_prompt": self.system_prompt,
            "chat_template": self.chat_template,
            "enable_thinking": self.enable_thinking,
        }

    def prompts(self, role: str) -> list[str]:
        source = self.sources[role]
        if source is None:
            raise AbliterateError(f"prompt role {role!r} is not configured; set data.{role}")
        return load_prompts(source)

    def attach_tokenizer(self, tokenizer) -> None:
        if self.tokenizer is not tokenizer:
            self.tokenizer = tokenizer
            self._datasets.clear()

    @override
    def setup(self, stage: str) -> None:
        if self.trainer is not None and self.tokenizer is None:
            self.attach_tokenizer(self.trainer.lightning_module.tokenizer)
        if self.tokenizer is None:
            raise RuntimeError("PromptDataModule needs a tokenizer: call attach_tokenizer() or run it under a Trainer")
        for role in self.pass_roles():
            self.dataset(role)

    def _tokenize(self, role: str) -> TokenizedPrompts:
        start = time.perf_counter()
        source = self.sources[role]
        prompts = self.prompts(role)
        if role == "unhelpful":
            texts = prompts  # raw text, no chat template: that contrast is the point of the role
        else:
            system = source.system_prompt if source.system_prompt is not None else self.system_prompt
            texts = format_chat(
                self.tokenizer,
                prompts,
                system_prompt=system,
                chat_template=self.chat_template,
                enable_thinking=self.enable_thinking,
            )
        # The chat template already holds any BOS token.
        input_ids = self.tokenizer(texts, add_special_tokens=role == "unhelpful")["input_ids"]
        log.info("tokenised %d %s prompts in %.2fs", len(input_ids), role, time.perf_counter() - start)
        return TokenizedPrompts(role, input_ids)

    def dataset(self, role: str) -> TokenizedPrompts:
        """The tokenised prompts of `role`, tokenised on first use."""
        if role not in self._datasets:
            if self.tokenizer is None:
                raise RuntimeError("PromptDataModule needs a tokenizer: call attach_tokenizer() first")
            self._datasets[role] = self._tokenize(role)
        return self._datasets[role]

    @override
    def predict_dataloader(self) -> list[DataLoader]:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        pad_id = self.tokenizer.pad_token_id
        loaders = []
        for role in self.pass_roles():
            batch_size = self.eval_batch_size if role in (*EVAL_ROLES, VALIDATION_ROLE) else self.batch_size
            batches = ShardBatches(shard_batches(len(self._datasets[role]), batch_size, rank, world, role))
            loaders.append(
                DataLoader(self._datasets[role], batch_sampler=batches, collate_fn=left_pad_collate(pad_id, role))
            )
        return loaders


class ShardBatches(Sampler[list[int]]):
    """A fixed list of batches (Lightning wraps batch samplers, so this must be an object)."""

    def __init__(self, batches: list[list[int]]):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def shard_batches(n: int, batch_size: int, rank: int, world: int, role: str = "prompts") -> list[list[int]]:
    """This rank's batches of dataset positions: rank r takes positions r, r+W, ...

    Every rank gets the same number of non-empty batches, so per-batch collectives (the pruning
    check) line up; a batch may hold one prompt more than batch_size for that.
    """
    if n < world:
        raise AbliterateError(
            f"{n} {role} prompts cannot be split over {world} processes; use more prompts or fewer devices"
        )
    positions = list(range(rank, n, world))
    n_batches = math.ceil((n // world) / batch_size)
    size, extra = divmod(len(positions), n_batches)
    batches, start = [], 0
    for i in range(n_batches):
        end = start + size + (1 if i < extra else 0)
        batches.append(positions[start:end])
        start = end
    return batches
