import os

import pytest
import torch

# On 2 shared cores, 2 torch threads ran 11x slower than 1; honour OMP_NUM_THREADS.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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


@pytest.fixture
def organism_config(organism_dir, tmp_path):
    """A small run config for the organism, as a YAML file."""
    text = f"""
data:
  harmful: {{dataset: {organism_dir}/harmful_train.txt, split: train}}
  harmless: {{dataset: {organism_dir}/harmless_train.txt, split: train}}
  eval_harmful: {{dataset: {organism_dir}/harmful_test.txt, split: train}}
  eval_harmless: {{dataset: {organism_dir}/harmless_test.txt, split: train}}
  batch_size: 64
  eval_batch_size: 16
module:
  load: {{dtypes: [float32]}}
  evaluation: {{max_new_tokens: 12}}
trainer:
  accelerator: cpu
  devices: 1
  enable_progress_bar: false
"""
    path = tmp_path / "organism.yaml"
    path.write_text(text)
    return path
