"""Exports never replace anything but an earlier export, and clean up after killed writers."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from abliterate.cli import main
from abliterate.errors import AbliterateError
from abliterate.export import MANIFEST, check_export_target, export_files, save_checkpoint
from abliterate.rundir import LOCK_FILE


@pytest.fixture(scope="module")
def tiny():
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "a", "b"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    return LlamaForCausalLM(config).eval(), tokenizer


def tree(path: Path) -> dict[str, bytes | None]:
    """Every entry under `path` (hidden ones too) with a file's bytes, or None for a dir."""
    return {p.relative_to(path).as_posix(): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}


def refused(call, *needles) -> str:
    with pytest.raises(AbliterateError) as info:
        call()
    message = str(info.value)
    assert len(message.splitlines()) == 1
    for needle in needles:
        assert needle in message, message
    return message


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    (run / "cache").mkdir(parents=True)
    (run / "study.db").write_bytes(b"SQLite format 3\x00trials")
    (run / "cache" / "residuals-0123.safetensors").write_bytes(b"residuals")
    (run / "notes.md").write_text("my notes")
    return run


def test_export_lists_exactly_its_files(tiny, tmp_path):
    model, tokenizer = tiny
    target = save_checkpoint(model, tokenizer, tmp_path / "model", False, {"base_model": "tiny", "trial": 3})
    card = json.loads((target / MANIFEST).read_text())
    assert card["trial"] == 3 and card["base_model"] == "tiny"
    names = {p.name for p in target.iterdir()}
    assert set(card["export_files"]) == names - {MANIFEST}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= names
    assert export_files(target) == names
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp dirs left
    assert AutoModelForCausalLM.from_pretrained(target).config.hidden_size == 16


def test_run_dir_is_never_an_export_target(tiny, run_dir, tmp_path):
    before = tree(tmp_path)
    model, tokenizer = tiny
    for target in (run_dir, tmp_path):  # the run dir, or a dir containing it
        for overwrite in (True, False):
            refused(lambda t=target, o=overwrite: check_export_target(t, o, run_dir), "is the run dir", "--export_dir")
        refused(lambda t=target: save_checkpoint(model, tokenizer, t, True, {}, run_dir=run_dir), "is the run dir")
    assert tree(tmp_path) == before
    check_export_target(run_dir / "model", True, run_dir)  # the default target is fine


def test_cwd_is_never_an_export_target(tiny, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "paper.tex").write_text("draft")
    monkeypatch.chdir(work)
    before = tree(tmp_path)
    model, tokenizer = tiny
    for target in (Path("."), Path(".."), work, Path("/")):
        refused(lambda t=target: save_checkpoint(model, tokenizer, t, True, {}), "current directory")
    assert tree(tmp_path) == before


def test_overwrite_only_replaces_an_export(tiny, tmp_path):
    model, tokenizer = tiny
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    (tmp_path / "a-file").write_text("data")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / MANIFEST).write_text('{"base_model": "x"}')
    (legacy / "config.json").write_text("{}")
    before = tree(tmp_path)
    refused(lambda: save_checkpoint(model, tokenizer, mine, True, {}), "did not write (keep.txt)", "--overwrite only")
    refused(lambda: save_checkpoint(model, tokenizer, tmp_path / "a-file", True, {}), "not a directory")
    refused(lambda: save_checkpoint(model, tokenizer, legacy, True, {}), "without a file list")
    link = tmp_path / "link"
    link.symlink_to(mine)
    refused(lambda: save_checkpoint(model, tokenizer, link, True, {}), "is a symlink")
    link.unlink()
    assert tree(tmp_path) == before


def test_an_export_with_added_files_is_not_replaced(tiny, tmp_path):
    model, tokenizer = tiny
    target = save_checkpoint(model, tokenizer, tmp_path / "model", False, {"trial": 1})
    (target / "my-eval.jsonl").write_text("results")
    before = tree(tmp_path)
    refused(lambda: save_checkpoint(model, tokenizer, target, True, {"trial": 2}), "did not write (my-eval.jsonl)")
    (target / "my-eval.jsonl").unlink()
    (target / "sub").mkdir()  # an empty dir is content too
    refused(lambda: save_checkpoint(model, tokenizer, target, True, {"trial": 2}), "did not write (sub)")
    (target / "sub").rmdir()
    (target / "my-eval.jsonl").write_text("results")
    assert tree(tmp_path) == before


