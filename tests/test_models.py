"""Loading and architecture discovery on tiny random models of every supported family.

The behavioural check is the one that matters: after projecting a direction r out of every
residual writer of a layer, that layer must add nothing along r to the residual stream. For
post-norm layers (Gemma 2/3, OLMo 2) that holds only when the projected direction is
normalize(g * r), g the post-norm gain from `post_norm_gains`; projecting r itself does not.
"""

import logging
import types

import pytest
import torch
import transformers
from torch import nn

from abliterate.ablation import orthogonalize_bias, orthogonalize_weight
from abliterate.directions import normalize
from abliterate.errors import AbliterateError
from abliterate.models import (
    decoder_layers,
    describe_architecture,
    load_model,
    load_tokenizer,
    post_norm_gains,
    residual_writers,
)

HIDDEN = 32
VOCAB = 64
TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)


def _gemma3_multimodal():
    vision = dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8
    )
    config = transformers.Gemma3Config(text_config=TEXT, vision_config=vision, mm_tokens_per_image=4)
    return transformers.Gemma3ForConditionalGeneration(config)


# family -> (builder, number of MLP writers per layer)
FAMILIES = {
    "llama": (lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**TEXT)), 1),
    "qwen2": (lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TEXT)), 1),
    "qwen3": (lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**TEXT)), 1),
    "mistral": (lambda: transformers.MistralForCausalLM(transformers.MistralConfig(**TEXT)), 1),
    "gemma2": (lambda: transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**TEXT)), 1),
    "gemma3": (lambda: transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**TEXT)), 1),
    "gemma3-multimodal": (_gemma3_multimodal, 1),
    "phi3": (lambda: transformers.Phi3ForCausalLM(transformers.Phi3Config(**TEXT)), 1),
    # fused experts [E, d_model, d_inter]
    "qwen3-moe": (lambda: transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**TEXT, **MOE)), 1),
    "mixtral": (
        lambda: transformers.MixtralForCausalLM(
            transformers.MixtralConfig(**TEXT, num_local_experts=4, num_experts_per_tok=2)
        ),
        1,
    ),
    # fused experts + shared expert
    "qwen2-moe": (
        lambda: transformers.Qwen2MoeForCausalLM(
            transformers.Qwen2MoeConfig(**TEXT, **MOE, shared_expert_intermediate_size=24)
        ),
        2,
    ),
    # fused experts stored transposed [E, d_inter, d_model] with a bias; d_inter == d_model as in
    # the real gpt-oss (2880), so only the experts' is_transposed flag gives the out axis.
    "gpt-oss": (
        lambda: transformers.GptOssForCausalLM(
            transformers.GptOssConfig(
                **{**TEXT, "intermediate_size": HIDDEN},
                num_local_experts=4,
                num_experts_per_tok=2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            )
        ),
        1,
    ),
    # older layouts: GPT-2 Conv1D writers ([in, out], out axis -1), parallel attention + MLP
    "gpt2": (
        lambda: transformers.GPT2LMHeadModel(
            transformers.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64)
        ),
        1,
    ),
    "gpt-neox": (lambda: transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**TEXT)), 1),
    "phi": (lambda: transformers.PhiForCausalLM(transformers.PhiConfig(**TEXT)), 1),
    # post-norm without a Gemma (1 + w) gain
    "olmo2": (lambda: transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**TEXT)), 1),
}

# Gemma 2/3 and OLMo 2 put an RMSNorm with a learned per-channel gain g (post_attention_layernorm,
# post_feedforward_layernorm) between each writer and the residual add: the layer adds
# g * y / rms(y). r^T W = 0 does not make r^T diag(g) W = 0 unless g is constant, so these
# families need normalize(g * r) projected out of their writers (see post_norm_gains).
POST_NORM_FAMILIES = {"gemma2", "gemma3", "gemma3-multimodal", "olmo2"}


