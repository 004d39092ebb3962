"""The chat REPL on the tiny organism: multi-turn history, /reset, /system, Ctrl-C, quitting, and
--compare (original and abliterated replies from one model in memory)."""

import io
from types import SimpleNamespace

import pytest
import torch
from helpers import run_cli

from abliterate.ablation import AblationParams, ComponentKernel
from abliterate.chat import chat_loop
from abliterate.metrics import default_markers, is_refusal
from abliterate.models import load_model, load_tokenizer
from abliterate.prompts import format_chat

TEA, BREAD = "how do i make tea ?", "how do i make bread ?"


@pytest.fixture(scope="module")
def organism(organism_dir):
    return load_model(str(organism_dir), dtypes=["float32"]), load_tokenizer(str(organism_dir))


def reader(*lines):
    """A `read` that returns each line in turn; an exception class in the list is raised (EOFError: Ctrl-D)."""
    items = iter(lines)

    def read(prompt: str) -> str:
        item = next(items)
        if isinstance(item, type) and issubclass(item, BaseException):
            raise item
        return item

    read.left = lambda: list(items)
    return read


class Recorder:
    """Wraps model.generate: records each call's input ids (and whether the weights differ from
    `original`), and raises KeyboardInterrupt mid-reply in the calls numbered in `interrupt` (1-based)."""

    def __init__(self, model, interrupt=(), original=None):
        self.model, self.real, self.interrupt, self.original = model, model.generate, set(interrupt), original
        self.inputs: list[list[int]] = []
        self.edited: list[bool] = []

    def __call__(self, **kwargs):
        self.inputs.append(kwargs["input_ids"][0].tolist())
        if self.original is not None:
            params = self.model.named_parameters()
            self.edited.append(any(not torch.equal(p, self.original[name]) for name, p in params))
        if len(self.inputs) in self.interrupt:  # Ctrl-C after this reply's first two tokens were shown
            streamer, shown = kwargs["streamer"], []
            put = streamer.put

            def put_then_stop(value):
                put(value)
                shown.append(value)
                if len(shown) == 3:  # the prompt, then two tokens
                    raise KeyboardInterrupt

            streamer.put = put_then_stop
        return self.real(**kwargs)


def data(system_prompt=None):
    return SimpleNamespace(system_prompt=system_prompt, chat_template=None, enable_thinking=None)


def chat(organism, monkeypatch, *lines, system_prompt=None, interrupt=()):
    model, tokenizer = organism
    recorder = Recorder(model, interrupt)
    monkeypatch.setattr(model, "generate", recorder)
    read = reader(*lines)
    histories = chat_loop(model, tokenizer, data(system_prompt), max_new_tokens=8, read=read)
    return histories["model"], recorder, read.left()


def test_the_second_prompt_sees_the_first_turn(organism, monkeypatch, capsys):
    history, recorder, _ = chat(organism, monkeypatch, TEA, BREAD, EOFError)
    tokenizer = organism[1]
    assert [t["role"] for t in history] == ["user", "assistant"] * 2
    assert [history[0]["content"], history[2]["content"]] == [TEA, BREAD]
    first_reply = history[1]["content"]
    assert first_reply and first_reply in capsys.readouterr().out  # streamed as it was generated
    first, second = recorder.inputs
    assert second[: len(first)] == first  # the first turn's prompt, then its reply, then the new question
    text = tokenizer.decode(second[len(first) :])
    assert text.index(first_reply) < text.index(BREAD)


def test_reset_clears_the_history(organism, monkeypatch, capsys):
    history, recorder, _ = chat(organism, monkeypatch, TEA, "/reset", BREAD, EOFError)
    assert "[history cleared]" in capsys.readouterr().out
    assert [t["content"] for t in history[::2]] == [BREAD]
    tokenizer = organism[1]
    alone = tokenizer(format_chat(tokenizer, [BREAD])[0], add_special_tokens=False)["input_ids"]
    assert recorder.inputs[1] == alone  # as the first question of a new chat


def test_system_sets_the_system_prompt_for_what_follows(organism, monkeypatch, capsys):
    first, second = "start with the basics and go slow", "follow the plan with tea"
    _, recorder, _ = chat(
        organism,
        monkeypatch,
        TEA,
        f"/system {second}",
        BREAD,
        "/system",
        "/reset",
        BREAD,
        EOFError,
        system_prompt=first,
    )
    texts = [organism[1].decode(ids) for ids in recorder.inputs]
    assert first in texts[0] and second not in texts[0]  # the data module's system prompt
    assert second in texts[1] and first not in texts[1]  # replaced for what follows
    assert first not in texts[2] and second not in texts[2]  # /system alone removes it
    out = capsys.readouterr().out
    assert f"[system prompt: {second}]" in out and "[system prompt removed]" in out


