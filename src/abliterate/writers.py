"""A reference to one weight that writes into the residual stream."""

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class WriterRef:
    """A residual writer: `getattr(module, name)` maps into the residual stream.

    `out_dim` is the weight axis of size d_model: -2 for an `nn.Linear` weight
    [d_model, d_in], or -1 for fused expert tensors stored as [E, d_in, d_model].
    `bias_name` names a bias living in the residual space (its last axis is d_model).
    """

    module: nn.Module
    name: str = "weight"
    out_dim: int = -2
    bias_name: str | None = None

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.module, self.name)

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.module, self.bias_name) if self.bias_name else None


# One entry per decoder layer: component ("attn" or "mlp") -> its writers.
LayerWriters = dict[str, list[WriterRef]]
