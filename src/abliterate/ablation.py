"""Directional ablation: the layer weight kernel, direction interpolation and weight edits.

Pure torch. A residual writer W maps into the residual stream along its `out_dim` axis;
ablating unit directions r_j with weights w_j gives W' = W - sum_j w_j r_j r_j^T W.
"""

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

from abliterate.errors import AbliterateError
from abliterate.writers import LayerWriters, WriterRef


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
    """[n_layers] weights: max_weight at the peak, falling linearly to min_weight at the edge, 0 beyond."""
    if kernel.min_weight_distance <= 0:
        raise ValueError(f"min_weight_distance must be > 0, got {kernel.min_weight_distance}")
    if kernel.max_weight < 0 or kernel.min_weight < 0:
        raise ValueError("kernel weights must be >= 0")
    distance = (torch.arange(n_layers, dtype=torch.float64) - kernel.max_weight_position).abs()
    fraction = distance / kernel.min_weight_distance
    weights = kernel.max_weight + fraction * (kernel.min_weight - kernel.max_weight)
    return torch.where(distance <= kernel.min_weight_distance, weights, torch.zeros_like(weights))


@dataclass
class AblationParams:
    """One trial's ablation."""

    components: dict[str, ComponentKernel] = field(default_factory=dict)
    """kernel per component ("attn", "mlp"); a component not listed is left alone."""
    direction_index: float | None = None
    """None: each layer ablates its own direction; a float: the direction interpolated there, for all layers."""
    direction_decay: float = 1.0
    """direction j of a k-subspace is ablated with weight kernel * decay**j."""
    norm_preserving: bool = False
    """rescale each weight column back to its original norm after the projection."""


def orthonormalize_like(vectors: Tensor, reference: Tensor) -> Tensor:
    """QR-orthonormalise [.., k, d] rows in order, each signed to agree with its reference row."""
    q, _ = torch.linalg.qr(vectors.mT)
    q = q.mT
    sign = torch.sign((q * reference).sum(-1, keepdim=True))
    return q * torch.where(sign == 0, torch.ones_like(sign), sign)


def interpolate_directions(directions: Tensor, index: float) -> Tensor:
    """[L, k, d] -> [k, d]: lerp between layers floor(index) and floor(index)+1, re-orthonormalised."""
    n_layers = directions.shape[0]
    if not 0 <= index <= n_layers - 1:
        raise ValueError(f"direction_index {index} is outside [0, {n_layers - 1}]")
    low = min(int(math.floor(index)), n_layers - 1)
    frac = index - low
    if frac == 0:
        return directions[low]
    mixed = (1 - frac) * directions[low] + frac * directions[low + 1]
    return orthonormalize_like(mixed, mixed)


def ablation_directions(directions: Tensor, direction_index: float | None) -> Tensor:
    """The [L, k, d] direction set each layer ablates."""
    if direction_index is None:
        return directions
    return interpolate_directions(directions, direction_index).expand_as(directions)


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def orthogonalize_weight(
    weight: Tensor, directions: Tensor, weights: Tensor, *, out_dim: int = -2, norm_preserving: bool = False
) -> Tensor:
    """W' = W - sum_j w_j r_j r_j^T W along `out_dim` (directions [k, d] orthonormal, weights [k]).

    norm_preserving rescales every column (each vector along the out axis) to its original norm.
    Scaling a column keeps it orthogonal to r, so r^T W' = 0 stays exact at w = 1; scaling rows
    would not.
    """
    dtype = _compute_dtype(weight)
    w = weight.to(dtype).movedim(out_dim, -1)  # [..., d_in, d_model]: rows are the columns of W
    r = directions.to(device=weight.device, dtype=dtype)
    coef = torch.as_tensor(weights, device=weight.device, dtype=dtype)
    projections = w @ r.T  # [..., d_in, k]
    edited = w - (projections * coef) @ r
    if norm_preserving:
        before = w.norm(dim=-1, keepdim=True)
        after = edited.norm(dim=-1, keepdim=True)
        edited = torch.where(after > 0, edited * (before / after.clamp_min(torch.finfo(dtype).tiny)), edited)
    return edited.movedim(-1, out_dim).to(weight.dtype)


def orthogonalize_bias(bias: Tensor, directions: Tensor, weights: Tensor) -> Tensor:
    """b' = b - sum_j w_j r_j r_j^T b for a bias in the residual space (last axis d_model)."""
    dtype = _compute_dtype(bias)
    b = bias.to(dtype)
    r = directions.to(device=bias.device, dtype=dtype)
    coef = torch.as_tensor(weights, device=bias.device, dtype=dtype)
    return (b - ((b @ r.T) * coef) @ r).to(bias.dtype)


