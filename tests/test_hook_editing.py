"""Ablation by forward hooks (`HookEditor`) for models whose weights cannot be edited in place.

The hooks must compute what the weight edit computes: the same directions and weights
(`edit_plan`: interpolation, decay, post-norm gains), biases inside the projected output, and
norm_preservation as an input scale. Checked against `WeightEditor` on tiny fp32 models of four
families (Llama with biases, GPT-2's Conv1D, Gemma 2's post-norms, Qwen2-MoE's fused experts), then on the organism whose writers are made uneditable three ways: parametrized
(recomputed on every forward, so an in-place edit would be lost), offloaded to disk by accelerate
(meta weights), and packed to int8 (a stand-in for 4-bit packing; bitsandbytes itself needs CUDA,
see the gpu test at the end).
"""

import copy

import pytest
import torch
from test_adapters import PARAMS, directions, input_ids, tiny
from torch import nn
from torch.nn.utils import parametrize

from abliterate.ablation import AblationParams, ComponentKernel, WeightEditor
from abliterate.editing import make_editor, writers_of
from abliterate.errors import AbliterateError
from abliterate.hooks import HookEditor
from abliterate.models import post_norm_gains, residual_writers

EVERYWHERE = ComponentKernel(max_weight=1.0, max_weight_position=1.0, min_weight=1.0, min_weight_distance=5.0)
VARIANTS = {
    "kernels_decay": PARAMS,
    "interpolated": AblationParams(components=PARAMS.components, direction_index=1.3, direction_decay=0.8),
    "norm_preserving": AblationParams(components=PARAMS.components, direction_decay=0.6, norm_preserving=True),
}


