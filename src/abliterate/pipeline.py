"""The pipeline: the passes in order, with the run dir's caches and the study.

Plain code over a Trainer, a module and a datamodule; the Trainer verbs only build a Pipeline
and call it. Reads top to bottom as `run` does: residuals, reference, search, select, export.
"""

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import lightning as L
import optuna
import torch

from abliterate.cache import TensorCache, fingerprint, model_stamp
from abliterate.callbacks import ApplyAblation, Pruning
from abliterate.data import EVAL_ROLES, RESIDUAL_ROLES, VALIDATION_ROLE
from abliterate.errors import AbliterateError
from abliterate.pareto import pareto_front, select_trial, within_budget
from abliterate.passes import Reference, ReferencePass, ResidualPass, Residuals, TrialPass, TrialResult
from abliterate.plans import TrialPlan, rebuild_plan
from abliterate.scorers import KL, Scorer, default_scorers
from abliterate.study import (
    InfeasiblePlan,
    check_objective,
    make_study,
    objectives_of,
    open_storage,
    run_search,
    signs_of,
)

log = logging.getLogger("abliterate")

CACHE_VERSION = "2"
REFERENCE_VERSION = "3"  # 3: Degeneration's original value is 0 by definition


def load_key(options) -> dict:
    """The load options in cache keys: all but edit_mode, which changes how trials apply, not what the model computes."""
    return {k: v for k, v in asdict(options).items() if k != "edit_mode"}


def scorer_spec(scorer: Scorer) -> dict:
    """A scorer's class and settings, for cache keys and the study's record."""
    settings = {k: v for k, v in vars(scorer).items() if not k.startswith("_") and k != "training"}
    return {
        "class": type(scorer).__name__,
        **{k: v for k, v in settings.items() if isinstance(v, (int, float, str, bool, list, type(None)))},
    }


def study_error(url: str, err: Exception) -> AbliterateError:
    from abliterate.errors import first_line

    return AbliterateError(
        f"cannot open the study at {url} ({first_line(err)}); fix --study.storage, or move a damaged study.db "
        "aside and use another --output_dir"
    )


def local_study_url(output_dir: Path) -> str:
    """The default storage: SQLite file study.db in the run dir."""
    return f"sqlite:///{(output_dir / 'study.db').resolve()}"


