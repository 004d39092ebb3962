"""AbliterationTrainer: a Lightning Trainer whose methods are the CLI verbs.

Every verb takes the LightningModule as `model` and the PromptDataModule as `datamodule`
(LightningCLI passes them under these names).
"""

import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import lightning as L
import optuna
import torch
from torch import Tensor

from abliterate.ablation import AblationParams
from abliterate.cache import fingerprint, load_tensors, save_tensors
from abliterate.callbacks import ApplyAblation
from abliterate.classifier import ClassifierOptions
from abliterate.data import EVAL_ROLES, RESIDUAL_ROLES, PromptDataModule
from abliterate.errors import AbliterateError
from abliterate.export import check_writable, save_checkpoint
from abliterate.module import AbliterationModule
from abliterate.options import DirectionOptions, SearchSpace, StudyOptions
from abliterate.search import (
    TrialPlan,
    check_objective,
    make_study,
    pareto_front,
    plot_pareto,
    run_search,
    sample_plan,
    select_trial,
    write_trials_csv,
)

log = logging.getLogger("abliterate")

CACHE_VERSION = "1"


def model_stamp(model_id: str | None) -> str:
    """The model id, plus the files' sizes and mtimes for a local dir: a model rewritten in place invalidates caches."""
    path = Path(model_id or "")
    if not model_id or not path.is_dir():
        return str(model_id)
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir() if p.is_file())
    return f"{model_id}:{fingerprint(files)}"


def objective(model: AbliterationModule, datamodule: PromptDataModule) -> dict:
    """What a trial's (refusal rate, KL) depends on besides its parameters, as a study records it."""
    return {
        "model": str(model.model_id),
        "kl_tokens": model.eval_options.kl_tokens,
        "max_new_tokens": model.eval_options.max_new_tokens,
        "refusal_markers": fingerprint(model.markers),
        "eval_prompts": fingerprint(datamodule.fingerprint_parts(EVAL_ROLES)),
    }


def local_study_url(output_dir: Path) -> str:
    """The default storage: SQLite file study.db in the run dir."""
    return f"sqlite:///{(output_dir / 'study.db').resolve()}"


