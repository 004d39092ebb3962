"""Directional ablation: the layer weight kernel, direction interpolation and weight edits.

Pure torch. A residual writer W maps into the residual stream along its `out_dim` axis;
ablating orthonormal directions r_j with weights w_j gives W' = W - sum_j w_j r_j r_j^T W.

Reading order: the kernel that gives each layer its weight (`ComponentKernel`, `layer_weights`),
the directions each layer ablates (`interpolate_directions`, `ablation_directions`), the edit of
one tensor (`orthogonalize_weight`, `orthogonalize_bias`), the plan of which writers get which
edit (`edit_plan`), and `WeightEditor`, which edits the weights in place and restores them
bit-exactly (hooks.py applies the same plan as forward hooks where weights cannot be edited).
"""

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.nn.utils import parametrize

from abliterate.directions import compute_dtype, orthonormalize
from abliterate.errors import AbliterateError
from abliterate.writers import LayerWriters, WriterRef

# ---- the layer kernel ------------------------------------------------------------------------


@dataclass
class ComponentKernel:
    """A linear tent of ablation weights over the layers for one component."""

    max_weight: float = 1.0
    """ablation weight at the peak layer."""
    max_weight_position: float = 0.0
    """layer index (may be fractional) of the peak."""
    min_weight: float = 0.0
    """weight at min_weight_distance from the peak."""
    min_weight_distance: float = 1.0
    """layers further than this from the peak get weight 0."""


def layer_weights(kernel: ComponentKernel, n_layers: int) -> Tensor:
    """[n_layers] float64 weights of a linear tent.

    w(i) = max_weight + (|i - pos| / min_weight_distance) * (min_weight - max_weight) while
    |i - pos| <= min_weight_distance, and 0 beyond.
    """
    values = {
        "max_weight": kernel.max_weight,
        "max_weight_position": kernel.max_weight_position,
        "min_weight": kernel.min_weight,
        "min_weight_distance": kernel.min_weight_distance,
    }
    for name, value in values.items():
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
    if kernel.min_weight_distance <= 0:
        raise ValueError(f"min_weight_distance must be > 0, got {kernel.min_weight_distance}")
    if kernel.max_weight < 0 or kernel.min_weight < 0:
        raise ValueError(f"kernel weights must be >= 0, got max {kernel.max_weight}, min {kernel.min_weight}")
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    distance = (torch.arange(n_layers, dtype=torch.float64) - kernel.max_weight_position).abs()
    weights = kernel.max_weight + (distance / kernel.min_weight_distance) * (kernel.min_weight - kernel.max_weight)
    return torch.where(distance <= kernel.min_weight_distance, weights, torch.zeros_like(weights))


@dataclass
class AblationParams:
    """One trial's ablation."""

    components: dict[str, ComponentKernel] = field(default_factory=dict)
    """kernel per component ("attn", "mlp"); a component not listed is left alone."""
    direction_index: float | None = None
    """None: each layer ablates its own directions; a float: the directions interpolated there, for all layers."""
    direction_decay: float = 1.0
    """direction j (0-based) of a k-subspace is ablated with weight kernel * decay**j."""
    norm_preserving: bool = False
    """rescale each weight column back to its original norm after the projection."""


# ---- directions ------------------------------------------------------------------------------


def interpolate_directions(directions: Tensor, index: float) -> Tensor:
    """[L, k, d] orthonormal per layer -> [k, d] at a fractional layer index.

    Each vector is lerped between layers floor(index) and floor(index)+1, then the set is
    re-orthonormalised in order (`directions.orthonormalize`), each vector keeping a positive
    dot with its lerp. An integer index returns that layer's directions unchanged.
    """
    if directions.ndim != 3:
        raise ValueError(f"directions must be [L, k, d], got {tuple(directions.shape)}")
    n_layers = directions.shape[0]
    if not 0 <= index <= n_layers - 1:  # also rejects NaN
        raise ValueError(f"direction_index {index} is outside [0, {n_layers - 1}]")
    low = min(int(math.floor(index)), n_layers - 1)
    frac = index - low
    if frac == 0:
        return directions[low]
    dtype = compute_dtype(directions)
    mixed = (1 - frac) * directions[low].to(dtype) + frac * directions[low + 1].to(dtype)
    return orthonormalize(mixed).to(directions.dtype)


def ablation_directions(directions: Tensor, direction_index: float | None) -> Tensor:
    """The [L, k, d] direction set each layer ablates: its own, or one interpolated set for all."""
    if directions.ndim != 3:
        raise ValueError(f"directions must be [L, k, d], got {tuple(directions.shape)}")
    if direction_index is None:
        return directions
    return interpolate_directions(directions, direction_index).expand_as(directions)


# ---- editing one tensor ----------------------------------------------------------------------