def forward_hook_counts(model):
    return {name: (len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()}


def hooks_and_weights(model, params, dirs, ids):
    """(plain, weight-edited, hooked, after) logits of `model`."""
    writers, gains = residual_writers(model), post_norm_gains(model)
    with torch.no_grad():
        plain = model(ids).logits
        with WeightEditor(writers, gains=gains).applied(params, dirs):
            edited = model(ids).logits
        with HookEditor(writers, gains=gains).applied(params, dirs):
            hooked = model(ids).logits
        after = model(ids).logits
    return plain, edited, hooked, after


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("family", ["llama_biased", "gpt2", "gemma2", "qwen2_moe"])
def test_hooks_compute_the_weight_edit(family, variant):
    params = VARIANTS[variant]
    if family == "qwen2_moe" and params.norm_preserving:
        pytest.skip("fused experts cannot preserve norms with hooks: see test_fused_experts_refuse_norm_preserving")
    model = tiny(family)
    counts = forward_hook_counts(model)
    plain, edited, hooked, after = hooks_and_weights(model, params, directions(), input_ids())
    assert (edited - plain).abs().max() > 1e-3, "the ablation must change the logits"
    torch.testing.assert_close(hooked, edited, rtol=0, atol=1e-5)
    assert torch.equal(after, plain)
    assert forward_hook_counts(model) == counts


def test_fused_experts_refuse_norm_preserving():
    model = tiny("qwen2_moe")
    editor = HookEditor(residual_writers(model))
    counts = forward_hook_counts(model)
    with pytest.raises(AbliterateError, match="fused experts.*norm_preserving") as info:
        editor.apply(VARIANTS["norm_preserving"], directions())
    assert len(str(info.value).splitlines()) == 1
    assert forward_hook_counts(model) == counts  # the hooks of layers before the refusal are gone too


def test_reset_removes_only_its_own_hooks():
    model = tiny("llama_biased")
    writers = residual_writers(model)
    editor = HookEditor(writers)
    seen = []
    foreign_module = writers[1]["attn"][0].module
    foreign = foreign_module.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    try:
        editor.apply(PARAMS, directions())
        editor.apply(PARAMS, directions())  # twice == once: the first apply's hooks are replaced
        assert len(foreign_module._forward_hooks) == 2
        with torch.no_grad():
            model(input_ids())
        editor.reset()
        assert list(foreign_module._forward_hooks) == [foreign.id] and len(seen) == 1
    finally:
        foreign.remove()


def test_hooks_removed_when_the_body_raises():
    model = tiny("gemma2")
    counts = forward_hook_counts(model)
    with pytest.raises(RuntimeError, match="boom"):
        with HookEditor(residual_writers(model), gains=post_norm_gains(model)).applied(PARAMS, directions()):
            assert forward_hook_counts(model) != counts
            raise RuntimeError("boom")
    assert forward_hook_counts(model) == counts


# ---- choosing the editor ---------------------------------------------------------------------------


class Frozen(nn.Module):
    """A parametrization returning the weight unchanged: the weight is recomputed on every forward,
    so an in-place edit of what `module.weight` returns would be lost."""

    def forward(self, weight):
        return weight


def parametrize_writers(model) -> None:
    for components in residual_writers(model):
        for refs in components.values():
            for ref in refs:
                parametrize.register_parametrization(ref.module, ref.name, Frozen())


def test_auto_picks_hooks_for_writers_that_cannot_be_edited():
    model = tiny("llama_biased")
    assert isinstance(make_editor(model), WeightEditor)
    assert isinstance(make_editor(model, "hooks"), HookEditor)
    parametrize_writers(model)
    assert isinstance(make_editor(model), HookEditor)
    with pytest.raises(AbliterateError, match="parametrized.*--module.load.edit_mode auto") as info:
        make_editor(model, "weights")
    assert len(str(info.value).splitlines()) == 1
    with pytest.raises(AbliterateError, match="edit_mode='fast'"):
        make_editor(model, "fast")


def test_parametrized_writers_are_hooked_like_the_weight_edit():
    reference = tiny("llama_biased")
    model = copy.deepcopy(reference)
    parametrize_writers(model)
    ids, dirs = input_ids(), directions()
    for params in VARIANTS.values():
        editor = make_editor(model)
        with torch.no_grad():
            with WeightEditor(residual_writers(reference)).applied(params, dirs):
                edited = reference(ids).logits
            with editor.applied(params, dirs):
                hooked = model(ids).logits
        torch.testing.assert_close(hooked, edited, rtol=0, atol=1e-5)


class PackedLinear(nn.Linear):
    """int8 codes and a per-row scale: a weight that is not a float tensor, as 4-bit/8-bit loads leave it."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        scale = linear.weight.abs().amax(1, keepdim=True) / 127
        self.weight = nn.Parameter(torch.round(linear.weight / scale).to(torch.int8), requires_grad=False)
        self.register_buffer("scale", scale)
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.scale

    def forward(self, x):
        return nn.functional.linear(x, self.dequantized(), self.bias)


def test_packed_writers_are_found_and_hooked():
    model = tiny("llama_biased")
    for layer in model.model.layers:
        layer.self_attn.o_proj = PackedLinear(layer.self_attn.o_proj)
        layer.mlp.down_proj = PackedLinear(layer.mlp.down_proj)
    reference = tiny("llama_biased")  # the same model with the dequantized weights as plain floats
    with torch.no_grad():
        for layer, packed in zip(reference.model.layers, model.model.layers, strict=True):
            layer.self_attn.o_proj.weight.copy_(packed.self_attn.o_proj.dequantized())
            layer.mlp.down_proj.weight.copy_(packed.mlp.down_proj.dequantized())
    with pytest.raises(AbliterateError, match="quantized"):
        residual_writers(model)
    writers = writers_of(model)
    assert [w["attn"][0].module for w in writers] == [layer.self_attn.o_proj for layer in model.model.layers]
    editor = make_editor(model)
    assert isinstance(editor, HookEditor)
    ids, dirs = input_ids(), directions()
    with torch.no_grad():
        with WeightEditor(residual_writers(reference)).applied(PARAMS, dirs):
            edited = reference(ids).logits
        with editor.applied(PARAMS, dirs):
            hooked = model(ids).logits
    torch.testing.assert_close(hooked, edited, rtol=0, atol=1e-5)
    with pytest.raises(AbliterateError, match="cannot be read.*norm_preserving") as info:
        editor.apply(VARIANTS["norm_preserving"], dirs)  # packed codes this code cannot dequantize
    assert len(str(info.value).splitlines()) == 1 and not editor.handles


def test_a_packed_model_loads(monkeypatch, caplog):
    """Loading describes a packed model's writers instead of refusing them (found on the GPU: a
    4-bit load failed in its log line before any trial ran)."""
    import abliterate.module as module_py
    from abliterate.module import AbliterationModule

    model = tiny("llama_biased")
    for layer in model.model.layers:
        layer.self_attn.o_proj = PackedLinear(layer.self_attn.o_proj)
        layer.mlp.down_proj = PackedLinear(layer.mlp.down_proj)
    monkeypatch.setattr(module_py, "load_model", lambda *args, **kwargs: model)
    module = AbliterationModule(model_id="packed")
    with caplog.at_level("INFO", logger="abliterate.module"):
        module.configure_model()
    assert module.model is model
    layers = len(model.model.layers)
    assert f"{layers} layers" in caplog.text and f"{layers} attention and {layers} MLP writers" in caplog.text
    assert isinstance(module.weight_editor(), HookEditor)


# ---- the organism, offloaded to disk, through trials and exports ---------------------------------------


def offloaded_parts(organism_dir, tmp_path):
    """The organism's parts with layer 1 offloaded to disk by accelerate (its weights on the meta device)."""
    pytest.importorskip("accelerate")
    from test_pipeline import make_parts

    from abliterate.options import LoadOptions

    module, data, trainer = make_parts(organism_dir)
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{i}": "disk" if i == 1 else "cpu" for i in range(2)})
    module.load_options = LoadOptions(dtypes=["float32"], device_map=device_map)
    from transformers import AutoModelForCausalLM

    # (LoadOptions has no offload_folder: loaded here, and set as AbliterationModule._load sets it)
    module.__dict__["_hf_model"] = AutoModelForCausalLM.from_pretrained(
        organism_dir, dtype=torch.float32, device_map=device_map, offload_folder=str(tmp_path / "offload")
    ).eval()
    assert module.model.model.layers[1].mlp.down_proj.weight.device.type == "meta"
    return module, data, trainer


