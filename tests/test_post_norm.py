"""Post-norm families (Gemma 2/3): the editor ablates normalize(g * r), so each layer's update
has no component along r even though an RMSNorm gain sits between the writers and the residual."""

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

from abliterate.ablation import AblationParams, ComponentKernel, WeightEditor
from abliterate.models import decoder_layers, post_norm_gains, residual_writers


def tiny(family):
    torch.manual_seed(0)
    common = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    model = Gemma2ForCausalLM(Gemma2Config(**common)) if family == "gemma2" else LlamaForCausalLM(LlamaConfig(**common))
    with torch.no_grad():  # constant gains would hide the problem
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p))
    return model.eval()


def layer_updates(model, ids):
    updates = []

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        updates.append(hidden - args[0])

    handles = [layer.register_forward_hook(hook) for layer in decoder_layers(model)]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in handles:
            h.remove()
    return updates


@pytest.mark.parametrize("use_gains", [True, False])
def test_gemma2_update_has_no_component_along_r(use_gains):
    model = tiny("gemma2")
    r = torch.nn.functional.normalize(torch.randn(2, 1, 32), dim=-1)
    kernel = ComponentKernel(max_weight=1.0, max_weight_position=0.0, min_weight=1.0, min_weight_distance=2.0)
    params = AblationParams(components={"attn": kernel, "mlp": kernel})
    # Only the attention sublayer of layer 0 sees no earlier edit, so measure the first attention update.
    gains = post_norm_gains(model) if use_gains else None
    editor = WeightEditor(residual_writers(model), gains=gains)
    ids = torch.randint(0, 64, (3, 7))
    attn = model.model.layers[0].self_attn
    captured = {}
    norm = model.model.layers[0].post_attention_layernorm
    handle = norm.register_forward_hook(lambda m, a, out: captured.__setitem__("y", out))
    try:
        with editor.applied(params, r):
            layer_updates(model, ids)
    finally:
        handle.remove()
    along = (captured["y"] @ r[0, 0]).abs().max() / captured["y"].norm(dim=-1).max()
    if use_gains:
        assert along < 1e-5
    else:
        assert along > 1e-3  # plain r leaves a component: the reason gains are used
    assert attn is model.model.layers[0].self_attn


def test_families_without_post_norm_have_no_gains():
    assert all(g == {"attn": None, "mlp": None} for g in post_norm_gains(tiny("llama")))
