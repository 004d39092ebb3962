"""The `abliterate` CLI: config precedence, clear errors, resume with cached inputs."""

import json
from pathlib import Path

import optuna
import pytest
import torch
from helpers import run_cli
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from abliterate.cli import AbliterateCLI, main
from abliterate.module import AbliterationModule


@pytest.fixture
def parsed(monkeypatch):
    """Parse a command line without running the verb; returns the verb's instantiated config."""
    seen = {}

    def record(self, subcommand):
        seen["config"] = self.config_init[subcommand]
        seen["module"] = self.model
        seen["data"] = self.datamodule

    monkeypatch.setattr(AbliterateCLI, "_run_subcommand", record)

    def parse(args):
        main(args)
        return seen

    return parse


def test_help_lists_the_verbs(capsys):
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0
    for verb in ("run", "directions", "search", "evaluate", "export", "chat", "demo"):
        assert verb in out


def test_print_config_shows_defaults_and_docs(capsys):
    code, out, _ = run_cli(["run", "--model", "some/model", "--print_config"], capsys)
    assert code == 0
    assert "model: some/model" in out
    assert "n_trials: 100" in out and "refusal_target: 0.0" in out and "steer_margin: 0.02" in out
    assert "mlabonne/harmful_behaviors" in out
    code, out, _ = run_cli(["run", "--help"], capsys)
    assert "total trials in the study" in out  # field docstrings become help


def test_config_precedence(tmp_path, parsed):
    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    a.write_text("model: from-a\nstudy:\n  n_trials: 5\n  seed: 3\ndata:\n  batch_size: 4\n")
    b.write_text("study:\n  n_trials: 6\nmodule:\n  evaluation:\n    max_new_tokens: 9\n")
    seen = parsed(["run", "--config", str(a), "--config", str(b), "--study.seed", "11"])
    assert seen["config"]["study"].n_trials == 6  # later config wins
    assert seen["config"]["study"].seed == 11  # a flag after the configs wins
    assert seen["config"]["study"].refusal_target == 0.0  # code default where nothing is set
    assert seen["data"].batch_size == 4
    assert seen["module"].model_id == "from-a"
    assert seen["module"].eval_options.max_new_tokens == 9
    seen = parsed(["run", "--config", str(a), "--model", "from-flag"])
    assert seen["module"].model_id == "from-flag"


@pytest.mark.parametrize(
    "args, needle",
    [
        (["run", "--model", "m", "--study.bogus", "1"], "study.bogus"),
        (["run", "--model", "m", "--study.n_trials", "many"], "n_trials"),
        (["run", "--model", "m", "--space.max_weight", "[2.0, 1.0]"], "max_weight"),
    ],
)
def test_bad_options_give_one_clear_error(args, needle, capsys):
    code, _, err = run_cli(args, capsys)
    assert code != 0
    assert needle in err


