"""AbliterationModule: the model, its residual hooks, its scorers, and refusal directions.

Each `Trainer.predict` runs one pass (see passes.py): the module hands every batch to the pass
that is active (`running`), or to a residual pass when none is, so that a plain
`trainer.predict(module, datamodule=data)` collects residuals and sets `module.directions`.
"""

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import astuple

import lightning as L
import torch
from torch import Tensor, nn
from typing_extensions import override

from abliterate.ablation import WeightEditor
from abliterate.directions import compute_directions
from abliterate.editing import make_editor, writers_of
from abliterate.errors import AbliterateError
from abliterate.hooks import HookEditor
from abliterate.metrics import default_markers
from abliterate.models import (
    decoder_layers,
    describe_architecture,
    load_model,
    load_tokenizer,
)
from abliterate.options import DirectionOptions, EvalOptions, LoadOptions
from abliterate.passes import Pass, ResidualPass, Residuals
from abliterate.scorers import Scorer, default_scorers

log = logging.getLogger("abliterate.module")


@contextmanager
def capture_prompt_end(
    layers: Sequence[nn.Module], positions: int = 1, attention_mask: Tensor | None = None
) -> Iterator[list[Tensor | None]]:
    """Record each layer's output residual at the last position (fp32), or averaged over the last `positions`
    (left-padded batches: `attention_mask` leaves out the pads of prompts shorter than that); removes only its
    own hooks."""
    captured: list[Tensor | None] = [None] * len(layers)

    def make_hook(i: int):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if positions == 1:
                captured[i] = hidden[:, -1, :].float()
            else:
                weights = attention_mask[:, -positions:, None].to(torch.float32)
                captured[i] = (hidden[:, -positions:, :].float() * weights).sum(1) / weights.sum(1)

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
    """A causal LM with residual capture, refusal directions and the scorers trials are judged by."""

    def __init__(
        self,
        model_id: str | None = None,
        load: LoadOptions = LoadOptions(),
        evaluation: EvalOptions = EvalOptions(),
        scorers: list[Scorer] | None = None,
        residual_positions: int = 1,
    ):
        """
        Args:
            model_id: hub id or local dir of the model (set with the top-level --model).
            load: how the model is loaded.
            evaluation: how replies are generated and refusals and KL measured.
            scorers: the search objectives, first the refusal rate; None: refusals by markers, then KL
                over `evaluation.kl_tokens` reply tokens, with Degeneration reported (not optimised).
            residual_positions: directions read each layer's output averaged over the last n prompt tokens;
                1 (default) reads the last only. More also reads the chat template's tokens before the reply
                (e.g. the assistant header), where a refusal may be decided.
        """
        super().__init__()
        if residual_positions < 1:
            raise AbliterateError(f"module.residual_positions={residual_positions}: give 1 or more prompt tokens")
        self.model_id = model_id
        self.residual_positions = residual_positions
        self.load_options = load
        self.eval_options = evaluation
        self.markers = list(evaluation.markers) if evaluation.markers else default_markers()
        if scorers is None:
            scorers = default_scorers(evaluation)
        check_scorers(scorers)
        self.scorers = nn.ModuleList(scorers)
        self._tokenizer = None
        self.editor: WeightEditor | None = None
        self.active_pass: Pass | None = None
        self._default_pass = ResidualPass()
        # Set by a residual pass run without `running` (programmatic use), or from the cache.
        self.residuals: dict[str, Tensor] = {}
        self.directions: Tensor | None = None
        self._direction_cache: dict[tuple, Tensor] = {}

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
            "loaded %s in %.1fs: %s",
            self.model_id,
            time.perf_counter() - start,
            describe_architecture(self.model, writers_of(self.model)),  # also packed 4-bit writers
        )

    def weight_editor(self) -> WeightEditor | HookEditor:
        """Applies trials: weight edits, or forward hooks where weights cannot be edited (load.edit_mode)."""
        if self.editor is None:
            self.editor = make_editor(self.model, self.load_options.edit_mode)
        return self.editor

    @property
    def n_layers(self) -> int:
        return len(decoder_layers(self.model))

    # ---- passes --------------------------------------------------------------------
    @contextmanager
    def running(self, pass_: Pass) -> Iterator[Pass]:
        """Make `pass_` the one the next `predict` runs."""
        self.active_pass = pass_
        try:
            yield pass_
        finally:
            self.active_pass = None

    @property
    def current_pass(self) -> Pass:
        # Without `running` (a plain trainer.predict(module, datamodule=...)): collect residuals.
        return self.active_pass or self._default_pass

    @override
    def on_predict_epoch_start(self) -> None:
        self.current_pass.start(self)

    @override
    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.current_pass.step(self, batch)

    @override
    def on_predict_epoch_end(self) -> None:
        pass_ = self.current_pass
        pass_.finish(self)
        if pass_ is self._default_pass:
            self.set_residuals(pass_.result)

    def prompt_end_residuals(self, batch: dict) -> Tensor:
        """[batch, layers, hidden]: every layer's output at the last prompt token (or the mean over the last
        `residual_positions`)."""
        positions, mask = self.residual_positions, batch["attention_mask"]
        with capture_prompt_end(decoder_layers(self.model), positions, mask) as captured:
            self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=1)
        return torch.stack(captured, dim=1)

    def gather(self, parts: list[tuple[Tensor, Tensor]]) -> Tensor:
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
    def set_residuals(self, residuals: Residuals) -> None:
        """Install residuals (from a pass or the cache); directions are computed from them on demand."""
        self.residuals = dict(residuals.tensors)
        self._direction_cache.clear()
        self.directions = self.directions_for(DirectionOptions())

    def directions_for(self, options: DirectionOptions) -> Tensor:
        """Refusal directions [L, k, d] from the collected residuals, memoised per option set."""
        key = astuple(options)  # every field: a new direction option cannot be left out of the key
        if key not in self._direction_cache:
            for role in ("harmful", "harmless"):
                if role not in self.residuals:
                    raise RuntimeError(f"no {role} residuals: run the residual pass first")
            start = time.perf_counter()
            self._direction_cache[key] = compute_directions(
                self.residuals["harmful"],
                self.residuals["harmless"],
                method=options.method,
                k=options.k,
                alpha=options.alpha,
                projected=options.projected,
                unhelpful=self.residuals.get("unhelpful"),
                winsorize_quantile=options.winsorize,
            )
            log.info("computed %s directions (k=%d) in %.3fs", options.method, options.k, time.perf_counter() - start)
        return self._direction_cache[key]

    @override
    def configure_optimizers(self):
        return None


def check_scorers(scorers: Sequence[Scorer]) -> None:
    """The first objective must be a refusal rate (the target and selection constrain it); names are unique."""
    objectives = [s for s in scorers if s.is_objective]
    if len(objectives) < 2 or not objectives[0].is_refusal_rate:
        raise AbliterateError(
            "module.scorers needs a refusal rate as its first objective and at least one more objective "
            "(e.g. [MarkerRefusals, KL]); set the others' direction to report to only report them"
        )
    names = [s.name for s in scorers]
    if len(set(names)) != len(names):
        raise AbliterateError(f"module.scorers names must be unique, got {names}")
