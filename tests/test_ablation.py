"""Ablation maths and mechanisms: exact against reference loops, zero projection, norm
preservation, interpolation, and the weight editor and hooks on a tiny Llama."""

import math

import pytest
import torch
from torch import nn
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
from abliterate.writers import WriterRef

D_MODEL = 32


def orthonormal(*shape: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """[..., k, d] random rows, orthonormal along the last two axes."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(*shape, generator=g, dtype=torch.float64).mT)
    return q.mT.to(dtype)


def randn(*shape: int, seed: int = 1, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def reference_linear(weight, directions, weights, norm_preserving):
    """The straightforward loop for a Linear weight [d_model, d_in]: one column at a time."""
    out = weight.clone()
    for col in range(weight.shape[1]):
        original = weight[:, col]
        v = original.clone()
        for r, w in zip(directions, weights):
            v = v - w * r * torch.dot(r, original)
        if norm_preserving and v.norm() > 0:
            v = v * (original.norm() / v.norm())
        out[:, col] = v
    return out


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a.norm() / b.norm())


# ---- exact maths -----------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("norm_preserving", [False, True])
def test_linear_edit_matches_reference_loop(k, norm_preserving):
    weight = randn(D_MODEL, 20)
    directions = orthonormal(k, D_MODEL)
    weights = torch.tensor([0.9, 0.5, 0.25], dtype=torch.float64)[:k]
    got = orthogonalize_weight(weight, directions, weights, norm_preserving=norm_preserving)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, reference_linear(weight, directions, weights, norm_preserving), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("norm_preserving", [False, True])
def test_fused_expert_layout_matches_reference_loop(k, norm_preserving):
    experts = randn(4, 20, D_MODEL)  # [E, d_in, d_model], out_dim=-1
    directions = orthonormal(k, D_MODEL, seed=2)
    weights = torch.tensor([1.0, 0.7, 0.3], dtype=torch.float64)[:k]
    got = orthogonalize_weight(experts, directions, weights, out_dim=-1, norm_preserving=norm_preserving)
    for e in range(experts.shape[0]):
        expected = reference_linear(experts[e].T, directions, weights, norm_preserving).T
        torch.testing.assert_close(got[e], expected, rtol=1e-12, atol=1e-12)


def test_bias_edit_matches_reference():
    bias = randn(D_MODEL, seed=3)
    directions = orthonormal(3, D_MODEL)
    weights = torch.tensor([1.0, 0.5, 0.2], dtype=torch.float64)
    expected = bias.clone()
    for r, w in zip(directions, weights):
        expected -= w * r * torch.dot(r, bias)
    torch.testing.assert_close(orthogonalize_bias(bias, directions, weights), expected, rtol=1e-12, atol=1e-12)


def test_low_precision_weights_are_edited_in_float32_and_keep_their_dtype():
    weight = randn(D_MODEL, 16, dtype=torch.bfloat16)
    directions = orthonormal(1, D_MODEL, dtype=torch.float32)
    got = orthogonalize_weight(weight, directions, torch.ones(1))
    assert got.dtype == torch.bfloat16
    expected = orthogonalize_weight(weight.double(), directions.double(), torch.ones(1)).to(torch.bfloat16)
    assert torch.equal(got, expected)


def test_shape_mismatches_raise():
    with pytest.raises(ValueError, match="directions must be"):
        orthogonalize_weight(randn(D_MODEL, 8), orthonormal(1, 16), torch.ones(1))
    with pytest.raises(ValueError, match="weights for"):
        orthogonalize_weight(randn(D_MODEL, 8), orthonormal(2, D_MODEL), torch.ones(3))


# ---- the kernel ------------------------------------------------------------------------------


def test_kernel_is_the_linear_tent():
    kernel = ComponentKernel(max_weight=1.0, max_weight_position=3.0, min_weight=0.2, min_weight_distance=2.0)
    weights = layer_weights(kernel, 8)
    assert weights.shape == (8,)
    expected = torch.tensor([0.0, 0.2, 0.6, 1.0, 0.6, 0.2, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(weights, expected, rtol=0, atol=1e-12)


def test_kernel_peak_at_a_fractional_position():
    kernel = ComponentKernel(max_weight=1.0, max_weight_position=2.5, min_weight=0.2, min_weight_distance=2.0)
    weights = layer_weights(kernel, 7)
    # distances 2.5, 1.5, 0.5, 0.5, 1.5, 2.5, 3.5: w = 1 - (dist / 2) * 0.8 inside, 0 beyond
    expected = torch.tensor([0.0, 0.4, 0.8, 0.8, 0.4, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(weights, expected, rtol=0, atol=1e-12)
    assert weights.max() < 1.0  # no layer sits on the peak


def test_kernel_is_symmetric_and_zero_beyond_the_distance():
    n = 12
    kernel = ComponentKernel(max_weight=1.3, max_weight_position=(n - 1) / 2, min_weight=0.1, min_weight_distance=3.7)
    weights = layer_weights(kernel, n)
    torch.testing.assert_close(weights, weights.flip(0), rtol=0, atol=1e-12)
    distance = (torch.arange(n) - kernel.max_weight_position).abs()
    assert (weights[distance > kernel.min_weight_distance] == 0).all()
    assert (weights[distance <= kernel.min_weight_distance] > 0).all()


def test_kernel_rejects_bad_inputs():
    for bad in (
        ComponentKernel(min_weight_distance=0.0),
        ComponentKernel(min_weight_distance=-1.0),
        ComponentKernel(max_weight=-0.5),
        ComponentKernel(min_weight=-0.1),
        ComponentKernel(max_weight_position=math.nan),
        ComponentKernel(min_weight_distance=math.inf),
    ):
        with pytest.raises(ValueError):
            layer_weights(bad, 4)
    with pytest.raises(ValueError, match="n_layers"):
        layer_weights(ComponentKernel(), 0)


# ---- the projection removes r ----------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3])
def test_projection_is_zero_at_full_weight(k):
    weight = randn(64, 48, dtype=torch.float32) * 3
    directions = orthonormal(k, 64, seed=5, dtype=torch.float32)
    edited = orthogonalize_weight(weight, directions, torch.ones(k))
    assert relative(directions @ edited, weight) <= 1e-6

    linear = nn.Linear(48, 64, bias=False)
    with torch.no_grad():
        linear.weight.copy_(edited)
        y = linear(randn(16, 48, seed=6, dtype=torch.float32))
    assert relative(y @ directions.T, y) <= 1e-6


def test_norm_preserving_keeps_column_norms_and_zero_projection():
    weight = randn(64, 48, dtype=torch.float32)
    directions = orthonormal(2, 64, seed=7, dtype=torch.float32)
    edited = orthogonalize_weight(weight, directions, torch.ones(2), norm_preserving=True)
    torch.testing.assert_close(edited.norm(dim=0), weight.norm(dim=0), rtol=1e-6, atol=0)
    assert relative(directions @ edited, weight) <= 1e-6
    assert not torch.allclose(edited, orthogonalize_weight(weight, directions, torch.ones(2)))


def test_rescaling_rows_instead_would_break_the_projection():
    """The counter-check: restoring ROW norms (the d_model axis) leaves r in the output."""
    weight = randn(64, 48, dtype=torch.float64)
    directions = orthonormal(1, 64, seed=8)
    projected = orthogonalize_weight(weight, directions, torch.ones(1))
    rows = projected * (weight.norm(dim=1, keepdim=True) / projected.norm(dim=1, keepdim=True))
    assert relative(directions @ rows, weight) > 1e-3  # broken
    columns = orthogonalize_weight(weight, directions, torch.ones(1), norm_preserving=True)
    assert relative(directions @ columns, weight) < 1e-12  # kept


def test_norm_preserving_leaves_a_fully_projected_column_zero():
    directions = orthonormal(1, 8, seed=9)
    weight = torch.cat([directions.T * 2.0, randn(8, 3)], dim=1)  # column 0 lies along r
    edited = orthogonalize_weight(weight, directions, torch.ones(1), norm_preserving=True)
    assert edited[:, 0].abs().max() < 1e-12
    assert torch.isfinite(edited).all()


# ---- interpolation ---------------------------------------------------------------------------


def test_integer_index_returns_that_layers_directions():
    directions = orthonormal(5, 3, D_MODEL)
    for layer in range(5):
        assert torch.equal(interpolate_directions(directions, float(layer)), directions[layer])


def test_halfway_is_the_normalised_lerp():
    directions = orthonormal(4, 1, D_MODEL, seed=10)
    got = interpolate_directions(directions, 1.5)
    mixed = directions[1, 0] + directions[2, 0]
    torch.testing.assert_close(got[0], mixed / mixed.norm(), rtol=1e-12, atol=1e-12)
    quarter = interpolate_directions(directions, 2.25)[0]
    mixed = 0.75 * directions[2, 0] + 0.25 * directions[3, 0]
    torch.testing.assert_close(quarter, mixed / mixed.norm(), rtol=1e-12, atol=1e-12)


def test_interpolated_subspace_is_orthonormal_and_ordered():
    directions = orthonormal(3, 3, D_MODEL, seed=11)
    got = interpolate_directions(directions, 0.3)
    torch.testing.assert_close(got @ got.T, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-12)
    lerp = 0.7 * directions[0] + 0.3 * directions[1]
    assert ((got * lerp).sum(-1) > 0).all()
    torch.testing.assert_close(got[0], lerp[0] / lerp[0].norm(), rtol=1e-12, atol=1e-12)  # first vector kept


def test_interpolation_out_of_range_raises():
    directions = orthonormal(3, 1, D_MODEL)
    for index in (-0.1, 2.01, math.nan):
        with pytest.raises(ValueError):
            interpolate_directions(directions, index)
    interpolate_directions(directions, 2.0)  # the last layer is in range


def test_ablation_directions_per_layer_or_shared():
    directions = orthonormal(4, 2, D_MODEL, seed=12)
    assert ablation_directions(directions, None) is directions
    shared = ablation_directions(directions, 1.0)
    assert shared.shape == directions.shape
    assert all(torch.equal(shared[layer], directions[1]) for layer in range(4))


# ---- the tiny Llama --------------------------------------------------------------------------

N_LAYERS = 4


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
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
        initializer_range=0.2,  # large enough that an ablation moves the logits visibly
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.bias.normal_(0, 0.2)  # init leaves biases at zero
    return model


def llama_writers(model: LlamaForCausalLM) -> list[dict[str, list[WriterRef]]]:
    return [
        {
            "attn": [WriterRef(layer.self_attn.o_proj, bias_name="bias")],
            "mlp": [WriterRef(layer.mlp.down_proj)],
        }
        for layer in model.model.layers
    ]


def input_ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(13))


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.state_dict().items()}


def assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    for name, p in model.state_dict().items():
        assert torch.equal(p, before[name]), name


# The middle two layers get weight 1, the outer ones weight 0.5 (attn) and 0 (mlp).
PARAMS = AblationParams(
    components={
        "attn": ComponentKernel(max_weight=1.0, max_weight_position=1.5, min_weight=0.5, min_weight_distance=1.5),
        "mlp": ComponentKernel(max_weight=1.0, max_weight_position=1.5, min_weight=1.0, min_weight_distance=0.5),
    },
    direction_decay=0.5,
)


def test_editor_reset_restores_bit_exactly_and_apply_is_idempotent(llama):
    writers = llama_writers(llama)
    editor = WeightEditor(writers)
    before = state(llama)
    directions = orthonormal(N_LAYERS, 2, D_MODEL, seed=14, dtype=torch.float32)
    for norm_preserving in (False, True):
        params = AblationParams(PARAMS.components, direction_decay=0.5, norm_preserving=norm_preserving)
        editor.apply(params, directions)
        once = state(llama)
        assert not torch.equal(once["model.layers.1.mlp.down_proj.weight"], before["model.layers.1.mlp.down_proj.weight"])
        assert torch.equal(once["model.layers.0.mlp.down_proj.weight"], before["model.layers.0.mlp.down_proj.weight"])
        editor.apply(params, directions)
        assert_same_state(llama, once)
        editor.reset()
        assert_same_state(llama, before)
    with editor.applied(PARAMS, directions):
        assert not torch.equal(writers[1]["attn"][0].weight, before["model.layers.1.self_attn.o_proj.weight"])
    assert_same_state(llama, before)


def test_editor_restores_weights_on_errors(llama):
    editor = WeightEditor(llama_writers(llama), cache_device="cpu")
    before = state(llama)
    directions = orthonormal(N_LAYERS, 1, D_MODEL, dtype=torch.float32)
    bad = AblationParams({"attn": ComponentKernel(1.0, 1.0, 1.0, 3.0), "moe": ComponentKernel(1.0, 1.0, 1.0, 3.0)})
    with pytest.raises(ValueError, match="'moe'"):
        editor.apply(bad, directions)
    assert_same_state(llama, before)
    with pytest.raises(ValueError, match="one set per layer"):
        editor.apply(PARAMS, directions[:2])
    with pytest.raises(RuntimeError, match="boom"), editor.applied(PARAMS, directions):
        raise RuntimeError("boom")
    assert_same_state(llama, before)


def writer_outputs(model: LlamaForCausalLM, writers) -> dict[tuple[int, str], torch.Tensor]:
    """Run the model once and capture every writer's output (what it adds to the residual)."""
    outputs, handles = {}, []
    for layer, components in enumerate(writers):
        for component, refs in components.items():

            def keep(module, args, output, key=(layer, component)):
                outputs[key] = output.detach()

            handles.append(refs[0].module.register_forward_hook(keep))
    try:
        with torch.no_grad():
            model(input_ids())
    finally:
        for handle in handles:
            handle.remove()
    return outputs


@pytest.mark.parametrize("norm_preserving", [False, True])
@pytest.mark.parametrize("direction_index", [None, 2.0])
def test_writer_outputs_have_no_projection_where_the_weight_is_one(llama, norm_preserving, direction_index):
    writers = llama_writers(llama)
    directions = orthonormal(N_LAYERS, 2, D_MODEL, seed=15, dtype=torch.float32)
    params = AblationParams(PARAMS.components, direction_index, direction_decay=1.0, norm_preserving=norm_preserving)
    per_layer = ablation_directions(directions, direction_index)
    with WeightEditor(writers).applied(params, directions):
        outputs = writer_outputs(llama, writers)
    for (layer, component), y in outputs.items():
        w = float(layer_weights(params.components[component], N_LAYERS)[layer])
        ratio = relative(y @ per_layer[layer].T, y)
        if w == 1.0:
            assert ratio < 1e-5, (layer, component)
        else:
            assert ratio > 1e-2, (layer, component)  # partial or no ablation leaves r in place


def test_hooks_match_the_weight_edit(llama):
    writers = llama_writers(llama)
    directions = orthonormal(N_LAYERS, 2, D_MODEL, seed=16, dtype=torch.float32)
    with torch.no_grad():
        original = llama(input_ids()).logits
        with WeightEditor(writers).applied(PARAMS, directions):
            edited = llama(input_ids()).logits
        with ablation_hooks(writers, PARAMS, directions):
            hooked = llama(input_ids()).logits
        after = llama(input_ids()).logits
    assert (edited - original).abs().max() > 1e-2  # the ablation does change the logits
    torch.testing.assert_close(hooked, edited, rtol=0, atol=1e-5)
    assert torch.equal(after, original)  # the hooks are gone


def test_hooks_remove_only_their_own_handles_even_on_errors(llama):
    writers = llama_writers(llama)
    module = writers[1]["mlp"][0].module
    foreign = module.register_forward_hook(lambda *args: None)
    directions = orthonormal(N_LAYERS, 1, D_MODEL, dtype=torch.float32)
    try:
        with pytest.raises(RuntimeError, match="boom"), ablation_hooks(writers, PARAMS, directions):
            assert len(module._forward_hooks) == 2
            raise RuntimeError("boom")
        assert list(module._forward_hooks) == [foreign.id]
    finally:
        foreign.remove()
    assert all(not ref.module._forward_hooks for layer in writers for refs in layer.values() for ref in refs)


def test_hooks_refuse_what_they_cannot_do(llama):
    writers = llama_writers(llama)
    directions = orthonormal(N_LAYERS, 1, D_MODEL, dtype=torch.float32)
    with pytest.raises(NotImplementedError, match="norm"), ablation_hooks(
        writers, AblationParams(PARAMS.components, norm_preserving=True), directions
    ):
        pass
    fused = [dict(layer, mlp=[WriterRef(layer["mlp"][0].module, out_dim=-1)]) for layer in writers]
    with pytest.raises(NotImplementedError, match="out_dim=-1"), ablation_hooks(fused, PARAMS, directions):
        pass
    assert all(not ref.module._forward_hooks for layer in writers for refs in layer.values() for ref in refs)
