"""The offline demo: a tiny organism that refuses, trained here, then abliterated."""

import logging
import os
from pathlib import Path

from abliterate.options import EvalOptions, LoadOptions, SearchSpace, StudyOptions
from abliterate.prompts import PromptSource

log = logging.getLogger("abliterate.demo")


def default_cache_dir() -> Path:
    return Path(os.environ.get("ABLITERATE_CACHE", Path.home() / ".cache" / "abliterate"))


def configure_demo(module, datamodule, n_trials: int, cache_dir: str | None = None) -> tuple[StudyOptions, SearchSpace]:
    """Point the module and datamodule at the tiny organism and its prompt files."""
    from abliterate.organism import build_tiny_organism

    path = build_tiny_organism(Path(cache_dir) if cache_dir else default_cache_dir() / "organism")
    module.model_id = str(path)
    module._tokenizer = None
    module.model = None
    module.editor = None
    module.load_options = LoadOptions(dtypes=["float32"])
    module.eval_options = EvalOptions(max_new_tokens=16)  # KL over the default 16 reply tokens, as runs score it
    datamodule.sources.update(
        harmful=PromptSource(str(path / "harmful_train.txt")),
        harmless=PromptSource(str(path / "harmless_train.txt")),
        unhelpful=None,
        eval_harmful=PromptSource(str(path / "harmful_test.txt")),
        eval_harmless=PromptSource(str(path / "harmless_test.txt")),
    )
    datamodule.system_prompt = None
    datamodule.chat_template = None
    datamodule.eval_batch_size = 16
    # The tiny organism's refusals are coarse (16 prompts): a 0.05 target, steered to itself.
    search = StudyOptions(
        n_trials=n_trials, n_startup_trials=min(10, n_trials), seed=0, refusal_target=0.05, steer_margin=0.0
    )
    # A 2-layer model: let the search reach every layer.
    space = SearchSpace(direction_index=(0.0, 1.0), max_weight_position=(0.0, 1.0), min_weight_distance=(0.5, 1.0))
    log.info("demo organism: %s", path)
    return search, space
