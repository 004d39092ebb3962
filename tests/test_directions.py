"""Refusal directions against an explicit float64 reference (eigh of P C P built densely)."""

import math

import pytest
import torch

from abliterate.directions import (
    ContrastivePCA,
    DirectionError,
    compute_directions,
    contrastive_pca,
    normalize,
    orthogonalize,
    orthonormalize,
    winsorize,
)

LAYERS = 3
HARMFUL_SPECTRUM = [100.0, 40.0, 16.0, 6.4, 2.5]  # ratio >= 2.5: eigenvectors well defined
HARMLESS_SPECTRUM = [20.0, 5.0]


def _centred_orthogonal(n: int, m: int, gen: torch.Generator) -> torch.Tensor:
    """[n, m] coefficients with zero column means and Z^T Z = (n - 1) I: an exact planted covariance."""
    z = torch.randn(n, m, generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(z - z.mean(0))
    return q * math.sqrt(n - 1)


def planted(
    n_bad: int, n_good: int, d: int, *, seed: int, noise: float = 1e-2, repeat: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residuals [n, LAYERS, d] with a planted spectrum, a large shared mean and a mean shift.

    Per layer, in a random orthonormal basis e_0..e_7: harmful variance HARMFUL_SPECTRUM on
    e_0..e_4, harmless variance HARMLESS_SPECTRUM on e_5, e_6, and the mean shift along
    e_7 + 0.3 e_0 + 0.2 e_1 so that P really moves the eigenvectors. `repeat` > 1 repeats every
    row (rank deficiency). Returned as float32, the dtype residuals arrive in.
    """
    gen = torch.Generator().manual_seed(seed)
    bads, goods = [], []
    for _ in range(LAYERS):
        basis, _ = torch.linalg.qr(torch.randn(d, min(d, 8), generator=gen, dtype=torch.float64))
        e = basis.T  # [8, d]
        mean_good = 5 * torch.randn(d, generator=gen, dtype=torch.float64)
        shift = 3 * normalize(e[7] + 0.3 * e[0] + 0.2 * e[1])
        mb = min(len(HARMFUL_SPECTRUM), n_bad - 1)
        mg = min(len(HARMLESS_SPECTRUM), n_good - 1)
        zb = _centred_orthogonal(n_bad, mb, gen) * torch.tensor(HARMFUL_SPECTRUM[:mb], dtype=torch.float64).sqrt()
        zg = _centred_orthogonal(n_good, mg, gen) * torch.tensor(HARMLESS_SPECTRUM[:mg], dtype=torch.float64).sqrt()
        bad = mean_good + shift + zb @ e[:mb] + noise * torch.randn(n_bad, d, generator=gen, dtype=torch.float64)
        good = mean_good + zg @ e[5 : 5 + mg] + noise * torch.randn(n_good, d, generator=gen, dtype=torch.float64)
        bads.append(bad.repeat_interleave(repeat, 0))
        goods.append(good.repeat_interleave(repeat, 0))
    return torch.stack(bads, 1).float(), torch.stack(goods, 1).float()


def reference(
    bad: torch.Tensor, good: torch.Tensor, alpha: float, k: int, projected: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
    """Dense float64 maths, one layer at a time: (directions [L,k,d], eigenvalues [L,k-1], max k).

    Directions are None when k exceeds the max k (fewer positive eigenvalues than k-1).
    """
    b, g = bad.double(), good.double()
    dirs, vals, positives = [], [], []
    for layer in range(b.shape[1]):
        xb, xg = b[:, layer], g[:, layer]
        diff = xb.mean(0) - xg.mean(0)
        r = diff / diff.norm()
        if projected:
            gh = xg.mean(0) / xg.mean(0).norm()
            r = r - (r @ gh) * gh
            r = r / r.norm()
        c = torch.cov(xb.T) - alpha * torch.cov(xg.T)
        p = torch.eye(len(r), dtype=torch.float64) - torch.outer(r, r)
        w, v = torch.linalg.eigh(p @ c @ p)
        w, v = w.flip(0), v.flip(1)  # descending
        positives.append(int((w > 1e-9 * w.abs().max()).sum()))
        vectors = [r]
        for j in range(k - 1):
            x = v[:, j]
            i = int(x.abs().argmax())
            vectors.append(x if x[i] > 0 else -x)
        dirs.append(torch.stack(vectors))
        vals.append(w[: k - 1])
    max_k = 1 + min(positives)
    if k > max_k:
        return None, None, max_k
    return torch.stack(dirs), torch.stack(vals), max_k


def assert_orthonormal(directions: torch.Tensor, tol: float = 1e-5) -> None:
    gram = directions.double() @ directions.double().mT
    eye = torch.eye(directions.shape[1], dtype=torch.float64, device=directions.device)
    assert (gram - eye).abs().max().item() < tol


def assert_sign_rule(directions: torch.Tensor, bad: torch.Tensor, good: torch.Tensor) -> None:
    diff = bad.double().mean(0) - good.double().mean(0)
    assert ((directions[:, 0].double().cpu() * diff.cpu()).sum(-1) > 0).all()
    for layer in range(directions.shape[0]):
        for j in range(1, directions.shape[1]):
            x = directions[layer, j].cpu()
            assert x[int(x.abs().argmax())] > 0


def assert_matches_reference(result: ContrastivePCA, ref_dirs: torch.Tensor, ref_vals: torch.Tensor) -> None:
    dirs = result.directions.double().cpu()
    assert dirs.shape == ref_dirs.shape
    cos = (dirs * ref_dirs).sum(-1)
    # Signed: the sign convention is part of the contract, so |cos| alone would be too weak.
    assert cos.min().item() >= 0.9999, cos
    vals = result.eigenvalues.double().cpu()
    assert vals.shape == ref_vals.shape
    if ref_vals.numel():
        assert ((vals - ref_vals).abs() / ref_vals.abs()).max().item() <= 1e-4
    assert_orthonormal(result.directions)


CASES = {
    "n<d": dict(n_bad=6, n_good=5, d=32),
    "n>d": dict(n_bad=40, n_good=30, d=8),
    "rank-deficient": dict(n_bad=4, n_good=3, d=24, noise=0.0, repeat=2),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("method", ["auto", "gram", "dense"])
@pytest.mark.parametrize("projected", [False, True], ids=["plain", "projected"])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("case", list(CASES))
def test_contrastive_pca_matches_dense_reference(case, alpha, projected, method, dtype):
    bad, good = planted(**CASES[case], seed=len(case))
    for k in range(1, 6):
        ref_dirs, ref_vals, max_k = reference(bad, good, alpha, k, projected)
        if ref_dirs is None:
            with pytest.raises(DirectionError, match=f"largest k that works is {max_k}"):
                contrastive_pca(bad, good, alpha=alpha, k=k, projected=projected, dtype=dtype, method=method)
            continue
        result = contrastive_pca(bad, good, alpha=alpha, k=k, projected=projected, dtype=dtype, method=method)
        assert result.directions.dtype == dtype and result.eigenvalues.dtype == dtype
        assert_matches_reference(result, ref_dirs, ref_vals)


def test_reference_cases_cover_the_k_limit():
    # Guards the test above: the rank-deficient case must hit the k limit, the others not.
    assert reference(*planted(**CASES["rank-deficient"], seed=1), 1.0, 5, False)[0] is None
    assert reference(*planted(**CASES["n<d"], seed=1), 1.0, 5, False)[0] is not None
    assert reference(*planted(**CASES["n>d"], seed=1), 2.0, 5, False)[0] is not None


def test_deterministic_with_sign_rule():
    bad, good = planted(12, 10, 40, seed=3)
    first = contrastive_pca(bad, good, k=4)
    second = contrastive_pca(bad.clone(), good.clone(), k=4)
    assert torch.equal(first.directions, second.directions)
    assert torch.equal(first.eigenvalues, second.eigenvalues)
    assert_sign_rule(first.directions, bad, good)
    assert (first.eigenvalues[:, :-1] > first.eigenvalues[:, 1:]).all()


def test_k1_is_the_normalised_mean_difference():
    bad, good = planted(7, 9, 16, seed=4)
    expected = bad.double().mean(0) - good.double().mean(0)
    expected = expected / expected.norm(dim=-1, keepdim=True)
    for directions in (
        contrastive_pca(bad, good, k=1).directions,
        compute_directions(bad, good, method="contrastive_pca", k=1),
        compute_directions(bad, good),
    ):
        assert directions.shape == (LAYERS, 1, 16) and directions.dtype == torch.float32
        assert torch.allclose(directions[:, 0].double(), expected, atol=1e-6)
    assert contrastive_pca(bad, good, k=1).eigenvalues.shape == (LAYERS, 0)


def test_projected_mean_difference_is_orthogonal_to_the_harmless_mean():
    bad, good = planted(7, 9, 16, seed=5)
    mu_g = good.double().mean(0)
    diff = bad.double().mean(0) - mu_g
    for r in (
        compute_directions(bad, good, projected=True)[:, 0],
        contrastive_pca(bad, good, k=3, projected=True).directions[:, 0],
    ):
        r = r.double()
        assert ((r * mu_g).sum(-1) / mu_g.norm(dim=-1)).abs().max() < 1e-6
        assert torch.allclose(r.norm(dim=-1), torch.ones(LAYERS, dtype=torch.float64), atol=1e-6)
        assert ((r * diff).sum(-1) > 0).all()


def test_orthogonalize_removes_the_component_and_keeps_order():
    gen = torch.Generator().manual_seed(6)
    directions = torch.randn(LAYERS, 3, 20, generator=gen, dtype=torch.float64)
    against = torch.randn(LAYERS, 20, generator=gen, dtype=torch.float64)
    out = orthogonalize(directions, against)
    assert out.shape == directions.shape
    a = against / against.norm(dim=-1, keepdim=True)
    assert (out * a[:, None]).sum(-1).abs().max() < 1e-12
    assert_orthonormal(out, 1e-12)
    # Classical Gram-Schmidt by hand: against first, then each direction in order.
    for layer in range(LAYERS):
        basis = [a[layer]]
        for j in range(3):
            v = directions[layer, j].clone()
            for u in basis:
                v = v - (v @ u) * u
            v = v / v.norm()
            assert torch.allclose(out[layer, j], v, atol=1e-10)
            basis.append(v)


def test_orthonormalize_is_signed_gram_schmidt_in_order():
    gen = torch.Generator().manual_seed(9)
    vectors = torch.randn(LAYERS, 3, 20, generator=gen, dtype=torch.float64)
    vectors[:, 1] *= -5  # signs and scales must not matter
    out = orthonormalize(vectors)
    assert out.shape == vectors.shape and out.dtype == torch.float64
    assert_orthonormal(out, 1e-12)
    for layer in range(LAYERS):  # classical Gram-Schmidt by hand
        basis = []
        for j in range(3):
            v = vectors[layer, j].clone()
            for u in basis:
                v = v - (v @ u) * u
            basis.append(v / v.norm())
            assert torch.allclose(out[layer, j], basis[-1], atol=1e-12)
    assert ((out * vectors).sum(-1) > 0).all()  # each row keeps its input's sign
    # Unbatched [k, d], and half precision computed in float32 and returned as it came.
    assert torch.equal(orthonormalize(vectors[0]), out[0])
    half = orthonormalize(vectors[0].bfloat16())
    assert half.dtype == torch.bfloat16
    assert torch.equal(half, orthonormalize(vectors[0].bfloat16().float()).bfloat16())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_orthonormalize_rejects_rows_left_as_rounding_noise(dtype):
    eps = torch.finfo(dtype).eps
    base = torch.eye(2, 8, dtype=dtype)
    # Row 1 keeps 10 sqrt(eps) of its norm off row 0: kept. 0.1 sqrt(eps): rounding noise.
    kept = base.clone()
    kept[1] = base[0] + 10 * eps**0.5 * base[1]
    assert_orthonormal(orthonormalize(kept)[None], 1e-5 if dtype == torch.float32 else 1e-12)
    lost = base.clone()
    lost[1] = base[0] + 0.1 * eps**0.5 * base[1]
    with pytest.raises(DirectionError, match="direction 1 lies in the span"):
        orthonormalize(lost)
    with pytest.raises(DirectionError, match="direction 0 at layer 2"):
        orthonormalize(torch.stack([base, base, torch.zeros_like(base)]))


def test_orthogonalize_rejects_a_direction_inside_against():
    against = torch.randn(LAYERS, 10, dtype=torch.float64)
    with pytest.raises(DirectionError, match="span"):
        orthogonalize(2 * against[:, None], against)


@pytest.mark.parametrize("method,k", [("mean_diff", 1), ("contrastive_pca", 3)])
def test_unhelpful_directions_are_orthogonal_to_h(method, k):
    bad, good = planted(8, 8, 24, seed=7)
    unhelpful = good + 0.5 * torch.randn(1, LAYERS, 24, generator=torch.Generator().manual_seed(8))
    h = good.double().mean(0) - unhelpful.double().mean(0)
    h = h / h.norm(dim=-1, keepdim=True)
    plain = compute_directions(bad, good, method=method, k=k).double()
    out = compute_directions(bad, good, method=method, k=k, unhelpful=unhelpful)
    assert out.shape == (LAYERS, k, 24)
    assert (out.double() * h[:, None]).sum(-1).abs().max() < 1e-5
    assert_orthonormal(out)
    # The first direction is the refusal direction with its h component removed.
    first = plain[:, 0] - (plain[:, 0] * h).sum(-1, keepdim=True) * h
    assert torch.allclose(out[:, 0].double(), first / first.norm(dim=-1, keepdim=True), atol=1e-5)


def test_k_too_large_names_the_max_k():
    bad, good = planted(4, 6, 30, seed=9, noise=0.0)  # 3 harmful samples of variance -> rank 3
    assert contrastive_pca(bad, good, k=4).directions.shape == (LAYERS, 4, 30)
    with pytest.raises(DirectionError, match="largest k that works is 4"):
        contrastive_pca(bad, good, k=5)
    with pytest.raises(ValueError):  # DirectionError is a ValueError for library callers
        compute_directions(bad, good, method="contrastive_pca", k=40)


def test_bad_arguments_raise():
    bad, good = planted(5, 5, 12, seed=10)
    with pytest.raises(ValueError, match="k=2"):
        compute_directions(bad, good, method="mean_diff", k=2)
    with pytest.raises(ValueError, match="method"):
        compute_directions(bad, good, method="pca")
    with pytest.raises(ValueError, match="method"):
        contrastive_pca(bad, good, method="lanczos")
    with pytest.raises(ValueError, match="must match"):
        compute_directions(bad, good[:, :, :6])
    with pytest.raises(ValueError, match="k must be"):
        contrastive_pca(bad, good, k=0)
    with pytest.raises(ValueError, match="coincide"):
        compute_directions(good, good)
    with pytest.raises(ValueError, match="2 prompts"):
        contrastive_pca(bad[:1], good, k=2)
    broken = bad.clone()
    broken[2, 1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"harmful residuals contain NaN or inf at layers \[1\]"):
        compute_directions(broken, good)
    with pytest.raises(ValueError, match="unhelpful residuals contain NaN"):
        compute_directions(bad, good, unhelpful=good * float("inf"))


def test_alpha_zero_ignores_harmless_covariance():
    bad, good = planted(6, 1, 16, seed=11)  # one harmless prompt: no covariance, and none needed
    ref_dirs, ref_vals, _ = reference(bad, torch.cat([good, good]), 0.0, 3, False)
    assert_matches_reference(contrastive_pca(bad, good, alpha=0.0, k=3), ref_dirs, ref_vals)


def test_auto_picks_the_cheaper_path(monkeypatch):
    calls = []
    geqrf = torch.geqrf
    monkeypatch.setattr(torch, "geqrf", lambda *a, **kw: calls.append(1) or geqrf(*a, **kw))
    contrastive_pca(*planted(6, 5, 32, seed=12), k=2)  # n < d: sample space
    assert calls == [1]
    contrastive_pca(*planted(40, 30, 8, seed=12), k=2)  # d <= n: dense
    assert calls == [1]


def test_half_precision_inputs_give_fp32():
    bad, good = planted(6, 5, 32, seed=13)
    out = compute_directions(bad.bfloat16(), good.bfloat16(), method="contrastive_pca", k=3)
    assert out.dtype == torch.float32
    assert_orthonormal(out)
    assert compute_directions(bad.double(), good.double()).dtype == torch.float64


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(CASES))
def test_contrastive_pca_matches_dense_reference_cuda(case):
    bad, good = planted(**CASES[case], seed=len(case))
    for alpha, projected, k in [(0.0, False, 3), (1.0, True, 4), (2.0, False, 5)]:
        ref_dirs, ref_vals, max_k = reference(bad, good, alpha, k, projected)
        for method in ("auto", "gram", "dense"):
            args = dict(alpha=alpha, k=k, projected=projected, method=method)
            if ref_dirs is None:
                with pytest.raises(DirectionError, match=f"largest k that works is {max_k}"):
                    contrastive_pca(bad.cuda(), good.cuda(), **args)
                continue
            result = contrastive_pca(bad.cuda(), good.cuda(), **args)
            assert result.directions.is_cuda and result.eigenvalues.is_cuda
            assert_matches_reference(result, ref_dirs, ref_vals)
    out = compute_directions(bad.cuda(), good.cuda(), method="contrastive_pca", k=2, unhelpful=good.cuda() + 1)
    assert out.is_cuda and out.shape == (LAYERS, 2, bad.shape[2])


def test_winsorize_clamps_at_the_pooled_magnitude_quantile():
    gen = torch.Generator().manual_seed(0)
    bad, good = torch.randn(7, LAYERS, 5, generator=gen), torch.randn(4, LAYERS, 5, generator=gen) * 3
    clamped = winsorize(0.9, bad, good)
    for layer in range(LAYERS):
        magnitudes = sorted(torch.cat([bad[:, layer], good[:, layer]]).abs().flatten().tolist())
        bound = magnitudes[math.ceil(0.9 * len(magnitudes)) - 1]  # the k-th smallest, k = ceil(q N)
        for x, y in zip((bad, good), clamped, strict=True):
            expected = x[:, layer].clamp(-bound, bound)
            assert torch.equal(y[:, layer], expected)
        assert max(float(y[:, layer].abs().max()) for y in clamped) == bound  # some coordinate was clamped to it
    assert winsorize(1.0, bad, good)[0] is bad  # 1: untouched
    assert winsorize(0.9, bad, None, good)[1] is None  # an absent role passes through
    for quantile in (0.0, 1.5):
        with pytest.raises(DirectionError, match="winsorize"):
            winsorize(quantile, bad, good)


def test_winsorize_one_is_bit_identical_to_no_winsorizing():
    bad, good = planted(20, 12, 16, seed=4)
    for method, k in (("mean_diff", 1), ("contrastive_pca", 2)):
        plain = compute_directions(bad, good, method=method, k=k, projected=True, unhelpful=good[:5])
        same = compute_directions(
            bad, good, method=method, k=k, projected=True, unhelpful=good[:5], winsorize_quantile=1.0
        )
        assert torch.equal(plain, same)


def test_winsorize_keeps_a_massive_activation_from_tilting_the_direction():
    # Refusal shifts dimension 0 by 1; dimension 1 is a massive activation (a few prompts at +-500,
    # unrelated to the class) that tilts the mean difference by chance.
    gen = torch.Generator().manual_seed(1)
    d, n = 32, 40
    bad, good = torch.randn(n, 1, d, generator=gen) * 0.1, torch.randn(n, 1, d, generator=gen) * 0.1
    bad[:, 0, 0] += 1.0
    bad[:3, 0, 1], good[:1, 0, 1] = 500.0, -500.0
    truth = torch.zeros(d)
    truth[0] = 1.0
    plain = compute_directions(bad, good)[0, 0]
    clamped = compute_directions(bad, good, winsorize_quantile=0.99)[0, 0]
    assert abs(float(plain @ truth)) < 0.1  # the outliers own the plain direction
    assert float(clamped @ truth) > 0.95
