"""Bad command lines and config files: one line on stderr that names the option, the file and the fix.

Exit code 2, no usage dump, no traceback. Also: top-level help answers without importing Lightning.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import run_cli

from abliterate.cli import VERBS, AbliterateCLI, verb_descriptions

ROOT = Path(__file__).resolve().parents[1]


def one_error_line(args, capsys) -> str:
    code, _, err = run_cli(args, capsys)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "usage:" not in err and "Traceback" not in err
    return lines[0]


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ---- flags ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, needles",
    [
        (["run", "--model", "m", "--study.bogus", "1"], ["--study.bogus", "abliterate run --help"]),
        (["run", "--model", "m", "--study.n_trialz", "1"], ["--study.n_trialz", "did you mean --study.n_trials?"]),
        (["run", "--model", "m", "--study.n_trials", "many"], ["--study.n_trials must be an integer", "'many'"]),
        (
            ["run", "--model", "m", "--space.components", "[attn, ffn]"],
            ["--space.components must be one of 'attn', 'mlp'", "'ffn'"],
        ),
        (
            ["directions", "--model", "m", "--direction.method", "pca"],
            ["--direction.method must be one of 'mean_diff', 'contrastive_pca', got 'pca'"],
        ),
        (["run", "--model"], ["--model needs a value"]),
        (["run", "--model", "m", "stray"], ["'stray'", "--name value"]),
        # a flag the verb does not take is an error even though another verb takes it
        (["directions", "--model", "m", "--study.n_trials", "3"], ["directions has no option --study.n_trials"]),
    ],
)
def test_bad_flag_is_one_line(args, needles, capsys):
    line = one_error_line(args, capsys)
    for needle in needles:
        assert needle in line, line


def test_unknown_command_suggests_one(capsys):
    line = one_error_line(["serach"], capsys)
    assert "'serach'" in line and "did you mean search?" in line and "abliterate --help" in line


def test_missing_command(tmp_path, capsys):
    config = write(tmp_path, "c.yaml", "model: m\n")
    line = one_error_line(["--config", config], capsys)
    assert "give a command" in line and "run" in line


# ---- config files -----------------------------------------------------------------------------------
def test_unknown_yaml_key_names_file_key_and_fix(tmp_path, capsys):
    bad = write(tmp_path, "bad.yaml", "model: m\nmodule:\n  evaluation:\n    max_new_tokenz: 3\n")
    line = one_error_line(["run", "--config", bad], capsys)
    assert line.startswith(f"error: {bad}: unknown option module.evaluation.max_new_tokenz")
    assert "did you mean module.evaluation.max_new_tokens?" in line and "remove or rename it" in line


def test_unknown_top_level_key_is_an_error_for_every_verb(tmp_path, capsys):
    bad = write(tmp_path, "bad.yaml", "model: m\nstudy:\n  n_trials: 3\nstudie: 1\n")
    for verb in ("run", "directions"):
        line = one_error_line([verb, "--config", bad], capsys)
        assert f"{bad}: unknown option studie" in line, line


def test_wrong_type_in_yaml_names_the_file(tmp_path, capsys):
    bad = write(tmp_path, "typ.yaml", "model: m\nstudy:\n  n_trials: many\n")
    line = one_error_line(["run", "--config", bad, "--output_dir", str(tmp_path)], capsys)
    assert line == f"error: {bad}: study.n_trials must be an integer, got 'many'"


def test_bad_literal_in_yaml_names_the_choices(tmp_path, capsys):
    bad = write(tmp_path, "lit.yaml", "model: m\nspace:\n  components: [attn, ffn]\n")
    line = one_error_line(["run", "--config", bad], capsys)
    assert line == f"error: {bad}: space.components must be one of 'attn', 'mlp', got 'ffn'"


def test_broken_yaml_names_file_and_line(tmp_path, capsys):
    bad = write(tmp_path, "broken.yaml", "model: m\nstudy:\n  n_trials: [3\n")
    line = one_error_line(["run", "--config", bad], capsys)
    assert f"{bad} line 4" in line and "invalid YAML" in line and "<unicode string>" not in line


def test_missing_config_file(tmp_path, capsys):
    missing = str(tmp_path / "nope.yaml")
    line = one_error_line(["run", "--config", missing], capsys)
    assert line == f"error: --config {missing}: no such file; check the path"


def test_config_that_is_a_list(tmp_path, capsys):
    bad = write(tmp_path, "list.yaml", "- model: m\n- study: {n_trials: 3}\n")
    line = one_error_line(["run", "--config", bad], capsys)
    assert f"{bad}: the top level must map option names to values" in line and "not a list" in line


def test_empty_config_sets_nothing(tmp_path, capsys):
    empty = write(tmp_path, "empty.yaml", "# nothing yet\n")
    code, out, err = run_cli(["run", "--config", empty, "--model", "m", "--print_config"], capsys)
    assert code == 0 and err == ""
    assert "model: m" in out and "n_trials: 100" in out


# ---- one config shared by several verbs ---------------------------------------------------------------
SHARED = """\
model: from-file
study:
  n_trials: 7
