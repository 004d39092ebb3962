"""`abliterate inspect`: per-layer views of a run dir, recomputed here from the cached residuals."""

import csv
import json

import numpy as np
import pytest
import torch
from helpers import run_cli
from safetensors.torch import load_file

from abliterate.directions import winsorize
from abliterate.inspect_views import layer_table, projections_2d
from abliterate.options import DirectionOptions


@pytest.fixture(scope="module")
def inspected(finished_organism_run, tmp_path_factory):
    """A copy of the session's 3-trial run of the organism, for `inspect` twice (mean difference, then
    contrastive PCA)."""
    from helpers import copy_run

    out, _, _ = copy_run(finished_organism_run, tmp_path_factory.mktemp("inspect"))
    return out


def _rows(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def _cached(out):
    (path,) = sorted((out / "cache").glob("residuals-*.safetensors"))
    return load_file(str(path))


def _image(path):
    from PIL import Image

    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 50
        return image.size


def test_inspect_writes_the_views_recomputed_from_the_cache(inspected, capsys, monkeypatch):
    from abliterate.pipeline import Pipeline

    def no_pass(self, pass_, *args, **kwargs):
        raise AssertionError(f"inspect ran {type(pass_).__name__}: the residuals are cached")

    monkeypatch.setattr(Pipeline, "run_pass", no_pass)
    out = inspected
    before = sorted(p.name for p in (out / "cache").iterdir())
    code, stdout, err = run_cli(["inspect", "--output_dir", str(out)], capsys)
    assert code == 0, err
    written = json.loads(stdout.strip().splitlines()[-1])
    assert set(written) == {"layers_csv", "layers_png", "projections_png", "pareto_png"}
    assert sorted(p.name for p in (out / "cache").iterdir()) == before

    residuals = _cached(out)
    # inspect reads the residuals as the run's directions do: clamped first (direction.winsorize's default)
    bad, good = winsorize(DirectionOptions.winsorize, residuals["harmful"].double(), residuals["harmless"].double())
    n_layers = bad.shape[1]
    rows = _rows(out / "inspect" / "layers.csv")
    assert len(rows) == n_layers and [int(r["layer"]) for r in rows] == list(range(n_layers))
    assert not any(c.startswith("eig_") for c in rows[0])

    # The run's default direction: the mean difference made orthogonal to the harmless mean (projected).
    mu_b, mu_g = bad.mean(0), good.mean(0)
    diff = mu_b - mu_g
    unit = diff / diff.norm(dim=-1, keepdim=True)
    g = mu_g / mu_g.norm(dim=-1, keepdim=True)
    r = unit - (unit * g).sum(-1, keepdim=True) * g
    if "unhelpful" in residuals:  # not in the organism's config; the table would orthogonalise to it
        pytest.fail("the organism's run has unhelpful residuals: extend this recomputation")
    r = r / r.norm(dim=-1, keepdim=True)
    for layer, row in enumerate(rows):
        assert float(row["mean_diff_norm"]) == pytest.approx(float(diff[layer].norm()), abs=1e-5)
        pb, pg = bad[:, layer] @ r[layer], good[:, layer] @ r[layer]
        d_prime = (pb.mean() - pg.mean()) / torch.sqrt((pb.var() + pg.var()) / 2)
        assert float(row["d_prime"]) == pytest.approx(float(d_prime), abs=1e-4)
        if layer == 0:
            assert row["cos_prev"] == ""
        else:
            cos = float(r[layer] @ r[layer - 1])
            assert float(row["cos_prev"]) == pytest.approx(cos, abs=1e-5)
    assert max(float(r["d_prime"]) for r in rows) > 1  # the organism's refusal is linearly separable somewhere

    for name in ("layers.png", "projections.png", "pareto.png"):
        _image(out / "inspect" / name)
    import matplotlib.pyplot as plt

    assert plt.imread(out / "inspect" / "projections.png").ndim == 3


def test_inspect_with_contrastive_pca_adds_the_eigenvalue_spectrum(inspected, capsys):
    from abliterate.directions import contrastive_pca

    out = inspected
    args = ["inspect", "--output_dir", str(out), "--direction.method", "contrastive_pca", "--direction.k", "3"]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    rows = _rows(out / "inspect" / "layers.csv")
    residuals = _cached(out)
    bad, good = winsorize(DirectionOptions.winsorize, residuals["harmful"].double(), residuals["harmless"].double())
    spectrum = contrastive_pca(bad, good, k=3, projected=True, dtype=torch.float64).eigenvalues
    assert len(rows) == bad.shape[1]
    for layer, row in enumerate(rows):
        got = [float(row["eig_1"]), float(row["eig_2"])]
        assert got == pytest.approx(spectrum[layer].tolist(), rel=1e-6, abs=1e-8)
        assert got[0] >= got[1] > 0
    _image(out / "inspect" / "layers.png")


def test_layer_table_and_projections_on_plain_tensors():
    torch.manual_seed(0)
    bad = torch.randn(12, 4, 8, dtype=torch.float64) + torch.tensor([3.0] + [0.0] * 7, dtype=torch.float64)
    good = torch.randn(10, 4, 8, dtype=torch.float64)
    rows = layer_table(bad, good)
    assert [r["layer"] for r in rows] == [0, 1, 2, 3] and rows[0]["cos_prev"] is None
    for row in rows:
        assert row["d_prime"] > 2 and row["harmful_proj_mean"] > row["harmless_proj_mean"]
    coords = projections_2d(bad, good)
    assert coords.shape == (22, 4, 2)
    # The first component carries the class shift: harmful points sit right of harmless ones.
    assert (coords[:12, :, 0].mean(0) > coords[12:, :, 0].mean(0)).all()
    # The coordinates are the residuals' projections onto two orthonormal axes: pairwise distances shrink.
    pooled = torch.cat([bad, good])[:, 0]
    assert np.all(torch.cdist(coords[:, 0], coords[:, 0]).numpy() <= torch.cdist(pooled, pooled).numpy() + 1e-9)


def test_layer_table_reads_the_residuals_the_directions_read():
    from abliterate.directions import winsorize

    torch.manual_seed(1)
    bad, good = torch.randn(12, 3, 8, dtype=torch.float64) + 1.0, torch.randn(10, 3, 8, dtype=torch.float64)
    bad[0, :, 5] = 80.0  # a massive activation
    clamped = layer_table(bad, good, winsorize=0.9)
    assert clamped == layer_table(*winsorize(0.9, bad, good))
    assert clamped != layer_table(bad, good)


def test_inspect_without_a_run_dir_study_writes_no_pareto(organism_config, organism_dir, tmp_path, capsys):
    out = tmp_path / "fresh"
    args = ["inspect", "--config", str(organism_config), "--model", str(organism_dir), "--output_dir", str(out)]
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    written = json.loads(stdout.strip().splitlines()[-1])
    assert "pareto_png" not in written and (out / "inspect" / "layers.csv").is_file()
    assert not (out / "study.db").exists()


def test_second_direction_is_large_where_two_directions_carry_the_shift_and_exact():
    from abliterate.inspect_views import second_direction

    torch.manual_seed(0)
    d, n = 8, 40
    e1, e2 = torch.eye(d, dtype=torch.float64)[:2]
    good = 0.05 * torch.randn(n, 1, d, dtype=torch.float64)
    noise = 0.05 * torch.randn(n, 1, d, dtype=torch.float64)
    two = noise + torch.cat([2 * e1.expand(n // 2, 1, d), 2 * e2.expand(n // 2, 1, d)])  # two families
    one = noise + 2 * e1  # one shift for every prompt

    # Reference: the dense eigenproblem of P C P, C = S_b - S_g, P removing the mean difference.
    def reference(bad):
        diff = bad.mean(0)[0] - good.mean(0)[0]
        r = diff / diff.norm()
        p = torch.eye(d, dtype=torch.float64) - torch.outer(r, r)
        c = torch.cov(bad[:, 0].T) - torch.cov(good[:, 0].T)
        return torch.linalg.eigvalsh(p @ c @ p)[-1] / diff.square().sum()

    for bad in (two, one):
        assert second_direction(bad, good).tolist() == pytest.approx([float(reference(bad))], rel=1e-9)
    # Two families at +-sqrt(2) along (e1 - e2)/sqrt(2) around a mean difference of norm sqrt(2): ratio n/(n-1).
    assert float(second_direction(two, good)[0]) == pytest.approx(n / (n - 1), rel=0.05)
    assert float(second_direction(one, good)[0]) < 0.01
    rows = layer_table(two, good)
    assert rows[0]["second_direction"] == pytest.approx(float(second_direction(two, good)[0]))
    # Too few prompts for a second direction: the column is empty, the table still written.
    assert layer_table(two[:1], good[:1])[0]["second_direction"] is None
