"""`abliterate` command line: LightningCLI whose verbs are AbliterationTrainer methods.

Start-up stays light: importing Lightning takes seconds, so `abliterate`, `abliterate -h/--help`, an
unknown command and a config file that cannot be read are answered without it. The LightningCLI
machinery is built by `_cli_class()` when a verb runs.

Bad input ends in one line on stderr that names the option (and the file it came from) and the fix,
exit code 2: parse errors are raised by `_Parser.error` instead of printing usage, and turned into
an AbliterateError by `_describe_parse_error`.
"""

import ast
import functools
import os
import shutil
import signal
import sys
import textwrap
import threading
from pathlib import Path

import yaml

from abliterate.cli_errors import (
    VERBS,
    _close,
    _describe_parse_error,
    _ParseError,
    _trainer_error,
    config_args,
    read_config,
)
from abliterate.errors import INTERRUPT_REQUESTED, AbliterateError, Interrupted, chain, explain
from abliterate.runconfig import CONFIG_FILE, with_run_config


# ---- top-level help, without importing Lightning ---------------------------------------------
@functools.cache
def verb_descriptions() -> dict[str, str]:
    """Each verb's one-line description: the first line of its AbliterationTrainer method's docstring.

    Read from trainer.py's source (the one place they are written) so top-level help does not import
    Lightning; `abliterate VERB --help` shows the same line, taken by LightningCLI from the method.
    """
    docs: dict[str, str | None] = {}
    try:
        tree = ast.parse(Path(__file__).with_name("trainer.py").read_text(encoding="utf-8"))
        (cls,) = (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "AbliterationTrainer")
        docs = {n.name: ast.get_docstring(n) for n in cls.body if isinstance(n, ast.FunctionDef)}
    except (OSError, SyntaxError, ValueError):
        pass
    if not all(docs.get(verb) for verb in VERBS):  # no source, or a verb defined elsewhere: ask the class
        from abliterate.trainer import AbliterationTrainer

        docs = {verb: getattr(AbliterationTrainer, verb).__doc__ for verb in VERBS}
    return {verb: (docs[verb] or "").strip().split("\n")[0].strip() for verb in VERBS}


def help_text() -> str:
    import abliterate

    summary = (abliterate.__doc__ or "").strip().removeprefix("abliterate: ")
    width = shutil.get_terminal_size((100, 24)).columns - 2
    indent = max(len(v) for v in VERBS) + 4
    lines = [
        "usage: abliterate [-h] COMMAND [options]",
        "",
        summary[:1].upper() + summary[1:],
        "",
        "commands:",
    ]
    for verb, text in verb_descriptions().items():
        lines += textwrap.wrap(
            text, width=max(width, 60), initial_indent=f"  {verb:<{indent - 2}}", subsequent_indent=" " * indent
        )
    lines += [
        "",
        "options:",
        "  -h, --help   show this help message and exit",
        "",
        "`abliterate COMMAND --help` lists a command's options; `--config FILE.yaml` (repeatable) sets them",
        "from YAML, later files and flags after them win, `--print_config` shows the result.",
    ]
    return "\n".join(lines)


