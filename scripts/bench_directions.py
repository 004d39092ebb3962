"""Benchmark contrastive PCA: the seed's dense per-layer d x d eigh against our batched sample-space solve.

Prints one JSON line per (device, n) case:
    layers, dim, n_per_class, k, device, threads, path, dense_layers, dense_s, fast_s, ratio,
    min_abs_cos, max_rel_eig_err

dense_s times the seed's method (build C = S_b - alpha S_g densely, project with P, eigh of
d x d) on --dense-layers layers and extrapolates to all layers; fast_s is
abliterate.directions.contrastive_pca on all layers, end to end (CUDA synchronised).
min_abs_cos / max_rel_eig_err compare the two on the timed layers, over every returned vector.

    OMP_NUM_THREADS=1 python scripts/bench_directions.py            # 64 x 5120, n=50 and 400, cpu (+cuda)
    python scripts/bench_directions.py --device cuda --n 400 --dense-layers 4
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from abliterate.directions import contrastive_pca, normalize


def synthetic(
    n: int, layers: int, dim: int, *, rank: int = 8, seed: int = 0, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Harmful/harmless residuals [n, L, d]: a planted low-rank structure plus isotropic noise.

    Harmful prompts vary strongly along `rank` directions (variances 16, 8, 4, ...), harmless
    ones along a partly shared set; both carry a large common mean and the harmful ones a shift.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(layers, dim, 2 * rank, generator=gen, device=device))[0].mT  # [L, 2r, d]
    scales_bad = 4.0 * 2.0 ** (-torch.arange(rank, device=device) / 2)  # std: variances 16, 8, 4, ...
    scales_good = 3.0 * 2.0 ** (-torch.arange(rank, device=device) / 2)
    mean = 10 * torch.randn(layers, dim, generator=gen, device=device)
    shift = 3 * normalize(basis[:, 0] + torch.randn(layers, dim, generator=gen, device=device) / dim**0.5)

    def sample(scales: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
        z = torch.randn(n, layers, rank, generator=gen, device=device) * scales
        x = torch.einsum("nlr,lrd->nld", z, directions)
        return x.add_(mean).add_(torch.randn(n, layers, dim, generator=gen, device=device), alpha=0.1)

    bad = sample(scales_bad, basis[:, :rank]) + shift
    good = sample(scales_good, basis[:, rank // 2 : rank // 2 + rank])  # half the harmful directions shared
    return bad, good


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def dense_layer(bad: torch.Tensor, good: torch.Tensor, alpha: float, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The seed's method for one layer: C built densely (d x d), projected, full eigh."""
    xb, xg = bad - bad.mean(0), good - good.mean(0)
    c = xb.T @ xb / (len(xb) - 1) - alpha * (xg.T @ xg / (len(xg) - 1))
    r = normalize(bad.mean(0) - good.mean(0))
    cr = c @ r
    pcp = c - torch.outer(r, cr) - torch.outer(cr, r) + (r @ cr) * torch.outer(r, r)
    w, v = torch.linalg.eigh(pcp)
    return torch.cat([r[None], v[:, -(k - 1) :].flip(-1).T]), w[-(k - 1) :].flip(-1)


def run_case(device: str, layers: int, dim: int, n: int, k: int, alpha: float, dense_layers: int, threads: int) -> dict:
    bad, good = synthetic(n, layers, dim, device=device)
    # Warm-up on a tiny problem: library loading and CUDA handles are not part of either method.
    contrastive_pca(bad[:, :1, :64], good[:, :1, :64], k=2, alpha=alpha)
    dense_layer(bad[:, 0, :64], good[:, 0, :64], alpha, 2)
    sync(device)

    start = time.perf_counter()
    fast = contrastive_pca(bad, good, k=k, alpha=alpha)
    sync(device)
    fast_s = time.perf_counter() - start

    dense_dirs, dense_vals = [], []
    start = time.perf_counter()
    for layer in range(dense_layers):
        dirs, vals = dense_layer(bad[:, layer], good[:, layer], alpha, k)
        dense_dirs.append(dirs)
        dense_vals.append(vals)
    sync(device)
    dense_s = (time.perf_counter() - start) / dense_layers * layers

    ours, dense = normalize(fast.directions[:dense_layers].double()), normalize(torch.stack(dense_dirs).double())
    cos = (ours * dense).sum(-1).abs()
    ref_vals = torch.stack(dense_vals).double()
    rel = ((fast.eigenvalues[:dense_layers].double() - ref_vals).abs() / ref_vals.abs()).max()
    return {
        "layers": layers,
        "dim": dim,
        "n_per_class": n,
        "k": k,
        "device": device,
        "threads": threads,
        "path": "dense" if dim <= (2 * n if alpha else n) else "gram",
        "dense_layers": dense_layers,
        "dense_s": round(dense_s, 3),
        "fast_s": round(fast_s, 4),
        "ratio": round(dense_s / fast_s, 1),
        "min_abs_cos": round(cos.min().item(), 7),
        "max_rel_eig_err": float(f"{rel.item():.3g}"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--device", nargs="+", default=None, help="devices to run (default: cpu, plus cuda when available)"
    )
    parser.add_argument("--layers", type=int, default=64)
    parser.add_argument("--dim", type=int, default=5120)
    parser.add_argument("--n", type=int, nargs="+", default=[50, 400], help="prompts per class, one case each")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument(
        "--dense-layers", type=int, default=2, help="layers timed with the dense method (then extrapolated)"
    )
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    args = parser.parse_args()
    if not 1 <= args.dense_layers <= args.layers:
        parser.error("--dense-layers must be between 1 and --layers")
    torch.set_num_threads(args.threads)
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    for device in devices:
        for n in args.n:
            print(
                json.dumps(
                    run_case(device, args.layers, args.dim, n, args.k, args.alpha, args.dense_layers, args.threads)
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
