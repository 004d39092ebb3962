"""Refusal directions from residuals: the mean difference and contrastive PCA around it.

Shapes: residuals are ``[n, L, d]`` (prompts, layers, hidden size) and directions are
``[L, k, d]``, orthonormal per layer. Everything is batched over the layers and runs on the
device of the inputs. Maths and rules are written up in docs/directions.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from abliterate.errors import AbliterateError

__all__ = [
    "ContrastivePCA",
    "DirectionError",
    "compute_directions",
    "compute_dtype",
    "contrastive_pca",
    "normalize",
    "orthogonalize",
    "orthonormalize",
    "winsorize",
]


class DirectionError(AbliterateError, ValueError):
    """Directions cannot be computed as asked (shapes, k too large, degenerate means).

    A ValueError for library callers and an AbliterateError so the CLI prints it as one line.
    """


# ---- checks and small helpers ------------------------------------------------------------


def _check_residuals(name: str, x: Tensor, like: Tensor | None = None) -> None:
    if x.ndim != 3 or not x.is_floating_point():
        raise DirectionError(
            f"{name} residuals must be a float tensor [n, layers, hidden], got {tuple(x.shape)} {x.dtype}"
        )
    if x.shape[0] < 1:
        raise DirectionError(f"{name} residuals are empty: need at least one prompt")
    if like is not None and x.shape[1:] != like.shape[1:]:
        raise DirectionError(
            f"{name} residuals are [n, {x.shape[1]}, {x.shape[2]}] but harmful ones are "
            f"[n, {like.shape[1]}, {like.shape[2]}]: layers and hidden size must match"
        )


def compute_dtype(*xs: Tensor) -> torch.dtype:
    """float64 when an input is float64, else float32: bf16/fp16 are averaged, decomposed and
    edited in float32 for the headroom (and QR has no bf16 kernel)."""
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(-1, keepdim=True)


def _check_finite(mean: Tensor, what: str) -> None:
    # One NaN or inf residual makes its column of the mean non-finite: checking the means
    # catches it without another pass over the residuals.
    bad_layers = (~torch.isfinite(mean).all(-1)).nonzero().flatten().tolist()
    if bad_layers:
        raise DirectionError(
            f"{what} residuals contain NaN or inf at layers {bad_layers} (an fp16 overflow?): load the model in bfloat16 or float32"
        )


def _unit_mean_shift(mu_b: Tensor, mu_g: Tensor, projected: bool) -> Tensor:
    """normalize(mu_b - mu_g) per layer, optionally made orthogonal to normalize(mu_g)."""
    _check_finite(mu_b, "harmful")
    _check_finite(mu_g, "harmless")
    eps = torch.finfo(mu_b.dtype).eps
    diff = mu_b - mu_g
    # A shift at rounding level is no direction at all: say so instead of returning noise.
    scale = torch.maximum(mu_b.norm(dim=-1), mu_g.norm(dim=-1))
    flat = (diff.norm(dim=-1) <= 64 * eps * scale).nonzero().flatten().tolist()
    if flat:
        raise DirectionError(
            f"harmful and harmless mean residuals coincide at layers {flat}: no refusal direction there"
        )
    r = normalize(diff)
    if projected:
        g = normalize(mu_g)
        r = r - _dot(r, g) * g
        flat = (r.norm(dim=-1) <= eps**0.5).nonzero().flatten().tolist()
        if flat:
            raise DirectionError(
                f"the mean difference is parallel to the harmless mean at layers {flat}: use projected=False"
            )
        r = normalize(r)
    return r


def _fix_signs(vectors: Tensor) -> Tensor:
    """Flip each vector so its entry of largest absolute value is positive (first such index)."""
    index = vectors.abs().argmax(dim=-1, keepdim=True)  # argmax returns the first maximum
    sign = vectors.gather(-1, index).sign()
    return vectors * torch.where(sign == 0, 1.0, sign).to(vectors.dtype)


# ---- unit vectors and orthonormal sets ----------------------------------------------------


def normalize(x: Tensor, dim: int = -1, eps: float = 1e-12) -> Tensor:
    """``x / ||x||`` along ``dim``; a zero vector stays zero (the norm is clamped to ``eps``)."""
    return x / x.norm(dim=dim, keepdim=True).clamp_min(eps)


def orthonormalize(vectors: Tensor, norms: Tensor | None = None) -> Tensor:
    """Gram-Schmidt of the ``[..., k, d]`` rows in the given order, batched over leading axes.

    Each output row keeps the sign of its input row (positive dot with it). Computed in
    :func:`compute_dtype` and returned in the input dtype. Raises DirectionError (a ValueError)
    when less than sqrt(eps) of a row's norm (``norms`` ``[..., k]``, default its own) is left
    after removing the rows before it: the result would be rounding noise.
    """
    dtype = compute_dtype(vectors)
    v = vectors.to(dtype)
    q, r = torch.linalg.qr(v.mT)  # [..., d, k], [..., k, k]
    diag = r.diagonal(dim1=-2, dim2=-1)
    # QR is Gram-Schmidt up to a sign per column; |R_ii| is what is left of vector i.
    norms = v.norm(dim=-1) if norms is None else norms.to(dtype)
    lost = diag.abs() <= torch.finfo(dtype).eps ** 0.5 * norms
    if lost.any():
        *batch, index = lost.nonzero()[0].tolist()
        where = "" if not batch else f" at layer {batch[0]}" if len(batch) == 1 else f" at {tuple(batch)}"
        raise DirectionError(f"direction {index}{where} lies in the span of the vectors it is orthogonalised against")
    return (q * diag.sign()[..., None, :]).mT.contiguous().to(vectors.dtype)


def orthogonalize(directions: Tensor, against: Tensor) -> Tensor:
    """Remove the ``against`` component from every direction, then re-orthonormalise per layer.

    Args:
        directions: ``[L, k, d]``.
        against: ``[L, d]``, need not be unit (it is normalised here; a zero vector removes nothing).

    Returns:
        ``[L, k, d]`` orthonormal per layer and orthogonal to ``against``. Gram-Schmidt keeps
        the order, and each vector keeps its sign (positive dot with its input). Raises
        DirectionError when a direction lies in the span of ``against`` and those before it.
    """
    if directions.ndim != 3 or against.shape != (directions.shape[0], directions.shape[2]):
        raise DirectionError(
            f"orthogonalize takes directions [L, k, d] and against [L, d], got {tuple(directions.shape)} and {tuple(against.shape)}"
        )
    a = normalize(against.to(directions.dtype))[:, None, :]
    return orthonormalize(directions - _dot(directions, a) * a, norms=directions.norm(dim=-1))


# ---- contrastive PCA -----------------------------------------------------------------------


@dataclass
class ContrastivePCA:
    """Result of :func:`contrastive_pca`."""

    directions: Tensor
    """[L, k, d], orthonormal per layer; [:, 0] is the (projected) mean difference."""
    eigenvalues: Tensor
    """[L, k-1], descending: the eigenvalues of P C P for directions [:, 1:]."""


def contrastive_pca(
    bad: Tensor,
    good: Tensor,
    *,
    alpha: float = 1.0,
    k: int = 3,
    projected: bool = False,
    dtype: torch.dtype = torch.float32,
    method: Literal["auto", "dense", "gram"] = "auto",
) -> ContrastivePCA:
    """The mean difference plus the top contrastive-PCA directions orthogonal to it, per layer.

    With ``r = normalize(mu_b - mu_g)`` (or the projected variant), unbiased covariances
    ``S_b, S_g`` and ``C = S_b - alpha * S_g``, the first direction is ``r`` and the next
    ``k - 1`` are the eigenvectors of ``P C P`` (``P = I - r r^T``) with the largest
    eigenvalues, in descending order. ``k = 1`` is the normalised mean difference.

    Sign convention: ``directions[:, 0]`` has a positive dot with ``mu_b - mu_g``; every
    further direction is flipped so its entry of largest absolute value is positive (on a
    tie, the first such index).

    k limit: only eigenvectors with a numerically positive eigenvalue are returned. ``r`` is
    always in the null space of ``P C P`` (and with fewer prompts than dimensions so is a
    whole subspace), so past the positive eigenvalues the next "top" eigenvector is a
    non-unique zero-eigenvalue vector. When ``k - 1`` exceeds the count of positive ones in
    any layer a DirectionError names the largest k that works.

    Args:
        bad: harmful residuals ``[n_b, L, d]``.
        good: harmless residuals ``[n_g, L, d]``.
        alpha: weight of the harmless covariance; 0 is plain PCA of the harmful residuals.
        k: directions per layer, the mean difference included.
        projected: make ``r`` orthogonal to the harmless mean first.
        dtype: compute dtype, torch.float32 or torch.float64.
        method: "gram" solves the eigenproblem exactly in sample space (n x n, never d x d);
            "dense" runs eigh on the d x d matrix; "auto" takes dense only when d <= n.
    """
    _check_residuals("harmful", bad)
    _check_residuals("harmless", good, like=bad)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise DirectionError(f"k must be an int >= 1, got {k!r}")
    if method not in ("auto", "dense", "gram"):
        raise DirectionError(f"method must be 'auto', 'dense' or 'gram', got {method!r}")
    if dtype not in (torch.float32, torch.float64):
        raise DirectionError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    alpha = float(alpha)
    mu_b, mu_g = bad.mean(0, dtype=dtype), good.mean(0, dtype=dtype)
    r = _unit_mean_shift(mu_b, mu_g, projected)  # [L, d]
    n_layers, d = r.shape
    if k == 1:
        return ContrastivePCA(r[:, None, :].contiguous(), r.new_zeros(n_layers, 0))

    n_b, n_g = bad.shape[0], good.shape[0]
    if n_b < 2 or (alpha != 0 and n_g < 2):
        raise DirectionError(
            f"contrastive PCA needs >= 2 prompts per class for covariances, got {n_b} harmful and {n_g} harmless"
        )

    # C = A^T S A with A the centred rows of both classes (layer-major) and S the diagonal
    # weights below, so the rank of C is at most n. alpha = 0 drops the harmless rows.
    # A is written in place: at d = 5120 and n = 800 moving it costs as much as the QR.
    classes = [(bad, mu_b, 1.0 / (n_b - 1))] + ([(good, mu_g, -alpha / (n_g - 1))] if alpha != 0 else [])
    n = sum(x.shape[0] for x, _, _ in classes)
    a = torch.empty(n_layers, n, d, dtype=dtype, device=r.device)
    s = torch.empty(n, dtype=dtype, device=r.device)
    start = 0
    for x, mu, weight in classes:
        torch.sub(x.transpose(0, 1), mu[:, None, :], out=a[:, start : start + x.shape[0]])
        s[start : start + x.shape[0]] = weight
        start += x.shape[0]

    # P C P = (A P)^T S (A P): remove the r component from every row.
    a.baddbmm_(a @ r[..., None], r[:, None, :], alpha=-1)

    # Rounding-level eigenvalues are zeros. The scale is trace(P |C| P), an upper bound on
    # the size of every eigenvalue and of the rounding left by the factorisations.
    scale = (torch.linalg.vector_norm(a, dim=-1).square() * s.abs()).sum(-1)  # [L]
    tol = 32 * torch.finfo(dtype).eps * scale

    if method == "dense" or (method == "auto" and d <= n):
        # The seed's way: eigh of the d x d matrix. Cheaper only when d <= n.
        evals, evecs = torch.linalg.eigh(a.mT @ (s[:, None] * a))  # ascending, [L, d], [L, d, d]
        lift = None
    else:
        # Thin QR of A'^T = Q R (d x n); then A'^T S A' = Q (R S R^T) Q^T, so the nonzero
        # eigenpairs are those of the small symmetric R S R^T, lifted by Q. geqrf keeps Q as
        # Householder reflectors: ormqr applies it to just k-1 vectors instead of forming it.
        reflectors, tau = torch.geqrf(a.mT)  # [L, d, n]
        del a
        m = min(d, n)
        r_factor = reflectors[..., :m, :].triu()  # [L, m, n]
        evals, evecs = torch.linalg.eigh((r_factor * s) @ r_factor.mT)  # ascending, [L, m], [L, m, m]
        lift = (reflectors, tau)

    positive = (evals > tol[:, None]).sum(-1)  # [L]
    if int(positive.min()) < k - 1:
        layer = int(positive.argmin())
        raise DirectionError(
            f"k={k} is too large: layer {layer} has only {int(positive[layer])} positive contrastive "
            f"eigenvalues, so the largest k that works is {int(positive[layer]) + 1} "
            f"(more prompts, a smaller alpha or a smaller k)"
        )
    top_values = evals[:, -(k - 1) :].flip(-1)  # [L, k-1], descending
    top_vectors = evecs[:, :, -(k - 1) :].flip(-1)  # [L, m or d, k-1]
    if lift is not None:
        reflectors, tau = lift
        padded = top_vectors.new_zeros(n_layers, d, k - 1)
        padded[:, : top_vectors.shape[1]] = top_vectors
        top_vectors = torch.ormqr(reflectors, tau, padded)  # Q @ V, [L, d, k-1]

    # Exact maths gives orthonormal vectors orthogonal to r; one Gram-Schmidt pass cleans up
    # rounding. Signs: r keeps its own, the eigenvectors follow the largest-entry rule.
    directions = orthonormalize(torch.cat([r[:, None, :], top_vectors.mT], dim=1))
    directions = torch.cat([directions[:, :1], _fix_signs(directions[:, 1:])], dim=1)
    return ContrastivePCA(directions, top_values.contiguous())


def winsorize(quantile: float, *residuals: Tensor | None) -> tuple[Tensor | None, ...]:
    """The residuals ``[n, L, d]`` (None passes through) with every coordinate clamped to ``[-c_l, c_l]``, where
    ``c_l`` is the ``quantile`` of ``|x|`` over all prompts and coordinates of layer ``l`` of all of them pooled.

    A few hidden dimensions carry "massive activations" hundreds of times larger than the rest; they
    dominate means and covariances without saying anything about refusal. quantile 1 returns the
    inputs themselves. c_l is the k-th smallest ``|x|``, k = ceil(quantile * count).
    """
    if not 0.0 < quantile <= 1.0:
        raise DirectionError(f"winsorize quantile must be in (0, 1], got {quantile}")
    present = [x for x in residuals if x is not None]
    if quantile == 1.0 or not present:
        return residuals
    layers = present[0].shape[1]
    pooled = torch.cat([x.transpose(0, 1).reshape(layers, -1) for x in present], dim=1).abs()  # [L, N]
    k = max(1, math.ceil(quantile * pooled.shape[1]))
    bound = pooled.kthvalue(k, dim=1).values[None, :, None]  # [1, L, 1]
    return tuple(None if x is None else torch.maximum(torch.minimum(x, bound), -bound) for x in residuals)


# ---- the entry point -----------------------------------------------------------------------


def compute_directions(
    bad: Tensor,
    good: Tensor,
    *,
    method: Literal["mean_diff", "contrastive_pca"] = "mean_diff",
    k: int = 1,
    alpha: float = 1.0,
    projected: bool = False,
    unhelpful: Tensor | None = None,
    winsorize_quantile: float = 1.0,
) -> Tensor:
    """Refusal directions ``[L, k, d]``, orthonormal per layer, on the inputs' device.

    Args:
        bad: harmful residuals ``[n_b, L, d]``.
        good: harmless residuals ``[n_g, L, d]``.
        method: "mean_diff" (k must be 1) or "contrastive_pca" (see :func:`contrastive_pca`).
        k: directions per layer.
        alpha: contrastive PCA weight of the harmless covariance.
        projected: make the mean difference orthogonal to the harmless mean first.
        unhelpful: optional residuals ``[n_u, L, d]`` of raw text; every direction is then
            made orthogonal to ``h = normalize(mean(good) - mean(unhelpful))`` per layer.
        winsorize_quantile: clamp the residuals first (see :func:`winsorize`); 1 leaves them as they are.

    Returns fp32 (fp64 when an input is fp64). Signs follow :func:`contrastive_pca`; after the
    unhelpful orthogonalisation each vector keeps a positive dot with its unorthogonalised self.
    """
    _check_residuals("harmful", bad)
    _check_residuals("harmless", good, like=bad)
    if unhelpful is not None:
        _check_residuals("unhelpful", unhelpful, like=bad)
    dtype = compute_dtype(bad, good)
    bad, good, unhelpful = winsorize(winsorize_quantile, bad, good, unhelpful)
    if method == "mean_diff":
        if k != 1:
            raise DirectionError(
                f"method 'mean_diff' gives one direction per layer, got k={k}: use k=1 or method 'contrastive_pca'"
            )
        directions = _unit_mean_shift(bad.mean(0, dtype=dtype), good.mean(0, dtype=dtype), projected)[:, None, :]
    elif method == "contrastive_pca":
        directions = contrastive_pca(bad, good, alpha=alpha, k=k, projected=projected, dtype=dtype).directions
    else:
        raise DirectionError(f"method must be 'mean_diff' or 'contrastive_pca', got {method!r}")
    if unhelpful is not None:
        # h points from raw text towards chat-formatted requests; see docs/directions.md.
        mu_u = unhelpful.mean(0, dtype=dtype)
        _check_finite(mu_u, "unhelpful")
        h = normalize(good.mean(0, dtype=dtype) - mu_u)
        directions = orthogonalize(directions, h)
    return directions.contiguous()
