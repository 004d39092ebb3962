"""Helpers shared by the CLI tests."""

from abliterate.cli import main


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