def build(family: str) -> nn.Module:
    torch.manual_seed(0)
    model = FAMILIES[family][0]().eval()
    # Realistic norm gains: at init every RMSNorm gain is constant, which would hide the post-norm issue.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and param.dim() == 1:
                param.normal_(0.0, 0.5)
    return model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_residual_writers_structure(family):
    model = build(family)
    n_mlp = FAMILIES[family][1]
    config = model.config.get_text_config()
    layers = decoder_layers(model)
    assert len(layers) == config.num_hidden_layers == 2
    writers = residual_writers(model)
    assert len(writers) == len(layers)
    for components in writers:
        assert set(components) == {"attn", "mlp"}
        assert len(components["attn"]) == 1
        assert len(components["mlp"]) == n_mlp
        for ref in components["attn"] + components["mlp"]:
            assert ref.weight.shape[ref.out_dim] == HIDDEN
            if ref.bias is not None:
                assert ref.bias.shape[-1] == HIDDEN
    assert f"{len(layers)} layers, hidden {HIDDEN}" in describe_architecture(model)


def test_moe_writer_kinds():
    qwen2 = residual_writers(build("qwen2-moe"))[0]["mlp"]
    assert qwen2[0].name == "down_proj" and qwen2[0].weight.dim() == 3 and qwen2[0].out_dim == -2
    assert isinstance(qwen2[1].module, nn.Linear)  # the shared expert's down_proj
    gpt_oss = residual_writers(build("gpt-oss"))[0]["mlp"][0]
    assert (gpt_oss.out_dim, gpt_oss.bias_name) == (-1, "down_proj_bias")


def test_qwen3_moe_dense_layers():
    config = transformers.Qwen3MoeConfig(**TEXT, **MOE, mlp_only_layers=[0])
    writers = residual_writers(transformers.Qwen3MoeForCausalLM(config))
    assert isinstance(writers[0]["mlp"][0].module, nn.Linear)
    assert writers[1]["mlp"][0].weight.dim() == 3


def _layer_delta(model: nn.Module, layer: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """output - input of `layer`'s hidden states, [positions, d_model]."""
    seen = {}

    def pre(module, args, kwargs):
        seen["in"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    def post(module, args, output):
        seen["out"] = (output[0] if isinstance(output, tuple) else output).detach().clone()

    handles = [layer.register_forward_pre_hook(pre, with_kwargs=True), layer.register_forward_hook(post)]
    try:
        with torch.no_grad():
            model(input_ids=input_ids)
    finally:
        for handle in handles:
            handle.remove()
    return (seen["out"] - seen["in"]).reshape(-1, seen["in"].shape[-1]).double()


def _ablate_layer(writers, gains, r: torch.Tensor, through_post_norm: bool) -> None:
    """Project r (or, behind a post-norm, normalize(g * r)) out of every writer of one layer."""
    with torch.no_grad():
        for component, refs in writers.items():
            gain = gains[component]
            direction = normalize(gain * r) if through_post_norm and gain is not None else r
            for ref in refs:
                ref.weight.copy_(orthogonalize_weight(ref.weight, direction[None], torch.ones(1), out_dim=ref.out_dim))
                if ref.bias is not None:
                    ref.bias.copy_(orthogonalize_bias(ref.bias, direction[None], torch.ones(1)))


def _ratio_along(model, layer, input_ids, r) -> torch.Tensor:
    """|r . delta| / |delta| per position of one layer's residual update."""
    delta = _layer_delta(model, layer, input_ids)
    return (delta @ r.double()).abs() / delta.norm(dim=-1)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_ablating_writers_removes_direction_from_residual_update(family):
    model = build(family)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, VOCAB, (2, 7), generator=generator)
    layers = decoder_layers(model)
    writers = residual_writers(model)
    gains = post_norm_gains(model)
    assert all(g is not None for g in gains[0].values()) == (family in POST_NORM_FAMILIES)
    for index, layer in enumerate(layers):
        r = normalize(torch.randn(HIDDEN, generator=generator))
        assert _ratio_along(model, layer, input_ids, r).max() > 1e-2, "the layer adds nothing along r before ablation"
        _ablate_layer(writers[index], gains[index], r, through_post_norm=True)
        ratio = _ratio_along(model, layer, input_ids, r)
        assert ratio.max() <= 1e-5, f"layer {index}: max |r.delta|/|delta| = {ratio.max():.2e}"


@pytest.mark.parametrize("family", sorted(POST_NORM_FAMILIES))
def test_post_norm_breaks_plain_projection(family):
    """Why post_norm_gains exists: behind a post-norm, projecting r itself leaves r in the update."""
    model = build(family)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, VOCAB, (2, 7), generator=generator)
    layer = decoder_layers(model)[0]
    r = normalize(torch.randn(HIDDEN, generator=generator))
    _ablate_layer(residual_writers(model)[0], post_norm_gains(model)[0], r, through_post_norm=False)
    assert _ratio_along(model, layer, input_ids, r).max() > 1e-3