@pytest.mark.parametrize("norm_preserving", [False, True])
def test_trials_on_a_disk_offloaded_model_match_the_weight_edit(organism_dir, tmp_path, norm_preserving):
    from test_pipeline import full_ablation, make_parts

    from abliterate.options import DirectionOptions
    from abliterate.pipeline import Pipeline
    from abliterate.plans import TrialPlan

    plain, data, trainer = make_parts(organism_dir)
    plain_pipe = Pipeline(trainer, plain, data, tmp_path / "plain")
    plain_pipe.residuals()
    placed, data2, trainer2 = offloaded_parts(organism_dir, tmp_path)
    placed_pipe = Pipeline(trainer2, placed, data2, tmp_path / "placed")
    placed_pipe.residuals()
    assert isinstance(placed.weight_editor(), HookEditor)
    params = full_ablation(plain.n_layers)
    params = AblationParams(components=params.components, direction_index=0.5, norm_preserving=norm_preserving)
    plan = TrialPlan(DirectionOptions(), params)
    expected = plain_pipe.evaluate(plan, plain_pipe.reference())
    got = placed_pipe.evaluate(plan, placed_pipe.reference())
    assert got.responses == expected.responses
    assert got.values == pytest.approx(expected.values, abs=1e-5)

    ids = plain.tokenizer(data.prompts("eval_harmful")[:4], return_tensors="pt", padding=True)
    directions = plain.directions_for(plan.directions)
    with torch.no_grad():
        with plain.weight_editor().applied(params, directions):
            edited = plain.model(**ids).logits
        with placed.weight_editor().applied(params, directions):
            hooked = placed.model(**ids).logits
    torch.testing.assert_close(hooked, edited, rtol=0, atol=1e-5)


