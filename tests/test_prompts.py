"""load_prompts over every source kind, split slices, streaming bounds and errors; format_chat templates."""

import csv
import json
import logging
from pathlib import Path

import datasets
import pytest
import yaml
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from abliterate import prompts as prompts_module
from abliterate.data import PromptDataModule
from abliterate.errors import AbliterateError
from abliterate.prompts import PromptSource, format_chat, load_prompts

ROWS = [{"text": f"p{i}", "n": i} for i in range(10)]
TEXTS = [row["text"] for row in ROWS]


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    # Keep the arrow caches datasets writes for local files out of the user's cache.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def make_source(kind: str, root) -> str:
    """A prompt source of `kind` holding ROWS (column "text"), written under root."""
    if kind == "txt":
        # Blank lines and surrounding spaces are not prompts.
        (root / "p.txt").write_text("\n".join(f"  {t} " if i % 3 else f"{t}\n" for i, t in enumerate(TEXTS)) + "\n\n")
        return str(root / "p.txt")
    if kind == "json":
        (root / "p.json").write_text(json.dumps(ROWS))
        return str(root / "p.json")
    if kind == "jsonl":
        return str(write_jsonl(root / "p.jsonl", ROWS))
    if kind == "csv":
        with (root / "p.csv").open("w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=["text", "n"])
            writer.writeheader()
            writer.writerows(ROWS)
        return str(root / "p.csv")
    if kind == "parquet":
        datasets.Dataset.from_list(ROWS).to_parquet(str(root / "p.parquet"))
        return str(root / "p.parquet")
    if kind == "saved":
        datasets.Dataset.from_list(ROWS).save_to_disk(str(root / "saved"))
        return str(root / "saved")
    if kind == "saved_dict":
        ds = datasets.Dataset.from_list(ROWS)
        datasets.DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(str(root / "saved_dict"))
        return str(root / "saved_dict")
    if kind == "jsonl_dir":
        (root / "shards").mkdir()
        write_jsonl(root / "shards" / "part-0.jsonl", ROWS[:4])
        write_jsonl(root / "shards" / "part-1.jsonl", ROWS[4:])
        return str(root / "shards")
    raise ValueError(kind)


KINDS = ["txt", "json", "jsonl", "csv", "parquet", "saved", "saved_dict", "jsonl_dir"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_with_split_slices(kind, tmp_path):
    path = make_source(kind, tmp_path)
    assert load_prompts(PromptSource(path)) == TEXTS
    assert load_prompts(PromptSource(path, split="train[:3]")) == TEXTS[:3]
    assert load_prompts(PromptSource(path, split="train[2:5]")) == TEXTS[2:5]
    assert load_prompts(PromptSource(path, split="train[2:8]", limit=2)) == TEXTS[2:4]  # slice first, then limit


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_streams(kind, tmp_path):
    path = make_source(kind, tmp_path)
    assert load_prompts(PromptSource(path, split="train[2:5]", streaming=True)) == TEXTS[2:5]
    assert load_prompts(PromptSource(path, streaming=True, limit=3)) == TEXTS[:3]
    assert load_prompts(PromptSource(path, split="train[4:]", streaming=True, limit=2)) == TEXTS[4:6]


@pytest.mark.parametrize("kind", ["txt", "saved", "jsonl"])
def test_negative_and_percent_slices(kind, tmp_path):
    path = make_source(kind, tmp_path)
    assert load_prompts(PromptSource(path, split="train[-2:]")) == TEXTS[-2:]
    assert load_prompts(PromptSource(path, split="train[:20%]")) == TEXTS[:2]
    # Percent bounds round half to even, as datasets does: 2.5 -> 2, 3.5 -> 4, -3.5 -> -4, -1.5 -> -2.
    assert load_prompts(PromptSource(path, split="train[25%:35%]")) == TEXTS[2:4]
    assert load_prompts(PromptSource(path, split="train[-35%:-15%]")) == TEXTS[6:8]
    assert load_prompts(PromptSource(path, split="train[-20:3]")) == TEXTS[:3]
    assert load_prompts(PromptSource(path, split="train[:2]+train[-1:]")) == TEXTS[:2] + TEXTS[-1:]


# A single file or saved split is one split: whatever split name the role's default has (eval roles: test[:100]).
@pytest.mark.parametrize("kind", ["txt", "json", "jsonl", "csv", "parquet", "saved"])
def test_single_split_sources_take_any_split_name(kind, tmp_path):
    path = make_source(kind, tmp_path)
    assert load_prompts(PromptSource(path, split="test[:100]")) == TEXTS
    assert load_prompts(PromptSource(path, split="test[:3]")) == TEXTS[:3]
    assert load_prompts(PromptSource(path, split="validation[-2:]")) == TEXTS[-2:]
    assert load_prompts(PromptSource(path, split="test[2:5]", streaming=True)) == TEXTS[2:5]


def test_saved_dataset_dict_joins_splits(tmp_path):
    path = make_source("saved_dict", tmp_path)
    assert load_prompts(PromptSource(path, split="train[:2]+test[-1:]")) == TEXTS[:2] + TEXTS[1:2]
    with pytest.raises(AbliterateError, match="must be one split with non-negative row numbers"):
        load_prompts(PromptSource(path, split="train[:2]+test[:1]", streaming=True))


def test_saved_dataset_dict_picks_the_split(tmp_path):
    path = make_source("saved_dict", tmp_path)
    assert load_prompts(PromptSource(path, split="test")) == TEXTS[:2]
    with pytest.raises(AbliterateError, match=r"no split 'validation'; set split: one of train, test"):
        load_prompts(PromptSource(path, split="validation"))


def test_prefix_suffix_and_strip(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "  how do I bake bread? "}, {"text": "hi"}])
    got = load_prompts(PromptSource(str(path), prefix=" Q: ", suffix=" Answer briefly.\n"))
    assert got == ["Q:   how do I bake bread?  Answer briefly.", "Q: hi Answer briefly."]