# ---- where an option's value came from ----------------------------------------------------------
# ---- the LightningCLI, built on first use ---------------------------------------------------------
@functools.cache
def _cli_class():
    """AbliterateCLI: the LightningCLI subclass (imports Lightning and the package's modules)."""
    import inspect

    import jsonargparse
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from abliterate.data import PromptDataModule
    from abliterate.module import AbliterationModule
    from abliterate.trainer import AbliterationTrainer

    class _Parser(LightningArgumentParser):
        """Raises _ParseError instead of printing usage; drops other verbs' sections of a shared config."""

        verb: str | None = None
        foreign: frozenset = frozenset()  # top-level options other verbs take and this one does not
        notes: list | None = None
        _source: str | None = None  # the config file being read

        def error(self, message: str, ex: Exception | None = None):
            if not self.exit_on_error:  # jsonargparse's inner parsers catch this and try alternatives
                super().error(message, ex)
            raise _ParseError(message, self._source)

        def parse_path(self, path, *args, **kwargs):
            self._source = str(path)
            try:
                return super().parse_path(path, *args, **kwargs)
            finally:
                self._source = None

        def parse_string(self, content, *args, **kwargs):
            # One config is often shared by several verbs (`run.yaml` for run, then directions or export).
            # A section only another verb takes (study: with directions, export_dir with search) is
            # dropped with one warning line rather than failing: the file is right, just not all for
            # this verb. A key that no verb takes is still an error (a typo must not pass silently),
            # and so is a flag this verb does not take (a flag is typed for this command).
            if self.verb is not None:
                try:
                    data = jsonargparse.get_loader(self.parser_mode)(content)
                except Exception:  # noqa: BLE001 - jsonargparse reports it
                    data = content
                if data is None:
                    content = "{}"
                elif isinstance(data, dict) and (dropped := [k for k in data if k in self.foreign]):
                    if self._source != _RUN_CONFIG[0]:  # the run's own settings serve every verb: no note
                        self.notes.append(
                            f"warning: {self.verb} ignores {', '.join(dropped)} from {self._source or '--config'} (options of other commands)"
                        )
                    content = yaml.safe_dump({k: v for k, v in data.items() if k not in dropped}, sort_keys=False)
            return super().parse_string(content, *args, **kwargs)

    def method_arguments(verb: str) -> set[str]:
        """The options a verb's method adds (what LightningCLI's add_method_arguments adds)."""
        params = inspect.signature(getattr(AbliterationTrainer, verb)).parameters.values()
        plain = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        return {p.name for p in params if p.name not in ("self", "model", "datamodule") and p.kind not in plain}

    class AbliterateCLI(LightningCLI):
        """The LightningModule lives under `module`, so `--model` can name the model to abliterate.

        `verbs`: the verbs to build parsers for. Each costs about half a second (docstrings of the
        Trainer and module classes are parsed for every one), so `abliterate VERB ...` builds only VERB's.
        """

        def __init__(self, *args, verbs: tuple[str, ...] = VERBS, **kwargs):
            self.verbs = verbs
            super().__init__(*args, **kwargs)

        def subcommands(self) -> dict[str, set[str]]:
            return {verb: {"model", "datamodule"} for verb in self.verbs}

        def setup_parser(self, add_subcommands, main_kwargs, subparser_kwargs) -> None:
            super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
            if not add_subcommands:
                return
            self.notes: list[str] = []
            taken = {verb: method_arguments(verb) for verb in VERBS}
            every = set().union(*taken.values())
            for verb, parser in self._subcommand_parsers.items():
                parser.verb, parser.notes = verb, self.notes
                parser.foreign = frozenset(every - taken[verb])

        def add_core_arguments_to_parser(self, parser) -> None:
            parser.add_lightning_class_args(self.trainer_class, "trainer")
            parser.set_defaults({f"trainer.{k}": v for k, v in self.trainer_defaults.items()})
            parser.add_lightning_class_args(self._model_class, "module")
            parser.add_lightning_class_args(self._datamodule_class, "data")

        def add_arguments_to_parser(self, parser) -> None:
            parser.add_argument(
                "--model", type=str | None, default=None, help="hub id or local dir of the model to abliterate"
            )
            parser.link_arguments("model", "module.model_id")

        def parse_arguments(self, parser, args) -> None:
            if isinstance(args, (dict, jsonargparse.Namespace)):  # a config object, from Python
                self.argv = []
                return super().parse_arguments(parser, args)
            self.argv = list(sys.argv[1:] if args is None else args)
            verb = next((a for a in self.argv if a in VERBS), None)
            try:
                self.config = parser.parse_args(self.argv)
            except _ParseError as err:
                sub = getattr(self, "_subcommand_parsers", {}).get(verb, parser)
                options = [o for o in sub._option_string_actions if o.startswith("--")]
                raise AbliterateError(_describe_parse_error(err, verb, self.argv, options)) from None
            except SystemExit as exit_:  # --help, --print_config
                if exit_.code in (0, None):
                    self.print_notes()
                raise
            self.print_notes()

        def print_notes(self) -> None:
            if is_first_rank():
                for note in getattr(self, "notes", []):
                    print(note, file=sys.stderr)

        def instantiate_classes(self) -> None:
            try:
                self.config_init = self.parser.instantiate_classes(self.config)
            except ValueError as err:  # jsonargparse wraps what a class's __init__ raised
                cause = next((e for e in chain(err) if isinstance(e, AbliterateError)), None)
                if cause is None:
                    raise
                raise cause from None
            self.datamodule = self._get(self.config_init, "data")
            self.model = self._get(self.config_init, "module")
            try:
                self.trainer = self.instantiate_trainer()
            except (MisconfigurationException, ValueError, TypeError) as err:  # accelerator/devices/strategy
                trainer = self._get(self.config, "trainer", default={}) or {}
                raise AbliterateError(_trainer_error(err, trainer, self.argv)) from err

    # Field docstrings of the option dataclasses become --help text.
    jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)
    AbliterateCLI.init_kwargs = dict(
        model_class=AbliterationModule,
        datamodule_class=PromptDataModule,
        trainer_class=AbliterationTrainer,
        parser_class=_Parser,
        auto_configure_optimizers=False,
        load_from_checkpoint_support=False,
        save_config_callback=None,
        seed_everything_default=0,
    )
    return AbliterateCLI