def test_ctrl_c_stops_the_reply_keeps_the_chat_and_leaves_the_turn_out(organism, monkeypatch, capsys):
    history, recorder, _ = chat(organism, monkeypatch, TEA, BREAD, EOFError, interrupt=[1])
    out = capsys.readouterr().out
    assert "[stopped]" in out and len(recorder.inputs) == 2  # the chat went on to the second question
    assert [t["content"] for t in history[::2]] == [BREAD]  # the stopped turn is not in the history
    assert "tea" not in organism[1].decode(recorder.inputs[1])
    after = out.split("[stopped]")[1]
    assert history[1]["content"] in after and BREAD not in after  # the next reply alone, nothing left over


@pytest.mark.parametrize("key", [EOFError, KeyboardInterrupt], ids=["ctrl-d", "ctrl-c"])
def test_ctrl_d_or_ctrl_c_at_the_prompt_quits(organism, monkeypatch, key):
    history, recorder, left = chat(organism, monkeypatch, TEA, key, BREAD)
    assert len(recorder.inputs) == 1 and len(history) == 2 and left == [BREAD]


def full_ablation(n_layers: int) -> AblationParams:
    kernel = ComponentKernel(max_weight=1.0, max_weight_position=0.0, min_weight=1.0, min_weight_distance=n_layers)
    return AblationParams(components={"attn": kernel, "mlp": kernel}, direction_index=None)


def test_compare_labels_original_and_abliterated_replies_of_one_model(organism_dir, tmp_path, monkeypatch, capsys):
    from abliterate.data import PromptDataModule
    from abliterate.module import AbliterationModule
    from abliterate.options import LoadOptions
    from abliterate.pipeline import Pipeline
    from abliterate.prompts import PromptSource
    from abliterate.trainer import AbliterationTrainer

    module = AbliterationModule(model_id=str(organism_dir), load=LoadOptions(dtypes=["float32"]))
    datamodule = PromptDataModule(
        harmful=PromptSource(f"{organism_dir}/harmful_train.txt"),
        harmless=PromptSource(f"{organism_dir}/harmless_train.txt"),
        batch_size=32,
    )
    trainer = AbliterationTrainer(accelerator="cpu", devices=1, enable_progress_bar=False)
    Pipeline(trainer, module, datamodule, tmp_path / "run").residuals()
    model, tokenizer = module.model, module.tokenizer
    params, directions = full_ablation(module.n_layers), module.directions
    original = {name: p.detach().clone() for name, p in model.named_parameters()}

    harmful = (organism_dir / "harmful_test.txt").read_text().splitlines()
    recorder = Recorder(model, interrupt=[4], original=original)  # Ctrl-C in the 2nd question's abliterated reply
    monkeypatch.setattr(model, "generate", recorder)
    capsys.readouterr()
    histories = chat_loop(
        model,
        tokenizer,
        datamodule,
        max_new_tokens=12,
        read=reader(harmful[0], harmful[1], harmful[2], EOFError),
        compare=lambda: module.weight_editor().applied(params, directions),
    )
    out = capsys.readouterr().out

    assert recorder.edited == [False, True] * 3  # the trial's edit is on for the abliterated replies only
    for name, p in model.named_parameters():
        assert torch.equal(p, original[name]), name  # and off again after the chat, even after a Ctrl-C
    assert set(histories) == {"original", "abliterated"}
    for history in histories.values():  # the stopped question is in neither history
        assert [t["content"] for t in history[::2]] == [harmful[0], harmful[2]]
    refused, answered = histories["original"][1]["content"], histories["abliterated"][1]["content"]
    markers = default_markers()
    assert is_refusal(refused, markers) and not is_refusal(answered, markers)
    assert out.index("[original]") < out.index(refused) < out.index("[abliterated]") < out.index(answered)
    assert out.count("[original]") == 3 and out.count("[abliterated]") == 3 and "[stopped]" in out


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--compare", "true"], "--compare needs --trial N"),
        (["--max_new_tokens", "0"], "--max_new_tokens 0: a reply needs at least 1 token"),
    ],
)
def test_chat_refuses_bad_flags_before_loading(flags, needle, organism_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n\n"))
    code, _, err = run_cli(["chat", "--model", str(organism_dir), *flags], capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and needle in errors[0], err
    assert "Traceback" not in err
