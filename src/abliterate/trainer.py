"""AbliterationTrainer: a Lightning Trainer whose methods are the CLI verbs, each delegating to `abliterate.verbs`
or `verbs_inspect` with the module as `model` and the PromptDataModule as `datamodule` (LightningCLI's names)."""

from pathlib import Path

import lightning as L
import optuna

from abliterate import verbs, verbs_inspect
from abliterate.benchmark import BenchmarkOptions
from abliterate.callbacks import StderrProgressBar
from abliterate.data import PromptDataModule
from abliterate.module import AbliterationModule
from abliterate.options import ClassifierOptions, DirectionOptions, ExportFormat, HubOptions, SearchSpace, StudyOptions


class AbliterationTrainer(L.Trainer):
    """A Trainer with abliteration verbs. Defaults suit inference: no logger, no checkpoints."""

    def __init__(
        self,
        *args,
        logger=False,
        enable_checkpointing: bool = False,
        enable_model_summary: bool = False,
        inference_mode: bool = False,
        use_distributed_sampler: bool = False,
        **kwargs,
    ):
        if kwargs.get("enable_progress_bar", True):
            kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), StderrProgressBar()]
        # inference_mode=False: edits and cached tensors outlive predict; PromptDataModule shards itself (no sampler).
        kwargs.update(logger=logger, enable_checkpointing=enable_checkpointing, inference_mode=inference_mode)
        kwargs.update(enable_model_summary=enable_model_summary, use_distributed_sampler=use_distributed_sampler)
        super().__init__(*args, **kwargs)

    def run(
        self,
        model: AbliterationModule,
        datamodule: PromptDataModule,
        study: StudyOptions = StudyOptions(),
        space: SearchSpace = SearchSpace(),
        output_dir: str = "outputs",
        export_dir: str | None = None,
        overwrite: bool = False,
        classifier: ClassifierOptions = ClassifierOptions(),
        export_format: ExportFormat = "merged",
        hub: HubOptions = HubOptions(),
    ) -> Path:
        """Main job: directions, search, select a trial, export the model (rerun the same command to resume).

        Args:
            output_dir: run dir: study.db, cache/, trials.csv, pareto.png (rerun to resume).
            export_dir: where the model is written; default OUTPUT_DIR/model.
            overwrite: replace an existing export this tool made elsewhere (never other files).
            export_format: merged (a full checkpoint), adapter (a PEFT LoRA adapter) or both (the adapter in adapter/).
        """
        return verbs.run(
            self, model, datamodule, study, space, output_dir, export_dir, overwrite, classifier, export_format, hub
        )

    def directions(
        self,
        model: AbliterationModule,
        datamodule: PromptDataModule,
        output_dir: str = "outputs",
        direction: DirectionOptions = DirectionOptions(),
    ) -> Path:
        """Collect residuals (the run dir's cache) and compute refusal directions: OUTPUT_DIR/directions.safetensors.

        Args:
            direction: how the directions are computed (e.g. --direction.method contrastive_pca --direction.k 3).
        """
        return verbs.directions(self, model, datamodule, output_dir, direction)

    def search(
        self,
        model: AbliterationModule,
        datamodule: PromptDataModule,
        study: StudyOptions = StudyOptions(),
        space: SearchSpace = SearchSpace(),
        output_dir: str = "outputs",
        classifier: ClassifierOptions = ClassifierOptions(),
    ) -> optuna.Study:
        """Run Optuna trials (resumes the study in OUTPUT_DIR) and write trials.csv and pareto.png."""
        return verbs.search(self, model, datamodule, study, space, output_dir, classifier)

    def inspect(
        self,
        model: AbliterationModule,
        datamodule: PromptDataModule,
        study: StudyOptions = StudyOptions(),
        space: SearchSpace = SearchSpace(),
        output_dir: str = "outputs",
        direction: DirectionOptions = DirectionOptions(),
    ) -> Path:
        """Per-layer refusal-direction views of a run dir in OUTPUT_DIR/inspect: layers.csv and plots, pareto.png."""
        return verbs_inspect.inspect(self, model, datamodule, study, space, output_dir, direction)

    def evaluate(
        self,
        model: AbliterationModule,
        datamodule: PromptDataModule,
        study: StudyOptions = StudyOptions(),
        space: SearchSpace = SearchSpace(),
        output_dir: str = "outputs",
        trial: int | None = None,
    ) -> dict[str, float]:
        """Every scorer on the model, or on a trial of the study applied to it, against the original.

        Args:
            trial: trial number to apply; None evaluates the unmodified model.
        """
        return verbs_inspect.evaluate(self, model, datamodule, study, space, output_dir, trial)

    def export(
        self,
        model: AbliterationModule,
        datamodule: PromptDataModule,
        study: StudyOptions = StudyOptions(),
        space: SearchSpace = SearchSpace(),
        output_dir: str = "outputs",
        export_dir: str | None = None,
        trial: int | None = None,
        overwrite: bool = False,
        export_format: ExportFormat = "merged",
        hub: HubOptions = HubOptions(),
    ) -> Path:
        """Merge a trial into the weights and save a normal HF checkpoint.

        Args:
            export_dir: where the model is written; default OUTPUT_DIR/model.
            trial: trial number; None applies study.select.
            overwrite: replace an existing export this tool made elsewhere (never other files).
            export_format: merged (a full checkpoint), adapter (a PEFT LoRA adapter) or both (the adapter in adapter/).
        """
        return verbs.export(
            self, model, datamodule, study, space, output_dir, export_dir, trial, overwrite, export_format, hub
        )

    def chat(
        self,
        model: AbliterationModule,
        datamodule: PromptDataModule,
        study: StudyOptions = StudyOptions(),
        space: SearchSpace = SearchSpace(),
        output_dir: str = "outputs",
        trial: int | None = None,
        compare: bool = False,
        max_new_tokens: int = 256,
    ) -> None:
        """A streaming multi-turn chat (/reset, /system TEXT; an empty line, Ctrl-D or Ctrl-C quits).

        Args:
            trial: trial number to apply; None chats with the unmodified model.
            compare: answer each prompt with the original and with --trial N, labelled, one model in memory.
            max_new_tokens: reply length limit (Ctrl-C stops a reply).
        """
        verbs_inspect.chat(self, model, datamodule, study, space, output_dir, trial, max_new_tokens, compare)

    def reproduce(self, model: AbliterationModule, datamodule: PromptDataModule, export_dir: str = "") -> None:
        """Re-derive the edit of the export in --export_dir from its base and reproduce.json; exit 1 if it differs."""
        verbs_inspect.reproduce(self, model, export_dir)

    def demo(
        self,
        model: AbliterationModule,
        datamodule: PromptDataModule,
        output_dir: str = "abliterate-demo",
        n_trials: int = 30,
        overwrite: bool = False,
        cache_dir: str | None = None,
    ) -> Path:
        """Offline demo: train a tiny refusing model, abliterate it, print before/after.

        Args:
            output_dir: run dir; the abliterated model goes to OUTPUT_DIR/model.
            n_trials: search budget.
            overwrite: replace an existing export this tool made elsewhere.
            cache_dir: where the trained organism is cached (default ~/.cache/abliterate).
        """
        return verbs.demo(self, model, datamodule, output_dir, n_trials, overwrite, cache_dir)

    def benchmark(
        self,
        model: AbliterationModule,
        datamodule: PromptDataModule,
        output_dir: str = "outputs",
        compare: str | None = None,
        lm_eval: BenchmarkOptions = BenchmarkOptions(),
    ) -> list:
        """lm-eval tasks on the original and the abliterated model, side by side (pip install 'abliterate[benchmark]').

        Args:
            output_dir: run dir: its model is the original, its export (OUTPUT_DIR/model) the abliterated one.
            compare: the abliterated model's dir instead of the run's export (with --model, the original).
        """
        return verbs_inspect.benchmark(self, model, datamodule, output_dir, compare, lm_eval)
