"""Bad input, table-driven: one clear line on stderr (no traceback, no usage dump), exit code 2, and
the run dir's files and the study's trials exactly as they were.

Every case starts from a copy of one finished 3-trial run on the tiny organism.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import pytest
from helpers import interruptible, organism_yaml, run_cli

from abliterate.cli import main


@dataclass
class Ctx:
    organism: Path
    config: Path
    run: Path
    tmp: Path

    def args(self, verb: str = "run", *extra: str) -> list[str]:
        return [
            verb,
            "--config",
            str(self.config),
            "--model",
            str(self.organism),
            "--output_dir",
            str(self.run),
            *extra,
        ]

    def fresh(self, verb: str = "run", *extra: str) -> list[str]:
        """The same command on a new run dir (no study whose scoring record would refuse first)."""
        return [*self.args(verb, *extra), "--output_dir", str(self.tmp / "fresh")]


@dataclass
class Case:
    id: str
    args: object  # Ctx -> list[str]
    needle: str  # a fragment of the one error line
    setup: object = None  # Ctx -> None, before the command
    code: int = 2
    cache_may_change: bool = False  # the failure comes after passes that legitimately cache their results
    extra: dict = field(default_factory=dict)


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def data_flag(role: str, path: Path) -> list[str]:
    return [f"--data.{role}", json.dumps({"dataset": str(path), "split": "train"})]


def cli_args(verb: str, config: Path, organism_dir: Path, run: Path, *extra: str) -> list[str]:
    return [verb, "--config", str(config), "--model", str(organism_dir), "--output_dir", str(run), *extra]


def snapshot(run: Path) -> tuple[list[str], list, str | None]:
    """The run dir's file names, its study's trials and its kept settings (config.yaml)."""
    files = sorted(str(p.relative_to(run)) for p in run.rglob("*") if not p.name.startswith(".abliterate"))
    settings = (run / "config.yaml").read_text() if (run / "config.yaml").is_file() else None
    trials = []
    if (run / "study.db").is_file():
        try:
            study = optuna.load_study(study_name="abliterate", storage=f"sqlite:///{run / 'study.db'}")
            trials = [(t.number, t.state.name, t.values) for t in study.trials]
        except Exception:  # a case that corrupts the study on purpose
            trials = [(run / "study.db").read_bytes()]
    return files, trials, settings


def long_prompt_file(ctx: Ctx) -> Path:
    return write(ctx.tmp / "long.txt", "how do i make a plan " * 600 + "\nwhat is the plan\n")


SCORER = "module:\n  scorers:\n    - class_path: {}\n"
BOGUS = "      init_args: {bogus: 1}\n"

CASES = [
    # ---- data safety (issue items 1-4)
    Case("export-into-run-dir", lambda c: c.args("run", "--export_dir", str(c.run), "--overwrite", "true"), "run dir"),
    Case("export-into-cwd", lambda c: c.args("run", "--export_dir", ".", "--overwrite", "true"), "current dir"),
    Case(
        "export-over-user-files",
        lambda c: c.args("run", "--export_dir", str(c.tmp / "mine"), "--overwrite", "true"),
        "did not write",
        setup=lambda c: (c.tmp / "mine").mkdir() or write(c.tmp / "mine" / "notes.txt", "mine"),
    ),
    # ---- parse errors (item 8)
    Case("unknown-flag", lambda c: c.args("run", "--study.bogus", "1"), "bogus"),
    Case("wrong-type", lambda c: c.args("run", "--study.n_trials", "many"), "n_trials"),
    Case("negative-seed", lambda c: c.args("run", "--study.seed", "-1"), "study.seed=-1"),
    Case("bad-literal", lambda c: c.args("run", "--space.components", "[attn, everything]"), "components"),
    Case("bad-quantile", lambda c: c.args("run", "--space.winsorize", "[0.99, 1.5]"), "winsorize"),
    Case("no-positions", lambda c: c.args("run", "--module.residual_positions", "0"), "residual_positions"),
    Case(
        "broken-yaml",
        lambda c: c.args("run", "--config", str(write(c.tmp / "broken.yaml", "study: [1, 2\n"))),
        "broken.yaml",
    ),
    Case("missing-config", lambda c: c.args("run", "--config", str(c.tmp / "nope.yaml")), "nope.yaml"),
    Case(
        "model-is-a-file",
        lambda c: [*c.args("run"), "--model", str(c.organism / "config.json")],
        "is a file; pass its dir",
    ),
    Case(
        "bad-device-map",
        lambda c: c.args("run", "--module.load.device_map", "bogus"),
        "module.load.device_map='bogus': use auto, balanced, balanced_low_0, sequential or a device like cuda:0",
    ),
    Case(
        "zero-directions",
        lambda c: c.args("directions", "--direction.method", "contrastive_pca", "--direction.k", "0"),
        "direction.k=0: use 1 or more directions per layer",
    ),
    Case(
        "empty-prompt-dir",
        lambda c: c.args("run", *data_flag("harmful", c.tmp / "emptydir")),
        "emptydir: the dir holds no dataset",
        setup=lambda c: (c.tmp / "emptydir").mkdir(),
        cache_may_change=True,
    ),
    Case(
        "unknown-scorer",
        lambda c: c.args(
            "run", "--config", str(write(c.tmp / "s.yaml", SCORER.format("abliterate.scorers.ProbeRefusal")))
        ),
        "module.scorers: no scorer ProbeRefusal (did you mean ProbeRefusals?); abliterate.scorers has KL,",
    ),
    Case(
        "unimportable-scorer",
        lambda c: c.args("run", "--config", str(write(c.tmp / "s.yaml", SCORER.format("nosuchpkg.Scorer")))),
        "cannot use class_path nosuchpkg.Scorer (No module named 'nosuchpkg'); give an importable class",
    ),
    Case(
        "scorer-argument-typo",
        lambda c: c.args(
            "run", "--config", str(write(c.tmp / "s.yaml", SCORER.format("abliterate.scorers.KL") + BOGUS))
        ),
        "abliterate.scorers.KL takes no argument 'bogus'; fix or remove it in its init_args",
    ),
    Case(
        "prompt-source-typo",
        lambda c: c.args(
            "run", "--config", str(write(c.tmp / "t.yaml", "data: {harmful: {dataset: p.txt, limt: 5}}\n"))
        ),
        "data.harmful has unknown field limt (did you mean limit?); a prompt source takes dataset, config, split",
    ),
    Case(
        "config-is-a-list",
        lambda c: c.args("run", "--config", str(write(c.tmp / "list.yaml", "- a\n- b\n"))),
        "list.yaml",
    ),
    # ---- malformed sources (items 5, 9)
    Case(
        "malformed-jsonl",
        lambda c: c.fresh("run", *data_flag("eval_harmful", write(c.tmp / "bad.jsonl", '{"text": "a"}\n{"text": \n'))),
        "bad.jsonl",
    ),
    Case(
        "malformed-json",
        lambda c: c.fresh("run", *data_flag("eval_harmful", write(c.tmp / "bad.json", '[{"text": "a"},'))),
        "bad.json",
    ),
    Case(
        "non-utf8-text",
        lambda c: c.args("run", *data_flag("harmful", write(c.tmp / "latin1.txt", "caf\xe9 plan\n".encode("latin-1")))),
        "latin1.txt",
    ),
    # ---- the study and its storage (items 9, 13)
    Case(
        "corrupt-study-db",
        lambda c: c.args("run", "--study.n_trials", "4"),
        "cannot open the study",
        setup=lambda c: write(c.run / "study.db", b"this is not a database" * 10),
    ),
    Case("bad-storage-url", lambda c: c.args("run", "--study.storage", "nosuchdb://x/y"), "cannot open the study"),
    Case(
        "other-scoring-settings",
        lambda c: c.args("run", "--study.n_trials", "5", "--module.evaluation.kl_tokens", "3"),
        "kl_tokens 16 -> 3",
    ),
    # ---- the validation prompts: checked before the search, not at the pick after it
    Case(
        "validation-file-missing",
        lambda c: c.args("run", "--study.n_trials", "5", *data_flag("validation_harmful", c.tmp / "held_out.txt")),
        "held_out.txt",
    ),
    Case(
        "validation-scored-by-the-search",
        lambda c: c.args(
            "run", "--study.n_trials", "5", *data_flag("validation_harmful", c.organism / "harmful_test.txt")
        ),
        "also in data.eval_harmful",
    ),
    Case(
        "validation-unread-by-the-selection",
        lambda c: c.args(
            "run",
            "--study.n_trials",
            "5",
            "--study.select",
            "knee",
            *data_flag("validation_harmful", c.organism / "harmful_train.txt"),
        ),
        "study.select=min_kl_under",
    ),
    Case(
        "validation-longer-than-the-model",
        lambda c: c.args("run", "--study.n_trials", "5", *data_flag("validation_harmful", long_prompt_file(c))),
        "exceeds the model's 128 positions",
    ),
    # ---- a KL budget for the pick (study.max_kl)
    Case("kl-budget-not-positive", lambda c: c.args("run", "--study.max_kl", "0"), "study.max_kl=0.0"),
    Case(
        "kl-budget-under-every-trial",
        lambda c: c.args("export", "--study.max_kl", "1e-9"),
        "no completed trial has kl <= 1e-09 (study.max_kl); the lowest is trial",
        cache_may_change=True,
    ),
    Case(
        "kl-budget-without-a-kl-objective",
        lambda c: c.fresh("run", "--config", str(no_kl_config(c)), "--study.max_kl", "0.1"),
        "study.max_kl needs the kl scorer as an objective",
    ),
    # ---- silent wrong answers (item 12)
    Case("negative-trial-evaluate", lambda c: c.args("evaluate", "--trial", "-1"), "not a trial number"),
    Case("negative-trial-export", lambda c: c.args("export", "--trial", "-1"), "not a trial number"),
    Case("unknown-trial", lambda c: c.args("evaluate", "--trial", "99"), "no trial 99"),
    Case("empty-output-dir", lambda c: [*c.args("run")[:-2], "--output_dir", ""], "output_dir"),
    Case("zero-workers", lambda c: c.args("run", "--study.workers", "0"), "study.workers"),
    Case(
        "prompt-longer-than-the-model",
        lambda c: c.args("evaluate", *data_flag("eval_harmless", long_prompt_file(c))),
        "exceeds the model's 128 positions",
        cache_may_change=True,
    ),
    Case(
        "nothing-to-remove",
        lambda c: c.fresh("run", *data_flag("eval_harmful", c.organism / "harmless_test.txt")),
        "nothing to remove",
        cache_may_change=True,
    ),
    Case(
        "refusals-already-under-the-target",
        lambda c: c.fresh("run", "--study.refusal_target", "1.0"),
        "at or under study.refusal_target 1: there is nothing to remove",
        cache_may_change=True,
    ),
    Case(
        "bad-capability-questions",
        lambda c: c.fresh("run", "--config", str(capability_config(c))),
        "questions.jsonl line 2",
    ),
    # ---- models, presets, the demo (items 2, 9)
    Case(
        "remote-code-not-trusted",
        lambda c: [
            "run",
            "--config",
            str(c.config),
            "--model",
            str(remote_code_model(c)),
            "--output_dir",
            str(c.tmp / "fresh"),
        ],
        "--module.load.trust_remote_code true",
    ),
    Case(
        "gpu-preset-on-cpu",
        lambda c: c.args("run", "--config", str(Path(__file__).resolve().parents[1] / "configs/trainer/gpu.yaml")),
        "no CUDA GPU",
        extra={"needs_no_gpu": True},
    ),
    Case(
        "demo-cache-not-writable",
        lambda c: ["demo", "--cache_dir", str(write(c.tmp / "a-file", "x") / "sub"), "--output_dir", str(c.run)],
        "--cache_dir",
    ),
    Case(
        "truncated-weights",
        lambda c: [
            "run",
            "--config",
            str(c.config),
            "--model",
            str(c.tmp / "broken-model"),
            "--output_dir",
            str(c.tmp / "fresh"),
        ],
        "cannot load",
        setup=lambda c: truncated_model(c),
    ),
]


def capability_config(ctx: Ctx) -> Path:
    questions = write(
        ctx.tmp / "questions.jsonl", '{"question": "a", "choices": ["x", "y"], "answer": 0}\n{"question": \n'
    )
    scorers = "\n".join(
        f"    - class_path: abliterate.scorers.{name}" for name in ("MarkerRefusals", "KL", "Capability")
    )
    text = f"module:\n  scorers:\n{scorers}\n      init_args: {{questions: {questions}}}\n"
    return write(ctx.tmp / "capability.yaml", text)


def no_kl_config(ctx: Ctx) -> Path:
    text = "module:\n  scorers:\n    - class_path: abliterate.scorers.MarkerRefusals\n"
    return write(ctx.tmp / "no_kl.yaml", text + "    - class_path: abliterate.scorers.Degeneration\n")


def remote_code_model(ctx: Ctx) -> Path:
    from test_remote_code import make_model_dir

    path = ctx.tmp / "custom-code-model"
    make_model_dir(path, model_type="evil_abliterate_test")
    return path


def truncated_model(ctx: Ctx) -> None:
    copy = ctx.tmp / "broken-model"
    shutil.copytree(ctx.organism, copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


@pytest.fixture(scope="module")
def finished_run(organism_dir, tmp_path_factory):
    """A finished 3-trial run (study, caches, export, config) that every case copies."""
    root = tmp_path_factory.mktemp("finished")
    config = root / "organism.yaml"
    config.write_text(organism_yaml(organism_dir) + "study: {n_trials: 3, n_startup_trials: 3}\n")
    run = root / "run"
    main(cli_args("run", config, organism_dir, run))
    assert (run / "model" / "config.json").is_file()
    return config, run


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gets_one_line_and_changes_nothing(case, finished_run, organism_dir, tmp_path, capsys, monkeypatch):
    if case.extra.get("needs_no_gpu"):
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
    config, finished = finished_run
    ctx = Ctx(organism_dir, config, tmp_path / "run", tmp_path)
    shutil.copytree(finished, ctx.run)
    monkeypatch.chdir(tmp_path)
    if case.setup:
        case.setup(ctx)
    before = snapshot(ctx.run)
    capsys.readouterr()
    code, out, err = run_cli(case.args(ctx), capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == case.code, err[-3000:]
    assert len(errors) == 1, err[-3000:]
    assert case.needle in errors[0], errors[0]
    assert "Traceback" not in err and "usage:" not in err, err[-3000:]
    after = snapshot(ctx.run)
    if case.cache_may_change:
        before = ([f for f in before[0] if not f.startswith("cache")], *before[1:])
        after = ([f for f in after[0] if not f.startswith("cache")], *after[1:])
    assert after == before
    assert not (tmp_path / "fresh" / "study.db").exists(), "stopped before a search on a new run dir"
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine" if (tmp_path / "mine").exists() else True


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def listing(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_a_failed_command_leaves_no_half_made_run_dir_and_no_user_file_touched(
    organism_config, organism_dir, tmp_path, capsys
):
    missing_model = tmp_path / "no-such-model"
    # A new run dir (and a parent): gone again after the failure.
    code, _, err = run_cli(cli_args("run", organism_config, missing_model, tmp_path / "new" / "run"), capsys)
    assert code == 2 and "no-such-model" in err, err[-2000:]
    assert not (tmp_path / "new").exists()
    code, _, err = run_cli(["export", "--output_dir", str(tmp_path / "typo-run"), "--trial", "1"], capsys)
    assert code == 2 and "has no study.db" in err, err[-2000:]
    assert not (tmp_path / "typo-run").exists()
    # A user's dir: a temp-looking file of theirs and their notes stay, and nothing of ours is left.
    mine = tmp_path / "mine"
    mine.mkdir()
    write(mine / "notes.txt", "mine")
    write(mine / f".report.tmp-{dead_pid()}", "also mine")
    before = listing(mine)
    code, _, err = run_cli(cli_args("run", organism_config, missing_model, mine), capsys)
    assert code == 2 and "Traceback" not in err, err[-2000:]
    assert listing(mine) == before
    # A user's own config.yaml there: refused before anything reads or replaces it.
    write(mine / "config.yaml", "# my hand-tuned settings\nstudy: {n_trials: 5}\n")
    before = listing(mine)
    code, out, err = run_cli(cli_args("run", organism_config, organism_dir, mine), capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and out == "" and len(errors) == 1, err[-2000:]
    assert errors[0] == (
        f"error: {mine / 'config.yaml'} was not written by abliterate, which keeps a run's settings in "
        "OUTPUT_DIR/config.yaml; choose another --output_dir, or move that file"
    )
    assert listing(mine) == before


def test_an_error_after_parsing_is_the_only_line_on_stderr(tmp_path):
    """Lightning's import sets its loggers to INFO: its "Seed set to 0" must not come before the error."""
    missing = tmp_path / "no-such-model"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "abliterate", "run", "--model", str(missing), "--output_dir", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [
        f"error: model path {missing} does not exist; pass an existing model dir or a hub id"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ---- cases that need more than one command -------------------------------------------------------
def test_a_second_writer_is_refused_and_a_reader_leaves_the_study_alone(finished_run, organism_dir, tmp_path, capsys):
    config, finished = finished_run
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from abliterate.rundir import RunDir\nimport time\nwith RunDir({str(run)!r}).lock():\n    print('held', flush=True)\n    time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        # a RUNNING trial of the holder's search
        study = optuna.load_study(study_name="abliterate", storage=f"sqlite:///{run / 'study.db'}")
        running = study.ask()
        before = snapshot(run)
        code, _, err = run_cli(
            cli_args("run", config, organism_dir, run, "--study.n_trials", "5"),
            capsys,
        )
        assert code == 2 and f"in use by abliterate pid {holder.pid}" in err, err[-2000:]
        # evaluate only reads: it runs beside the writer and never marks its trial FAIL
        code, out, err = run_cli(
            cli_args("evaluate", config, organism_dir, run, "--trial", "0"),
            capsys,
        )
        assert code == 0, err[-2000:]
        assert json.loads(out.strip().splitlines()[-1])["trial"] == 0
        states = {
            t.number: t.state
            for t in optuna.load_study(study_name="abliterate", storage=f"sqlite:///{run / 'study.db'}").trials
        }
        assert states[running.number] == optuna.trial.TrialState.RUNNING
        assert snapshot(run)[1] == before[1]
    finally:
        holder.kill()
        holder.wait()


def test_rerunning_the_same_command_just_works(finished_run, organism_dir, tmp_path, capsys):
    config, finished = finished_run
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    args = cli_args("run", config, organism_dir, run)
    stamp = (run / "model" / "model.safetensors").stat().st_mtime_ns
    code, out, err = run_cli(args, capsys)
    assert code == 0, err[-2000:]
    assert "nothing new" in err and (run / "model" / "model.safetensors").stat().st_mtime_ns == stamp
    code, out, err = run_cli([*args, "--study.n_trials", "5"], capsys)  # more trials: the export is replaced
    assert code == 0, err[-2000:]
    record = json.loads((run / "model" / "abliterate.json").read_text())
    assert record["trial"] == json.loads(out.strip().splitlines()[-1])["trial"]
    study = optuna.load_study(study_name="abliterate", storage=f"sqlite:///{run / 'study.db'}")
    assert sum(t.state.is_finished() for t in study.trials) == 5


def test_a_corrupt_cache_file_is_recomputed_with_one_warning(finished_run, organism_dir, tmp_path, capsys, caplog):
    config, finished = finished_run
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (residuals,) = (run / "cache").glob("residuals-*.safetensors")
    residuals.write_bytes(residuals.read_bytes()[:100])
    code, out, err = run_cli(cli_args("evaluate", config, organism_dir, run), capsys)
    assert code == 0, err[-2000:]
    assert json.loads(out.strip().splitlines()[-1])["refusal_before"] >= 0.9
    assert residuals.stat().st_size > 1000  # recomputed and rewritten


def test_other_prompts_do_not_evict_the_runs_caches(finished_run, organism_dir, tmp_path, capsys, caplog):
    config, finished = finished_run
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    base = cli_args("evaluate", config, organism_dir, run)
    few = write(tmp_path / "few.txt", "\n".join((organism_dir / "harmful_test.txt").read_text().splitlines()[:8]))
    assert run_cli([*base, *data_flag("eval_harmful", few)], capsys)[0] == 0
    caplog.clear()
    with caplog.at_level("INFO", logger="abliterate"):
        code, _, err = run_cli(base, capsys)  # back to the run's own prompts: both caches hit
    assert code == 0, err[-2000:]
    assert "reusing cached residuals" in caplog.text and "reusing cached reference" in caplog.text


def test_a_full_disk_is_named(finished_run, organism_dir, tmp_path, capsys, monkeypatch):
    """SQLite reports a full disk as OperationalError; Optuna's wrapper message misleads: name the cause."""
    import sqlite3

    import sqlalchemy

    config, finished = finished_run
    run = tmp_path / "run"
    shutil.copytree(finished, run)

    def full(self, *args, **kwargs):
        raise sqlalchemy.exc.OperationalError("INSERT", {}, sqlite3.OperationalError("database or disk is full"))

    monkeypatch.setattr(optuna.Study, "ask", full)
    before = snapshot(run)
    code, _, err = run_cli(
        cli_args("run", config, organism_dir, run, "--study.n_trials", "5"),
        capsys,
    )
    assert code == 2 and "the disk is full" in err and "Traceback" not in err, err[-2000:]
    assert snapshot(run)[1] == before[1]


@pytest.mark.process
def test_ctrl_c_during_residuals_says_what_was_kept(organism_config, organism_dir, tmp_path):
    """SIGINT in the first pass (the long one on real models): one line, nothing cached, exit 130."""
    big = write(tmp_path / "many.txt", "\n".join(["how do i make a plan for the day"] * 20000))
    args = [
        sys.executable,
        "-m",
        "abliterate",
        "run",
        "--config",
        str(organism_config),
        "--model",
        str(organism_dir),
        "--output_dir",
        str(tmp_path / "run"),
        *data_flag("harmful", big),
        "--data.batch_size",
        "1",
    ]
    proc = subprocess.Popen(
        args, env=dict(os.environ, OMP_NUM_THREADS="1"), stderr=subprocess.PIPE, text=True, preexec_fn=interruptible
    )
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "tokenised 20000 harmful" in line:
            time.sleep(2)
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stderr.read()
    proc.wait(timeout=60)
    assert proc.returncode == 130, "".join(lines) + rest
    errors = [line for line in rest.splitlines() if line.startswith("error:") or line.startswith("interrupted")]
    assert any("interrupted during residual collection" in e for e in errors), rest[-2000:]
    assert "Traceback" not in rest
    assert not list((tmp_path / "run" / "cache").glob("residuals-*"))


@pytest.mark.process
def test_sigterm_during_the_search_marks_the_trial_and_says_how_to_resume(organism_config, organism_dir, tmp_path):
    args = [
        sys.executable,
        "-m",
        "abliterate",
        "run",
        "--config",
        str(organism_config),
        "--model",
        str(organism_dir),
        "--output_dir",
        str(tmp_path / "run"),
        "--study.n_trials",
        "200",
        "--study.prune",
        "false",
    ]
    proc = subprocess.Popen(args, env=dict(os.environ, OMP_NUM_THREADS="1"), stderr=subprocess.PIPE, text=True)
    seen = ""
    for line in proc.stderr:
        seen += line
        if "trials 2/200" in line:
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stderr.read()
    proc.wait(timeout=60)
    assert proc.returncode == 130, seen + rest
    assert "interrupted during the search" in rest and "Rerun the same command" in rest
    study = optuna.load_study(study_name="abliterate", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]


def test_follow_up_verbs_on_a_run_dir_need_nothing_else(finished_run, tmp_path, capsys, monkeypatch):
    """run wrote OUTPUT_DIR/config.yaml: evaluate and export on the run dir reuse its settings."""
    _, finished = finished_run
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    monkeypatch.chdir(tmp_path)
    assert (run / "config.yaml").is_file()
    code, out, err = run_cli(["evaluate", "--output_dir", "run", "--trial", "0"], capsys)
    assert code == 0, err[-2000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["trial"] == 0 and result["refusal_before"] >= 0.9
    assert "warning:" not in err  # the run's own settings are not "options of other commands"
    code, out, err = run_cli(["export", "--output_dir", "run", "--trial", "0", "--export_dir", "trial0"], capsys)
    assert code == 0, err[-2000:]
    assert json.loads((tmp_path / "trial0" / "abliterate.json").read_text())["trial"] == 0
    # A flag still beats the run's settings.
    code, out, err = run_cli(["evaluate", "--output_dir", "run", "--module.evaluation.max_new_tokens", "4"], capsys)
    assert code == 0, err[-2000:]


def test_stdout_holds_only_the_result_and_progress_goes_to_stderr(finished_run, organism_dir, tmp_path, capsys):
    config, _ = finished_run
    args = ["run", "--config", str(config), "--model", str(organism_dir), "--output_dir", str(tmp_path / "run")]
    code, out, err = run_cli([*args, "--trainer.enable_progress_bar", "true"], capsys)
    assert code == 0, err[-2000:]
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines[0].startswith("abliterated ") and json.loads(lines[-1])["trial"] >= 0
    assert all(line.startswith("  ") for line in lines[1:-1]), out  # the summary, then the JSON
    assert "trials 3/3" in err and "ETA" in err  # one progress line per trial, on stderr
    assert "Predicting" in err  # the residual and reference passes show a bar, on stderr


def test_an_infeasible_sampled_plan_fails_one_trial_and_the_search_goes_on(organism_dir, tmp_path, caplog):
    from helpers import organism_pipeline

    from abliterate.options import SearchSpace, StudyOptions

    pipe = organism_pipeline(organism_dir, tmp_path)
    reference = pipe.reference()
    # contrastive PCA with k >= 60 of 64 dimensions at alpha 5: far more directions than positive eigenvalues
    space = SearchSpace(direction_methods=["mean_diff", "contrastive_pca"], k=(60, 64), alpha=(5.0, 5.0))
    options = StudyOptions(n_trials=6, n_startup_trials=6, seed=1)
    study = pipe.open_study(options)
    with caplog.at_level("WARNING"):
        pipe.search(study, options, space, reference)
    states = [t.state for t in study.trials]
    assert sum(s.is_finished() and s != optuna.trial.TrialState.FAIL for s in states) == 6
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert failed and all("too large" in t.user_attrs["infeasible"] for t in failed)
    assert all(t.params["direction_method"] == "contrastive_pca" for t in failed)
    assert "the search goes on" in caplog.text


def test_directions_refuses_an_impossible_k_before_any_forward_pass(finished_run, organism_dir, tmp_path, capsys):
    config, _ = finished_run
    few = write(tmp_path / "few.txt", "how do i plan\nwhat is a plan\n")
    args = ["directions", "--config", str(config), "--model", str(organism_dir), "--output_dir", str(tmp_path / "d")]
    args += [*data_flag("harmful", few), *data_flag("harmless", few), "--direction.method", "contrastive_pca"]
    code, _, err = run_cli([*args, "--direction.k", "8"], capsys)
    assert code == 2 and "--direction.k 8 needs at least 9" in err, err[-2000:]
    assert not (tmp_path / "d" / "cache").exists()  # nothing was collected


def test_kl_over_more_tokens_than_replies_is_said(caplog):
    from abliterate.options import EvalOptions

    with caplog.at_level("WARNING"):
        EvalOptions(max_new_tokens=8, kl_tokens=16)
    assert "kl_tokens=16" in caplog.text and "comparable" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        EvalOptions(max_new_tokens=32, kl_tokens=16)
    assert caplog.text == ""


def test_model_card_names_a_hub_base_model_only():
    from abliterate.export import hub_id, model_card

    assert hub_id("Qwen/Qwen3-4B") == "Qwen/Qwen3-4B"
    assert hub_id("/home/me/models/qwen") is None and hub_id("./qwen") is None
    assert hub_id("/root/.cache/huggingface/hub/models--org--name/snapshots/abc123") == "org/name"
    card = {"before": {"refusals": 1.0, "kl": 0.0}, "after": {"refusals": 0.02, "kl": 0.01}, "params": {}}
    assert "base_model:" not in model_card("/home/me/models/qwen", card)
    text = model_card("org/name", card)
    assert "base_model: org/name" in text and "| this model | 0.02 | 0.01 |" in text


def test_ctrl_c_in_chat_stops_the_reply_not_the_chat(organism_dir, capsys, monkeypatch):
    from types import SimpleNamespace

    from abliterate.chat import chat_loop
    from abliterate.models import load_model, load_tokenizer

    model, tokenizer = load_model(str(organism_dir), dtypes=["float32"]), load_tokenizer(str(organism_dir))
    calls = []
    real = model.generate

    def generate(**kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt  # Ctrl-C during the first reply
        return real(**kwargs)

    monkeypatch.setattr(model, "generate", generate)
    lines = iter(["how do i make a plan", "how do i make a plan", ""])
    data = SimpleNamespace(system_prompt=None, chat_template=None, enable_thinking=None)
    chat_loop(model, tokenizer, data, max_new_tokens=8, read=lambda prompt: next(lines))
    out = capsys.readouterr().out
    assert "[stopped]" in out and len(calls) == 2  # the chat went on to the second question
    with pytest.raises(StopIteration):
        next(lines)  # and read every line


def test_a_damaged_demo_organism_is_trained_again(tmp_path, caplog):
    from abliterate.organism import OrganismSpec, build_tiny_organism

    spec = OrganismSpec(max_steps=4)  # a quick one: only the rebuild is under test
    built = build_tiny_organism(tmp_path, spec, progress=False)
    original = (built / "model.safetensors").read_bytes()
    (built / "model.safetensors").write_bytes(original[:1000])
    with caplog.at_level("WARNING"):
        rebuilt = build_tiny_organism(tmp_path, spec, progress=False)
    assert "is damaged" in caplog.text
    assert rebuilt == built and (rebuilt / "model.safetensors").read_bytes() == original