def run_dir(output_dir: str) -> Path:
    """The run dir with its cache/ subdir, created; a clear error when it can't be."""
    out = Path(output_dir)
    try:
        (out / "cache").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise AbliterateError(f"cannot create {out}: {err.strerror}; choose a writable --output_dir") from err
    return out


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
        # inference_mode=False: weight edits and cached tensors must stay usable outside predict.
        super().__init__(
            *args,
            logger=logger,
            enable_checkpointing=enable_checkpointing,
            enable_model_summary=enable_model_summary,
            inference_mode=inference_mode,
            use_distributed_sampler=use_distributed_sampler,  # PromptDataModule shards itself
            **kwargs,
        )
        # The parsed CLI config, set by the CLI; worker processes are started from it.
        self.cli_config: dict | None = None

    # ---- building blocks (also for programmatic use) ---------------------------------
    def collect_residuals(
        self, model: AbliterationModule, datamodule: PromptDataModule, cache_dir: Path | None
    ) -> Tensor:
        """Residuals of the direction roles (cached on disk), then the configured directions."""
        key = fingerprint(
            CACHE_VERSION,
            model_stamp(model.model_id),
            asdict(model.load_options),
            datamodule.fingerprint_parts(RESIDUAL_ROLES),
        )
        path = cache_dir / "residuals.safetensors" if cache_dir else None
        cached = load_tensors(path, key) if path else None
        if cached is not None:
            log.info(
                "reusing cached residuals from %s (%s)",
                path,
                ", ".join(f"{k} {tuple(v.shape)}" for k, v in cached.items()),
            )
            model.set_residuals(cached)
            return model.directions
        start = time.perf_counter()
        model.task = "residuals"
        datamodule.use(RESIDUAL_ROLES)
        self.predict(model, datamodule=datamodule, return_predictions=False)
        log.info("collected residuals in %.1fs", time.perf_counter() - start)
        if path and self.is_global_zero:
            save_tensors(path, model.residuals, key)
        return model.directions

    def compute_baseline(
        self, model: AbliterationModule, datamodule: PromptDataModule, cache_dir: Path | None
    ) -> float:
        """The original model's reference log-probs and refusal rate (cached on disk)."""
        key = fingerprint(
            CACHE_VERSION,
            model_stamp(model.model_id),
            asdict(model.load_options),
            asdict(model.eval_options),
            model.markers,
            datamodule.fingerprint_parts(EVAL_ROLES),
        )
        path = cache_dir / "baseline.safetensors" if cache_dir else None
        # Under DDP this pass also starts the other ranks before the search needs them, so it always runs.
        cached = load_tensors(path, key) if path and self.world_size == 1 else None
        if cached is not None:
            log.info("reusing cached baseline from %s", path)
            model.reference_logprobs = cached["logprobs"]
            model.reference_continuation = cached["continuation"]
            model.result = {"refusal_rate": float(cached["refusal_rate"])}
            return model.result["refusal_rate"]
        start = time.perf_counter()
        model.task = "baseline"
        datamodule.use(EVAL_ROLES)
        self.predict(model, datamodule=datamodule, return_predictions=False)
        log.info(
            "baseline: refusal rate %.3f on %d harmful prompts (%.1fs)",
            model.result["refusal_rate"],
            len(datamodule.dataset("eval_harmful")),
            time.perf_counter() - start,
        )
        if path and self.is_global_zero:
            tensors = {
                "logprobs": model.reference_logprobs,
                "continuation": model.reference_continuation,
                "refusal_rate": torch.tensor(model.result["refusal_rate"]),
            }
            save_tensors(path, tensors, key)
        return model.result["refusal_rate"]

    def evaluate_plan(
        self,
        model: AbliterationModule,
        datamodule: PromptDataModule,
        ablation: AblationParams,
        directions: Tensor,
        extra_callbacks: Sequence[L.Callback] = (),
    ) -> dict[str, float]:
        """One trial: KL on the harmless eval prompts, then refusals on the harmful ones."""
        if model.reference_logprobs is None:
            raise RuntimeError("compute_baseline must run before evaluate_plan")
        model.task = "evaluate"
        datamodule.use(EVAL_ROLES)
        added = [ApplyAblation(ablation, directions), *extra_callbacks]
        self.callbacks.extend(added)
        try:
            self.predict(model, datamodule=datamodule, return_predictions=False)
        finally:
            for callback in added:
                self.callbacks.remove(callback)
        return dict(model.result)

    def prepare(self, model: AbliterationModule, datamodule: PromptDataModule, output_dir: str) -> tuple[Path, float]:
        """Directions and baseline, reusing the run dir's cache."""
        out = run_dir(output_dir)
        datamodule.attach_tokenizer(model.tokenizer)
        self.collect_residuals(model, datamodule, out / "cache")
        baseline = self.compute_baseline(model, datamodule, out / "cache")
        model.configure_model()  # with both caches hit, nothing has loaded the model yet
        return out, baseline

    def open_study(
        self, output_dir: Path, study: StudyOptions, scoring: tuple[AbliterationModule, PromptDataModule] | None = None
    ) -> optuna.Study:
        """Open (or create) the study; with `scoring`, a study that will get new trials must match how they are scored."""
        from abliterate.workers import is_worker

        storage = study.storage or local_study_url(output_dir)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # Under DDP rank 0 creates the study first; the other ranks then load it.
        if self.world_size > 1 and not self.is_global_zero:
            self.strategy.barrier("open_study")
        optuna_study = make_study(study, storage)
        if self.world_size > 1 and self.is_global_zero:
            self.strategy.barrier("open_study")
        if not is_worker() and study.storage is None and self.is_global_zero:
            # This process owns the local study: RUNNING trials were left by a killed run.
            for t in optuna_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
                optuna_study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
                log.info("trial %d was interrupted in an earlier run; marked FAIL", t.number)
        if scoring is not None:
            check_objective(optuna_study, objective(*scoring), record=self.is_global_zero)
        return optuna_study

    def _check_local_study(self, output_dir: Path, study: StudyOptions, model, datamodule) -> None:
        """The `open_study` scoring check, early: before residuals and baseline cost minutes (read-only)."""
        if study.storage is not None or not (output_dir / "study.db").is_file():
            return
        try:
            existing = optuna.load_study(study_name=study.study_name, storage=local_study_url(output_dir))
        except KeyError:  # the file holds no study of that name yet
            return
        check_objective(existing, objective(model, datamodule), record=False)

    def plan_for(self, model: AbliterationModule, trial: optuna.trial.FrozenTrial, space: SearchSpace) -> TrialPlan:
        try:
            return sample_plan(trial, space, model.n_layers)
        except ValueError as error:  # a parameter the current sampler asks for was never stored
            raise AbliterateError(
                f"trial {trial.number} cannot be rebuilt from its stored parameters ({error}); it was made "
                "by another abliterate version or search space: search again with a new --output_dir"
            ) from error

    # ---- verbs --------------------------------------------------------------------
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
    ) -> Path:
        """Main job: directions, search, select a trial, export the model.

        Args:
            study: how trials run and which is picked.
            space: the ablation parameter ranges.
            output_dir: run dir: study.db, cache/, trials.csv, pareto.png (rerun to resume).
            export_dir: where the model is written; default OUTPUT_DIR/model.
            overwrite: replace an existing export.
            classifier: an optional model that re-checks the best Pareto trials' refusals after the search.
        """
        start = time.perf_counter()
        target = Path(export_dir) if export_dir else Path(output_dir) / "model"
        check_writable(target, overwrite)
        self._check_local_study(Path(output_dir), study, model, datamodule)
        out, baseline = self.prepare(model, datamodule, output_dir)
        optuna_study = self.open_study(out, study, scoring=(model, datamodule))
        self._search(model, datamodule, optuna_study, study, space)
        self._recheck(model, datamodule, optuna_study, space, classifier, out)
        chosen = self._report(optuna_study, study, out, interactive=True)
        plan = self.plan_for(model, chosen, space)
        self._export(model, plan, chosen, baseline, target, overwrite)
        summary = {
            "refusal_before": baseline,
            "refusal_after": chosen.values[0],
            "kl": chosen.values[1],
            "trial": chosen.number,
            "export": str(target),
            "seconds": round(time.perf_counter() - start, 1),
        }
        if self.is_global_zero:
            print(
                f"\nabliterated {model.model_id} with trial {chosen.number}\n"
                f"  refusal rate on {len(datamodule.dataset('eval_harmful'))} harmful prompts: "
                f"{baseline:.3f} before -> {chosen.values[0]:.3f} after\n"
                f"  KL divergence on {len(datamodule.dataset('eval_harmless'))} harmless prompts: "
                f"0 before -> {chosen.values[1]:.4f} after\n"
                f"  model written to {target}\n"
            )
            print(json.dumps(summary))
        return target

    def directions(
        self,
        model: AbliterationModule,
        datamodule: PromptDataModule,
        output_dir: str = "outputs",
        direction_method: str | None = None,
        k: int | None = None,
        alpha: float | None = None,
    ) -> Path:
        """Collect residuals and compute refusal directions, saved to OUTPUT_DIR/directions.safetensors.

        Args:
            output_dir: run dir (its cache is reused).
            direction_method: shortcut for --module.directions.method.
            k: shortcut for --module.directions.k.
            alpha: shortcut for --module.directions.alpha.
        """
        opts = model.direction_options
        model.direction_options = DirectionOptions(
            method=direction_method or opts.method,
            k=k if k is not None else opts.k,
            alpha=alpha if alpha is not None else opts.alpha,
            projected=opts.projected,
        )
        out = run_dir(output_dir)
        datamodule.attach_tokenizer(model.tokenizer)
        directions = self.collect_residuals(model, datamodule, out / "cache")
        path = out / "directions.safetensors"
        if self.is_global_zero:
            info = {"model": str(model.model_id), "options": json.dumps(asdict(model.direction_options))}
            save_tensors(path, {"directions": directions}, key=fingerprint(info), info=info)
            log.info("saved directions %s to %s", tuple(directions.shape), path)
        return path

    def search(
        self,
        model: AbliterationModule,
        datamodule: PromptDataModule,
        study: StudyOptions = StudyOptions(),
        space: SearchSpace = SearchSpace(),
        output_dir: str = "outputs",
        classifier: ClassifierOptions = ClassifierOptions(),
    ) -> optuna.Study:
        """Run Optuna trials (resumes the study in OUTPUT_DIR) and write trials.csv and pareto.png.

        Args:
            study: how trials run and which is picked.
            space: the ablation parameter ranges.
            output_dir: run dir: study.db, cache/, trials.csv, pareto.png.
            classifier: an optional model that re-checks the best Pareto trials' refusals after the search.
        """
        self._check_local_study(Path(output_dir), study, model, datamodule)
        out, _ = self.prepare(model, datamodule, output_dir)
        optuna_study = self.open_study(out, study, scoring=(model, datamodule))
        self._search(model, datamodule, optuna_study, study, space)
        from abliterate.workers import is_worker

        if not is_worker():  # the coordinator reports once all workers are done
            self._recheck(model, datamodule, optuna_study, space, classifier, out)
            self._report(optuna_study, study, out)
        return optuna_study

    def evaluate(
        self,
        model: AbliterationModule,
        datamodule: PromptDataModule,
        study: StudyOptions = StudyOptions(),
        space: SearchSpace = SearchSpace(),
        output_dir: str = "outputs",
        trial: int | None = None,
    ) -> dict[str, float]:
        """Refusals and KL of the model, or of a trial of the study applied to it, against the original.

        Args:
            study: where the study is (storage, study_name).
            space: the search space the study used.
            output_dir: run dir.
            trial: trial number to apply; None evaluates the unmodified model.
        """
        out, baseline = self.prepare(model, datamodule, output_dir)
        result = {"refusal_before": baseline}
        if trial is not None:
            frozen = self._trial(self.open_study(out, study), trial)
            plan = self.plan_for(model, frozen, space)
            after = self.evaluate_plan(model, datamodule, plan.ablation, model.directions_for(plan.directions))
            result.update({"trial": trial, "refusal_after": after["refusal_rate"], "kl": after["kl"]})
        print(json.dumps(result))
        return result

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
    ) -> Path:
        """Merge a trial into the weights and save a normal HF checkpoint.

        Args:
            study: the study (storage, study_name) and the selection policy.
            space: the search space the study used.
            output_dir: run dir.
            export_dir: where the model is written; default OUTPUT_DIR/model.
            trial: trial number; None applies study.select.
            overwrite: replace an existing export.
        """
        target = Path(export_dir) if export_dir else Path(output_dir) / "model"
        check_writable(target, overwrite)
        out, baseline = self.prepare(model, datamodule, output_dir)
        optuna_study = self.open_study(out, study)
        chosen = (
            self._trial(optuna_study, trial)
            if trial is not None
            else self._report(optuna_study, study, out, interactive=True)
        )
        self._export(model, self.plan_for(model, chosen, space), chosen, baseline, target, overwrite)
        return target

    def chat(
        self,
        model: AbliterationModule,
        datamodule: PromptDataModule,
        study: StudyOptions = StudyOptions(),
        space: SearchSpace = SearchSpace(),
        output_dir: str = "outputs",
        trial: int | None = None,
        max_new_tokens: int = 256,
    ) -> None:
        """A streaming chat REPL with the model, or with a trial applied (empty line or Ctrl-D quits).

        Args:
            study: the study (storage, study_name).
            space: the search space the study used.
            output_dir: run dir.
            trial: trial number to apply; None chats with the unmodified model.
            max_new_tokens: reply length limit.
        """
        from abliterate.chat import chat_loop

        model.configure_model()
        if trial is not None:
            out, _ = self.prepare(model, datamodule, output_dir)
            frozen = self._trial(self.open_study(out, study), trial)
            plan = self.plan_for(model, frozen, space)
            model.weight_editor().apply(plan.ablation, model.directions_for(plan.directions))
        chat_loop(model.model, model.tokenizer, datamodule, max_new_tokens=max_new_tokens)

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
            overwrite: replace an existing exported model.
            cache_dir: where the trained organism is cached (default ~/.cache/abliterate).
        """
        from abliterate.demo import configure_demo

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        study, space = configure_demo(model, datamodule, n_trials=n_trials, cache_dir=cache_dir)
        return self.run(model, datamodule, study=study, space=space, output_dir=output_dir, overwrite=overwrite)

    # ---- helpers ------------------------------------------------------------------
    def _search(self, model, datamodule, optuna_study, study: StudyOptions, space: SearchSpace) -> None:
        if study.workers > 1:
            from abliterate.workers import run_workers

            if self.cli_config is None:
                raise AbliterateError(
                    "study.workers > 1 runs worker processes through the CLI; use `abliterate search`"
                )
            out = Path(self.cli_config.get("output_dir", "outputs"))
            run_workers(optuna_study, study.workers, study.n_trials, self.cli_config, out)
            return
        try:
            run_search(self, model, datamodule, study, space, optuna_study)
        except (KeyboardInterrupt, SystemExit) as err:
            raise SystemExit(
                f"interrupted; the running trial is marked FAIL and finished trials are kept in study "
                f"{optuna_study.study_name!r}. Rerun the same command to resume."
            ) from err

    def _recheck(self, model, datamodule, optuna_study, space: SearchSpace, classifier: ClassifierOptions, out: Path):
        """Re-judge the best Pareto trials' harmful responses with the classifier (reported, not used to select)."""
        if not (classifier.enabled and classifier.recheck_top):
            return
        from abliterate.classifier import RefusalClassifier, recheck_pareto

        judge = RefusalClassifier(classifier, device=self.strategy.root_device)
        trials = optuna_study.get_trials(deepcopy=False)
        rows = recheck_pareto(self, model, datamodule, trials, space, judge, classifier.recheck_top)
        if self.is_global_zero:
            (out / "classifier_recheck.json").write_text(json.dumps(rows, indent=2))

    def _trial(self, optuna_study: optuna.Study, number: int) -> optuna.trial.FrozenTrial:
        return select_trial(optuna_study.get_trials(deepcopy=False), str(number), 0.0)

    def _report(
        self, optuna_study: optuna.Study, study: StudyOptions, out: Path, interactive: bool = False
    ) -> optuna.trial.FrozenTrial:
        trials = optuna_study.get_trials(deepcopy=False)
        chosen = select_trial(trials, study.select, study.refusal_target)
        if self.is_global_zero:
            write_trials_csv(trials, out / "trials.csv")
            plot_pareto(trials, chosen, out / "pareto.png")
        states = {s.name: sum(t.state == s for t in trials) for s in optuna.trial.TrialState}
        front = pareto_front(trials)
        log.info("study: %s", ", ".join(f"{n} {c}" for n, c in states.items() if c))
        for t in front:
            log.info("  Pareto trial %d: refusals %.3f, KL %.4f", t.number, t.values[0], t.values[1])
        log.info("selected trial %d by %s", chosen.number, study.select)
        if interactive and self.is_global_zero and sys.stdin.isatty() and sys.stdout.isatty():
            chosen = choose_from_front(trials, front, chosen)
        return chosen

    def _export(self, model, plan: TrialPlan, chosen, baseline: float, target: Path, overwrite: bool) -> None:
        if not self.is_global_zero:
            return
        model.configure_model()
        card = {
            "base_model": model.model_id,
            "trial": chosen.number,
            "refusal_before": round(baseline, 4),
            "refusal_after": round(chosen.values[0], 4),
            "kl": round(chosen.values[1], 5),
            "params": chosen.params,
        }
        directions = model.directions_for(plan.directions)
        with model.weight_editor().applied(plan.ablation, directions):
            save_checkpoint(model.model, model.tokenizer, target, overwrite, card)


def choose_from_front(trials, front, default, read=input) -> optuna.trial.FrozenTrial:
    """On a terminal: show the Pareto front and let the user pick the trial to export."""
    print("\nPareto front (refusal rate vs KL divergence):")
    print(f"  {'trial':>6}  {'refusals':>9}  {'KL':>8}")
    for t in front:
        mark = "  <- default" if t.number == default.number else ""
        print(f"  {t.number:>6}  {t.values[0]:>9.3f}  {t.values[1]:>8.4f}{mark}")
    while True:
        answer = read(f"trial to export [{default.number}]: ").strip()
        if not answer:
            return default
        try:
            return select_trial(trials, answer, 0.0)
        except AbliterateError as err:
            print(f"  {err}")
