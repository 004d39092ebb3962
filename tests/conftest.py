import os

import pytest
import torch
from helpers import organism_yaml
from transformers.utils import logging as hf_logging

# On 2 shared cores, 2 torch threads ran 11x slower than 1; honour OMP_NUM_THREADS.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# transformers binds its log handler to sys.stderr as it is at first use; bind it now, to the session's stream,
# not to the capsys stream of whichever test happens to log first (closed after it: a later warning then printed
# a logging traceback into another test's one-line error check).
hf_logging.get_logger("transformers")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def organism_dir(tmp_path_factory):
    """The tiny refusing organism, trained once per test session (about 20 s on one thread)."""
    from abliterate.organism import build_tiny_organism

    cache = os.environ.get("ABLITERATE_TEST_CACHE")
    root = cache if cache else tmp_path_factory.mktemp("organism")
    return build_tiny_organism(root, progress=False)


@pytest.fixture(scope="session")
def thinking_organism_dir(tmp_path_factory):
    """The tiny thinking organism (a short <think> block before each answer), trained once per
    test session (about 30 s on one thread)."""
    from abliterate.organism_thinking import build_thinking_organism

    cache = os.environ.get("ABLITERATE_TEST_CACHE")
    root = cache if cache else tmp_path_factory.mktemp("thinking-organism")
    return build_thinking_organism(root, progress=False)


@pytest.fixture
def organism_config(organism_dir, tmp_path):
    """A small run config for the organism, as a YAML file."""
    text = organism_yaml(organism_dir)
    path = tmp_path / "organism.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="session")
def finished_organism_run(organism_dir, tmp_path_factory):
    """A finished 3-trial `abliterate run` on the organism, made once per session: a folder holding its
    config (organism.yaml) and its run dir (run/). Modules take their own copy (helpers.copy_run)."""
    from test_reproduce import organism_run

    root = tmp_path_factory.mktemp("finished-organism-run")
    organism_run(organism_dir, root)
    return root