def test_logs_what_was_loaded(tmp_path, caplog):
    path = make_source("jsonl", tmp_path)
    with caplog.at_level(logging.INFO, logger="abliterate.prompts"):
        load_prompts(PromptSource(path, split="train[:3]"))
    assert f"loaded 3 prompts from {path} (train[:3], column text) in " in caplog.text
    txt = make_source("txt", tmp_path)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="abliterate.prompts"):
        load_prompts(PromptSource(txt, split="train[:4]"))
    assert caplog.messages[0].startswith(f"loaded 4 prompts from {txt} in ")  # one prompt a line: no split or column


# ---- streaming never reads more rows than requested ----


def counting_stream(n_rows: int, allowed: int, seen: list):
    """A streamed dataset whose row `allowed` (0-based) raises: reading it means too much was read."""

    def rows():
        for i in range(n_rows):
            if i >= allowed:
                raise AssertionError(f"row {i} was read; only {allowed} were requested")
            seen.append(i)
            yield {"text": f"p{i}", "n": i}

    return datasets.IterableDataset.from_generator(rows)


def test_streaming_reads_only_requested_rows(monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, split=None, streaming=False, **kwargs):
        calls.append((path, name, split, streaming))
        return counting_stream(10_000, allowed=7, seen=seen)

    monkeypatch.setattr(prompts_module.datasets, "load_dataset", fake_load_dataset)
    seen: list = []
    assert load_prompts(PromptSource("org/huge", config="en", streaming=True, limit=7)) == [f"p{i}" for i in range(7)]
    assert seen == list(range(7))
    # The slice start is skipped, then only limit rows are read: rows 3..6 of a stream that must stop at 7.
    seen.clear()
    got = load_prompts(PromptSource("org/huge", config="en", split="train[3:]", streaming=True, limit=4))
    assert got == ["p3", "p4", "p5", "p6"] and seen == list(range(7))
    seen.clear()
    assert load_prompts(PromptSource("org/huge", split="train[5:7]", streaming=True)) == ["p5", "p6"]
    assert calls[0] == ("org/huge", "en", "train", True)  # the plain split name: datasets can't slice streams


