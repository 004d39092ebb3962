"""Command-line errors in one line: config files checked before Lightning loads, and jsonargparse's
parse errors and Lightning's trainer errors turned into a sentence naming the option, file and fix."""

import difflib
import re
from pathlib import Path

import yaml

from abliterate.errors import AbliterateError, first_line

VERBS = ("run", "directions", "search", "evaluate", "export", "chat", "inspect", "benchmark", "reproduce", "demo")


def config_args(argv: list[str]) -> list[str]:
    """The values of every -c/--config in argv, in order."""
    values = []
    for i, arg in enumerate(argv):
        if arg in ("-c", "--config") and i + 1 < len(argv):
            values.append(argv[i + 1])
        elif arg.startswith("--config="):
            values.append(arg.split("=", 1)[1])
    return values


def read_config(value: str) -> dict | None:
    """A --config file's top-level mapping; None for an inline YAML mapping. Clear errors for the rest."""
    path = Path(value)
    if not path.exists():
        try:
            inline = yaml.safe_load(value)
        except yaml.YAMLError:
            inline = None
        if isinstance(inline, dict):  # `--config '{study: {n_trials: 5}}'` is YAML text, not a path
            return None
        raise AbliterateError(f"--config {value}: no such file; check the path")
    if path.is_dir():
        raise AbliterateError(f"--config {value} is a directory; give a YAML file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise AbliterateError(f"--config {value}: cannot read it ({err.strerror}); check its permissions") from None
    except UnicodeDecodeError:
        raise AbliterateError(f"--config {value} is not a text file; give a YAML file") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or first_line(err)
        raise AbliterateError(f"{value}{where}: invalid YAML ({problem}); fix the syntax there") from None
    if data is None:
        return {}  # empty or only comments: sets nothing
    if not isinstance(data, dict):
        kind = "list" if isinstance(data, list) else type(data).__name__
        raise AbliterateError(
            f"{value}: the top level must map option names to values (like `study: {{n_trials: 50}}`), not a {kind}"
        )
    return data


def _has_key(data, key: str) -> bool:
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


def value_source(key: str, argv: list[str]) -> str | None:
    """The --config file that set `key` (like study.n_trials); None when a flag or nothing set it."""
    for arg in argv:
        name = arg.split("=", 1)[0]
        if name.startswith("--") and (key == name[2:] or key.startswith(name[2:] + ".")):
            return None  # a flag names it (flags come after the configs they override)
    for value in reversed(config_args(argv)):
        data = _loaded_config(value)
        if data is not None and _has_key(data, key):
            return value
    return None


def _loaded_config(value: str) -> dict | None:
    try:
        return read_config(value)
    except AbliterateError:
        return None


# ---- parse errors as one line ---------------------------------------------------------------------
class _ParseError(Exception):
    """Raised by the CLI's parsers where jsonargparse would print usage and exit."""

    def __init__(self, message: str, source: str | None = None):
        super().__init__(message)
        self.source = source  # the config file being read when it was raised, if any


def _close(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.75)
    return f" (did you mean {match[0]}?)" if match else ""


def _expected(detail: str) -> str:
    """jsonargparse's "Expected a <class 'int'>. Got value: x" as "must be an integer, got 'x'"."""
    detail = " ".join(detail.split())
    got = re.search(r"(?:Got|Given) value: (.*?)(?: - |$)", detail)
    got_text = f", got {got.group(1)!r}" if got else ""
    literal = re.search(r"Literal\[([^\]]*)\]", detail)
    if literal:
        return f"must be one of {literal.group(1)}{got_text}"
    types = re.findall(r"Expected a <class '(\w+)'>", detail)
    types = [t for t in types if t != "NoneType"]
    if types:
        names = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}
        kinds = " or ".join(dict.fromkeys(names.get(t, f"a {t}") for t in types))
        return f"must be {kinds}{got_text}"
    return first_line(Exception(detail))