def _directions_and_coefficients(
    directions: Tensor, weights: Tensor | float, d_model: int, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Directions as [k, d] and weights as [k], on `device` in `dtype`, with their shapes checked."""
    r = directions[None] if directions.ndim == 1 else directions
    if r.ndim != 2 or r.shape[-1] != d_model:
        raise ValueError(f"directions must be [k, {d_model}], got {tuple(directions.shape)}")
    coef = torch.as_tensor(weights, dtype=dtype, device=device).reshape(-1)
    if coef.numel() == 1:
        coef = coef.expand(r.shape[0])
    if coef.shape[0] != r.shape[0]:
        raise ValueError(f"{coef.shape[0]} weights for {r.shape[0]} directions")
    return r.to(device=device, dtype=dtype), coef


def orthogonalize_weight(
    weight: Tensor, directions: Tensor, weights: Tensor | float, *, out_dim: int = -2, norm_preserving: bool = False
) -> Tensor:
    """W' = W - sum_j w_j r_j r_j^T W along `out_dim` (directions [k, d] orthonormal, weights [k]).

    Computed in float32 (float64 for a float64 weight) and returned in the weight's dtype. Leading
    axes batch, so fused experts [E, d_in, d_model] work with out_dim=-1.

    norm_preserving rescales every column (each vector along the out axis, W[:, j] for a Linear)
    to the norm it had before; a column projected to zero (up to round-off) becomes exactly zero.
    Scaling a column keeps it orthogonal to r, so r^T W' = 0 stays exact at w = 1; scaling rows
    would not.
    """
    dtype = compute_dtype(weight)
    r, coef = _directions_and_coefficients(directions, weights, weight.shape[out_dim], weight.device, dtype)
    w = weight.to(dtype).movedim(out_dim, -1)  # [..., d_in, d_model]: each row is one column of W
    edited = w - ((w @ r.T) * coef) @ r
    if norm_preserving:
        edited = edited * _column_scales(w, edited)
    return edited.movedim(-1, out_dim).to(weight.dtype)


def _column_scales(w: Tensor, edited: Tensor) -> Tensor:
    """[..., d_in, 1]: ||column|| before / after the projection (columns as rows of `w`, `edited`)."""
    dtype = w.dtype
    before = w.norm(dim=-1, keepdim=True)
    after = edited.norm(dim=-1, keepdim=True)
    # A column that lay in span(r) is left with round-off only: rescaling that noise to the
    # original norm would invent a column, so it becomes exactly zero instead.
    noise = before * (4 * torch.finfo(dtype).eps * math.sqrt(w.shape[-1]))
    return torch.where(after > noise, before / after.clamp_min(torch.finfo(dtype).tiny), torch.zeros_like(after))


def column_scales(weight: Tensor, directions: Tensor, weights: Tensor | float, *, out_dim: int = -2) -> Tensor:
    """[..., d_in]: the factors norm_preserving multiplies each column by (W' = (I - P) W diag(s)).

    The same arithmetic as `orthogonalize_weight`, in its compute dtype: scaling a writer's input by s
    and then projecting its output equals the norm-preserving weight edit.
    """
    dtype = compute_dtype(weight)
    r, coef = _directions_and_coefficients(directions, weights, weight.shape[out_dim], weight.device, dtype)
    w = weight.to(dtype).movedim(out_dim, -1)
    return _column_scales(w, w - ((w @ r.T) * coef) @ r).squeeze(-1)


def orthogonalize_bias(bias: Tensor, directions: Tensor, weights: Tensor | float) -> Tensor:
    """b' = b - sum_j w_j r_j r_j^T b for a bias in the residual space (last axis d_model)."""
    dtype = compute_dtype(bias)
    r, coef = _directions_and_coefficients(directions, weights, bias.shape[-1], bias.device, dtype)
    b = bias.to(dtype)
    return (b - ((b @ r.T) * coef) @ r).to(bias.dtype)


# ---- the plan: which writers get which edit --------------------------------------------------


Gains = list[dict[str, Tensor | None]]


def through_gain(directions: Tensor, gain: Tensor) -> Tensor:
    """The directions to ablate from writers followed by an RMSNorm with per-channel gain g.

    Such a layer adds g * y / rms(y) to the residual, so r^T(update) = 0 needs (g * r)^T y = 0:
    ablate normalize(g * r). Exact for k = 1, and for k > 1 with equal weights (the span of g * R
    is projected out); with decaying weights it approximates the oblique projection.
    """
    scaled = directions * gain.to(device=directions.device, dtype=directions.dtype)
    return orthonormalize(scaled)


def edit_plan(
    params: AblationParams, directions: Tensor, writers: list[LayerWriters], gains: Gains | None = None
) -> list[tuple[int, str, Tensor, Tensor]]:
    """(layer, component, directions [k, d], weights [k] float64) for every non-zero edit.

    Everything is checked here, before any weight changes: the direction count, the decay and
    that every listed component exists in every layer it touches. `gains` (from
    models.post_norm_gains) turns each direction into the one to remove before a post-norm.
    """
    n_layers = len(writers)
    if directions.ndim != 3 or directions.shape[0] != n_layers:
        raise ValueError(f"directions must be [{n_layers}, k, d] (one set per layer), got {tuple(directions.shape)}")
    if not (math.isfinite(params.direction_decay) and params.direction_decay >= 0):
        raise ValueError(f"direction_decay must be finite and >= 0, got {params.direction_decay}")
    per_layer = ablation_directions(directions, params.direction_index)
    decay = params.direction_decay ** torch.arange(directions.shape[1], dtype=torch.float64)
    plan = []
    for component, kernel in params.components.items():
        for layer, w in enumerate(layer_weights(kernel, n_layers).tolist()):
            if w == 0.0:
                continue
            if component not in writers[layer]:
                raise ValueError(f"layer {layer} has no {component!r} writers (has {sorted(writers[layer])})")
            dirs = per_layer[layer]
            gain = gains[layer].get(component) if gains is not None else None
            plan.append((layer, component, dirs if gain is None else through_gain(dirs, gain), w * decay))
    return plan


# ---- applying it: edit the weights in place --------------------------------------------------


def not_editable(ref: WriterRef) -> str | None:
    """Why a writer's weight (or bias) cannot be edited in place, or None when it can."""
    for name in (ref.name, ref.bias_name):
        if name is None:
            continue
        if parametrize.is_parametrized(ref.module, name):
            return "parametrized (recomputed from other tensors on every forward)"
        tensor = getattr(ref.module, name)
        if tensor.device.type == "meta":
            return "offloaded to disk"
        if not tensor.is_floating_point():
            return f"quantized ({tensor.dtype})"
        if tensor.is_inference():
            return "read-only (inference tensors)"
    return None


class Editor:
    """What applies an ablation to a model: `apply`, `reset`, `applied` for a block, and `suspended`.

    Subclasses set `last` to the (params, directions) an `apply` succeeded with, and `reset` to None.
    """

    last: tuple[AblationParams, Tensor] | None = None

    def apply(self, params: AblationParams, directions: Tensor) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError

    @contextmanager
    def applied(self, params: AblationParams, directions: Tensor) -> Iterator[None]:
        """Apply for the duration of the block; undo it afterwards, even on errors."""
        self.apply(params, directions)
        try:
            yield
        finally:
            self.reset()

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """The unedited model for the block, the same edit again afterwards: `apply` always starts
        from the originals, so re-applying gives the same weights (or hooks) bit for bit."""
        last = self.last
        if last is None:
            yield
            return
        self.reset()
        try:
            yield
        finally:
            self.apply(*last)


class WeightEditor(Editor):
    """Applies an ablation in place and restores the exact original weights."""

    def __init__(
        self, writers: list[LayerWriters], cache_device: str | torch.device | None = None, gains: Gains | None = None
    ):
        """Clone every writer's weight (and bias) once, to `cache_device` or beside the weight.

        `gains`: post-norm gains per layer and component (models.post_norm_gains), or None.
        """
        self.writers = writers
        self.gains = gains
        self.originals: dict[tuple[int, str, int], tuple[Tensor, Tensor | None]] = {}
        self.edited: set[tuple[int, str, int]] = set()
        # Plain tensors even when built inside inference mode: they are copied back later, outside it.
        with torch.no_grad(), torch.inference_mode(False):
            for layer, components in enumerate(writers):
                for component, refs in components.items():
                    for i, ref in enumerate(refs):
                        why = not_editable(ref)
                        if why:
                            raise AbliterateError(
                                f"layer {layer} {component} weights are {why} and cannot be edited in place; "
                                "set --module.load.edit_mode auto (or hooks) to ablate with forward hooks, or give "
                                "the model more GPU/CPU memory (module.load.device_map)"
                            )
                        bias = ref.bias
                        self.originals[(layer, component, i)] = (
                            ref.weight.detach().to(cache_device or ref.weight.device, copy=True),
                            None if bias is None else bias.detach().to(cache_device or bias.device, copy=True),
                        )

    @torch.no_grad()
    def apply(self, params: AblationParams, directions: Tensor) -> None:
        """Ablate `directions` [L, k, d], always starting from the originals (apply twice == once).

        On any error the weights are restored before it propagates.
        """
        self.reset()
        plan = edit_plan(params, directions, self.writers, self.gains)
        try:
            for layer, component, dirs, weights in plan:
                for i, ref in enumerate(self.writers[layer][component]):
                    weight, bias = self.originals[(layer, component, i)]
                    self.edited.add((layer, component, i))
                    ref.weight.copy_(
                        orthogonalize_weight(
                            weight.to(ref.weight.device),
                            dirs,
                            weights,
                            out_dim=ref.out_dim,
                            norm_preserving=params.norm_preserving,
                        )
                    )
                    if bias is not None:
                        ref.bias.copy_(orthogonalize_bias(bias.to(ref.bias.device), dirs, weights))
        except BaseException:
            self.reset()
            raise
        self.last = (params, directions)

    @torch.no_grad()
    def reset(self) -> None:
        """Copy the originals back into every edited writer, bit-exactly."""
        for layer, component, i in self.edited:
            ref = self.writers[layer][component][i]
            weight, bias = self.originals[(layer, component, i)]
            ref.weight.copy_(weight)
            if bias is not None:
                ref.bias.copy_(bias)
        self.edited.clear()
        self.last = None