def test_post_norm_gains_values():
    gemma = build("gemma2")
    layer = decoder_layers(gemma)[1]
    gains = post_norm_gains(gemma)[1]
    torch.testing.assert_close(gains["attn"], 1 + layer.post_attention_layernorm.weight, rtol=1e-5, atol=0)
    torch.testing.assert_close(gains["mlp"], 1 + layer.post_feedforward_layernorm.weight, rtol=1e-5, atol=0)
    olmo = build("olmo2")
    olmo_norm = decoder_layers(olmo)[0].post_feedforward_layernorm
    torch.testing.assert_close(post_norm_gains(olmo)[0]["mlp"], olmo_norm.weight)
    # Llama's post_attention_layernorm is its pre-MLP norm, on the residual's copy: not a post-norm.
    assert post_norm_gains(build("llama")) == [{"attn": None, "mlp": None}] * 2
    assert "post-norms" in describe_architecture(gemma) and "post-norms" not in describe_architecture(build("llama"))


def test_post_norm_that_is_not_rms_is_refused():
    model = build("gemma2")
    layer = decoder_layers(model)[0]
    layer.post_feedforward_layernorm = nn.LayerNorm(HIDDEN)
    with pytest.raises(AbliterateError, match="layer 0 post_feedforward_layernorm .LayerNorm. is not an RMS norm"):
        post_norm_gains(model)


class _NoAttentionLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.mixer = nn.Linear(8, 8)
        self.mlp = nn.Sequential(nn.Linear(8, 8))


class _Custom(nn.Module):
    def __init__(self, layer_cls):
        super().__init__()
        self.config = types.SimpleNamespace(hidden_size=8)
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([layer_cls(), layer_cls()])


def test_unsupported_layer_names_its_class():
    with pytest.raises(AbliterateError, match="_NoAttentionLayer.*attention out-projection"):
        residual_writers(_Custom(_NoAttentionLayer))


def test_missing_mlp_down_projection():
    class NoDownLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = nn.Module()
            self.self_attn.o_proj = nn.Linear(8, 8)
            self.mlp = nn.Module()
            self.mlp.up_proj = nn.Linear(8, 16)

    with pytest.raises(AbliterateError, match="NoDownLayer.*MLP down-projection"):
        residual_writers(_Custom(NoDownLayer))


def test_no_decoder_layers():
    with pytest.raises(AbliterateError, match="cannot find the decoder layers of Linear"):
        decoder_layers(nn.Linear(2, 2))


def test_square_fused_experts_without_layout_flag_are_refused():
    experts = nn.Module()
    experts.down_proj = nn.Parameter(torch.zeros(2, 8, 8))
    layer = nn.Module()
    layer.self_attn = nn.Module()
    layer.self_attn.o_proj = nn.Linear(8, 8)
    layer.mlp = nn.Module()
    layer.mlp.experts = experts
    model = _Custom(nn.Module)
    model.model.layers = nn.ModuleList([layer])
    with pytest.raises(AbliterateError, match="MLP down-projection"):
        residual_writers(model)
    experts.is_transposed = True
    assert residual_writers(model)[0]["mlp"][0].out_dim == -1


