"""Directional ablation as forward hooks on the writers' outputs, for weights that cannot be edited
in place (4-bit packed, offloaded to disk, read-only): W'x + b' = (I - P)(Wx + b), so projecting a
writer's output with the edit's directions and weights is the weight edit, exactly; norm-preserving
adds a pre-hook that scales the writer's input by the edit's column scales.
"""

from collections.abc import Callable

import torch
from torch import Tensor, nn

from abliterate.ablation import AblationParams, Editor, Gains, column_scales, edit_plan, not_editable
from abliterate.directions import compute_dtype
from abliterate.errors import AbliterateError
from abliterate.writers import LayerWriters, WriterRef

WeightReader = Callable[[WriterRef], "Tensor | None"]


def plain_weight(ref: WriterRef) -> Tensor | None:
    """A writer's weight when it can be read as it is (floating point, not offloaded), else None."""
    weight = ref.weight
    return weight if weight.is_floating_point() and weight.device.type != "meta" else None


class HookEditor(Editor):
    """Applies an ablation as forward hooks on the writers' outputs; the weights are never written.

    For models whose weights cannot be edited in place (4-bit packed, offloaded to disk). A writer
    computes y = W x + b; the weight edit gives W' x + b' = (I - P)(W x + b) with P = sum_j w_j r_j r_j^T
    (the bias edit is the same projection), so the hook returns y - sum_j w_j r_j (r_j^T y) with the
    directions and weights of `edit_plan` (post-norm gains included). norm_preserving is
    W' = (I - P) W diag(s): a forward pre-hook scales the writer's input by s (`column_scales`, from
    the weight as `weight_reader` reads it). Only this editor's own hook handles are ever removed.
    """

    def __init__(
        self, writers: list[LayerWriters], gains: Gains | None = None, weight_reader: WeightReader | None = None
    ):
        """`weight_reader`: a writer's weight as a float tensor (dequantised, loaded from disk) or None
        when it cannot be read; only norm_preserving needs it. Default: `plain_weight`."""
        self.writers = writers
        self.gains = gains
        self.read_weight = weight_reader or plain_weight
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    @torch.no_grad()
    def apply(self, params: AblationParams, directions: Tensor) -> None:
        """Hook `directions` [L, k, d] into the writers, replacing any earlier hooks (apply twice == once)."""
        self.reset()
        plan = edit_plan(params, directions, self.writers, self.gains)
        try:
            for layer, component, dirs, weights in plan:
                for ref in self.writers[layer][component]:
                    scale = (
                        self._input_scale(ref, dirs, weights, f"layer {layer} {component}")
                        if params.norm_preserving
                        else None
                    )
                    if scale is not None:
                        self.handles.append(ref.module.register_forward_pre_hook(_scale_input_hook(scale)))
                    self.handles.append(ref.module.register_forward_hook(_projection_hook(dirs, weights)))
        except BaseException:
            self.reset()
            raise
        self.last = (params, directions)

    def _input_scale(self, ref: WriterRef, dirs: Tensor, weights: Tensor, where: str) -> Tensor:
        if ref.name != "weight":  # fused experts: the module's input is not the down-projection's
            raise AbliterateError(
                f"{where} writers are fused experts ({type(ref.module).__name__}.{ref.name}): hooks cannot preserve "
                "their column norms; set --space.norm_preserving [false] or load the model editable"
            )
        weight = self.read_weight(ref)
        if weight is None:
            raise AbliterateError(
                f"{where} weights cannot be read ({not_editable(ref) or 'unreadable'}), which norm_preserving needs; "
                "set --space.norm_preserving [false] or load the model editable"
            )
        return column_scales(weight, dirs, weights, out_dim=ref.out_dim)

    def reset(self) -> None:
        """Remove this editor's hooks (hooks others registered stay)."""
        while self.handles:
            self.handles.pop().remove()
        self.last = None


class _PerDevice:
    """Tensors moved to a device and dtype once, on first use there."""

    def __init__(self, *tensors: Tensor):
        self.tensors = tensors
        self.cache: dict[tuple, tuple[Tensor, ...]] = {}

    def on(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, ...]:
        key = (device, dtype)
        if key not in self.cache:
            self.cache[key] = tuple(t.to(device=device, dtype=dtype) for t in self.tensors)
        return self.cache[key]


def _projection_hook(directions: Tensor, weights: Tensor):
    """A forward hook returning y - sum_j w_j r_j (r_j^T y), computed as the weight edit is: in float32,
    or float64 for float64 outputs."""
    factors = _PerDevice(directions, weights)

    def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        if not isinstance(output, Tensor) or output.shape[-1] != directions.shape[-1]:
            raise AbliterateError(
                f"{type(module).__name__} does not return one residual-space tensor; this writer cannot be "
                "ablated with hooks: set --module.load.edit_mode weights"
            )
        compute = compute_dtype(output)
        r, coef = factors.on(output.device, compute)
        y = output.to(compute)
        return (y - ((y @ r.T) * coef) @ r).to(output.dtype)

    return hook


def _scale_input_hook(scale: Tensor):
    """A forward pre-hook multiplying the first input's last axis by `scale` [d_in]."""
    factors = _PerDevice(scale)

    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        (s,) = factors.on(x.device, compute_dtype(x))
        return ((x.to(s.dtype) * s).to(x.dtype), *args[1:])

    return hook
