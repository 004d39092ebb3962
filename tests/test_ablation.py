"""Directional ablation maths and the two ways of applying it (weight edits, forward hooks).

Every expected value comes from an independent reference: a float64 column-by-column loop for
the projection, hand-computed tent values for the kernel, explicit lerps for interpolation and
snapshots of the untouched model for the editor.
"""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from abliterate.ablation import (
    AblationParams,
    ComponentKernel,
    WeightEditor,
    ablation_directions,
    ablation_hooks,
    interpolate_directions,
    layer_weights,
    orthogonalize_bias,
    orthogonalize_weight,
)
from abliterate.models import residual_writers

D_MODEL = 32
N_LAYERS = 3


def orthonormal(k: int, d: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[k, d] random orthonormal rows (orthonormal to the precision of `dtype`)."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=torch.float64))
    return q.T.contiguous().to(dtype)


def layer_directions(k: int, seed: int = 0) -> torch.Tensor:
    """[N_LAYERS, k, D_MODEL]: an independent orthonormal set per layer."""
    return torch.stack([orthonormal(k, D_MODEL, seed + i) for i in range(N_LAYERS)])


def reference_orthogonalize(weight, directions, weights, out_dim, norm_preserving=False):
    """float64, one column at a time: c' = c - sum_j w_j (r_j . c) r_j (then rescaled to |c|)."""
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


# ---- orthogonalize_weight: exact maths ------------------------------------------------------------

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
    before = weight.clone()

    got64 = orthogonalize_weight(weight, dirs, coef, out_dim=out_dim, norm_preserving=norm_preserving)
    assert got64.dtype == torch.float64 and got64.shape == weight.shape
    torch.testing.assert_close(got64, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(weight, before), "the input must not be edited in place"

    w32 = weight.float()
    got32 = orthogonalize_weight(w32, dirs.float(), coef, out_dim=out_dim, norm_preserving=norm_preserving)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(w32, weight.float()), "a float32 input (computed without a copy) must stay untouched"
    # the reference really does something: the edit is far from the identity
    assert (expected - weight).abs().max() > 0.1


@pytest.mark.parametrize("layout", LAYOUTS)
def test_orthogonalize_weight_keeps_bf16(layout):
    shape, out_dim = LAYOUTS[layout]
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(3)).bfloat16()
    dirs = orthonormal(2, D_MODEL, seed=4)
    coef = torch.tensor([0.9, 0.6])
    got = orthogonalize_weight(weight, dirs, coef, out_dim=out_dim)
    assert got.dtype == torch.bfloat16 and got.shape == weight.shape
    expected = reference_orthogonalize(weight, dirs, coef, out_dim).to(torch.bfloat16)
    # computed in fp32 then rounded once: at most one bf16 ulp from the rounded float64 reference
    torch.testing.assert_close(got.double(), expected.double(), rtol=2**-7, atol=1e-2)


def test_orthogonalize_bias_matches_reference():
    bias = torch.randn(5, D_MODEL, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    dirs = orthonormal(2, D_MODEL, seed=6, dtype=torch.float64)
    coef = torch.tensor([0.8, 0.3], dtype=torch.float64)
    expected = torch.stack(
        [b - sum(float(coef[j]) * torch.dot(dirs[j], b) * dirs[j] for j in range(2)) for b in bias]
    )
    torch.testing.assert_close(orthogonalize_bias(bias, dirs, coef), expected, rtol=1e-12, atol=1e-12)
    got = orthogonalize_bias(bias[0].bfloat16(), dirs.float(), coef)
    assert got.dtype == torch.bfloat16 and got.shape == (D_MODEL,)


# ---- projection: r^T W' = 0 -----------------------------------------------------------------------


def test_full_weight_removes_the_direction():
    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(D_MODEL, 48, generator=gen)
    r = orthonormal(1, D_MODEL, seed=8)
    edited = orthogonalize_weight(weight, r, torch.ones(1))
    before = (r @ weight).norm()
    assert before > 1e-2 * weight.norm(), "a random weight writes along r to begin with"
    assert (r @ edited).norm() <= 1e-6 * weight.norm()

    linear = torch.nn.Linear(48, D_MODEL, bias=False)
    with torch.no_grad():
        linear.weight.copy_(edited)
    x = torch.randn(100, 48, generator=gen)
    y = linear(x)
    assert ((y @ r.T).abs() <= 1e-6 * y.norm(dim=-1, keepdim=True)).all()
    # the rest of the output is untouched: y equals the original output minus its r component
    y0 = x @ weight.T
    torch.testing.assert_close(y, y0 - (y0 @ r.T) @ r, rtol=1e-5, atol=1e-5)


def test_norm_preserving_rescales_columns_not_rows():
    weight = torch.randn(D_MODEL, 48, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    r = orthonormal(1, D_MODEL, seed=10, dtype=torch.float64)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        w = weight.to(dtype)
        edited = orthogonalize_weight(w, r.to(dtype), torch.ones(1), norm_preserving=True)
        torch.testing.assert_close(edited.norm(dim=0), w.norm(dim=0), rtol=tol, atol=0)  # column norms
        assert (r.to(dtype) @ edited).norm() <= tol * w.norm()  # still exactly ablated at w = 1
    # Counter-check: rescaling the ROWS of the projected weight back to their old norms (d_model
    # different factors along the out axis) brings r back.
    projected = weight - r.T @ (r @ weight)
    rows = projected * (weight.norm(dim=1) / projected.norm(dim=1))[:, None]
    torch.testing.assert_close(rows.norm(dim=1), weight.norm(dim=1))
    assert (r @ rows).norm() > 1e-3 * weight.norm()


# ---- the layer kernel -----------------------------------------------------------------------------


def test_kernel_tent_values():
    kernel = ComponentKernel(max_weight=0.8, max_weight_position=2.5, min_weight=0.2, min_weight_distance=2.0)
    got = layer_weights(kernel, 7)
    # distances 2.5 1.5 0.5 0.5 1.5 2.5 3.5 -> 0.8 + (d / 2) * (0.2 - 0.8), 0 beyond 2
    expected = torch.tensor([0.0, 0.35, 0.65, 0.65, 0.35, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-12)

    symmetric = layer_weights(ComponentKernel(1.0, 4.0, 0.1, 3.0), 9)
    torch.testing.assert_close(symmetric, symmetric.flip(0))
    assert symmetric.argmax() == 4 and symmetric[4] == 1.0
    assert (symmetric[[0, 8]] == 0).all()

    edge = layer_weights(ComponentKernel(max_weight=1.0, max_weight_position=3.0, min_weight=0.25, min_weight_distance=2.0), 7)
    torch.testing.assert_close(edge.double(), torch.tensor([0, 0.25, 0.625, 1.0, 0.625, 0.25, 0], dtype=torch.float64))


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
    ],
)
def test_kernel_rejects_invalid(kernel):
    with pytest.raises(ValueError):
        layer_weights(kernel, 5)


# ---- direction interpolation ----------------------------------------------------------------------


def test_interpolation_integer_index_is_exact():
    dirs = torch.stack([orthonormal(3, 16, seed=20 + i) for i in range(4)])
    for index in (0, 2, 2.0, 3):
        assert torch.equal(interpolate_directions(dirs, index), dirs[int(index)])
    assert ablation_directions(dirs, None) is dirs
    everywhere = ablation_directions(dirs, 1)
    assert everywhere.shape == dirs.shape and all(torch.equal(everywhere[i], dirs[1]) for i in range(4))


def test_interpolation_fractional_k1_is_normalised_lerp():
    dirs = torch.stack([orthonormal(1, 16, seed=30 + i) for i in range(4)])
    got = interpolate_directions(dirs, 1.25)
    lerp = 0.75 * dirs[1, 0].double() + 0.25 * dirs[2, 0].double()
    torch.testing.assert_close(got[0].double(), lerp / lerp.norm(), rtol=1e-6, atol=1e-6)
    assert ablation_directions(dirs, 1.25).shape == dirs.shape


def test_interpolation_fractional_k3_is_orthonormal_span_of_lerp():
    dirs = torch.stack([orthonormal(3, 16, seed=40 + i) for i in range(4)])
    got = interpolate_directions(dirs, 0.6).double()
    torch.testing.assert_close(got @ got.T, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-6)
    lerp = 0.4 * dirs[0].double() + 0.6 * dirs[1].double()
    torch.testing.assert_close(got[0], lerp[0] / lerp[0].norm(), rtol=1e-6, atol=1e-6)  # first row: its lerp
    torch.testing.assert_close((lerp @ got.T) @ got, lerp, rtol=1e-5, atol=1e-5)  # same span as the lerps
    assert ((got * lerp).sum(-1) > 0).all()  # each row agrees in sign with its lerp


def test_interpolation_bf16_directions():
    dirs = torch.stack([orthonormal(2, 16, seed=50 + i) for i in range(3)])
    got = interpolate_directions(dirs.bfloat16(), 0.5)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), interpolate_directions(dirs, 0.5), rtol=0, atol=1e-2)