classifier:
  threshold: 0.25
export_dir: /tmp/x
direction:
  k: 2
data:
  batch_size: 3
"""


@pytest.mark.parametrize(
    "verb, ignored",
    [
        ("run", "direction"),
        ("directions", "study, classifier, export_dir"),
        ("search", "export_dir, direction"),
        ("export", "classifier, direction"),
    ],
)
def test_shared_config_sections_of_other_verbs_are_ignored_with_one_warning(verb, ignored, tmp_path, capsys):
    shared = write(tmp_path, "shared.yaml", SHARED)
    code, out, err = run_cli([verb, "--config", shared, "--print_config"], capsys)
    assert code == 0, err
    assert err.strip().splitlines() == [f"warning: {verb} ignores {ignored} from {shared} (options of other commands)"]
    assert "model: from-file" in out and "batch_size: 3" in out
    for section in ignored.split(", "):
        assert f"\n{section}:" not in out


def test_shared_config_runs_the_verb_with_the_rest(tmp_path, capsys, monkeypatch):
    seen = {}

    def record(self, subcommand):
        seen["config"] = self.config_init[subcommand]
        seen["data"] = self.datamodule

    monkeypatch.setattr(AbliterateCLI, "_run_subcommand", record)
    shared = write(tmp_path, "shared.yaml", SHARED)
    code, _, err = run_cli(["directions", "--config", shared, "--direction.alpha", "0.5"], capsys)
    assert code == 0, err
    assert seen["config"]["direction"].k == 2 and seen["config"]["direction"].alpha == 0.5
    assert "study" not in seen["config"] and "export_dir" not in seen["config"]
    assert seen["data"].batch_size == 3
    assert len(err.strip().splitlines()) == 1 and err.startswith("warning: directions ignores")


# ---- trainer presets this machine cannot run -----------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
@pytest.mark.parametrize("preset, fix", [("gpu.yaml", "configs/trainer/cpu.yaml"), ("ddp.yaml", "ddp_cpu.yaml")])
def test_gpu_preset_without_gpu(preset, fix, tmp_path, capsys):
    config = str(ROOT / "configs" / "trainer" / preset)
    args = ["run", "--config", config, "--model", "some/model", "--output_dir", str(tmp_path)]
    line = one_error_line(args, capsys)
    assert f"{config}: trainer.accelerator: gpu" in line and "no CUDA GPU" in line and fix in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_gpu_flag_without_gpu(tmp_path, capsys):
    args = ["run", "--model", "some/model", "--output_dir", str(tmp_path), "--trainer.accelerator", "gpu"]
    line = one_error_line(args, capsys)
    assert "--trainer.accelerator gpu" in line and "--trainer.accelerator cpu" in line


def test_impossible_trainer_setting(tmp_path, capsys):
    args = ["run", "--model", "some/model", "--output_dir", str(tmp_path), "--trainer.accelerator", "abacus"]
    line = one_error_line(args, capsys)
    assert "abacus" in line and "--trainer.accelerator" in line


# ---- help and start-up -----------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [[], ["-h"], ["--help"]])
def test_top_level_help(args, capsys):
    code, out, err = run_cli(args, capsys)
    assert code == 0 and err == ""
    assert "abliterate COMMAND --help" in out
    for verb, description in verb_descriptions().items():
        assert f"  {verb}  " in out and description.split()[0] in out


def test_help_descriptions_are_the_verbs_docstrings():
    """The static help table (read from trainer.py's source) says what LightningCLI says for each verb."""
    import docstring_parser

    from abliterate.trainer import AbliterationTrainer

    assert tuple(verb_descriptions()) == VERBS
    for verb, description in verb_descriptions().items():
        assert description, verb
        assert description == docstring_parser.parse(getattr(AbliterationTrainer, verb).__doc__).short_description


@pytest.mark.parametrize("args", [["--help"], ["-h"], [], ["bogus"]])
def test_top_level_answers_without_importing_lightning(args):
    code = (
        "import sys\n"
        "from abliterate.cli import main\n"
        "try:\n"
        f"    main({args!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = sorted(m for m in ('lightning', 'torch', 'transformers', 'optuna') if m in sys.modules)\n"
        "print('heavy:', heavy, file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "heavy: []" in proc.stderr, proc.stderr


def test_module_entry_point_help():
    proc = subprocess.run([sys.executable, "-m", "abliterate", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr == ""
    assert all(verb in proc.stdout for verb in VERBS)