def test_streaming_a_local_jsonl_reads_only_limit_rows(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "big.jsonl", [{"text": f"p{i}"} for i in range(20_000)])
    yielded = []
    real_load = datasets.load_dataset

    def counted_load(*args, **kwargs):
        ds = real_load(*args, **kwargs)
        assert kwargs.get("streaming") and isinstance(ds, datasets.IterableDataset)
        return ds.map(lambda row: yielded.append(row["text"]) or row)

    monkeypatch.setattr(prompts_module.datasets, "load_dataset", counted_load)
    assert load_prompts(PromptSource(str(path), streaming=True, limit=5)) == [f"p{i}" for i in range(5)]
    assert yielded == [f"p{i}" for i in range(5)]
    assert not (tmp_path / "hf_cache").exists() or not any((tmp_path / "hf_cache").rglob("*.arrow"))


def test_streaming_needs_a_row_count(tmp_path):
    path = make_source("jsonl", tmp_path)
    with pytest.raises(AbliterateError, match="set limit"):
        load_prompts(PromptSource(path, streaming=True))
    with pytest.raises(AbliterateError, match="set limit"):
        load_prompts(PromptSource(path, split="train[3:]", streaming=True))
    with pytest.raises(AbliterateError, match="non-negative row numbers"):
        load_prompts(PromptSource(path, split="train[:10%]", streaming=True))


# ---- errors name the fix ----


def test_missing_file_and_dir(tmp_path):
    with pytest.raises(AbliterateError, match="does not exist; check the dataset path"):
        load_prompts(PromptSource(str(tmp_path / "nope.jsonl")))
    with pytest.raises(AbliterateError, match="does not exist"):
        load_prompts(PromptSource(str(tmp_path / "no_dir")))


@pytest.mark.parametrize("streaming", [False, True])
def test_missing_column_lists_columns(tmp_path, streaming):
    path = make_source("jsonl", tmp_path)
    with pytest.raises(AbliterateError) as info:
        load_prompts(PromptSource(path, column="prompt", streaming=streaming, limit=3))
    message = str(info.value)
    assert "no column 'prompt'" in message and "set column: one of text, n" in message
    assert "\n" not in message


def test_missing_column_in_a_stream_without_features(monkeypatch):
    monkeypatch.setattr(prompts_module.datasets, "load_dataset", lambda *a, **k: counting_stream(10, 10, []))
    with pytest.raises(AbliterateError, match="no column 'prompt'; set column: one of text, n"):
        load_prompts(PromptSource("org/x", column="prompt", streaming=True, limit=2))


def test_non_string_column(tmp_path):
    path = make_source("jsonl", tmp_path)
    with pytest.raises(
        AbliterateError, match=r"column 'n' .* holds int values \(row 0\), not text; set column: one of text"
    ):
        load_prompts(PromptSource(path, column="n"))
    none_path = write_jsonl(tmp_path / "none.jsonl", [{"text": "a"}, {"text": None}])
    with pytest.raises(AbliterateError, match=r"holds NoneType values \(row 1\)"):
        load_prompts(PromptSource(str(none_path)))


def test_empty_prompt_sets(tmp_path):
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(AbliterateError, match="has no prompts; check split/limit"):
        load_prompts(PromptSource(str(tmp_path / "blank.txt")))
    path = make_source("saved", tmp_path)
    with pytest.raises(AbliterateError, match="has no prompts; check split/limit"):
        load_prompts(PromptSource(path, split="train[20:]"))


def test_unknown_extension(tmp_path):
    (tmp_path / "p.tsv").write_text("text\np0\n")
    with pytest.raises(
        AbliterateError, match=r"unsupported extension '.tsv'; use a .txt/.json/.jsonl/.csv/.parquet file"
    ):
        load_prompts(PromptSource(str(tmp_path / "p.tsv")))


