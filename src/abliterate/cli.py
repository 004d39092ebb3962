"""`abliterate` command line: LightningCLI whose verbs are AbliterationTrainer methods."""

import logging
import os
import sys
import warnings

import jsonargparse
import optuna
import yaml
from lightning.pytorch.cli import LightningCLI

from abliterate.data import PromptDataModule
from abliterate.errors import AbliterateError
from abliterate.module import AbliterationModule
from abliterate.trainer import AbliterationTrainer

VERBS = ("run", "directions", "search", "evaluate", "export", "chat", "demo")


class AbliterateCLI(LightningCLI):
    """The LightningModule lives under `module`, so `--model` can name the model to abliterate."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {verb: {"model", "datamodule"} for verb in VERBS}

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

    def instantiate_classes(self) -> None:
        self.config_init = self.parser.instantiate_classes(self.config)
        self.datamodule = self._get(self.config_init, "data")
        self.model = self._get(self.config_init, "module")
        self.trainer = self.instantiate_trainer()
        if self.subcommand is not None:
            self.trainer.cli_config = self.worker_config()

    def worker_config(self) -> dict:
        """This command's config as a plain dict, for starting worker processes with it."""
        text = self._parser(self.subcommand).dump(self.config[self.subcommand], skip_none=False)
        keep = ("seed_everything", "trainer", "model", "module", "data", "study", "space", "output_dir")
        return {k: v for k, v in yaml.safe_load(text).items() if k in keep}


def configure_logging() -> None:
    # predict_step returns nothing on purpose; results live on the module.
    warnings.filterwarnings("ignore", message=".*predict returned None.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*custom batch sampler.*")  # ShardBatches returns every prompt
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # Lightning repeats its device banner on every Trainer call (one per trial).
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in ("httpx", "urllib3", "datasets", "filelock", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.WARNING)


def build_cli(args=None, run: bool = True) -> AbliterateCLI:
    # Field docstrings of the option dataclasses become --help text.
    jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)
    return AbliterateCLI(
        AbliterationModule,
        PromptDataModule,
        trainer_class=AbliterationTrainer,
        args=args,
        run=run,
        auto_configure_optimizers=False,
        load_from_checkpoint_support=False,
        save_config_callback=None,
        seed_everything_default=0,
    )


def main(args=None) -> None:
    configure_logging()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        build_cli(args)
    except AbliterateError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
