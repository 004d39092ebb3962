"""The verbs that look at a run dir or an export without searching: inspect, evaluate, chat,
reproduce and benchmark (`verbs.py` holds the ones that search and export)."""

import json
import sys
from pathlib import Path

from optuna.trial import TrialState

import abliterate.reproduce as records
from abliterate.benchmark import BenchmarkOptions
from abliterate.data import PromptDataModule
from abliterate.errors import AbliterateError
from abliterate.inspect_views import write_views
from abliterate.module import AbliterationModule
from abliterate.options import DirectionOptions, SearchSpace, StudyOptions
from abliterate.pipeline import Pipeline
from abliterate.reports import plot_pareto
from abliterate.verbs import phase, prepare, run_dir_of, trial_by_number, writing


def inspect(
    trainer, module, datamodule, study: StudyOptions, space: SearchSpace, output_dir: str, direction: DirectionOptions
) -> Path:
    """OUTPUT_DIR/inspect: layers.csv/.png, projections.png (inspect_views.py), pareto.png when there is a study.
    Its chosen trial is the one `export` takes, validated where data.validation_harmful is set (cached rates)."""
    out, written = run_dir_of(output_dir), {}
    with writing(trainer, out), phase("residual collection", "nothing of it was cached"):
        residuals = (pipe := Pipeline(trainer, module, datamodule, out)).residuals()
        if trainer.is_global_zero:
            written = write_views(residuals.tensors, out / "inspect", **vars(direction))
        if written and (study.storage is not None or (out / "study.db").is_file()):
            trials, names = (s := pipe.load_study(study)).get_trials(deepcopy=False), [o.name for o in pipe.objectives]
            chosen = pipe.choose(s, study, space) if any(t.state == TrialState.COMPLETE for t in trials) else None
            if plot_pareto(trials, pipe.front(s), chosen, names, path := out / "inspect" / "pareto.png"):
                written["pareto_png"] = path
    print(json.dumps({name: str(path) for name, path in written.items()}))
    return out / "inspect"


def evaluate(trainer, module, datamodule, study: StudyOptions, space: SearchSpace, output_dir: str, trial) -> dict:
    out = run_dir_of(output_dir)
    pipe = Pipeline(trainer, module, datamodule, out)
    if trial is not None:  # fail before any forward pass
        frozen = trial_by_number(pipe.load_study(study), trial)
    reference = prepare(pipe)
    names = [s.name for s in pipe.scorers]
    result = {f"{n}_before": reference.values[n] for n in names}
    result["refusal_before"] = reference.values[pipe.objectives[0].name]
    if trial is not None:
        after = pipe.evaluate(pipe.plan_of(frozen, space), reference)
        result.update({"trial": trial, **{f"{n}_after": v for n, v in after.values.items()}})
        result.update({"refusal_after": after.values[pipe.objectives[0].name], "kl": after.values.get("kl")})
    print(json.dumps(result))
    return result


def chat(
    trainer, module, datamodule, study: StudyOptions, space: SearchSpace, output_dir, trial, max_new_tokens, compare
) -> None:
    from abliterate.chat import chat_loop

    if compare and trial is None:
        raise AbliterateError("--compare needs --trial N: the trial whose replies are shown beside the original's")
    if max_new_tokens < 1:
        raise AbliterateError(f"--max_new_tokens {max_new_tokens}: a reply needs at least 1 token")
    module.configure_model()
    if trial is not None:
        pipe = Pipeline(trainer, module, datamodule, run_dir_of(output_dir))
        frozen = trial_by_number(pipe.load_study(study), trial)
        pipe.residuals()
        plan = pipe.plan_of(frozen, space)
        editor, directions = module.weight_editor(), module.directions_for(plan.directions)
        if not compare:  # with --compare the one model in memory is edited for the abliterated replies only
            editor.apply(plan.ablation, directions)
    edited = (lambda: editor.applied(plan.ablation, directions)) if compare else None
    chat_loop(module.model, module.tokenizer, datamodule, max_new_tokens=max_new_tokens, compare=edited)


def reproduce(trainer, module, export_dir: str) -> None:
    """Re-derive an export's edit from its base and reproduce.json (no search) and check it; exit 1 if it differs."""
    record, where = records.load_record(export_dir)
    model = AbliterationModule(
        module.model_id or record["model"]["id"],
        load=records.load_options(record, trust_remote_code=module.load_options.trust_remote_code),
        residual_positions=records.residual_positions(record),
    )
    data = PromptDataModule(**records.data_options(record))
    with phase("residual collection", "nothing was kept"):
        Pipeline(trainer, model, data, None).residuals()  # no run dir: nothing cached is reused
    if trainer.is_global_zero:
        records.finish(records.verify(record, model, data, where, trainer.strategy.root_device.type))


def benchmark(trainer, module, datamodule, output_dir: str, compare: str | None, options: BenchmarkOptions) -> list:
    """lm-eval tasks on the original (the run's model) and the abliterated model (the run's export, or
    --compare DIR): a side-by-side table and a JSON line on stdout; the table goes into the export's card."""
    from abliterate import benchmark as bench
    from abliterate.export import MANIFEST
    from abliterate.models import load_model, load_tokenizer

    bench.require_lm_eval()  # before any model loads
    target = Path(compare) if compare else run_dir_of(output_dir) / "model"
    check_benchmark_target(target, compare)
    if not module.model_id:
        raise AbliterateError("no original model: pass --model, or --output_dir of a run dir with config.yaml")
    device, opts, results = trainer.strategy.root_device, module.load_options, {}
    for label, model_id, revision in (("original", module.model_id, opts.revision), ("abliterated", str(target), None)):
        print(f"benchmark: {label} model {model_id} on {', '.join(options.tasks)}", file=sys.stderr)
        remote = opts.trust_remote_code
        model = load_model(
            model_id, dtypes=opts.dtypes, device_map=opts.device_map, revision=revision, trust_remote_code=remote
        )
        if opts.device_map is None:
            model.to(device)
        tokenizer = load_tokenizer(model_id, revision=revision, trust_remote_code=remote)
        results[label] = bench.run_tasks(model.eval(), tokenizer, options, datamodule.system_prompt)
        del model  # one model in memory at a time
    rows = bench.side_by_side(results["original"], results["abliterated"])
    if trainer.is_global_zero:
        print(bench.markdown_table(rows))
        print(json.dumps({"original": module.model_id, "abliterated": str(target), "rows": rows}))
        if (target / MANIFEST).is_file():  # an export of this tool: its model card shows the table
            bench.add_benchmarks(
                target, {"lm_eval": bench.lm_eval_version(), "original": module.model_id, "rows": rows}
            )
    return rows


def check_benchmark_target(target: Path, compare: str | None) -> None:
    """The abliterated model is a merged checkpoint (config.json); say how to get one if it is not."""
    if (target / "config.json").is_file():
        return
    if (target / "adapter_config.json").is_file():
        raise AbliterateError(
            f"{target} holds a LoRA adapter only; benchmark needs merged weights: export again with --export_format both"
        )
    where = "--compare" if compare else "the run's export"
    raise AbliterateError(
        f"{where} {target} holds no model (no config.json); run `abliterate run` or `abliterate export` first, or pass --compare DIR"
    )