def _class_problem(path: str, problem: str) -> str:
    """A class_path entry (a scorer) that jsonargparse could not make: what to change."""
    if m := re.match(r"Option '([^']+)' is not accepted", problem):
        return f"{path} takes no argument {m.group(1)!r}; fix or remove it in its init_args"
    module, _, name = path.rpartition(".")
    if module == "abliterate.scorers":
        from abliterate import scorers

        known = [n for n in scorers.__all__ if n[0].isupper() and n not in ("Observations", "Scorer")]
        return f"no scorer {name}{_close(name, known)}; abliterate.scorers has {', '.join(known)}"
    return f"cannot use class_path {path} ({problem}); give an importable class, e.g. abliterate.scorers.KL"


def _describe_parse_error(err: _ParseError, verb: str | None, argv: list[str], options: list[str]) -> str:
    """One line for a jsonargparse error message: the option, the file it came from, the fix."""
    where = f"abliterate {verb} --help" if verb else "abliterate --help"
    text = " ".join(str(err).split())

    def in_file(key: str) -> str:
        """'FILE: ' for a key set by a config file (the one being read when the error was raised)."""
        source = err.source or value_source(key, argv)
        return f"{source}: " if source else ""

    if m := re.match(r"unrecognized arguments: (\S+)", text):
        flag = m.group(1).split("=", 1)[0]
        if not flag.startswith("-"):
            return f"unexpected argument {flag!r}: options are given as --name value ({where} lists them)"
        return f"{verb or 'abliterate'} has no option {flag}{_close(flag, options)} ({where} lists them)"
    if m := re.search(r"(?:Subcommand '[^']*'|Group '[^']*') does not accept option '([^']+)'", text) or re.match(
        r"Option '([^']+)' is not accepted", text
    ):
        key = m.group(1)
        if (g := re.match(r"Group '([^']*)'", text)) and not key.startswith(g.group(1) + "."):
            key = f"{g.group(1)}.{key}"
        keys = [o[2:] for o in options]
        return f"{in_file(key)}unknown option {key}{_close(key, keys)}; remove or rename it ({where} lists the options)"
    if m := re.match(r'Parser key "([^"]+)": (.*)', text):
        key, detail = m.groups()
        if key == "config":
            return f"--config: {first_line(Exception(detail))}"
        source = in_file(key)
        if m := re.search(r"Problem with given class_path '([^']+)': (.*?)(?: - Expected|$)", detail):
            return f"{source}{key if source else '--' + key}: {_class_problem(*m.groups())}"
        return f"{source}{key if source else '--' + key} {_expected(detail)}"
    if m := re.match(r"argument (\S+): expected one argument", text):
        return f"{m.group(1)} needs a value"
    if m := re.match(r"the following arguments are required: (.*)", text):
        keys = [k.removeprefix(f"{verb}.") for k in m.group(1).split(", ")]
        return f"missing {', '.join('--' + k for k in keys)}; give {'them' if len(keys) > 1 else 'it'} ({where})"
    if "subcommand" in text and "not provided" in text:
        return f"give a command: one of {', '.join(VERBS)} (abliterate --help)"
    return f"{first_line(Exception(text))} ({where})"


def _trainer_error(err: Exception, trainer: dict, argv: list[str]) -> str:
    """One line for a Trainer that cannot be set up on this machine (accelerator, devices, strategy)."""
    import torch

    accelerator = str(trainer.get("accelerator"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        source = value_source("trainer.accelerator", argv)
        setting = f"{source}: trainer.accelerator: {accelerator}" if source else f"--trainer.accelerator {accelerator}"
        if "ddp" in str(trainer.get("strategy")):
            return f"{setting} but this machine has no CUDA GPU; use --config configs/trainer/ddp_cpu.yaml (or cpu.yaml) instead"
        return f"{setting} but this machine has no CUDA GPU; use --config configs/trainer/cpu.yaml instead, or --trainer.accelerator cpu"
    return (
        f"cannot set up the trainer ({first_line(err)}); "
        "fix --trainer.accelerator, --trainer.devices or --trainer.strategy"
    )