@pytest.mark.parametrize("index", [-0.01, 3.01, 7, math.nan])
def test_interpolation_out_of_range(index):
    dirs = torch.stack([orthonormal(1, 16, seed=60 + i) for i in range(4)])
    with pytest.raises(ValueError):
        interpolate_directions(dirs, index)


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
    with torch.no_grad():  # HF zero-initialises biases: make them matter
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
    return model


@pytest.fixture
def model(tiny_llama):
    """The shared tiny Llama, checked untouched after each test."""
    snapshot = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    yield tiny_llama
    for name, value in tiny_llama.state_dict().items():
        assert torch.equal(value, snapshot[name]), f"{name} left edited"


def input_ids():
    return torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(70))


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def changed(model, before):
    return {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}


WRITER_PARAMS = {
    f"model.layers.{i}.{p}" for i in range(N_LAYERS) for p in ("self_attn.o_proj.weight", "self_attn.o_proj.bias",
                                                               "mlp.down_proj.weight", "mlp.down_proj.bias")
}

EVERYWHERE = ComponentKernel(max_weight=1.0, max_weight_position=1.0, min_weight=1.0, min_weight_distance=5.0)
MIXED = AblationParams(
    components={"attn": ComponentKernel(0.9, 0.7, 0.3, 1.5), "mlp": ComponentKernel(1.2, 1.6, 0.2, 2.0)},
    direction_index=None,
    direction_decay=0.6,
)