def __getattr__(name: str):
    if name == "AbliterateCLI":  # `from abliterate.cli import AbliterateCLI` builds it
        return _cli_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def configure_logging() -> None:
    import logging
    import warnings

    import lightning.pytorch  # noqa: F401 - its import sets its loggers to INFO: imported first, quieted below
    import optuna

    # predict_step returns nothing on purpose; results live on the module.
    warnings.filterwarnings("ignore", message=".*predict returned None.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*custom batch sampler.*")  # ShardBatches returns every prompt
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # Lightning repeats its device banner on every Trainer call (one per trial).
    # Its "Seed set to 0" would come before any error; the DDP rank banners stay (lightning.fabric).
    quiet = (
        "lightning.pytorch.utilities.rank_zero",
        "lightning.pytorch.accelerators.cuda",
        "lightning.fabric.utilities.seed",
    )
    for name in quiet:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in ("httpx", "urllib3", "datasets", "filelock", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if not is_first_rank():  # say each step once
        logging.getLogger("abliterate").setLevel(logging.WARNING)


def is_first_rank() -> bool:
    """DDP starts every rank with the same command line; notes and progress are said by rank 0 only."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


def build_cli(args=None, run: bool = True):
    cli = _cli_class()
    argv = sys.argv[1:] if args is None else list(args)
    verbs = (argv[0],) if run and argv and argv[0] in VERBS else VERBS
    return cli(args=args, run=run, verbs=verbs, **cli.init_kwargs)


_RUN_CONFIG: list[str | None] = [None]  # OUTPUT_DIR/config.yaml when main() read it in


def _terminate(signum, frame):
    # SIGTERM ends a run like Ctrl-C: the running trial is marked, the resume hint printed.
    INTERRUPT_REQUESTED.set()  # in case the KeyboardInterrupt lands where Python swallows it
    raise KeyboardInterrupt


def main(args=None) -> None:
    argv = list(sys.argv[1:] if args is None else args)
    try:
        if not argv or argv[0] in ("-h", "--help"):
            try:
                print(help_text(), flush=True)
            except BrokenPipeError:  # `abliterate --help | head`
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return
        if not argv[0].startswith("-") and argv[0] not in VERBS:
            raise AbliterateError(
                f"unknown command {argv[0]!r}{_close(argv[0], list(VERBS))}; "
                f"choose one of {', '.join(VERBS)} (abliterate --help)"
            )
        if argv[0] == "reproduce" and len(argv) > 1 and not argv[1].startswith("-"):
            argv = ["reproduce", "--export_dir", *argv[1:]]  # `abliterate reproduce DIR`
        configs = [read_config(value) for value in config_args(argv)]  # a broken file: named before Lightning loads
        argv = with_run_config(argv, configs)
        _RUN_CONFIG[0] = argv[2] if argv[1:2] == ["--config"] and argv[2].endswith(CONFIG_FILE) else None
        configure_logging()
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        INTERRUPT_REQUESTED.clear()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _terminate)
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where SIGINT is ignored (nohup)
                signal.signal(signal.SIGINT, _terminate)
        build_cli(argv)
    except AbliterateError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as err:
        print(str(err), file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print("interrupted before any work was kept; nothing was changed", file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        message = explain(err)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