def test_writer_out_axis_must_be_hidden_size():
    class WrongWidth(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = nn.Module()
            self.self_attn.o_proj = nn.Linear(8, 6)
            self.mlp = nn.Module()
            self.mlp.down_proj = nn.Linear(16, 8)

    with pytest.raises(AbliterateError, match="layer 0 self_attn.o_proj has weight shape .6, 8., whose out axis -2"):
        residual_writers(_Custom(WrongWidth))


def test_quantized_writer_is_refused():
    class Quantized(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = nn.Module()
            self.self_attn.o_proj = nn.Linear(8, 8)
            self.mlp = nn.Module()
            self.mlp.down_proj = nn.Linear(16, 8)
            self.mlp.down_proj.weight = nn.Parameter(torch.zeros(64, 1, dtype=torch.uint8), requires_grad=False)

    with pytest.raises(AbliterateError, match="layer 0 mlp.down_proj is quantized.*load_in_4bit"):
        residual_writers(_Custom(Quantized))


# --- loading ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TEXT)).save_pretrained(path)
    return path


def test_load_model_float32(tiny_model_dir):
    model = load_model(str(tiny_model_dir), dtypes=("float32",))
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert next(model.parameters()).dtype == torch.float32
    assert len(residual_writers(model)) == 2


def test_load_model_dtype_fallback(tiny_model_dir, monkeypatch, caplog):
    real = transformers.AutoModelForCausalLM.from_pretrained
    tried = []

    def fake(model_id, *args, dtype=None, **kwargs):
        tried.append(dtype)
        if dtype == torch.bfloat16:
            raise RuntimeError("bf16 not supported")
        return real(model_id, *args, dtype=dtype, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake)
    with caplog.at_level(logging.WARNING, logger="abliterate.models"):
        model = load_model(str(tiny_model_dir), dtypes=("bfloat16", "float32"))
    assert tried == [torch.bfloat16, torch.float32]
    assert next(model.parameters()).dtype == torch.float32
    assert "bfloat16" in caplog.text and "bf16 not supported" in caplog.text


def test_load_model_all_dtypes_fail(tiny_model_dir, monkeypatch):
    def fake(*args, dtype=None, **kwargs):
        raise TypeError(f"{dtype} is not supported on this device")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake)
    with pytest.raises(AbliterateError, match="any dtype.*float32 is not supported"):
        load_model(str(tiny_model_dir), dtypes=("bfloat16", "float32"))


def test_load_model_other_errors_do_not_fall_back(tiny_model_dir, monkeypatch, caplog):
    tried = []

    def fake(*args, dtype=None, **kwargs):
        tried.append(dtype)
        raise RuntimeError("size mismatch for lm_head.weight\nmore detail")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake)
    with pytest.raises(AbliterateError, match="size mismatch for lm_head.weight\\); check the model files"):
        load_model(str(tiny_model_dir), dtypes=("bfloat16", "float32"))
    assert tried == [torch.bfloat16]


def test_load_model_dir_without_model(tmp_path):
    with pytest.raises(AbliterateError, match="Unrecognized model"):
        load_model(str(tmp_path), dtypes=("bfloat16", "float32"))


@pytest.mark.parametrize("loader", [load_model, load_tokenizer])
def test_missing_hub_id_offline_names_the_fix(loader, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AbliterateError, match="HF_HUB_OFFLINE=0.*local model dir"):
        loader("no-such-org/no-such-model")


@pytest.mark.parametrize("loader", [load_model, load_tokenizer])
def test_nonexistent_local_path(loader):
    with pytest.raises(AbliterateError, match="does not exist"):
        loader("./nope")


def test_load_in_4bit_needs_cuda(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(AbliterateError, match="CUDA"):
        load_model(str(tiny_model_dir), load_in_4bit=True)


@pytest.mark.parametrize("name", ["float31", "nn", "Tensor"])
def test_unknown_dtype(tiny_model_dir, name):
    with pytest.raises(AbliterateError, match="unknown dtype"):
        load_model(str(tiny_model_dir), dtypes=(name,))


def test_empty_dtypes(tiny_model_dir):
    with pytest.raises(AbliterateError, match="empty"):
        load_model(str(tiny_model_dir), dtypes=())


def _save_tokenizer(path, **special):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "</s>": 1, "hello": 2, "world": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", **special)
    assert tokenizer.pad_token is None
    tokenizer.save_pretrained(path)
    return path


def test_load_tokenizer_left_padding_and_pad_token(tmp_path):
    tokenizer = load_tokenizer(str(_save_tokenizer(tmp_path, eos_token="</s>")))
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token == "</s>"
    batch = tokenizer(["hello", "hello world"], padding=True)
    assert batch["input_ids"][0] == [tokenizer.pad_token_id, 2]


def test_load_tokenizer_without_pad_or_eos(tmp_path):
    with pytest.raises(AbliterateError, match="neither a pad nor an eos token; set one"):
        load_tokenizer(str(_save_tokenizer(tmp_path)))
