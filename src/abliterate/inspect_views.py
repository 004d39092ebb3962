"""Research views of a run's residuals: a per-layer table and plots, and 2-D projections per layer.

Plain tensors in, CSV and PNG files out (matplotlib, Agg). Every statistic is computed in float64
from the ``[n, L, d]`` residuals the run cached:

- ``mean_diff_norm``: ``||mean(harmful) - mean(harmless)||`` per layer.
- the layer's direction ``r``: the first refusal direction as the run computes it
  (:func:`abliterate.directions.compute_directions` with the given options).
- ``d_prime``: separation of the projections ``x . r`` of harmful (b) and harmless (g) prompts,
  ``(mu_b - mu_g) / sqrt((var_b + var_g) / 2)``, unbiased variances (one prompt per class: 0 variance).
- ``cos_prev``: cosine between this layer's direction and the previous layer's (empty for layer 0).
- ``second_direction``: the largest contrastive-PCA eigenvalue beside the mean difference (k = 2, the given alpha
  and projection), over ``||mean(harmful) - mean(harmless)||^2``: the harmful-only variance a second direction would carry,
  relative to the one the mean difference carries. About 0.5 on both layers of the two-styles organism, whose
  refusal one mean difference cannot remove; at most 0.05 on the refusal layers of models where one direction
  carries it (docs/benchmarks.md). Empty when the prompts cannot support a second direction.
- ``eig_1 ... eig_{k-1}``: the contrastive PCA eigenvalues of the layer, when that method is asked for.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import torch
from torch import Tensor

from abliterate.directions import DirectionError, compute_directions, contrastive_pca
from abliterate.directions import winsorize as winsorize_residuals
from abliterate.rundir import atomic_path

log = logging.getLogger("abliterate.inspect")

COLUMNS = (
    "layer",
    "mean_diff_norm",
    "d_prime",
    "cos_prev",
    "harmful_proj_mean",
    "harmless_proj_mean",
    "second_direction",
)


def layer_table(
    bad: Tensor,
    good: Tensor,
    *,
    method: str = "mean_diff",
    k: int = 1,
    alpha: float = 1.0,
    projected: bool = False,
    unhelpful: Tensor | None = None,
    winsorize: float = 1.0,
) -> list[dict[str, float | int | None]]:
    """One row per layer: the statistics of the module docstring (float64), of the residuals the directions
    read (clamped first when `winsorize` < 1)."""
    bad, good = bad.double(), good.double()
    unhelpful = unhelpful.double() if unhelpful is not None else None
    bad, good, unhelpful = winsorize_residuals(winsorize, bad, good, unhelpful)
    options = dict(method=method, k=k, alpha=alpha, projected=projected)
    r = compute_directions(bad, good, unhelpful=unhelpful, **options)[:, 0]  # [L, d]
    norms = (bad.mean(0) - good.mean(0)).norm(dim=-1)
    pb, pg = torch.einsum("nld,ld->nl", bad, r), torch.einsum("nld,ld->nl", good, r)
    spread = ((_var(pb) + _var(pg)) / 2).sqrt()
    d_prime = (pb.mean(0) - pg.mean(0)) / spread
    cos = torch.nn.functional.cosine_similarity(r[1:], r[:-1], dim=-1)
    second = second_direction(bad, good, alpha=alpha, projected=projected)
    eigen = None
    if method == "contrastive_pca" and k > 1:
        eigen = contrastive_pca(bad, good, alpha=alpha, k=k, projected=projected, dtype=torch.float64).eigenvalues
    rows = []
    for layer in range(r.shape[0]):
        row = {
            "layer": layer,
            "mean_diff_norm": float(norms[layer]),
            "d_prime": float(d_prime[layer]),
            "cos_prev": float(cos[layer - 1]) if layer else None,
            "harmful_proj_mean": float(pb[:, layer].mean()),
            "harmless_proj_mean": float(pg[:, layer].mean()),
            "second_direction": float(second[layer]) if second is not None else None,
        }
        if eigen is not None:
            row.update({f"eig_{i + 1}": float(v) for i, v in enumerate(eigen[layer])})
        rows.append(row)
    return rows


def second_direction(bad: Tensor, good: Tensor, *, alpha: float = 1.0, projected: bool = False) -> Tensor | None:
    """``[L]``: the top contrastive-PCA eigenvalue beside the (projected, if asked) mean difference over the squared
    mean difference (the module docstring); None when some layer has no positive one (too few prompts). One layer
    at a time: the factorisation holds a float64 copy of the residuals, too much at once for a large model."""
    top = []
    for layer in range(bad.shape[1]):
        one = slice(layer, layer + 1)
        try:
            spectrum = contrastive_pca(
                bad[:, one], good[:, one], alpha=alpha, k=2, projected=projected, dtype=torch.float64
            )
        except DirectionError:
            return None
        top.append(spectrum.eigenvalues[0, 0])
    return torch.stack(top) / (bad.mean(0) - good.mean(0)).double().square().sum(-1)


def _var(x: Tensor) -> Tensor:
    return x.var(0) if x.shape[0] > 1 else torch.zeros_like(x[0])


def write_table(rows: list[dict], path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: ("" if v is None else repr(v)) for k, v in row.items()} for row in rows)


def projections_2d(bad: Tensor, good: Tensor) -> Tensor:
    """Per layer, the pooled harmful + harmless residuals on their first two principal components:
    ``[n_b + n_g, L, 2]`` (harmful rows first). Each component's sign makes the harmful mean positive."""
    pooled = torch.cat([bad, good]).double().transpose(0, 1)  # [L, n, d]
    centred = pooled - pooled.mean(1, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)  # vh [L, min(n, d), d]
    axes = vh[:, :2]
    if axes.shape[1] < 2:  # one prompt in all, or hidden size 1: pad with a zero axis
        axes = torch.cat([axes, axes.new_zeros(axes.shape[0], 2 - axes.shape[1], axes.shape[2])], 1)
    coords = centred @ axes.mT  # [L, n, 2]
    sign = coords[:, : bad.shape[0]].mean(1).sign()
    coords = coords * torch.where(sign == 0, 1.0, sign)[:, None, :]
    return coords.transpose(0, 1).contiguous()


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed; skipping the inspect plots (pip install matplotlib)")
        return None
    return plt