@pytest.mark.parametrize("norm_preserving", [False, True])
def test_editor_apply_reset_is_bit_exact(model, norm_preserving):
    before = snapshot(model)
    editor = WeightEditor(residual_writers(model))
    params = AblationParams(components=MIXED.components, direction_decay=0.6, norm_preserving=norm_preserving)
    editor.apply(params, layer_directions(2))
    assert changed(model, before) == WRITER_PARAMS  # every writer edited, nothing else
    editor.reset()
    assert changed(model, before) == set()


def test_editor_apply_twice_equals_once(model):
    before = snapshot(model)
    editor = WeightEditor(residual_writers(model))
    dirs = layer_directions(2)
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


def test_editor_leaves_zero_weight_layers_untouched(model):
    before = snapshot(model)
    editor = WeightEditor(residual_writers(model))
    # weight 1 at layer 0, 0.5 at layer 1... except min_weight 0 at distance 1: layer 1 gets 0, layer 2 is beyond
    params = AblationParams(components={"mlp": ComponentKernel(1.0, 0.0, 0.0, 1.0)})
    with editor.applied(params, layer_directions(1)):
        assert changed(model, before) == {"model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.down_proj.bias"}
    assert changed(model, before) == set()


def capture_writer_outputs(model, writers):
    outputs, handles = {}, []
    for layer, components in enumerate(writers):
        for component, refs in components.items():
            def hook(module, args, output, key=(layer, component)):
                outputs[key] = output.detach().clone()
            handles.append(refs[0].module.register_forward_hook(hook))
    return outputs, handles


@pytest.mark.parametrize("norm_preserving", [False, True])
def test_edited_writers_output_nothing_along_r(model, norm_preserving):
    writers = residual_writers(model)
    editor = WeightEditor(writers)
    dirs = layer_directions(2)
    # attn: weight 1 on every layer; mlp: weight 1 on layer 2 only (0 elsewhere)
    params = AblationParams(
        components={"attn": EVERYWHERE, "mlp": ComponentKernel(1.0, 2.0, 0.0, 1.0)}, norm_preserving=norm_preserving
    )
    outputs, handles = capture_writer_outputs(model, writers)
    try:
        model(input_ids())
        plain = dict(outputs)
        with editor.applied(params, dirs):
            model(input_ids())
    finally:
        for h in handles:
            h.remove()
    for (layer, component), y in outputs.items():
        along = (y @ dirs[layer].T).abs().max()
        if component == "attn" or layer == 2:
            assert along <= 1e-5 * y.abs().max(), (layer, component)
        else:  # unablated writers still write along r: the check above can fail
            assert along > 1e-2 * y.abs().max(), (layer, component)
            torch.testing.assert_close(y, plain[(layer, component)], rtol=0, atol=0)