def test_overwrite_replaces_an_earlier_export(tiny, tmp_path):
    model, tokenizer = tiny
    target = save_checkpoint(model, tokenizer, tmp_path / "model", False, {"trial": 1})
    first = tree(tmp_path)
    refused(lambda: save_checkpoint(model, tokenizer, target, False, {"trial": 2}), "pass --overwrite true")
    assert tree(tmp_path) == first
    save_checkpoint(model, tokenizer, target, True, {"trial": 2})
    assert json.loads((target / MANIFEST).read_text())["trial"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert {k for k in tree(tmp_path)} == {k for k in first}


def test_empty_dir_needs_no_overwrite(tiny, tmp_path):
    model, tokenizer = tiny
    (tmp_path / "model").mkdir()
    save_checkpoint(model, tokenizer, tmp_path / "model", False, {})
    assert export_files(tmp_path / "model") is not None


def test_failed_export_keeps_the_earlier_one(tiny, tmp_path):
    model, tokenizer = tiny
    target = save_checkpoint(model, tokenizer, tmp_path / "model", False, {"trial": 1})
    before = tree(tmp_path)

    class DiskFull:
        def save_pretrained(self, path):
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(model, DiskFull(), target, True, {"trial": 2})
    assert tree(tmp_path) == before


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_stale_temps_of_this_target_are_removed(tiny, tmp_path, caplog):
    model, tokenizer = tiny
    old_export = save_checkpoint(model, tokenizer, tmp_path / "seed", False, {})
    dead, dead2, alive = _dead_pid(), _dead_pid(), os.getppid()
    (tmp_path / f".model.tmp-{dead}").mkdir()
    (tmp_path / f".model.tmp-{dead}" / "model.safetensors").write_bytes(b"\0" * 1000)
    shutil.copytree(old_export, tmp_path / f".model.old-{dead}")  # a replaced export
    shutil.copytree(old_export, tmp_path / f".model.old-{dead2}")
    (tmp_path / f".model.old-{dead2}" / "notes.txt").write_text("not ours")  # then it is not only ours
    (tmp_path / f".model.tmp-{alive}").mkdir()  # another live writer's
    (tmp_path / f".other.tmp-{dead}").mkdir()  # another target's
    with caplog.at_level(logging.WARNING, logger="abliterate.export"):
        save_checkpoint(model, tokenizer, tmp_path / "model", False, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["seed", "model", f".model.old-{dead2}", f".model.tmp-{alive}", f".other.tmp-{dead}"]
    )
    assert (tmp_path / f".model.old-{dead2}" / "notes.txt").read_text() == "not ours"
    messages = [r.getMessage() for r in caplog.records]
    for name in (f".model.tmp-{dead}", f".model.old-{dead}", f".model.old-{dead2}"):
        assert sum(f"removed {tmp_path / name}," in m for m in messages) == (name != f".model.old-{dead2}")
    assert sum(f"left {tmp_path / f'.model.old-{dead2}'} in place" in m for m in messages) == 1


# Exports argv[1] to argv[2], but stops after the weights are written until it is killed.
KILLED_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from abliterate.export import save_checkpoint

    model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
    tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
    real = model.save_pretrained

    def save_then_wait(path, **kwargs):
        real(path, **kwargs)
        print("saved", flush=True)
        sys.stdin.read()

    model.save_pretrained = save_then_wait
    save_checkpoint(model, tokenizer, Path(sys.argv[2]), True, {})
    """
)


def test_kill_9_during_export_is_cleaned_up_by_the_next_writer(tiny, tmp_path, caplog):
    model, tokenizer = tiny
    source = save_checkpoint(model, tokenizer, tmp_path / "source", False, {})
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(source), str(out / "model")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )
    try:
        assert proc.stdout.readline().strip() == "saved"
        left = out / f".model.tmp-{proc.pid}"
        assert (left / "model.safetensors").stat().st_size > 0
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert [p.name for p in out.iterdir()] == [left.name]  # what the issue reported
    with caplog.at_level(logging.WARNING, logger="abliterate.export"):
        save_checkpoint(model, tokenizer, out / "model", False, {})
    assert [p.name for p in out.iterdir()] == ["model"]
    assert [r.getMessage() for r in caplog.records] == [f"removed {left}, left by an export whose process is gone"]


def organism_run(organism_config, organism_dir, out, *extra):
    return ["run", "--config", str(organism_config), "--model", str(organism_dir), "--output_dir", str(out), *extra]


def test_cli_refuses_run_dir_and_cwd_as_export_dir(organism_config, organism_dir, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    (run / "cache").mkdir(parents=True)
    (run / "cache" / "residuals-0123.safetensors").write_bytes(b"residuals")
    (run / "notes.md").write_text("my notes")
    for export_dir in (str(run), "."):
        if export_dir == ".":
            monkeypatch.chdir(run)
        before = tree(tmp_path)
        args = organism_run(organism_config, organism_dir, run, "--export_dir", export_dir, "--overwrite", "true")
        with pytest.raises(SystemExit) as exit_:
            main(args)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "Traceback" not in err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "--export_dir" in errors[0], err
        after = tree(tmp_path)
        assert {k: after[k] for k in before} == before  # nothing changed or removed
        assert set(after) - set(before) <= {f"run/{LOCK_FILE}"}  # at most the run dir's lock file was added