def test_exports_of_a_disk_offloaded_model(organism_dir, tmp_path):
    """merged: the base files rewritten shard by shard, equal to the export of a plain load; adapter too."""
    from safetensors.torch import load_file
    from test_pipeline import full_ablation, make_parts

    from abliterate.export import export_files
    from abliterate.options import DirectionOptions
    from abliterate.pipeline import Pipeline
    from abliterate.plans import TrialPlan

    plain, data, trainer = make_parts(organism_dir)
    plain_pipe = Pipeline(trainer, plain, data, tmp_path / "plain")
    plain_pipe.residuals()
    placed, data2, trainer2 = offloaded_parts(organism_dir, tmp_path)
    placed_pipe = Pipeline(trainer2, placed, data2, tmp_path / "placed")
    placed_pipe.residuals()
    plan = TrialPlan(DirectionOptions(), full_ablation(plain.n_layers))
    card = {"base_model": str(organism_dir), "trial": 0}
    plain_pipe.export(plan, card, tmp_path / "plain_export", False, "both")
    placed_pipe.export(plan, card, tmp_path / "placed_export", False, "both")
    expected = load_file(tmp_path / "plain_export" / "model.safetensors")
    got = load_file(tmp_path / "placed_export" / "model.safetensors")
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-6, msg=name)
    for name in ("adapter/adapter_model.safetensors",):
        a = load_file(tmp_path / "plain_export" / name)
        b = load_file(tmp_path / "placed_export" / name)
        assert set(a) == set(b)
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    assert "config.json" in export_files(tmp_path / "placed_export")


# ---- bitsandbytes 4-bit (CUDA) ---------------------------------------------------------------------


@pytest.mark.gpu
def test_4bit_trials_use_hooks_and_export_from_the_full_precision_base(organism_dir, tmp_path):
    """4-bit writers are hooked; the exports are computed from the full-precision base files, so they
    equal the exports of a full-precision load."""
    pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file
    from test_pipeline import full_ablation, make_parts

    from abliterate.export import save_export
    from abliterate.options import DirectionOptions, LoadOptions
    from abliterate.pipeline import Pipeline

    plain, data, trainer = make_parts(organism_dir)
    Pipeline(trainer, plain, data, tmp_path / "run").residuals()
    directions = plain.directions_for(DirectionOptions())
    params = full_ablation(plain.n_layers)
    quant, _, _ = make_parts(organism_dir)
    quant.load_options = LoadOptions(dtypes=["float32"], load_in_4bit=True, device_map="cuda")
    quant.configure_model()
    editor = quant.weight_editor()
    assert isinstance(editor, HookEditor)

    card = {"base_model": str(organism_dir), "trial": 0}
    for module, name in ((plain, "plain"), (quant, "quant")):
        save_export(
            module.model,
            module.tokenizer,
            module.weight_editor(),
            params,
            directions,
            tmp_path / name,
            False,
            card,
            "both",
        )
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(tmp_path / "plain" / name), load_file(tmp_path / "quant" / name)
        assert set(a) == set(b)
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)

    # the hooks equal the weight edit of the same weights, dequantized in place afterwards
    ids = plain.tokenizer(data.prompts("eval_harmful")[:4], return_tensors="pt", padding=True).to("cuda")
    with torch.no_grad():
        before = quant.model(**ids).logits.float()
        with editor.applied(params, directions):
            hooked = quant.model(**ids).logits.float()
        quant.model.dequantize()
        with WeightEditor(residual_writers(quant.model)).applied(params, directions):
            edited = quant.model(**ids).logits.float()
    assert (edited - before).abs().max() > 0.1
    torch.testing.assert_close(hooked, edited, rtol=0, atol=5e-2)  # 4-bit kernels vs bf16 matmuls
