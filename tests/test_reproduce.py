"""reproduce.json in every export, and `abliterate reproduce` re-deriving the edit from it.

One run on the tiny organism exports a merged model and an adapter; the run dir is then deleted, so
every check below starts from the export alone (no study, no cached residuals).
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from helpers import copy_run
from safetensors import safe_open

from abliterate.cli import main
from abliterate.export import export_files
from abliterate.prompts import PromptSource, load_prompts
from abliterate.reproduce import json_sha256, tensor_sha256

TRAINER = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.enable_progress_bar", "false"]


def organism_yaml(organism_dir: Path, path: Path) -> Path:
    roles = {"harmful": "harmful_train", "harmless": "harmless_train"}
    roles |= {"eval_harmful": "harmful_test", "eval_harmless": "harmless_test"}
    data = {role: {"dataset": f"{organism_dir}/{name}.txt", "split": "train"} for role, name in roles.items()}
    config = {
        "data": {**data, "batch_size": 64, "eval_batch_size": 16},
        "module": {"load": {"dtypes": ["float32"]}, "evaluation": {"max_new_tokens": 12}},
        "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def organism_run(organism_dir: Path, root: Path, trials: int = 3) -> tuple[Path, Path, dict]:
    """`abliterate run` on the organism: (run dir, its config file, the export's abliterate.json)."""
    config = organism_yaml(organism_dir, root / "organism.yaml")
    run = root / "run"
    main(
        [
            "run",
            "--model",
            str(organism_dir),
            "--config",
            str(config),
            "--output_dir",
            str(run),
            "--study.n_trials",
            str(trials),
        ]
    )
    return run, config, json.loads((run / "model" / "abliterate.json").read_text())


def file_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


@pytest.fixture(scope="module")
def exports(finished_organism_run, tmp_path_factory):
    """A merged and an adapter export of one trial, with the run dir that made them gone."""
    root = tmp_path_factory.mktemp("reproduce")
    run, config, card = copy_run(finished_organism_run, root)
    adapter = root / "adapter"
    main(
        ["export", "--output_dir", str(run), "--config", str(config), "--trial", str(card["trial"])]
        + ["--export_dir", str(adapter), "--export_format", "adapter", *TRAINER]
    )
    merged = root / "merged"
    shutil.copytree(run / "model", merged)
    settings = yaml.safe_load((run / "config.yaml").read_text())
    shutil.rmtree(run)
    return {"merged": merged, "adapter": adapter, "settings": settings, "card": card}


def reproduce(export: Path | None, capsys, *extra) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        main(["reproduce", *(["--export_dir", str(export)] if export is not None else []), *TRAINER, *extra])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def tampered(exports, tmp_path, change) -> Path:
    copy = tmp_path / "tampered"
    shutil.copytree(exports["merged"], copy)
    record = json.loads((copy / "reproduce.json").read_text())
    change(record)
    (copy / "reproduce.json").write_text(json.dumps(record))
    return copy


def test_every_export_carries_a_complete_record(exports, organism_dir):
    merged, adapter, card = exports["merged"], exports["adapter"], exports["card"]
    record = json.loads((merged / "reproduce.json").read_text())
    assert "reproduce.json" in export_files(merged) and "reproduce.json" in export_files(adapter)
    assert "reproduce" not in card  # abliterate.json stays the manifest; the record has its own file
    assert {"abliterate", "torch", "transformers", "optuna", "peft"} <= set(record["versions"])
    assert record["model"]["id"] == str(organism_dir) and record["model"]["dtype"] == "float32"
    assert record["model"]["commit"] is None  # a local dir has no hub commit
    assert record["device"] == "cpu" and record["export_format"] == "merged"
    assert record["trial"] == {"number": card["trial"], "params": card["params"], "study": "abliterate", "seed": 0}
    assert record["config"] == exports["settings"]  # every option, as the run's config.yaml holds them
    for role, name in [("harmful", "harmful_train"), ("harmless", "harmless_train"), ("eval_harmful", "harmful_test")]:
        texts = load_prompts(PromptSource(f"{organism_dir}/{name}.txt"))
        assert record["prompts"][role]["texts_sha256"] == json_sha256(texts)
        assert record["prompts"][role]["count"] == len(texts)
    assert len(record["directions"]["sha256"]) == 64 and record["directions"]["shape"][1:] == [1, 64]

    # The edited tensors are exactly the exported tensors that differ from the base, hashed as exported.
    exported, base = file_tensors(merged), file_tensors(organism_dir)
    changed = {name for name, tensor in exported.items() if not torch.equal(tensor, base[name])}
    assert changed and set(record["edited_tensors"]) == changed
    assert all(record["edited_tensors"][name] == tensor_sha256(exported[name]) for name in changed)
    adapter_record = json.loads((adapter / "reproduce.json").read_text())
    assert adapter_record["export_format"] == "adapter"
    assert adapter_record["edited_tensors"] == record["edited_tensors"]


def test_the_model_card_says_how_it_was_made_and_how_to_check_it(exports):
    card = (exports["merged"] / "README.md").read_text()
    record = json.loads((exports["merged"] / "reproduce.json").read_text())
    assert "base_model:" not in card  # a local dir is no hub id
    assert "tags: [abliterated, abliterate]" in card
    assert "| original | 1.0 | 0.0 |" in card and "| refusals | kl |" in card
    assert json.dumps(record["trial"]["params"], indent=2, sort_keys=True) in card
    assert "## How it was made" in card and "230 harmful and 230 harmless prompts" in card
    assert f"trial {record['trial']['number']} chosen by `min_kl_under`" in card
    assert "## Reproduce" in card and "abliterate reproduce --export_dir" in card
    assert record["directions"]["sha256"] in card and f"| torch | {record['versions']['torch']} |" in card


def test_reproduce_from_the_export_alone_is_bit_exact(exports, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a fresh place: no outputs/ whose settings could be read in
    for kind in ("merged", "adapter"):
        code, out, err = reproduce(exports[kind], capsys)
        assert code == 0, err
        assert "prompts: harmful, harmless identical (texts and tokens)" in out
        assert "directions: identical" in out
        assert "tensors: 4 of 4 match (sha256, bit-exact)" in out
        assert out.rstrip().endswith("\nreproduced")
    assert list(tmp_path.iterdir()) == []  # it writes nothing


def test_a_tampered_parameter_names_the_tensors_that_differ(exports, tmp_path, capsys):
    def change(record):
        record["trial"]["params"]["mlp.max_weight"] -= 0.2

    code, out, _ = reproduce(tampered(exports, tmp_path, change), capsys)
    assert code == 1  # a finding, not bad input (2)
    differing = [line.split(":")[0].strip() for line in out.splitlines() if line.endswith("DIFFERS")]
    assert differing == ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    assert "directions: identical" in out and "tensors: 2 of 4 match" in out
    assert "NOT reproduced: 2 of 4 edited tensors differ" in out


def test_reproduce_reads_the_residuals_where_the_record_says(exports, tmp_path, capsys):
    assert exports["settings"]["module"]["residual_positions"] == 1

    def change(record):
        record["config"]["module"]["residual_positions"] = 2

    code, out, _ = reproduce(tampered(exports, tmp_path, change), capsys)
    assert code == 1 and "directions: differ" in out  # the record's setting was used, not the default


def test_a_tampered_hash_and_prompt_set_are_named(exports, tmp_path, capsys):
    name = "model.layers.1.self_attn.o_proj.weight"

    def change(record):
        record["edited_tensors"][name] = "0" * 64
        record["prompts"]["harmless"]["tokens_sha256"] = "0" * 64

    code, out, _ = reproduce(tampered(exports, tmp_path, change), capsys)
    assert code == 1
    # The export holds the tensor the edit makes (max abs diff 0): the record's hash is what is wrong.
    assert f"  {name}: sha256 " in out and "!= recorded 000000000000; max abs diff 0 vs the export" in out
    assert "tensors: 3 of 4 match" in out
    assert "prompts: harmful identical" in out and "the harmless prompts differ from the record" in out


def test_off_cpu_records_are_compared_by_max_abs_diff(exports, tmp_path, capsys):
    """A record made on a GPU cannot match bit for bit: each tensor's max abs diff against the export decides."""

    def change(record):
        record["device"] = "cuda"

    code, out, _ = reproduce(tampered(exports, tmp_path, change), capsys)
    assert code == 0
    assert "tensors: 4 of 4 match (max abs diff vs the export, tolerance 5% of the edit)" in out
    assert sum("max abs diff 0 vs the export (identical)" in line for line in out.splitlines()) == 4

    def worse(record):
        record["device"] = "cuda"
        record["trial"]["params"]["attn.max_weight"] -= 0.3

    shutil.rmtree(tmp_path / "tampered")
    code, out, _ = reproduce(tampered(exports, tmp_path, worse), capsys)
    assert code == 1
    assert "tensors: 2 of 4 match" in out and out.count("of the edit) DIFFERS") == 2


def test_the_record_cannot_allow_a_model_s_own_code(exports, tmp_path, capsys, monkeypatch):
    """An export is a download: its record saying trust_remote_code must not run the base's code."""
    import io
    import sys

    from test_remote_code import FLAG, make_model_dir

    evil, marker = make_model_dir(tmp_path / "evil", "evil_abliterate_test")

    def change(record):
        record["model"]["id"] = str(evil)
        record["config"]["module"]["load"]["trust_remote_code"] = True

    answers = io.StringIO("y\n" * 5)  # what transformers' "run the custom code? [y/N]" would read
    monkeypatch.setattr(sys, "stdin", answers)
    code, out, err = reproduce(tampered(exports, tmp_path, change), capsys)
    assert code == 2 and out == ""
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and FLAG in errors[0] and str(evil) in errors[0], err
    assert not marker.exists() and answers.tell() == 0


@pytest.mark.parametrize(
    "where, needle",
    [
        (None, "give the export to check: abliterate reproduce --export_dir DIR"),
        ("{tmp}/nowhere", "is not a directory"),
        ("{tmp}", "has no reproduce.json"),
        ("abliterate-test/not-on-this-machine", "is not reachable from here, download the export"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(where, needle, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))  # nothing cached for the hub id
    monkeypatch.chdir(tmp_path)
    code, out, err = reproduce(where and Path(where.format(tmp=tmp_path)), capsys)
    assert code == 2 and out == ""
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # after Lightning's seed line, if any
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]) and needle in errors[0], err


def test_a_record_made_with_forward_hooks_is_checked_the_same(exports, tmp_path, capsys):
    """edit_mode hooks changes how trials apply the ablation, not the exported edit: still bit-exact."""

    def change(record):
        record["config"]["module"]["load"]["edit_mode"] = "hooks"

    code, out, _ = reproduce(tampered(exports, tmp_path, change), capsys)
    assert code == 0 and "tensors: 4 of 4 match (sha256, bit-exact)" in out
