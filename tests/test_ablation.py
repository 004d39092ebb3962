"""Directional ablation maths and the two ways of applying it: weight edits (`WeightEditor`) and
forward hooks (`ablation_hooks` of scripts/bench_ablation.py, checked here as the benchmark's twin).

Every expected value comes from an independent reference: a float64 column-by-column loop for
the projection, hand-computed tent values for the kernel, explicit lerps for interpolation and
snapshots of the untouched model for the editor. The model tests use a tiny Llama built from a
config (3 layers, hidden 32) and its writers as `abliterate.models.residual_writers` finds them.
"""

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from abliterate.ablation import (
    AblationParams,
    ComponentKernel,
    WeightEditor,
    ablation_directions,
    interpolate_directions,
    layer_weights,
    orthogonalize_bias,
    orthogonalize_weight,
)
from abliterate.models import residual_writers
from abliterate.writers import WriterRef

D_MODEL = 32
N_LAYERS = 3


def _bench_ablation():
    """scripts/bench_ablation.py, where the forward-hook mechanism lives (it benchmarks it)."""
    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_ablation.py"
    spec = importlib.util.spec_from_file_location("bench_ablation", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ablation_hooks = _bench_ablation().ablation_hooks


def orthonormal(k: int, d: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[k, d] random rows, orthonormal to the precision of `dtype` (made in float64)."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=torch.float64))
    return q.T.contiguous().to(dtype)


def stacked(n_layers: int, k: int, d: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[n_layers, k, d]: an independent orthonormal set per layer."""
    return torch.stack([orthonormal(k, d, seed + i, dtype) for i in range(n_layers)])


def reference_orthogonalize(weight, directions, weights, out_dim, norm_preserving=False):
    """float64, one column (vector along the out axis) at a time:
    c' = c - sum_j w_j (r_j . c) r_j, then rescaled to |c| when norm_preserving."""
    w = weight.double()
    batched = w.dim() == 3
    if not batched:
        w = w[None]
    r = directions.double()
    coef = [float(x) for x in weights]
    out = w.clone()
    for e in range(w.shape[0]):
        n_columns = w.shape[-1] if out_dim == -2 else w.shape[-2]
        for i in range(n_columns):
            c = w[e, :, i] if out_dim == -2 else w[e, i, :]
            new = c.clone()
            for j in range(r.shape[0]):
                new = new - coef[j] * torch.dot(r[j], c) * r[j]
            if norm_preserving:
                new = new * (c.norm() / new.norm())
            if out_dim == -2:
                out[e, :, i] = new
            else:
                out[e, i, :] = new
    return out if batched else out[0]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a.norm() / b.norm())


# ---- orthogonalize_weight / orthogonalize_bias: exact maths -----------------------------------

LAYOUTS = {
    "linear": ((D_MODEL, 20), -2),  # nn.Linear [d_model, d_in]
    "experts_out_-2": ((4, D_MODEL, 20), -2),  # fused experts [E, d_model, d_in]
    "experts_out_-1": ((4, 20, D_MODEL), -1),  # fused experts [E, d_in, d_model]
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("norm_preserving", [False, True])
def test_orthogonalize_weight_matches_reference_loop(layout, k, norm_preserving):
    shape, out_dim = LAYOUTS[layout]
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    dirs = orthonormal(k, D_MODEL, seed=2, dtype=torch.float64)
    coef = torch.tensor([0.7, 0.45, 1.3][:k], dtype=torch.float64)  # weights != 1 (and one > 1)
    expected = reference_orthogonalize(weight, dirs, coef, out_dim, norm_preserving)
    assert (expected - weight).abs().max() > 0.1  # the reference does edit: a no-op would fail below
    before = weight.clone()

    got64 = orthogonalize_weight(weight, dirs, coef, out_dim=out_dim, norm_preserving=norm_preserving)
    assert got64.dtype == torch.float64 and got64.shape == weight.shape
    torch.testing.assert_close(got64, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(weight, before), "the input must not be edited in place"

    w32 = weight.float()
    got32 = orthogonalize_weight(w32, dirs.float(), coef, out_dim=out_dim, norm_preserving=norm_preserving)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(w32, weight.float()), "a float32 input (used without a copy) must stay untouched"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_orthogonalize_weight_keeps_bf16(layout):
    shape, out_dim = LAYOUTS[layout]
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(3)).bfloat16()
    dirs = orthonormal(2, D_MODEL, seed=4)
    coef = torch.tensor([0.9, 0.6])
    got = orthogonalize_weight(weight, dirs, coef, out_dim=out_dim)
    assert got.dtype == torch.bfloat16 and got.shape == weight.shape
    expected = reference_orthogonalize(weight, dirs, coef, out_dim).to(torch.bfloat16)
    # computed in fp32 and rounded once: within a bf16 ulp of the rounded float64 reference
    torch.testing.assert_close(got.double(), expected.double(), rtol=2**-7, atol=1e-2)


def test_orthogonalize_bias_matches_reference():
    bias = torch.randn(5, D_MODEL, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    dirs = orthonormal(2, D_MODEL, seed=6, dtype=torch.float64)
    coef = torch.tensor([0.8, 0.3], dtype=torch.float64)
    expected = torch.stack([b - sum(float(coef[j]) * torch.dot(dirs[j], b) * dirs[j] for j in range(2)) for b in bias])
    torch.testing.assert_close(orthogonalize_bias(bias, dirs, coef), expected, rtol=1e-12, atol=1e-12)
    got = orthogonalize_bias(bias[0].bfloat16(), dirs.float(), coef)
    assert got.dtype == torch.bfloat16 and got.shape == (D_MODEL,)


def test_shape_mismatches_raise():
    weight = torch.randn(D_MODEL, 8)
    with pytest.raises(ValueError, match="directions must be"):
        orthogonalize_weight(weight, orthonormal(1, 16, seed=0), torch.ones(1))
    with pytest.raises(ValueError, match="weights for"):
        orthogonalize_weight(weight, orthonormal(2, D_MODEL, seed=0), torch.ones(3))


# ---- projection: r^T W' = 0 -----------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3])
def test_full_weight_removes_the_directions(k):
    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(64, 48, generator=gen) * 3
    r = orthonormal(k, 64, seed=8)
    assert relative(r @ weight, weight) > 1e-2, "a random weight writes along r to begin with"
    edited = orthogonalize_weight(weight, r, torch.ones(k))
    assert relative(r @ edited, weight) <= 1e-6

    linear = nn.Linear(48, 64, bias=False)
    with torch.no_grad():
        linear.weight.copy_(edited)
        x = torch.randn(100, 48, generator=gen)
        y = linear(x)
    assert ((y @ r.T).abs() <= 1e-6 * y.norm(dim=-1, keepdim=True)).all()
    # and nothing else changes: y is the original output minus its component in span(r)
    y0 = x @ weight.T
    torch.testing.assert_close(y, y0 - (y0 @ r.T) @ r, rtol=1e-5, atol=1e-5)


def test_norm_preserving_rescales_columns_not_rows():
    weight = torch.randn(D_MODEL, 48, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    r = orthonormal(2, D_MODEL, seed=10, dtype=torch.float64)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        w = weight.to(dtype)
        edited = orthogonalize_weight(w, r.to(dtype), torch.ones(2), norm_preserving=True)
        torch.testing.assert_close(edited.norm(dim=0), w.norm(dim=0), rtol=tol, atol=0)  # column norms kept
        assert relative(r.to(dtype) @ edited, w) <= tol  # still exactly ablated at w = 1
        assert not torch.allclose(edited, orthogonalize_weight(w, r.to(dtype), torch.ones(2)))  # it did rescale
    # Counter-check: rescaling the ROWS of the projected weight (the d_model axis) back to their old
    # norms multiplies each residual coordinate by its own factor, which brings r back.
    projected = weight - r.T @ (r @ weight)
    rows = projected * (weight.norm(dim=1) / projected.norm(dim=1))[:, None]
    torch.testing.assert_close(rows.norm(dim=1), weight.norm(dim=1))
    assert relative(r @ rows, weight) > 1e-3


def test_norm_preserving_leaves_a_fully_projected_column_zero():
    r = orthonormal(1, 8, seed=11, dtype=torch.float64)
    weight = torch.cat(
        [r.T * 2.0, torch.randn(8, 3, generator=torch.Generator().manual_seed(12), dtype=torch.float64)], 1
    )
    edited = orthogonalize_weight(weight, r, torch.ones(1), norm_preserving=True)
    assert edited[:, 0].abs().max() < 1e-12  # round-off is not blown up to the old norm
    assert torch.isfinite(edited).all()
    torch.testing.assert_close(edited[:, 1:].norm(dim=0), weight[:, 1:].norm(dim=0))


# ---- the layer kernel -----------------------------------------------------------------------------


def test_kernel_tent_values_at_a_fractional_peak():
    kernel = ComponentKernel(max_weight=0.8, max_weight_position=2.5, min_weight=0.2, min_weight_distance=2.0)
    got = layer_weights(kernel, 7)
    # distances 2.5 1.5 0.5 0.5 1.5 2.5 3.5 -> 0.8 + (d / 2) * (0.2 - 0.8) within 2, else 0
    expected = torch.tensor([0.0, 0.35, 0.65, 0.65, 0.35, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-12)
    assert got.max() < kernel.max_weight  # no layer sits on the peak


def test_kernel_min_weight_at_the_edge_and_zero_beyond():
    kernel = ComponentKernel(max_weight=1.0, max_weight_position=3.0, min_weight=0.25, min_weight_distance=2.0)
    got = layer_weights(kernel, 7)
    expected = torch.tensor([0.0, 0.25, 0.625, 1.0, 0.625, 0.25, 0.0], dtype=torch.float64)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-12)


def test_kernel_is_symmetric():
    n = 12
    kernel = ComponentKernel(max_weight=1.3, max_weight_position=(n - 1) / 2, min_weight=0.1, min_weight_distance=3.7)
    got = layer_weights(kernel, n)
    torch.testing.assert_close(got, got.flip(0), rtol=0, atol=1e-12)
    distance = (torch.arange(n) - kernel.max_weight_position).abs()
    assert (got[distance > kernel.min_weight_distance] == 0).all()
    assert (got[distance <= kernel.min_weight_distance] > 0).all()


@pytest.mark.parametrize(
    "kernel",
    [
        ComponentKernel(min_weight_distance=0.0),
        ComponentKernel(min_weight_distance=-1.0),
        ComponentKernel(max_weight=-0.1),
        ComponentKernel(min_weight=-0.1),
        ComponentKernel(max_weight=math.nan),
        ComponentKernel(min_weight=math.nan),
        ComponentKernel(min_weight_distance=math.nan),
        ComponentKernel(max_weight_position=math.nan),
        ComponentKernel(max_weight=math.inf),
        ComponentKernel(min_weight_distance=math.inf),
    ],
)
def test_kernel_rejects_invalid(kernel):
    with pytest.raises(ValueError):
        layer_weights(kernel, 5)


def test_kernel_rejects_no_layers():
    with pytest.raises(ValueError, match="n_layers"):
        layer_weights(ComponentKernel(), 0)


# ---- direction interpolation ----------------------------------------------------------------------


def test_interpolation_integer_index_is_exact():
    dirs = stacked(4, 3, 16, seed=20)
    for index in (0, 2, 2.0, 3):
        assert torch.equal(interpolate_directions(dirs, index), dirs[int(index)])
    assert ablation_directions(dirs, None) is dirs
    everywhere = ablation_directions(dirs, 1)
    assert everywhere.shape == dirs.shape and all(torch.equal(everywhere[i], dirs[1]) for i in range(4))


@pytest.mark.parametrize("index,low,frac", [(1.25, 1, 0.25), (1.5, 1, 0.5), (2.9, 2, 0.9)])
def test_interpolation_fractional_k1_is_normalised_lerp(index, low, frac):
    dirs = stacked(4, 1, 16, seed=30, dtype=torch.float64)
    got = interpolate_directions(dirs, index)
    lerp = (1 - frac) * dirs[low, 0] + frac * dirs[low + 1, 0]
    torch.testing.assert_close(got[0], lerp / lerp.norm(), rtol=1e-12, atol=1e-12)
    assert ablation_directions(dirs, index).shape == dirs.shape


def test_interpolation_fractional_k3_is_orthonormal_span_of_lerp():
    dirs = stacked(4, 3, 16, seed=40, dtype=torch.float64)
    got = interpolate_directions(dirs, 0.6)
    torch.testing.assert_close(got @ got.T, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-12)
    lerp = 0.4 * dirs[0] + 0.6 * dirs[1]
    torch.testing.assert_close(got[0], lerp[0] / lerp[0].norm(), rtol=1e-12, atol=1e-12)  # first row: its lerp
    torch.testing.assert_close((lerp @ got.T) @ got, lerp, rtol=1e-10, atol=1e-10)  # same span as the lerps
    assert ((got * lerp).sum(-1) > 0).all()  # each row agrees in sign with its lerp


def test_interpolation_of_float32_and_bf16_directions():
    dirs = stacked(3, 2, 16, seed=50)
    got32 = interpolate_directions(dirs, 0.5)
    expected = interpolate_directions(dirs.double(), 0.5)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), expected, rtol=0, atol=1e-6)
    got16 = interpolate_directions(dirs.bfloat16(), 0.5)  # QR has no bf16 kernel: computed in fp32
    assert got16.dtype == torch.bfloat16
    torch.testing.assert_close(got16.double(), expected, rtol=0, atol=2e-2)


@pytest.mark.parametrize("index", [-0.01, 3.01, 7, math.nan])
def test_interpolation_out_of_range(index):
    dirs = stacked(4, 1, 16, seed=60)
    with pytest.raises(ValueError):
        interpolate_directions(dirs, index)


def test_interpolation_of_opposite_directions_raises():
    r = orthonormal(1, 16, seed=61)
    with pytest.raises(ValueError, match="span"):
        interpolate_directions(torch.stack([r, -r]), 0.5)  # the lerp is the zero vector


# ---- WeightEditor and hooks on a tiny Llama -------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=D_MODEL,
        intermediate_size=64,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attention_bias=True,  # o_proj gets a bias in the residual space
        mlp_bias=True,  # and so does down_proj
    )
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    with torch.no_grad():  # HF initialises biases to zero: make them matter
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
    return model


@pytest.fixture
def model(tiny_llama):
    """The shared tiny Llama, checked bit-exactly untouched after each test."""
    before = snapshot(tiny_llama)
    yield tiny_llama
    assert changed(tiny_llama, before) == set(), "a test left the model edited"


def input_ids():
    return torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(70))


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def changed(model, before):
    return {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}


def forward_hook_counts(model):
    return {name: len(m._forward_hooks) for name, m in model.named_modules()}


def layer_dirs(k: int, seed: int = 0) -> torch.Tensor:
    return stacked(N_LAYERS, k, D_MODEL, seed)


WRITER_PARAMS = {
    f"model.layers.{i}.{p}"
    for i in range(N_LAYERS)
    for p in ("self_attn.o_proj.weight", "self_attn.o_proj.bias", "mlp.down_proj.weight", "mlp.down_proj.bias")
}

EVERYWHERE = ComponentKernel(max_weight=1.0, max_weight_position=1.0, min_weight=1.0, min_weight_distance=5.0)
# Both kernels are non-zero on all three layers, with weights != 1 and != each other.
MIXED = AblationParams(
    components={"attn": ComponentKernel(0.9, 0.7, 0.3, 1.5), "mlp": ComponentKernel(1.2, 1.6, 0.2, 2.0)},
    direction_decay=0.6,
)


def test_residual_writers_are_the_biased_out_projections(model):
    writers = residual_writers(model)
    assert len(writers) == N_LAYERS
    for layer, components in zip(model.model.layers, writers, strict=True):
        assert [ref.module for ref in components["attn"]] == [layer.self_attn.o_proj]
        assert [ref.module for ref in components["mlp"]] == [layer.mlp.down_proj]
        assert all(ref.bias is not None for refs in components.values() for ref in refs)


@pytest.mark.parametrize("norm_preserving", [False, True])
def test_editor_apply_then_reset_is_bit_exact(model, norm_preserving):
    before = snapshot(model)
    editor = WeightEditor(residual_writers(model))
    params = AblationParams(components=MIXED.components, direction_decay=0.6, norm_preserving=norm_preserving)
    editor.apply(params, layer_dirs(2))
    assert changed(model, before) == WRITER_PARAMS  # every writer (and bias) edited, nothing else
    editor.reset()
    assert changed(model, before) == set()
    assert editor.edited == set()


def test_editor_apply_twice_equals_once(model):
    before = snapshot(model)
    editor = WeightEditor(residual_writers(model), cache_device="cpu")
    dirs = layer_dirs(2)
    try:
        editor.apply(MIXED, dirs)
        once = snapshot(model)
        editor.apply(MIXED, dirs)
        assert changed(model, once) == set()
        other = AblationParams(components={"attn": EVERYWHERE}, direction_index=0.5, norm_preserving=True)
        editor.apply(other, dirs)
        assert changed(model, once)
        editor.apply(MIXED, dirs)  # every apply starts from the originals
        assert changed(model, once) == set()
    finally:
        editor.reset()
    assert changed(model, before) == set()


@pytest.mark.parametrize("norm_preserving", [False, True])
def test_zero_weight_layers_are_neither_edited_nor_hooked(model, norm_preserving):
    before = snapshot(model)
    writers = residual_writers(model)
    editor = WeightEditor(writers)
    # peak 1 at layer 0 falling to min_weight 0 at distance 1: layer 1 gets 0, layer 2 is beyond
    params = AblationParams(components={"mlp": ComponentKernel(1.0, 0.0, 0.0, 1.0)}, norm_preserving=norm_preserving)
    with editor.applied(params, layer_dirs(1)):
        assert changed(model, before) == {"model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.down_proj.bias"}
        assert editor.edited == {(0, "mlp", 0)}
    assert changed(model, before) == set()
    if not norm_preserving:
        with ablation_hooks(writers, params, layer_dirs(1)):
            hooked = [name for name, m in model.named_modules() if m._forward_hooks]
        assert hooked == ["model.layers.0.mlp.down_proj"]


def capture_writer_outputs(model, writers):
    outputs, handles = {}, []
    for layer, components in enumerate(writers):
        for component, refs in components.items():

            def keep(module, args, output, key=(layer, component)):
                outputs[key] = output.detach().clone()

            handles.append(refs[0].module.register_forward_hook(keep))
    try:
        with torch.no_grad():
            model(input_ids())
    finally:
        for handle in handles:
            handle.remove()
    return outputs


@pytest.mark.parametrize("norm_preserving", [False, True])
@pytest.mark.parametrize("direction_index", [None, 1.4])
def test_edited_writers_output_nothing_along_r_where_the_weight_is_one(model, norm_preserving, direction_index):
    writers = residual_writers(model)
    editor = WeightEditor(writers)
    dirs = layer_dirs(2)
    per_layer = ablation_directions(dirs, direction_index)
    # attn: weight 1 on every layer; mlp: weight 1 on layer 2 only, 0 elsewhere
    params = AblationParams(
        components={"attn": EVERYWHERE, "mlp": ComponentKernel(1.0, 2.0, 0.0, 1.0)},
        direction_index=direction_index,
        norm_preserving=norm_preserving,
    )
    plain = capture_writer_outputs(model, writers)
    with editor.applied(params, dirs):
        outputs = capture_writer_outputs(model, writers)
    for (layer, component), y in outputs.items():
        ratio = relative(y @ per_layer[layer].T, y)
        if component == "attn" or layer == 2:
            assert ratio <= 1e-5, (layer, component)
        else:  # unablated writers still write along r, so the check above can fail
            assert ratio > 1e-2, (layer, component)
    for (layer, component), y in plain.items():  # before the edit every writer wrote along r
        assert relative(y @ per_layer[layer].T, y) > 1e-2, (layer, component)


def test_editor_applied_resets_when_the_body_raises(model):
    before = snapshot(model)
    editor = WeightEditor(residual_writers(model))
    with pytest.raises(RuntimeError, match="boom"):
        with editor.applied(MIXED, layer_dirs(2)):
            assert changed(model, before)
            raise RuntimeError("boom")
    assert changed(model, before) == set()
    assert editor.edited == set()


def test_editor_rejects_bad_inputs_without_editing(model):
    before = snapshot(model)
    editor = WeightEditor(residual_writers(model))
    bad = AblationParams(components={"attn": EVERYWHERE, "moe": EVERYWHERE})
    with pytest.raises(ValueError, match="'moe'"):
        editor.apply(bad, layer_dirs(1))
    assert changed(model, before) == set()
    with pytest.raises(ValueError, match="one set per layer"):
        editor.apply(MIXED, layer_dirs(1)[:2])  # 2 layers of directions for 3 layers
    with pytest.raises(ValueError, match="direction_decay"):
        editor.apply(AblationParams(components=MIXED.components, direction_decay=math.nan), layer_dirs(2))
    assert changed(model, before) == set()


def test_direction_decay_weights_the_second_direction(model):
    writers = residual_writers(model)
    editor = WeightEditor(writers)
    dirs = layer_dirs(2)
    kernel = ComponentKernel(max_weight=0.8, max_weight_position=1.0, min_weight=0.2, min_weight_distance=2.0)
    params = AblationParams(components={"mlp": kernel}, direction_decay=0.5)
    tent = {0: 0.5, 1: 0.8, 2: 0.5}  # 0.8 + (1 / 2) * (0.2 - 0.8) at distance 1
    originals = [(w["mlp"][0].weight.clone(), w["mlp"][0].bias.clone()) for w in writers]
    with editor.applied(params, dirs):
        for layer in range(N_LAYERS):
            coef = [tent[layer], tent[layer] * 0.5]  # direction 2: kernel * decay
            weight, bias = originals[layer]
            ref = writers[layer]["mlp"][0]
            torch.testing.assert_close(
                ref.weight.double(), reference_orthogonalize(weight, dirs[layer], coef, -2), rtol=1e-5, atol=1e-5
            )
            r1, r2 = dirs[layer].double()
            # along r_1 the writer keeps (1 - kernel), along r_2 (1 - kernel * decay) of what it wrote
            torch.testing.assert_close(
                r1 @ ref.weight.double(), (1 - coef[0]) * (r1 @ weight.double()), rtol=1e-5, atol=1e-5
            )
            torch.testing.assert_close(
                r2 @ ref.weight.double(), (1 - coef[1]) * (r2 @ weight.double()), rtol=1e-5, atol=1e-5
            )
            torch.testing.assert_close(
                r2 @ ref.bias.double(), (1 - coef[1]) * (r2 @ bias.double()), rtol=1e-5, atol=1e-5
            )


@pytest.mark.parametrize(
    "params",
    [
        MIXED,
        AblationParams(components={"attn": EVERYWHERE, "mlp": EVERYWHERE}),
        AblationParams(components=MIXED.components, direction_index=1.3, direction_decay=0.8),
    ],
    ids=["kernels_decay", "everywhere", "interpolated"],
)
def test_hooks_equal_weight_edit_and_leave_no_hooks(model, params):
    writers = residual_writers(model)
    editor = WeightEditor(writers)
    dirs = layer_dirs(2)
    ids = input_ids()
    seen = []
    foreign_module = writers[1]["attn"][0].module
    foreign = foreign_module.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    try:
        counts = forward_hook_counts(model)
        with torch.no_grad():
            plain = model(ids).logits
            with editor.applied(params, dirs):
                edited = model(ids).logits
            with ablation_hooks(writers, params, dirs):
                during = forward_hook_counts(model)
                hooked = model(ids).logits
            after = model(ids).logits
        n_hooked = N_LAYERS * len(params.components)  # every kernel here is non-zero on every layer
        assert sum(during.values()) == sum(counts.values()) + n_hooked
        assert forward_hook_counts(model) == counts
        assert list(foreign_module._forward_hooks) == [foreign.id]  # the pre-existing hook survived
        assert len(seen) == 4  # ... and ran on every pass
    finally:
        foreign.remove()
    assert (edited - plain).abs().max() > 1e-2, "the ablation must change the logits"
    torch.testing.assert_close(hooked, edited, rtol=0, atol=1e-5)
    assert torch.equal(after, plain)


def test_hooks_removed_when_the_body_raises(model):
    writers = residual_writers(model)
    counts = forward_hook_counts(model)
    with pytest.raises(RuntimeError, match="boom"):
        with ablation_hooks(writers, MIXED, layer_dirs(2)):
            assert forward_hook_counts(model) != counts
            raise RuntimeError("boom")
    assert forward_hook_counts(model) == counts


def test_hooks_refuse_what_they_cannot_do(model):
    writers = residual_writers(model)
    counts = forward_hook_counts(model)
    with pytest.raises(NotImplementedError, match="norm"):
        with ablation_hooks(
            writers, AblationParams(components={"attn": EVERYWHERE}, norm_preserving=True), layer_dirs(1)
        ):
            pass
    fused = [dict(layer, mlp=[WriterRef(layer["mlp"][0].module, out_dim=-1)]) for layer in writers]
    with pytest.raises(NotImplementedError, match="out_dim=-1"):
        with ablation_hooks(fused, MIXED, layer_dirs(1)):
            pass
    with pytest.raises(ValueError, match="'moe'"):
        with ablation_hooks(writers, AblationParams(components={"moe": EVERYWHERE}), layer_dirs(1)):
            pass
    assert forward_hook_counts(model) == counts


# ---- edits that a second apply or an error must undo ---------------------------------------------


def test_a_smaller_apply_after_a_larger_one_leaves_no_stale_edits(model):
    editor = WeightEditor(residual_writers(model))
    dirs = layer_dirs(1)
    narrow = AblationParams(components={"mlp": ComponentKernel(1.0, 2.0, 1.0, 0.5)})  # layer 2's mlp only
    try:
        editor.apply(narrow, dirs)
        expected = snapshot(model)
        editor.apply(AblationParams(components={"attn": EVERYWHERE, "mlp": EVERYWHERE}), dirs)
        editor.apply(narrow, dirs)
        assert changed(model, expected) == set()
    finally:
        editor.reset()


def test_an_error_half_way_through_apply_restores_the_edited_layers(model):
    before = snapshot(model)
    writers = residual_writers(model)
    # layer 2's "mlp" writer is up_proj [64, 32]: not d_model wide, so its edit fails after layers 0-1
    writers[2] = dict(writers[2], mlp=[WriterRef(model.model.layers[2].mlp.up_proj)])
    editor = WeightEditor(writers)
    with pytest.raises(ValueError, match="directions must be"):
        editor.apply(AblationParams(components={"attn": EVERYWHERE, "mlp": EVERYWHERE}), layer_dirs(1))
    assert changed(model, before) == set()
    assert editor.edited == set()


def test_interpolated_rows_agree_in_sign_with_their_lerp():
    raw_flips = 0
    for seed in range(100, 140, 2):  # QR's own signs depend on the input: enough seeds to get flips
        dirs = stacked(2, 3, 16, seed=seed, dtype=torch.float64)
        got = interpolate_directions(dirs, 0.3)
        lerp = 0.7 * dirs[0] + 0.3 * dirs[1]
        assert ((got * lerp).sum(-1) > 0).all(), seed
        raw_flips += int((torch.linalg.qr(lerp.T).R.diagonal() < 0).sum())
    assert raw_flips > 0, "no seed made plain QR flip a sign: the check above proves nothing"