def test_bad_split_and_limit(tmp_path):
    path = make_source("jsonl", tmp_path)
    with pytest.raises(AbliterateError) as info:
        load_prompts(PromptSource(path, split="train[::2]", streaming=True, limit=2))
    assert str(info.value) == (
        f"split 'train[::2]' of {path} is not understood (Unrecognized instruction format: train[::2]); "
        "set split: a name with an optional row slice, e.g. train[:400]"
    )
    with pytest.raises(AbliterateError, match=r"not understood \(Percent slice boundaries must be > -100 and < 100.\)"):
        load_prompts(PromptSource(path, split="train[:200%]"))
    with pytest.raises(AbliterateError, match=r"does not apply \(.*pct1_dropremainder.*less than 100"):
        load_prompts(PromptSource(path, split="train[:50%](pct1_dropremainder)"))
    with pytest.raises(AbliterateError, match="set limit >= 1"):
        PromptSource(path, limit=0)
    with pytest.raises(AbliterateError, match="a prompt source has dataset ''; name a hub id, a dataset dir or a"):
        PromptSource("")


# ---- unreadable files: one line naming the file, the line and the fix ----


def test_malformed_jsonl(tmp_path, caplog):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"\n{"text": "c"}\n')
    expected = (
        f"{path} line 2 is not valid JSON (Expecting ',' delimiter at column 13); "
        "fix that line (JSON Lines: one object per line)"
    )
    for streaming in (False, True):
        with caplog.at_level(logging.INFO), pytest.raises(AbliterateError) as info:
            load_prompts(PromptSource(str(path), streaming=streaming, limit=3))
        assert str(info.value) == expected
    assert "Failed to load JSON" not in caplog.text  # the builder's own error log is folded into that line


def test_malformed_json_document(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"text": "a"}\n  {"text": "b"}\n]\n')
    with pytest.raises(AbliterateError) as info:
        load_prompts(PromptSource(str(path)))
    assert str(info.value) == (
        f"{path} line 3 is not valid JSON (Expecting ',' delimiter at column 3); fix the JSON there"
    )


def test_malformed_jsonl_in_a_dir_names_the_file(tmp_path):
    path = make_source("jsonl_dir", tmp_path)
    bad = tmp_path / "shards" / "part-1.jsonl"
    bad.write_text('{"text": "p4"}\n{"text": "p5"}\n{"text" "p6"}\n')
    with pytest.raises(AbliterateError) as info:
        load_prompts(PromptSource(path))
    assert str(info.value) == (
        f"{bad} line 3 is not valid JSON (Expecting ':' delimiter at column 9); "
        "fix that line (JSON Lines: one object per line)"
    )


