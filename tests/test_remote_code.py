"""A model dir's own Python code (auto_map) never runs unless --module.load.trust_remote_code is on."""

import io
import json
import os
import subprocess
import sys
import textwrap

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from abliterate.cli import main
from abliterate.errors import AbliterateError
from abliterate.models import load_model, load_tokenizer

FLAG = "--module.load.trust_remote_code true"

# Each module writes the marker as soon as it is imported: any execution of the repo's code leaves it.
CODE = {
    "configuration_evil.py": """
        from transformers import PretrainedConfig

        class EvilConfig(PretrainedConfig):
            model_type = "evil_abliterate_test"
    """,
    "modeling_evil.py": """
        from transformers import LlamaForCausalLM

        class EvilForCausalLM(LlamaForCausalLM):
            pass
    """,
    "tokenization_evil.py": """
        from transformers import PreTrainedTokenizerFast

        class EvilTokenizer(PreTrainedTokenizerFast):
            pass
    """,
}
AUTO_MAP = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}


def make_model_dir(path, model_type: str, tokenizer_class: str = "EvilTokenizer"):
    """A tiny Llama dir whose config and tokenizer config point at custom code (auto_map)."""
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "a", "b"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>").save_pretrained(path)
    config = LlamaConfig(vocab_size=4, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    LlamaForCausalLM(config).save_pretrained(path)
    marker = path.parent / f"{path.name}-EXECUTED"
    for name, body in CODE.items():
        header = f"import pathlib\npathlib.Path({str(marker)!r}).write_text({name!r})\n"
        (path / name).write_text(header + textwrap.dedent(body))
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(model_type=model_type, auto_map=AUTO_MAP, architectures=["EvilForCausalLM"])
    (path / "config.json").write_text(json.dumps(cfg))
    tok = json.loads((path / "tokenizer_config.json").read_text())
    tok.update(tokenizer_class=tokenizer_class, auto_map={"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]})
    (path / "tokenizer_config.json").write_text(json.dumps(tok))
    return path, marker


@pytest.fixture
def evil(tmp_path):
    """A dir only its own code can load (a model type transformers does not know)."""
    return make_model_dir(tmp_path / "evil", "evil_abliterate_test")


@pytest.fixture
def stdin_says_yes(monkeypatch):
    """stdin that would answer transformers' "run the custom code? [y/N]" with y."""
    answers = io.StringIO("y\n" * 5)
    monkeypatch.setattr(sys, "stdin", answers)
    return answers


@pytest.mark.parametrize("loader", [load_model, load_tokenizer])
def test_remote_code_is_refused_without_the_option(evil, stdin_says_yes, loader):
    path, marker = evil
    with pytest.raises(AbliterateError) as info:
        loader(str(path))
    message = str(info.value)
    assert message == (
        f"{path} needs its own Python code to load (auto_map in its config files); pass {FLAG} "
        "only if you trust that code"
    )
    assert not marker.exists()
    assert stdin_says_yes.tell() == 0  # nobody asked


def test_known_architecture_ignores_auto_map_without_the_option(tmp_path, stdin_says_yes):
    path, marker = make_model_dir(tmp_path / "llama", "llama", "PreTrainedTokenizerFast")
    model = load_model(str(path), dtypes=("float32",))
    tokenizer = load_tokenizer(str(path))
    assert type(model).__name__ == "LlamaForCausalLM"  # transformers' own class, not the repo's
    assert type(tokenizer).__name__ != "EvilTokenizer"
    assert not marker.exists()
    assert stdin_says_yes.tell() == 0


def test_cli_refuses_remote_code_in_one_line(evil, stdin_says_yes, organism_config, tmp_path, capsys):
    path, marker = evil
    args = ["run", "--config", str(organism_config), "--model", str(path), "--output_dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and FLAG in errors[0], err
    assert not marker.exists()
    assert stdin_says_yes.tell() == 0


def test_the_option_does_run_the_code(evil, tmp_path):
    """The control: with the option on, the same dir's code runs (so the tests above can see it)."""
    path, marker = evil
    script = (
        "import sys\nfrom abliterate.models import load_tokenizer\n"
        "print(type(load_tokenizer(sys.argv[1], trust_remote_code=True)).__name__)"
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "EvilTokenizer"
    assert marker.exists()


def test_the_classifier_refuses_remote_code_without_its_option(evil, stdin_says_yes):
    from abliterate.classifier import RefusalClassifier
    from abliterate.options import ClassifierOptions

    path, marker = evil
    with pytest.raises(AbliterateError) as info:
        RefusalClassifier(ClassifierOptions(model=str(path))).refusal_scores(["I can't help with that."])
    assert str(info.value) == (
        f"classifier.model={str(path)!r} needs its own Python code to load (auto_map in its config files); "
        "pass --classifier.trust_remote_code true only if you trust that code"
    )
    assert not marker.exists()
    assert stdin_says_yes.tell() == 0