def test_unknown_yaml_key_is_named(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: m\nmodule:\n  evaluation:\n    max_new_tokenz: 3\n")
    code, _, err = run_cli(["run", "--config", str(bad)], capsys)
    assert code != 0 and "max_new_tokenz" in err


def test_missing_model_names_the_flag(tmp_path, capsys):
    code, _, err = run_cli(["run", "--output_dir", str(tmp_path / "o")], capsys)
    assert code == 2
    assert "--model" in err
    assert len(err.strip().splitlines()) == 1


def organism_args(organism_config, organism_dir, out, *extra):
    return ["run", "--config", str(organism_config), "--model", str(organism_dir), "--output_dir", str(out), *extra]


def test_existing_export_is_not_overwritten(organism_config, organism_dir, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "model").mkdir(parents=True)
    (out / "model" / "keep.txt").write_text("mine")
    code, _, err = run_cli(organism_args(organism_config, organism_dir, out, "--study.n_trials", "2"), capsys)
    assert code == 2 and "--overwrite" in err
    assert (out / "model" / "keep.txt").read_text() == "mine"
    assert not (out / "cache").exists()  # nothing was computed or written half-way


def test_unwritable_output_dir(organism_config, organism_dir, capsys):
    code, _, err = run_cli(organism_args(organism_config, organism_dir, "/proc/abliterate-out"), capsys)
    assert code == 2 and "writable" in err


def test_empty_prompt_file(organism_config, organism_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    args = organism_args(organism_config, organism_dir, tmp_path / "run", "--data.harmful.dataset", str(empty))
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "no prompts" in err


def test_missing_column(organism_config, organism_dir, tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "hello there"}\n')
    args = organism_args(
        organism_config,
        organism_dir,
        tmp_path / "run",
        "--data.harmful.dataset",
        str(rows),
        "--data.harmful.split",
        "train",
    )
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "column" in err and "prompt" in err


def test_model_without_chat_template(organism_config, tmp_path, capsys):
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "a", "b"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    model_dir = tmp_path / "plain"
    LlamaForCausalLM(
        LlamaConfig(vocab_size=4, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    ).save_pretrained(model_dir)
    fast.save_pretrained(model_dir)
    code, _, err = run_cli(organism_args(organism_config, model_dir, tmp_path / "run"), capsys)
    assert code == 2 and "chat template" in err and "--data.chat_template" in err


def test_resume_keeps_trials_and_reuses_caches(organism_config, organism_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    code, _, _ = run_cli(organism_args(organism_config, organism_dir, out, "--study.n_trials", "4"), capsys)
    assert code == 0
    study = optuna.load_study(study_name="abliterate", storage=f"sqlite:///{out / 'study.db'}")
    first = {t.number: t.params for t in study.trials}
    assert len(first) == 4

    # On resume the residuals and baselines come from the cache: no forward pass may collect them.
    tasks = []
    original_step = AbliterationModule.predict_step

    def spy(self, batch, batch_idx, dataloader_idx=0):
        tasks.append(type(self.current_pass).__name__)
        return original_step(self, batch, batch_idx, dataloader_idx)

    monkeypatch.setattr(AbliterationModule, "predict_step", spy)
    code, stdout, err = run_cli(
        organism_args(organism_config, organism_dir, out, "--study.n_trials", "7", "--overwrite", "true"), capsys
    )
    assert code == 0, err
    assert set(tasks) == {"TrialPass"}  # no ResidualPass, no ReferencePass
    study = optuna.load_study(study_name="abliterate", storage=f"sqlite:///{out / 'study.db'}")
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) == 7  # n_trials is the total
    assert {t.number: t.params for t in study.trials if t.number in first} == first
    assert json.loads(stdout.strip().splitlines()[-1])["refusal_before"] >= 0.9

    # Resuming with another KL objective would mix incomparable values: refused before any forward pass.
    tasks.clear()
    extra = ("--study.n_trials", "9", "--overwrite", "true", "--module.evaluation.kl_tokens", "3")
    code, _, err = run_cli(organism_args(organism_config, organism_dir, out, *extra), capsys)
    assert code == 2 and "kl_tokens 16 -> 3" in err and "--output_dir" in err, err
    assert len(err.strip().splitlines()) == 1 and tasks == []
    assert len(optuna.load_study(study_name="abliterate", storage=f"sqlite:///{out / 'study.db'}").trials) == 7


def test_directions_verb_contrastive_pca(organism_config, organism_dir, tmp_path, capsys):
    from safetensors import safe_open

    from abliterate.directions import compute_directions
    from abliterate.options import DirectionOptions

    out = tmp_path / "run"
    args = [
        "directions",
        "--config",
        str(organism_config),
        "--model",
        str(organism_dir),
        "--output_dir",
        str(out),
        "--direction.method",
        "contrastive_pca",
        "--direction.k",
        "3",
    ]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    with safe_open(str(out / "directions.safetensors"), "pt") as f:
        directions = f.get_tensor("directions")
        assert "contrastive_pca" in f.metadata()["options"]
    assert directions.shape == (2, 3, 64)
    # the saved directions are those of the cached residuals (projected and winsorised: the defaults)
    (cached,) = (out / "cache").glob("residuals-*.safetensors")
    with safe_open(str(cached), "pt") as f:
        harmful, harmless = f.get_tensor("harmful"), f.get_tensor("harmless")
    expected = compute_directions(
        harmful, harmless, method="contrastive_pca", k=3, projected=True, winsorize_quantile=DirectionOptions.winsorize
    )
    torch.testing.assert_close(directions, expected)


def test_search_can_choose_the_direction_method(organism_config, organism_dir, tmp_path, capsys):
    import csv

    out = tmp_path / "run"
    args = [
        "search",
        "--config",
        str(organism_config),
        "--model",
        str(organism_dir),
        "--output_dir",
        str(out),
        "--config",
        str(Path(__file__).resolve().parents[1] / "configs/examples/contrastive_pca.yaml"),
        "--study.n_trials",
        "12",
        "--study.n_startup_trials",
        "12",
        "--study.seed",
        "3",
        "--study.prune",
        "false",
    ]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    rows = list(csv.DictReader((out / "trials.csv").open()))
    methods = {r["params_direction_method"] for r in rows if r["state"] == "COMPLETE"}
    assert methods == {"mean_diff", "contrastive_pca"}
    assert all(r["params_k"] for r in rows if r["params_direction_method"] == "contrastive_pca")


def test_changed_model_files_invalidate_the_caches(organism_dir, tmp_path, monkeypatch):
    import shutil

    from abliterate.cache import model_stamp

    copy = tmp_path / "model"
    shutil.copytree(organism_dir, copy)
    before = model_stamp(str(copy))
    assert model_stamp(str(copy)) == before
    (copy / "config.json").write_text((copy / "config.json").read_text() + "\n")
    assert model_stamp(str(copy)) != before

    # A hub id is keyed by the commit its revision resolves to: a moved `main` misses the cache.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert model_stamp("org/hub-id") == "org/hub-id@main"  # nothing known offline: the revision name
    refs = tmp_path / "hub" / "models--org--hub-id" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("a" * 40)
    assert model_stamp("org/hub-id") == "org/hub-id@" + "a" * 40
    (refs / "main").write_text("b" * 40)  # main moved
    assert model_stamp("org/hub-id") == "org/hub-id@" + "b" * 40
    assert model_stamp("org/hub-id", revision="c" * 40) == "org/hub-id@" + "c" * 40


@pytest.mark.parametrize("steer, margin", [(True, 0.0), (False, 0.0), (True, 0.1)])
def test_trials_carry_the_refusal_constraint(organism_config, organism_dir, tmp_path, capsys, steer, margin):
    out = tmp_path / "run"
    extra = ["--study.n_trials", "6", "--study.refusal_target", "0.3", "--study.steer_to_target", str(steer).lower()]
    extra += ["--study.steer_margin", str(margin)]
    bound = 0.3 + margin
    code, _, err = run_cli(organism_args(organism_config, organism_dir, out, *extra), capsys)
    assert code == 0, err
    study = optuna.load_study(study_name="abliterate", storage=f"sqlite:///{out / 'study.db'}")
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) == 6
    for t in finished:
        if not steer:
            assert t.constraints == {}
        elif t.state == optuna.trial.TrialState.COMPLETE:
            assert t.constraints == {"refusal_rate_over_target": pytest.approx(t.values[0] - bound)}
        else:  # pruned: at least the refusals it was pruned at
            assert t.constraints == {"refusal_rate_over_target": pytest.approx(t.user_attrs["bound"][0] - bound)}
