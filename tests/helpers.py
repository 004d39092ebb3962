"""Helpers shared by the CLI tests."""

import signal

from abliterate.cli import main


def interruptible() -> None:
    """`Popen(preexec_fn=...)` for a child the test sends Ctrl-C: a job that a non-interactive shell
    starts in the background inherits SIGINT ignored, and so would the child."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_cli(args, capsys) -> tuple[int, str, str]:
    """main(args) -> (exit code, stdout, stderr)."""
    try:
        main(args)
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def organism_yaml(organism_dir) -> str:
    """A small run config for the tiny organism."""
    return f"""
data:
  harmful: {{dataset: {organism_dir}/harmful_train.txt, split: train}}
  harmless: {{dataset: {organism_dir}/harmless_train.txt, split: train}}
  eval_harmful: {{dataset: {organism_dir}/harmful_test.txt, split: train}}
  eval_harmless: {{dataset: {organism_dir}/harmless_test.txt, split: train}}
  batch_size: 64
  eval_batch_size: 16
module:
  load: {{dtypes: [float32]}}
  evaluation: {{max_new_tokens: 12}}
trainer:
  accelerator: cpu
  devices: 1
  enable_progress_bar: false
"""


def organism_pipeline(organism_dir, tmp_path, scorers=None, eval_harmful=16, eval_batch_size=8):
    """A Pipeline on the tiny organism with small prompt sets, its residuals collected, its run dir in
    tmp_path/run."""
    from abliterate.data import PromptDataModule
    from abliterate.module import AbliterationModule
    from abliterate.options import EvalOptions, LoadOptions
    from abliterate.pipeline import Pipeline
    from abliterate.prompts import PromptSource
    from abliterate.trainer import AbliterationTrainer

    module = AbliterationModule(
        model_id=str(organism_dir),
        load=LoadOptions(dtypes=["float32"]),
        evaluation=EvalOptions(max_new_tokens=12),
        scorers=scorers,
    )
    data = PromptDataModule(
        harmful=PromptSource(f"{organism_dir}/harmful_train.txt", limit=64),
        harmless=PromptSource(f"{organism_dir}/harmless_train.txt", limit=64),
        eval_harmful=PromptSource(f"{organism_dir}/harmful_test.txt", limit=eval_harmful),
        eval_harmless=PromptSource(f"{organism_dir}/harmless_test.txt", limit=16),
        eval_batch_size=eval_batch_size,
    )
    trainer = AbliterationTrainer(accelerator="cpu", devices=1, enable_progress_bar=False)
    pipe = Pipeline(trainer, module, data, tmp_path / "run")
    pipe.residuals()
    return pipe


def copy_run(finished, root):
    """A copy of conftest's finished_organism_run under root, free to change:
    (run dir, its config file, the export's abliterate.json)."""
    import json
    import shutil

    shutil.copytree(finished, root, dirs_exist_ok=True)
    run = root / "run"
    return run, root / "organism.yaml", json.loads((run / "model" / "abliterate.json").read_text())