def _plan(params: AblationParams, directions: Tensor, n_layers: int) -> Iterator[tuple[int, str, Tensor, Tensor]]:
    """(layer, component, directions [k, d], weights [k]) for every non-zero edit."""
    if directions.shape[0] != n_layers:
        raise ValueError(f"directions cover {directions.shape[0]} layers, the model has {n_layers}")
    per_layer = ablation_directions(directions, params.direction_index)
    decay = params.direction_decay ** torch.arange(directions.shape[1], dtype=torch.float64)
    for component, kernel in params.components.items():
        for layer, w in enumerate(layer_weights(kernel, n_layers).tolist()):
            if w != 0.0:
                yield layer, component, per_layer[layer], w * decay


class WeightEditor:
    """Applies an ablation in place and restores the exact original weights."""

    def __init__(self, writers: list[LayerWriters], cache_device: str | torch.device | None = None):
        self.writers = writers
        # Originals are cloned once; every apply starts from them, so apply twice == apply once.
        self.originals: dict[tuple[int, str, int], tuple[Tensor, Tensor | None]] = {}
        with torch.no_grad(), torch.inference_mode(False):
            for layer, components in enumerate(writers):
                for component, refs in components.items():
                    for i, ref in enumerate(refs):
                        if ref.weight.device.type == "meta":
                            raise AbliterateError(
                                f"layer {layer} {component} weights are offloaded to disk and cannot be edited; "
                                "give the model more GPU/CPU memory (module.load.device_map)"
                            )
                        bias = ref.bias
                        self.originals[(layer, component, i)] = (
                            ref.weight.detach().to(cache_device or ref.weight.device, copy=True),
                            None if bias is None else bias.detach().to(cache_device or bias.device, copy=True),
                        )
        self.edited: set[tuple[int, str, int]] = set()

    def _refs(self, layer: int, component: str) -> list[WriterRef]:
        refs = self.writers[layer].get(component)
        if refs is None:
            raise ValueError(f"layer {layer} has no {component!r} writers (has {sorted(self.writers[layer])})")
        return refs

    @torch.no_grad()
    def apply(self, params: AblationParams, directions: Tensor) -> None:
        self.reset()
        for layer, component, dirs, weights in _plan(params, directions, len(self.writers)):
            for i, ref in enumerate(self._refs(layer, component)):
                weight, bias = self.originals[(layer, component, i)]
                new = orthogonalize_weight(
                    weight.to(ref.weight.device), dirs, weights, out_dim=ref.out_dim, norm_preserving=params.norm_preserving
                )
                ref.weight.copy_(new)
                if bias is not None:
                    ref.bias.copy_(orthogonalize_bias(bias.to(ref.bias.device), dirs, weights))
                self.edited.add((layer, component, i))

    @torch.no_grad()
    def reset(self) -> None:
        for layer, component, i in self.edited:
            ref = self.writers[layer][component][i]
            weight, bias = self.originals[(layer, component, i)]
            ref.weight.copy_(weight)
            if bias is not None:
                ref.bias.copy_(bias)
        self.edited.clear()

    @contextmanager
    def applied(self, params: AblationParams, directions: Tensor) -> Iterator[None]:
        self.apply(params, directions)
        try:
            yield
        finally:
            self.reset()


@contextmanager
def ablation_hooks(writers: list[LayerWriters], params: AblationParams, directions: Tensor) -> Iterator[None]:
    """The hook alternative to weight edits: project each writer's output, y' = y - sum_j w_j r_j r_j^T y.

    Equal to the weight edit without norm preservation. Removes only its own handles.
    """
    if params.norm_preserving:
        raise NotImplementedError("norm-preserving ablation changes weights column by column; use WeightEditor")
    handles = []

    def make_hook(dirs: Tensor, weights: Tensor):
        def hook(module, args, output):
            r = dirs.to(device=output.device, dtype=torch.float32)
            coef = weights.to(device=output.device, dtype=torch.float32)
            y = output.float()
            return (y - ((y @ r.T) * coef) @ r).to(output.dtype)

        return hook

    try:
        for layer, component, dirs, weights in _plan(params, directions, len(writers)):
            for ref in writers[layer][component]:
                if ref.out_dim != -2 or ref.name != "weight":
                    raise NotImplementedError(f"hooks need nn.Linear writers; {type(ref.module).__name__} is fused")
                handles.append(ref.module.register_forward_hook(make_hook(dirs, weights)))
        yield
    finally:
        for handle in handles:
            handle.remove()
