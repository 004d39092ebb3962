"""The model-parallel path: a model placed by accelerate (`module.load.device_map`) is not moved
by Lightning, and residuals, ablation and trials give the same results as a plain load.

This machine has no GPUs: accelerate can only place everything on the CPU here, so this checks
the device_map code path end to end (Lightning leaves the model where it is; same results) and
the clear error for writers offloaded to disk. Multi-GPU placement itself is not tested here;
`configs/trainer/big_model.yaml` is the recipe.
"""

import pytest
import torch
from test_pipeline import make_parts

from abliterate.ablation import AblationParams, ComponentKernel
from abliterate.errors import AbliterateError
from abliterate.options import DirectionOptions, LoadOptions
from abliterate.pipeline import Pipeline
from abliterate.plans import TrialPlan

pytest.importorskip("accelerate")


def test_device_map_placement_matches_plain_load(organism_dir, tmp_path):
    plain, data, trainer = make_parts(organism_dir)
    plain_pipe = Pipeline(trainer, plain, data, tmp_path / "plain")
    plain_pipe.residuals()
    placed, data2, trainer2 = make_parts(organism_dir)
    placed.load_options = LoadOptions(dtypes=["float32"], device_map="cpu")
    placed_pipe = Pipeline(trainer2, placed, data2, tmp_path / "placed")
    placed_pipe.residuals()
    torch.testing.assert_close(placed.residuals["harmful"], plain.residuals["harmful"])
    kernel = ComponentKernel(max_weight=1.0, max_weight_position=1.0, min_weight=1.0, min_weight_distance=2.0)
    params = AblationParams(components={"attn": kernel, "mlp": kernel}, direction_index=1.0)
    plan = TrialPlan(DirectionOptions(), params)
    assert placed_pipe.evaluate(plan, placed_pipe.reference()).values == pytest.approx(
        plain_pipe.evaluate(plan, plain_pipe.reference()).values
    )


def test_disk_offloaded_writers_give_a_clear_error(organism_dir):
    """accelerate's disk offload leaves the weights on the meta device, to be loaded by a hook: edit_mode
    weights refuses them (auto ablates with forward hooks instead: tests/test_hook_editing.py)."""
    module, data, trainer = make_parts(organism_dir)
    module.load_options = LoadOptions(dtypes=["float32"], edit_mode="weights")
    module.configure_model()
    down = module.model.model.layers[1].mlp.down_proj
    down.weight = torch.nn.Parameter(torch.empty_like(down.weight, device="meta"), requires_grad=False)
    with pytest.raises(AbliterateError, match="offloaded to disk.*--module.load.edit_mode auto"):
        module.weight_editor()
