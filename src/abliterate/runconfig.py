"""The run's resolved settings, kept in OUTPUT_DIR/config.yaml.

Written by the verbs that fill a run dir (run, search, directions, demo), from the objects they
ran with (so the demo's organism paths are in it too). Any verb pointed at the run dir reads it
first, below the user's own configs and flags: `abliterate export --output_dir R` needs nothing else,
and trial workers start from it.
"""

import inspect
from dataclasses import asdict
from pathlib import Path

import yaml

from abliterate.errors import AbliterateError
from abliterate.rundir import LOCK_FILE, atomic_path

CONFIG_FILE = "config.yaml"
# The first line of every config.yaml abliterate writes: how a run's settings are told from a user's own file.
HEADER = "# abliterate: this run's settings; verbs on this dir read them below your own configs and flags\n"


def foreign_settings(out: Path) -> Path | None:
    """OUTPUT_DIR/config.yaml when no abliterate run wrote it (a user's own file: never read, never replaced).
    Run dirs from before the header have the lock file every abliterate writer leaves."""
    path = out / CONFIG_FILE
    if not path.is_file() or (out / LOCK_FILE).exists():
        return None
    try:
        with path.open(encoding="utf-8", errors="replace") as file:
            first = file.readline()
    except OSError as err:
        raise AbliterateError(f"cannot read {path} ({err.strerror}); choose another --output_dir") from None
    return None if first == HEADER else path


def check_settings_owner(out: Path) -> None:
    """Refuse a run dir whose config.yaml is somebody else's, before anything reads or replaces it."""
    if (path := foreign_settings(out)) is not None:
        raise AbliterateError(
            f"{path} was not written by abliterate, which keeps a run's settings in OUTPUT_DIR/{CONFIG_FILE}; "
            "choose another --output_dir, or move that file"
        )


def scorer_entry(scorer) -> dict:
    """A scorer as a jsonargparse class_path entry, its init args read back from the object."""
    params = [p for p in inspect.signature(type(scorer).__init__).parameters if p != "self"]
    args = {}
    for name in params:
        value = getattr(scorer, name, None)
        args[name] = asdict(value) if hasattr(value, "__dataclass_fields__") else value
    cls = type(scorer)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": args}


def resolved_config(out: Path, module, datamodule, study=None, space=None) -> dict:
    """The settings a verb ran with, in the CLI's config layout. Scorers are listed only when they are
    not the ones `module.evaluation` implies, so that a later --module.evaluation flag still applies."""
    from abliterate.scorers import default_scorers

    scorers = [scorer_entry(s) for s in module.scorers]
    options = module.eval_options
    implied = [scorer_entry(s) for s in default_scorers(options)]
    data = {role: asdict(source) if source is not None else None for role, source in datamodule.sources.items()}
    data.update(
        system_prompt=datamodule.system_prompt,
        chat_template=datamodule.chat_template,
        enable_thinking=datamodule.enable_thinking,
        batch_size=datamodule.batch_size,
        eval_batch_size=datamodule.eval_batch_size,
    )
    config = {
        "model": module.model_id,
        "module": {
            "residual_positions": module.residual_positions,
            "load": asdict(module.load_options),
            "evaluation": asdict(module.eval_options),
            **({"scorers": scorers} if scorers != implied else {}),
        },
        "data": data,
        "output_dir": str(out),
    }
    if study is not None:
        config["study"] = {k: v for k, v in asdict(study).items() if k != "workers"}
    if space is not None:
        config["space"] = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(space).items()}
    return config


def save_run_config(out: Path, config: dict) -> None:
    """Write OUTPUT_DIR/config.yaml atomically."""
    with atomic_path(out / CONFIG_FILE) as tmp:
        tmp.write_text(HEADER + yaml.safe_dump(config, sort_keys=False))


def output_dir_of(argv: list[str], configs=()) -> str:
    """The run dir a command line names (its last --output_dir, else its configs'), else the verb's default."""
    value = "abliterate-demo" if argv and argv[0] == "demo" else "outputs"
    for config in configs:
        if isinstance(config, dict) and isinstance(config.get("output_dir"), str):
            value = config["output_dir"]
    for i, arg in enumerate(argv):
        if arg == "--output_dir" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--output_dir="):
            value = arg.split("=", 1)[1]
    return value


def with_run_config(argv: list[str], configs=()) -> list[str]:
    """argv with `--config OUTPUT_DIR/config.yaml` right after the verb when the run dir has one:
    the run's settings, below everything the user typed."""
    if not argv or argv[0] == "demo" or "-h" in argv or "--help" in argv:
        return argv
    out = Path(output_dir_of(argv, configs))
    check_settings_owner(out)
    path = out / CONFIG_FILE
    return [argv[0], "--config", str(path), *argv[1:]] if path.is_file() else argv
