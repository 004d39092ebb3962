"""How a loaded model is ablated: its weights edited in place, or its writers' outputs hooked.

`make_editor` picks `WeightEditor` when every writer's weight can be edited in place, and
`HookEditor` (the same ablation as forward hooks) when one cannot: 4-bit packed (bitsandbytes),
offloaded to disk (accelerate leaves it on the meta device) or read-only. `module.load.edit_mode`
forces either. Writers of 4-bit models are found on a meta-device copy of the architecture, since
their packed weights no longer have the residual width on their out axis.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import Tensor, nn

from abliterate.ablation import WeightEditor, not_editable
from abliterate.errors import AbliterateError, first_line
from abliterate.hooks import HookEditor
from abliterate.models import post_norm_gains, residual_writers
from abliterate.writers import LayerWriters, WriterRef

log = logging.getLogger("abliterate.editing")

EDIT_MODES = ("auto", "weights", "hooks")


def make_editor(model: nn.Module, mode: str = "auto") -> WeightEditor | HookEditor:
    """The editor for `model`: `weights`, `hooks`, or `auto` (weights unless a writer cannot be edited)."""
    if mode not in EDIT_MODES:
        raise AbliterateError(f"module.load.edit_mode={mode!r}: use one of {', '.join(EDIT_MODES)}")
    gains = post_norm_gains(model)
    if mode == "weights":
        return WeightEditor(residual_writers(model), gains=gains)
    writers = writers_of(model)
    if mode == "auto":
        blocked = _not_editable(writers)
        if blocked is None:
            return WeightEditor(writers, gains=gains)
        log.info("%s: ablating with forward hooks on the writers", blocked)
    return HookEditor(writers, gains=gains, weight_reader=read_weight)


def _not_editable(writers: list[LayerWriters]) -> str | None:
    """The first writer that cannot be edited in place, and why; None when all can."""
    for layer, components in enumerate(writers):
        for component, refs in components.items():
            for ref in refs:
                why = not_editable(ref)
                if why:
                    return f"layer {layer} {component} weights are {why}"
    return None


def writers_of(model: nn.Module) -> list[LayerWriters]:
    """`models.residual_writers`, also for a model whose writers hold packed (e.g. 4-bit) weights.

    Those are found on a meta-device copy of the architecture (same module names, float weights)
    and mapped back to the model's modules, which must have the same in and out widths.
    """
    try:
        return residual_writers(model)
    except AbliterateError as err:
        if all(p.is_floating_point() for p in model.parameters()):
            raise
        refused = err
    try:
        with torch.device("meta"):
            skeleton = type(model)(copy.deepcopy(model.config))
    except Exception as err:  # an architecture that cannot be rebuilt from its config
        raise AbliterateError(f"{refused} (a float copy to find the writers failed: {first_line(err)})") from err
    names = {id(module): name for name, module in skeleton.named_modules()}
    result: list[LayerWriters] = []
    for components in residual_writers(skeleton):
        mapped: LayerWriters = {}
        for component, refs in components.items():
            mapped[component] = []
            for ref in refs:
                name = names[id(ref.module)]
                real = model.get_submodule(name)
                _check_widths(ref, real, name)
                mapped[component].append(WriterRef(real, ref.name, ref.out_dim, ref.bias_name))
        result.append(mapped)
    return result


def _check_widths(ref: WriterRef, real: nn.Module, name: str) -> None:
    weight = ref.weight  # the skeleton's: float, full shape
    if ref.name != "weight" or weight.dim() != 2:
        if not getattr(real, ref.name).is_floating_point():
            raise AbliterateError(
                f"{name}.{ref.name} is quantized fused experts; hooks support only quantized nn.Linear writers"
            )
        return
    shape = (getattr(real, "out_features", None), getattr(real, "in_features", None))
    expected = tuple(weight.shape) if ref.out_dim == -2 else tuple(weight.shape[::-1])
    if shape != expected:
        raise AbliterateError(
            f"{name} ({type(real).__name__}) maps {shape[1]} -> {shape[0]} features, not {expected[1]} -> {expected[0]} "
            "as the architecture says; this quantized layout is not supported"
        )


def read_weight(ref: WriterRef, name: str | None = None) -> Tensor | None:
    """A writer's weight (or `name`, e.g. its bias) as a float tensor, or None when it cannot be read.

    Plain tensors as they are; bitsandbytes 4-bit weights dequantised; tensors accelerate offloaded
    to disk (meta device) read from its offload map.
    """
    name = name or ref.name
    tensor = getattr(ref.module, name)
    if tensor is None:
        return None
    if tensor.is_floating_point() and tensor.device.type != "meta":
        return tensor
    quant_state = getattr(tensor, "quant_state", None)
    if quant_state is not None:  # bitsandbytes Params4bit
        import bitsandbytes.functional as bnb_functional

        return bnb_functional.dequantize_4bit(tensor.data, quant_state)
    if tensor.device.type == "meta":
        return offloaded_tensor(ref.module, name)
    return None


def offloaded_tensor(module: nn.Module, name: str) -> Tensor | None:
    """A parameter accelerate offloaded (to disk or CPU), read from the module's hook's weights map."""
    hook = getattr(module, "_hf_hook", None)
    for candidate in [hook, *getattr(hook, "hooks", ())]:
        weights_map = getattr(candidate, "weights_map", None)
        if weights_map is None:
            continue
        try:
            return weights_map[name]
        except KeyError:
            continue
    return None
