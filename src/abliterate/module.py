"""AbliterationModule: the model, its residual hooks, directions and trial metrics.

One `Trainer.predict` pass does one task:
- "residuals": capture the last-prompt-token residual of every layer for the direction roles,
  then compute the refusal directions at epoch end;
- "baseline": the original model's reference log-probs (for KL) and its refusals;
- "evaluate": one trial's KL and refusal rate (the ablation is applied by a callback).
"""

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import lightning as L
import torch
from torch import Tensor, nn
from typing_extensions import override

from abliterate.ablation import WeightEditor
from abliterate.directions import compute_directions
from abliterate.errors import AbliterateError
from abliterate.metrics import (
    KLDivergence,
    RefusalRate,
    default_markers,
    generate_responses,
    greedy_continuation,
    next_token_logprobs,
)
from abliterate.models import (
    decoder_layers,
    describe_architecture,
    load_model,
    load_tokenizer,
    post_norm_gains,
    residual_writers,
)
from abliterate.options import DirectionOptions, EvalOptions, LoadOptions

log = logging.getLogger("abliterate.module")

TASKS = ("residuals", "baseline", "evaluate")


@contextmanager
def capture_last_token(layers: Sequence[nn.Module]) -> Iterator[list[Tensor | None]]:
    """Record each layer's output residual at the last position (fp32); removes only its own hooks."""
    captured: list[Tensor | None] = [None] * len(layers)

    def make_hook(i: int):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            captured[i] = hidden[:, -1, :].float()

        return hook

    handles = []
    try:
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_hook(make_hook(i)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


class AbliterationModule(L.LightningModule):
    """A causal LM with residual capture, refusal directions and trial metrics."""

    def __init__(
        self,
        model_id: str | None = None,
        load: LoadOptions = LoadOptions(),
        directions: DirectionOptions = DirectionOptions(),
        evaluation: EvalOptions = EvalOptions(),
    ):
        """
        Args:
            model_id: hub id or local dir of the model (set with the top-level --model).
            load: how the model is loaded.
            directions: how refusal directions are computed.
            evaluation: how refusals and KL divergence are measured.
        """
        super().__init__()
        self.model_id = model_id
        self.load_options = load
        self.direction_options = directions
        self.eval_options = evaluation
        self.markers = list(evaluation.markers) if evaluation.markers else default_markers()
        self.task = "residuals"
        self._tokenizer = None
        self.editor: WeightEditor | None = None
        self.refusal_rate = RefusalRate(self.markers)
        self.kl_divergence = KLDivergence()
        # Results, each filled by one task and kept across Trainer calls.
        self.residuals: dict[str, Tensor] = {}
        self.directions: Tensor | None = None
        self._direction_cache: dict[tuple, Tensor] = {}
        self.reference_logprobs: Tensor | None = None
        self.reference_continuation: Tensor | None = None
        self.responses: list[str] = []
        self.result: dict[str, float] = {}
        self._rows: dict[str, list[tuple[Tensor, Tensor]]] = {}

    # ---- loading -------------------------------------------------------------------
    # The HF model is kept out of the LightningModule's submodules: Lightning moves a module to
    # the CPU at the end of every Trainer call, which would copy the whole model once per trial.
    @property
    def model(self):
        return self.__dict__.get("_hf_model")

    @model.setter
    def model(self, value) -> None:
        self.__dict__["_hf_model"] = value

    def _require_model_id(self) -> str:
        if not self.model_id:
            raise AbliterateError("no model given: pass --model <hub id or local dir>")
        return self.model_id

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            opts = self.load_options
            self._tokenizer = load_tokenizer(
                self._require_model_id(),
                revision=opts.revision,
                trust_remote_code=opts.trust_remote_code,
                gguf_file=opts.gguf_file,
            )
        return self._tokenizer

    @override
    def configure_model(self) -> None:
        # Runs on every Trainer call: load once, then keep the model on the strategy's device.
        if self.model is None:
            self._load()
        if self._trainer is not None and self.load_options.device_map is None:
            device = self.trainer.strategy.root_device
            if self.model.device != device:
                self.model.to(device)

    def _load(self) -> None:
        start = time.perf_counter()
        opts = self.load_options
        self.__dict__["_hf_model"] = load_model(  # not self.model =: nn.Module would register it
            self._require_model_id(),
            dtypes=opts.dtypes,
            device_map=opts.device_map,
            revision=opts.revision,
            trust_remote_code=opts.trust_remote_code,
            gguf_file=opts.gguf_file,
            load_in_4bit=opts.load_in_4bit,
        )
        log.info(
            "loaded %s in %.1fs: %s", self.model_id, time.perf_counter() - start, describe_architecture(self.model)
        )

    def weight_editor(self) -> WeightEditor:
        if self.editor is None:
            self.editor = WeightEditor(residual_writers(self.model), gains=post_norm_gains(self.model))
        return self.editor

    @property
    def n_layers(self) -> int:
        return len(decoder_layers(self.model))

    # ---- predict -------------------------------------------------------------------
    @override
    def on_predict_epoch_start(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}")
        self._rows = {}
        self.refusal_rate.reset()
        self.kl_divergence.reset()
        self.responses = []

    @override
    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        role, ids, mask = batch["role"], batch["input_ids"], batch["attention_mask"]
        if self.task == "residuals":
            with capture_last_token(decoder_layers(self.model)) as captured:
                self.model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
            self._keep(role, torch.stack(captured, dim=1), batch["index"])
        elif role == "eval_harmless":
            if self.task == "baseline":
                continuation = greedy_continuation(
                    self.model, ids, mask, self.eval_options.kl_tokens, self.tokenizer.pad_token_id
                )
                logprobs = next_token_logprobs(self.model, ids, mask, continuation)
                self._keep("logprobs", logprobs, batch["index"])
                self._keep("continuation", continuation, batch["index"])
            else:
                reference = self.reference_logprobs[batch["index"].cpu()].to(ids.device)
                continuation = self.reference_continuation[batch["index"].cpu()].to(ids.device)
                self.kl_divergence.update(next_token_logprobs(self.model, ids, mask, continuation), reference)
        elif role == "eval_harmful":
            responses = generate_responses(
                self.model,
                self.tokenizer,
                ids,
                mask,
                max_new_tokens=self.eval_options.max_new_tokens,
                markers=self.markers,
            )
            self.refusal_rate.update(responses)
            self.responses.extend(responses)
        else:
            raise ValueError(f"task {self.task} does not take role {role}")

    def _keep(self, name: str, rows: Tensor, index: Tensor) -> None:
        self._rows.setdefault(name, []).append((rows, index))

    @override
    def on_predict_epoch_end(self) -> None:
        gathered = {name: self._gather(parts) for name, parts in self._rows.items()}
        if self.task == "residuals":
            self.residuals.update(gathered)
            self.directions = self.directions_for(self.direction_options)
        if self.task == "baseline":
            if "logprobs" in gathered:
                self.reference_logprobs = gathered["logprobs"].cpu()
                self.reference_continuation = gathered["continuation"].cpu()
            if self.refusal_rate.total.item() > 0 or self.trainer.world_size > 1:
                self.result = {"refusal_rate": self.refusal_rate.compute().item()}
        if self.task == "evaluate":
            self.result = {
                "kl": self.kl_divergence.compute().item(),
                "refusal_rate": self.refusal_rate.compute().item(),
            }

    def _gather(self, parts: list[tuple[Tensor, Tensor]]) -> Tensor:
        """Rows of all ranks in prompt order; uneven shards are padded, gathered and trimmed."""
        rows = torch.cat([r for r, _ in parts])
        index = torch.cat([i for _, i in parts]).to(rows.device)
        if self.trainer.world_size > 1:
            count = torch.tensor([rows.shape[0]], device=rows.device)
            width = int(self.all_gather(count).max())
            padded = rows.new_zeros((width, *rows.shape[1:]))
            padded[: rows.shape[0]] = rows
            padded_index = torch.full((width,), -1, dtype=index.dtype, device=index.device)
            padded_index[: index.shape[0]] = index
            rows = self.all_gather(padded).flatten(0, 1)
            index = self.all_gather(padded_index).flatten()
            keep = index >= 0
            rows, index = rows[keep], index[keep]
        return rows[index.argsort()]

    # ---- directions ----------------------------------------------------------------
    def directions_for(self, options: DirectionOptions) -> Tensor:
        """Refusal directions [L, k, d] from the collected residuals, memoised per option set."""
        key = (options.method, options.k, options.alpha, options.projected)
        if key not in self._direction_cache:
            for role in ("harmful", "harmless"):
                if role not in self.residuals:
                    raise RuntimeError(f"no {role} residuals: run the residuals task first")
            start = time.perf_counter()
            self._direction_cache[key] = compute_directions(
                self.residuals["harmful"],
                self.residuals["harmless"],
                method=options.method,
                k=options.k,
                alpha=options.alpha,
                projected=options.projected,
                unhelpful=self.residuals.get("unhelpful"),
            )
            log.info("computed %s directions (k=%d) in %.3fs", options.method, options.k, time.perf_counter() - start)
        return self._direction_cache[key]

    def set_residuals(self, residuals: dict[str, Tensor]) -> None:
        """Install residuals loaded from the cache."""
        self.residuals = dict(residuals)
        self._direction_cache.clear()
        self.directions = self.directions_for(self.direction_options)

    @override
    def configure_optimizers(self):
        return None