def test_editor_applied_resets_when_the_body_raises(model):
    before = snapshot(model)
    editor = WeightEditor(residual_writers(model))
    with pytest.raises(RuntimeError, match="boom"):
        with editor.applied(MIXED, layer_directions(2)):
            assert changed(model, before)
            raise RuntimeError("boom")
    assert changed(model, before) == set()
    assert editor.edited == set()


def test_editor_rejects_bad_inputs(model):
    editor = WeightEditor(residual_writers(model))
    with pytest.raises(ValueError):
        editor.apply(AblationParams(components={"ffn": EVERYWHERE}), layer_directions(1))
    editor.reset()
    with pytest.raises(ValueError):
        editor.apply(MIXED, layer_directions(1)[:2])  # 2 layers of directions for 3 layers


def test_direction_decay_weights_the_second_direction(model):
    writers = residual_writers(model)
    editor = WeightEditor(writers)
    dirs = layer_directions(2)
    kernel = ComponentKernel(max_weight=0.8, max_weight_position=1.0, min_weight=0.2, min_weight_distance=2.0)
    params = AblationParams(components={"mlp": kernel}, direction_decay=0.5)
    tent = {0: 0.5, 1: 0.8, 2: 0.5}  # 0.8 + (1 / 2) * (0.2 - 0.8) at distance 1
    originals = [w["mlp"][0].weight.clone() for w in writers]
    with editor.applied(params, dirs):
        for layer in range(N_LAYERS):
            coef = [tent[layer], tent[layer] * 0.5]
            expected = reference_orthogonalize(originals[layer], dirs[layer], coef, -2)
            edited = writers[layer]["mlp"][0].weight
            torch.testing.assert_close(edited.double(), expected, rtol=1e-5, atol=1e-5)
            # r_2 keeps exactly (1 - kernel * decay) of what it wrote
            r2 = dirs[layer, 1].double()
            torch.testing.assert_close(r2 @ edited.double(), (1 - coef[1]) * (r2 @ originals[layer].double()),
                                       rtol=1e-5, atol=1e-5)


def forward_hook_counts(model):
    return {name: len(m._forward_hooks) for name, m in model.named_modules()}


@pytest.mark.parametrize(
    "params",
    [
        MIXED,
        AblationParams(components={"attn": EVERYWHERE, "mlp": EVERYWHERE}),
        AblationParams(components=MIXED.components, direction_index=1.3, direction_decay=0.8),
    ],
    ids=["kernels_decay", "everywhere", "interpolated"],
)
def test_hooks_equal_weight_edit(model, params):
    writers = residual_writers(model)
    editor = WeightEditor(writers)
    dirs = layer_directions(2)
    ids = input_ids()

    seen = []
    existing = writers[1]["attn"][0].module.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    try:
        counts = forward_hook_counts(model)
        plain = model(ids).logits
        with editor.applied(params, dirs):
            edited = model(ids).logits
        n_hooked = sum(1 for _ in writers for c in params.components)  # every kernel here is non-zero everywhere
        with ablation_hooks(writers, params, dirs):
            during = forward_hook_counts(model)
            hooked = model(ids).logits
        assert sum(during.values()) == sum(counts.values()) + n_hooked
        assert forward_hook_counts(model) == counts
        assert len(seen) == 3  # the pre-existing hook survived and ran on every pass
        model(ids)
        assert len(seen) == 4
    finally:
        existing.remove()
    assert (edited - plain).abs().max() > 1e-2, "the ablation must change the logits"
    torch.testing.assert_close(hooked, edited, rtol=0, atol=1e-5)


def test_hooks_removed_when_the_body_raises(model):
    writers = residual_writers(model)
    counts = forward_hook_counts(model)
    with pytest.raises(RuntimeError, match="boom"):
        with ablation_hooks(writers, MIXED, layer_directions(2)):
            assert forward_hook_counts(model) != counts
            raise RuntimeError("boom")
    assert forward_hook_counts(model) == counts


def test_hooks_refuse_norm_preserving(model):
    writers = residual_writers(model)
    counts = forward_hook_counts(model)
    with pytest.raises(NotImplementedError):
        with ablation_hooks(writers, AblationParams(components={"attn": EVERYWHERE}, norm_preserving=True),
                            layer_directions(1)):
            pass
    assert forward_hook_counts(model) == counts
