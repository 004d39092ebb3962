"""abliterate: remove refusal behaviour from causal LMs by directional ablation."""

__version__ = "0.1.0"