@pytest.mark.parametrize(
    "suffix, content",
    [(".txt", b"ok\ncaf\xe9\n"), (".csv", b"text\ncaf\xe9\n"), (".jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n')],
)
@pytest.mark.parametrize("streaming", [False, True])
def test_non_utf8_file(tmp_path, suffix, content, streaming):
    path = tmp_path / f"latin1{suffix}"
    path.write_bytes(content)
    column = 4 if suffix != ".jsonl" else 14
    with pytest.raises(AbliterateError) as info:
        load_prompts(PromptSource(str(path), streaming=streaming, limit=5))
    assert str(info.value) == f"{path} line 2 is not UTF-8 (byte 0xe9 at column {column}); save the file as UTF-8"


def test_empty_data_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(AbliterateError) as info:
        load_prompts(PromptSource(str(path)))
    assert str(info.value) == f"{path} is empty; put prompts in it"


def test_utf8_bom_is_not_part_of_the_first_prompt(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffhello\nworld\n".encode())
    assert load_prompts(PromptSource(str(path))) == ["hello", "world"]


@pytest.mark.skipif(not datasets.config.HF_HUB_OFFLINE, reason="needs HF_HUB_OFFLINE=1 (else the hub is retried)")
def test_unreachable_hub_id():
    with pytest.raises(
        AbliterateError, match="could not load nobody/no-such-dataset-xyz: .*check the dataset path or id"
    ):
        load_prompts(PromptSource("nobody/no-such-dataset-xyz"))


# ---- roles on the command line and in YAML: a plain string, or the fields ----


@pytest.fixture
def cli_data(monkeypatch):
    """The data module the real `abliterate run` parser builds from some args, without running the verb."""
    from abliterate.cli import AbliterateCLI, main

    seen = {}
    monkeypatch.setattr(AbliterateCLI, "_run_subcommand", lambda self, subcommand: seen.update(data=self.datamodule))

    def parse(*args: str) -> PromptDataModule:
        main(["run", *args, "--model", "m"])
        return seen["data"]

    return parse


def test_cli_roles_take_a_plain_string(tmp_path, cli_data):
    # The .txt and .csv texts parse as YAML strings: jsonargparse must not read them as sub-configs.
    txt, jsonl, csv_path = (make_source(kind, tmp_path) for kind in ("txt", "jsonl", "csv"))
    data = cli_data(
        *("--data.harmful", txt, "--data.harmless", jsonl, "--data.eval_harmful", csv_path),
        *("--data.unhelpful", "allenai/c4"),
    )
    assert data.sources["harmful"] == PromptSource(txt)
    assert data.sources["harmless"] == PromptSource(jsonl)
    assert data.sources["eval_harmful"] == PromptSource(csv_path)
    assert data.sources["unhelpful"] == PromptSource("allenai/c4")
    assert data.sources["eval_harmless"] == PromptSource("mlabonne/harmless_alpaca", split="test[:100]")
    for role in ("harmful", "harmless", "eval_harmful"):
        assert load_prompts(data.sources[role]) == TEXTS


def test_cli_roles_take_fields(tmp_path, cli_data):
    txt = make_source("txt", tmp_path)
    data = cli_data(
        *("--data.harmful", "{dataset: org/x, split: train}"),
        *("--data.harmless.dataset", "org/y", "--data.harmless.limit", "5"),
        *("--data.eval_harmful", f"{{dataset: {txt}}}", "--data.eval_harmless.dataset", txt),
    )
    assert data.sources["harmful"] == PromptSource("org/x", split="train")
    assert data.sources["harmless"] == PromptSource("org/y", split="train[:400]", limit=5)
    # Eval roles keep their default split, test[:100]: on a file that is its first 100 prompts.
    assert data.sources["eval_harmful"] == PromptSource(txt, split="test[:100]")
    assert load_prompts(data.sources["eval_harmful"]) == TEXTS
    assert load_prompts(data.sources["eval_harmless"]) == TEXTS


def test_yaml_roles_take_a_plain_string(tmp_path, cli_data):
    txt, jsonl = make_source("txt", tmp_path), make_source("jsonl", tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text(f"data:\n  harmful: {txt}\n  eval_harmless: {{dataset: {jsonl}, split: 'test[-2:]'}}\n")
    data = cli_data("--config", str(config))
    assert data.sources["harmful"] == PromptSource(txt)
    assert load_prompts(data.sources["harmful"]) == TEXTS
    assert load_prompts(data.sources["eval_harmless"]) == TEXTS[-2:]


def test_cli_fields_without_a_dataset_name_the_fix(capsys, cli_data):
    for args in (["--data.unhelpful.limit", "5"], ["--data.harmful", "p.txt", "--data.harmful.limit", "5"]):
        with pytest.raises(SystemExit) as exit_:
            cli_data(*args)
        assert exit_.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            "error: a prompt role got fields but no dataset; add --data.<role>.dataset p.txt, "
            "or give the role whole: --data.<role> '{dataset: p.txt, limit: 5}'"
        )


def test_print_config_shows_plain_strings_and_defaults(tmp_path, capsys):
    from abliterate.cli import main

    txt = make_source("txt", tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--model", "m", "--data.harmful", txt, "--print_config"])
    assert exit_.value.code in (0, None)
    data = yaml.safe_load(capsys.readouterr().out)["data"]
    assert data["harmful"] == txt
    assert data["harmless"]["dataset"] == "mlabonne/harmless_alpaca" and data["harmless"]["split"] == "train[:400]"
    assert data["eval_harmful"]["dataset"] == "mlabonne/harmful_behaviors"
    assert data["eval_harmful"]["split"] == "test[:100]" and data["unhelpful"] is None


def test_data_module_takes_strings_and_paths(tmp_path):
    txt = make_source("txt", tmp_path)
    data = PromptDataModule(harmful=txt, harmless=Path(txt), unhelpful="allenai/c4")
    assert data.sources["harmful"] == data.sources["harmless"] == PromptSource(txt)
    assert data.sources["unhelpful"] == PromptSource("allenai/c4")
    assert data.prompts("harmless") == TEXTS


def test_cli_malformed_jsonl_is_one_line(organism_config, organism_dir, tmp_path, capfd):
    from abliterate.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": "b"\n')
    args = ["run", "--config", str(organism_config), "--model", str(organism_dir), "--output_dir", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--data.harmful", str(bad)])
    err = capfd.readouterr().err
    assert exit_.value.code == 2
    assert err.strip().splitlines()[-1] == (
        f"error: {bad} line 2 is not valid JSON (Expecting ',' delimiter at column 13); "
        "fix that line (JSON Lines: one object per line)"
    )
    assert "Traceback" not in err and "Failed to load JSON" not in err


# ---- format_chat ----

CHAT = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
    "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}"
)
NO_SYSTEM = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}" + CHAT
)


def tiny_tokenizer(chat_template: str | None = CHAT):
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel({"[UNK]": 0}, unk_token="[UNK]")), name_or_path="tiny-model"
    )
    tok.chat_template = chat_template
    return tok