class Pipeline:
    """One model and prompt set, in one run dir (None: no caches, no study)."""

    def __init__(self, trainer: L.Trainer, module, datamodule, run_dir: Path | None):
        self.trainer = trainer
        self.module = module
        self.datamodule = datamodule
        self.run_dir = run_dir
        self.cache = TensorCache(run_dir / "cache") if run_dir is not None else None
        self.scorers: list[Scorer] = list(module.scorers)
        self.objectives = objectives_of(self.scorers)
        self.validated: dict[int, float] = {}  # trial number -> refusal rate on the validation prompts

    # ---- passes -----------------------------------------------------------------------
    def run_pass(self, pass_, callbacks: Sequence[L.Callback] = (), show_bar: bool = True):
        """Run one pass as a `Trainer.predict`; per-pass callbacks are added for this call only."""
        bar = self.trainer.progress_bar_callback
        hide = bar is not None and not show_bar and bar.is_enabled
        if hide:  # one bar per trial would flood the terminal: the search reports its own progress
            bar.disable()
        self.trainer.callbacks.extend(callbacks)
        try:
            with self.module.running(pass_):
                self.trainer.predict(self.module, datamodule=self.datamodule, return_predictions=False)
        finally:
            for callback in callbacks:
                self.trainer.callbacks.remove(callback)
            if hide:
                bar.enable()
        return pass_.result

    def _cached(self, name: str, key: str, compute, always_compute: bool = False):
        tensors = self.cache.load(name, key) if self.cache and not always_compute else None
        if tensors is not None:
            log.info("reusing cached %s (%s)", name, key)
            return tensors, True
        result, tensors = compute()
        if self.cache is not None and self.trainer.is_global_zero:
            self.cache.save(name, key, tensors)
        return result, False

    def residuals(self) -> Residuals:
        """Residuals of the direction roles (cached); installed on the module for its directions."""
        self.datamodule.attach_tokenizer(self.module.tokenizer)
        key = fingerprint(
            CACHE_VERSION,
            model_stamp(self.module.model_id, self.module.load_options.revision),
            load_key(self.module.load_options),
            self.datamodule.fingerprint_parts(RESIDUAL_ROLES),
            # Only a non-default value joins the key, so caches made before the option existed are still hits.
            *([f"positions={self.module.residual_positions}"] if self.module.residual_positions != 1 else []),
        )

        def compute():
            self.check_prompt_lengths(RESIDUAL_ROLES, reply_tokens=0)
            start = time.perf_counter()
            residuals = self.run_pass(ResidualPass())
            log.info("collected residuals in %.1fs", time.perf_counter() - start)
            return residuals, residuals.tensors

        result, hit = self._cached("residuals", key, compute)
        residuals = Residuals(result) if hit else result
        self.module.set_residuals(residuals)
        return residuals

    def reference(self) -> Reference:
        """The original model as the scorers see it (cached): their values and per-prompt rows."""
        self.datamodule.attach_tokenizer(self.module.tokenizer)
        key = fingerprint(
            CACHE_VERSION,
            REFERENCE_VERSION,
            model_stamp(self.module.model_id, self.module.load_options.revision),
            load_key(self.module.load_options),
            asdict(self.module.eval_options),
            self.module.markers,
            [scorer_spec(s) for s in self.scorers],
            self.datamodule.fingerprint_parts(EVAL_ROLES),
        )

        def compute():
            options = self.module.eval_options
            thought = options.think_tokens if self.thinking() is not None else 0
            self.check_prompt_lengths(EVAL_ROLES, reply_tokens=thought + max(options.max_new_tokens, options.kl_tokens))
            start = time.perf_counter()
            reference = self.run_pass(ReferencePass(self.scorers))
            shown = ", ".join(f"{n} {v:.4f}" for n, v in reference.values.items())
            log.info("reference (original model): %s (%.1fs)", shown, time.perf_counter() - start)
            return reference, reference.to_tensors()

        # Under DDP this pass also starts the other ranks before the search needs them, so it always runs.
        result, hit = self._cached("reference", key, compute, always_compute=self.trainer.world_size > 1)
        return Reference.from_tensors(result) if hit else result

    def check_prompt_lengths(self, roles: Sequence[str], reply_tokens: int) -> None:
        """A prompt the model cannot hold (with its reply) fails here, not as a 40x slower trial."""
        self.module.configure_model()
        limit = getattr(self.module.model.config, "max_position_embeddings", None)
        if not limit:
            return
        for role in self.datamodule.roles_present(roles):
            longest = max((len(ids) for ids in self.datamodule.dataset(role).input_ids), default=0)
            if longest + reply_tokens > limit:
                raise AbliterateError(
                    f"the longest {role} prompt has {longest} tokens; with {reply_tokens} reply tokens that exceeds "
                    f"the model's {limit} positions: shorten or drop long prompts in --data.{role}"
                )

    def evaluate(
        self,
        plan: TrialPlan,
        reference: Reference,
        callbacks: Sequence[L.Callback] = (),
        scorers: Sequence[Scorer] | None = None,
        report: bool = True,
        show_bar: bool = False,
    ) -> TrialResult:
        """One trial: the plan's ablation applied for the pass, the scorers (default: all; `report=False`:
        the objectives only) on the eval prompts. No progress bar unless `show_bar` (the search shows its own)."""
        self.module.configure_model()
        directions = self.module.directions_for(plan.directions)
        callbacks = [ApplyAblation(plan.ablation, directions), *callbacks]
        trial_pass = TrialPass(self.scorers if scorers is None else scorers, reference, report)
        return self.run_pass(trial_pass, callbacks, show_bar=show_bar)

    def reported_values(self, trial: optuna.trial.FrozenTrial, space, reference: Reference) -> dict[str, float]:
        """The reported (non-objective) scorers' values for `trial`: those the search stored on it
        (study.report_scorers=completed), else measured now with its ablation applied."""
        reported = [s for s in self.scorers if not s.is_objective]
        if all(s.name in trial.user_attrs for s in reported):
            return {s.name: trial.user_attrs[s.name] for s in reported}
        log.info("trial %d: measuring %s", trial.number, ", ".join(s.name for s in reported))
        start = time.perf_counter()
        values = self.evaluate(self.plan_of(trial, space), reference, scorers=reported, show_bar=True).values
        shown = ", ".join(f"{name} {value:.4f}" for name, value in values.items())
        log.info("trial %d reported: %s (%.1fs)", trial.number, shown, time.perf_counter() - start)
        return values

    # ---- the study --------------------------------------------------------------------
    def objective_record(self) -> dict:
        """What a trial's values depend on besides its parameters, as a study records it."""
        record = {
            "model": str(self.module.model_id),
            "kl_tokens": self.module.eval_options.kl_tokens,
            "max_new_tokens": self.module.eval_options.max_new_tokens,
            "refusal_markers": fingerprint(self.module.markers),
            "eval_prompts": fingerprint(self.datamodule.fingerprint_parts(EVAL_ROLES)),
        }
        defaults = [scorer_spec(s) for s in default_scorers(self.module.eval_options)]
        specs = [scorer_spec(s) for s in self.scorers]
        if specs != defaults:  # studies made with the default scorers keep the record they had
            record["scorers"] = specs
        if self.thinking() is not None:  # replies are answers after a thought of up to think_tokens
            record["think_tokens"] = self.module.eval_options.think_tokens
        return record

    def thinking(self):
        """The model's thinking format (scorers judge answers after the thought), or None."""
        from abliterate.thinking import detect_thinking, template_text

        options = self.module.eval_options
        template = template_text(self.module.tokenizer, self.datamodule.chat_template)
        return detect_thinking(template, options.think_tags, options.thinking)

    def open_study(self, options, check_scoring: bool = True) -> optuna.Study:
        """Open (or create) the study; one that will get new trials must match how they are scored."""
        storage = options.storage or local_study_url(self.run_dir)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # Under DDP rank 0 creates the study first; the other ranks then load it.
        distributed = self.trainer.world_size > 1
        if distributed and not self.trainer.is_global_zero:
            self.trainer.strategy.barrier("open_study")
        study = make_study(options, storage, self.objectives)
        if distributed and self.trainer.is_global_zero:
            self.trainer.strategy.barrier("open_study")
        if check_scoring:
            check_objective(study, self.objective_record(), record=self.trainer.is_global_zero)
        return study

    def check_existing_study(self, options) -> None:
        """Before residuals and reference cost minutes: the storage opens, and a study that exists was
        scored the way new trials would be (read-only)."""
        url = options.storage or local_study_url(self.run_dir)
        if options.storage is None and not (self.run_dir / "study.db").is_file():
            return
        try:
            existing = optuna.load_study(study_name=options.study_name, storage=open_storage(url))
        except KeyError:  # the storage holds no study of that name yet
            return
        except Exception as err:  # a bad URL, a server that is down, a file that is not a database
            raise study_error(url, err) from err
        check_objective(existing, self.objective_record(), record=False)

    def load_study(self, options) -> optuna.Study:
        """The run's study, read-only: a verb that only reads never creates or changes it."""
        url = options.storage or local_study_url(self.run_dir)
        if options.storage is None and not (self.run_dir / "study.db").is_file():
            raise AbliterateError(
                f"{self.run_dir} has no study.db; run `abliterate run` there first, or set --output_dir"
            )
        try:
            return optuna.load_study(study_name=options.study_name, storage=open_storage(url))
        except KeyError:
            raise AbliterateError(f"no study named {options.study_name!r} in {url}; check --study.study_name") from None
        except Exception as err:
            raise study_error(url, err) from err

    def search(self, study: optuna.Study, options, space, reference: Reference, progress=None) -> None:
        """Trials until the study holds options.n_trials finished ones."""
        self.module.configure_model()  # with both caches hit, nothing has loaded the model yet
        totals = {role: len(self.datamodule.dataset(role)) for role in EVAL_ROLES if self.datamodule.sources[role]}

        def evaluate(trial, plan: TrialPlan, completed) -> dict[str, float]:
            try:
                self.module.directions_for(plan.directions)
            except AbliterateError as err:  # e.g. a contrastive PCA k these prompts cannot support
                raise InfeasiblePlan(str(err)) from err
            record = trial if trial is not None else _OtherRankTrial()
            pruning = Pruning(record, self.objectives, completed, totals, options.prune, options.storage is not None)
            return self.evaluate(plan, reference, [pruning], report=options.report_scorers == "completed").values

        run_search(self.trainer, study, options, space, self.module.n_layers, self.scorers, evaluate, progress)

    def signs(self) -> list[int]:
        return signs_of(self.objectives)

    def choose(self, study: optuna.Study, options, space=None) -> optuna.trial.FrozenTrial:
        """The trial to export; with `space` and data.validation_harmful, min_kl_under's candidates are
        re-scored on the validation prompts (validation.py)."""
        trials = study.get_trials(deepcopy=False)
        if options.max_kl is not None and not options.select.isdigit():  # a number is an explicit pick
            trials = within_budget(trials, self.kl_index(), options.max_kl, KL.name)
        if space is not None and options.select == "min_kl_under" and self.datamodule.sources[VALIDATION_ROLE]:
            from abliterate.validation import choose_validated

            return choose_validated(self, trials, options, space)
        return select_trial(trials, options.select, options.refusal_target, self.signs(), options.steer_bound)

    def check_selection(self, options) -> None:
        """Before the search, not at the pick after it: what the configured selection reads is there."""
        from abliterate.validation import check_validation_prompts

        if options.max_kl is not None:
            self.kl_index()
        check_validation_prompts(self, options)

    def kl_index(self) -> int:
        names = [s.name for s in self.objectives]
        if KL.name not in names:
            raise AbliterateError(f"study.max_kl needs the {KL.name} scorer as an objective, not only {names}")
        return names.index(KL.name)

    def front(self, study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
        return pareto_front(study.get_trials(deepcopy=False), self.signs())

    def plan_of(self, trial: optuna.trial.FrozenTrial, space) -> TrialPlan:
        self.module.configure_model()
        return rebuild_plan(trial, space, self.module.n_layers)

    # ---- re-check and export ------------------------------------------------------------
    def recheck(self, trials, space, reference: Reference, judge, top: int) -> list[dict]:
        """Re-evaluate the `top` Pareto trials with the fewest refusals and judge their harmful replies.

        One dict per trial, in front order: trial, kl, marker_refusal_rate, classifier_refusal_rate and
        disagreement (share of replies on which markers and classifier differ). The replies are the
        search's (cut after a marker). Collective under DDP: each rank judges its shard, counts are summed.
        """
        from abliterate.classifier import log_recheck
        from abliterate.metrics import is_refusal

        rows = []
        for trial in pareto_front(trials, self.signs())[: max(top, 0)]:
            result = self.evaluate(self.plan_of(trial, space), reference, report=False)
            responses = result.responses
            markers = [is_refusal(text, self.module.markers) for text in responses]
            judged = judge.is_refusal(responses) if responses else []
            counts = [
                len(responses),
                sum(markers),
                sum(judged),
                sum(m != c for m, c in zip(markers, judged, strict=True)),
            ]
            if self.trainer.world_size > 1:
                summed = self.trainer.strategy.reduce(
                    torch.tensor(counts, dtype=torch.long, device=self.trainer.strategy.root_device), reduce_op="sum"
                )
                counts = [int(c) for c in summed.tolist()]
            total, n_markers, n_judged, n_disagree = counts
            if total == 0:
                raise RuntimeError(f"trial {trial.number}: the re-evaluation produced no harmful responses")
            rows.append(
                {
                    "trial": trial.number,
                    "kl": float(result.values.get("kl", trial.values[1])),
                    "marker_refusal_rate": n_markers / total,
                    "classifier_refusal_rate": n_judged / total,
                    "disagreement": n_disagree / total,
                }
            )
        if self.trainer.is_global_zero:
            log_recheck(rows, judge.options)
        return rows

    def export(self, plan: TrialPlan, card: dict, target: Path, overwrite: bool, fmt: str = "merged") -> Path:
        """The plan saved as `fmt`: merged into the weights (a normal HF checkpoint), a PEFT adapter, or both (rank 0)."""
        from abliterate.export import save_export

        if self.trainer.is_global_zero:
            module = self.module
            module.configure_model()
            ablation = (plan.ablation, module.directions_for(plan.directions))
            editor, revision = module.weight_editor(), module.load_options.revision
            save_export(
                module.model, module.tokenizer, editor, *ablation, target, overwrite, card, fmt, self.run_dir, revision
            )
        return target


class _OtherRankTrial:
    """Stands in for the trial on ranks other than 0, which keep no Optuna state."""

    def set_user_attr(self, key: str, value) -> None:
        pass


def require_trials(study: optuna.Study) -> None:
    if not study.get_trials(deepcopy=False):
        raise AbliterateError(f"study {study.study_name!r} has no trials yet; run `abliterate search` first")