def _save(fig, path: Path, plt) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)


def plot_layers(rows: list[dict], path: Path) -> bool:
    """A panel per statistic against the layer: norm, d', adjacent cosine, and the eigenvalues if any."""
    plt = _pyplot()
    if plt is None:
        return False
    layers = [r["layer"] for r in rows]
    eig = sorted((c for c in rows[0] if c.startswith("eig_")), key=lambda c: int(c[4:]))
    panels = [("mean_diff_norm", "||mean diff||"), ("d_prime", "d' of projections"), ("cos_prev", "cos(prev layer)")]
    if rows[0]["second_direction"] is not None:
        panels.append(("second_direction", "2nd direction / ||mean diff||²"))
    fig, axes = plt.subplots(1, len(panels) + bool(eig), figsize=(3.2 * (len(panels) + bool(eig)), 2.8))
    for ax, (column, title) in zip(axes, panels, strict=False):
        points = [(r["layer"], r[column]) for r in rows if r[column] is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", ms=3)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("layer", fontsize=8)
    if eig:
        ax = axes[-1]
        for column in eig:
            ax.plot(layers, [r[column] for r in rows], "o-", ms=3, label=column.replace("eig_", "λ"))
        ax.set_yscale("log")  # contrastive_pca returns positive eigenvalues only
        ax.set_title("contrastive PCA eigenvalues", fontsize=9)
        ax.set_xlabel("layer", fontsize=8)
        ax.legend(fontsize=7)
    for ax in axes:
        ax.xaxis.get_major_locator().set_params(integer=True)
    _save(fig, path, plt)
    return True


def plot_projections(coords: Tensor, n_bad: int, path: Path, columns: int = 6) -> bool:
    """A grid of small scatter plots, one per layer: harmful (red) and harmless (blue) residuals
    on the layer's first two principal components."""
    plt = _pyplot()
    if plt is None:
        return False
    n_layers = coords.shape[1]
    columns = min(columns, n_layers)
    rows = math.ceil(n_layers / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.9 * columns, 1.9 * rows), squeeze=False)
    for layer, ax in enumerate(axes.flat):
        if layer >= n_layers:
            ax.axis("off")
            continue
        xy = coords[:, layer].numpy()
        ax.scatter(*xy[n_bad:].T, s=4, c="C0", alpha=0.6, label="harmless", linewidths=0)
        ax.scatter(*xy[:n_bad].T, s=4, c="C3", alpha=0.6, label="harmful", linewidths=0)
        ax.set_title(f"layer {layer}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    axes.flat[0].legend(fontsize=6, loc="best", markerscale=2)
    _save(fig, path, plt)
    return True


def write_views(residuals: dict[str, Tensor], out: Path, **options) -> dict[str, Path]:
    """layers.csv, layers.png and projections.png in `out`; the paths written, by name."""
    out.mkdir(parents=True, exist_ok=True)
    bad, good = residuals["harmful"], residuals["harmless"]
    rows = layer_table(bad, good, unhelpful=residuals.get("unhelpful"), **options)
    written = {"layers_csv": out / "layers.csv"}
    write_table(rows, written["layers_csv"])
    if rows[0]["second_direction"] is not None:
        top = max(rows, key=lambda row: row["second_direction"])
        strongest = max(rows, key=lambda row: row["mean_diff_norm"])
        log.info(
            "second direction: %.3f of the mean difference's variance at layer %d (the most), %.3f at layer %d (the "
            "largest mean difference); about 0.5 where one direction could not remove refusal (docs/benchmarks.md)",
            top["second_direction"],
            top["layer"],
            strongest["second_direction"],
            strongest["layer"],
        )
    if plot_layers(rows, out / "layers.png"):
        written["layers_png"] = out / "layers.png"
    if plot_projections(projections_2d(bad, good), bad.shape[0], out / "projections.png"):
        written["projections_png"] = out / "projections.png"
    return written