def test_format_chat_without_system_prompt():
    assert format_chat(tiny_tokenizer(), ["hi", "yo"]) == ["<user>hi</s><assistant>", "<user>yo</s><assistant>"]
    assert format_chat(tiny_tokenizer(), []) == []


def test_format_chat_with_system_prompt():
    got = format_chat(tiny_tokenizer(), ["hi"], system_prompt="be brief")
    assert got == ["<system>be brief</s><user>hi</s><assistant>"]


def test_template_rejecting_system_role_is_folded(caplog):
    with caplog.at_level(logging.INFO, logger="abliterate.prompts"):
        got = format_chat(tiny_tokenizer(NO_SYSTEM), ["hi", "yo"], system_prompt="be brief")
    assert got == ["<user>be brief\n\nhi</s><assistant>", "<user>be brief\n\nyo</s><assistant>"]
    assert "rejects the system role" in caplog.text and "folding the system prompt" in caplog.text
    # Without a system prompt nothing is folded or logged.
    assert format_chat(tiny_tokenizer(NO_SYSTEM), ["hi"]) == ["<user>hi</s><assistant>"]


def test_other_template_errors_are_not_folded():
    broken = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    with pytest.raises(Exception, match="roles must alternate"):
        format_chat(tiny_tokenizer(broken), ["hi"], system_prompt="be brief")


def test_missing_chat_template_names_the_fix():
    with pytest.raises(AbliterateError, match=r"model tiny-model has no chat template; pass --data.chat_template"):
        format_chat(tiny_tokenizer(None), ["hi"])


def test_chat_template_string_and_file(tmp_path):
    assert format_chat(tiny_tokenizer(None), ["hi"], chat_template="[{{ messages[-1]['content'] }}]") == ["[hi]"]
    (tmp_path / "chat.jinja").write_text(CHAT)
    got = format_chat(tiny_tokenizer(None), ["hi"], chat_template=str(tmp_path / "chat.jinja"), system_prompt="s")
    assert got == ["<system>s</s><user>hi</s><assistant>"]
    with pytest.raises(AbliterateError, match="chat template file .* does not exist"):
        format_chat(tiny_tokenizer(None), ["hi"], chat_template=str(tmp_path / "missing.jinja"))
    with pytest.raises(AbliterateError, match="does not parse"):
        format_chat(tiny_tokenizer(None), ["hi"], chat_template="{% for m in messages %}")


@pytest.mark.parametrize("enable_thinking, rendered", [(None, ""), (True, ""), (False, "<think></think>")])
def test_enable_thinking_reaches_the_template(enable_thinking, rendered):
    got = format_chat(tiny_tokenizer(), ["hi"], enable_thinking=enable_thinking)
    assert got == [f"<user>hi</s><assistant>{rendered}"]
