"""`--export_format adapter|both`: the ablation as a PEFT LoRA adapter, exactly.

Tiny random models of several families (fp32, built from configs): Llama with biases in the
residual space (lora_bias), GPT-2 (biased Conv1D writers: fan_in_fan_out), Qwen2, Qwen3, Gemma 2
(post-norms: the directions go through the gains) and Qwen2-MoE (fused experts as
target_parameters, plus the shared expert). For each,
base + adapter gives the logits of the in-memory edit and of the merged export, and
`merge_and_unload()` gives the merged export's weights. Then the organism through the Pipeline,
and what the adapter refuses.
"""

import copy
import json

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from abliterate.ablation import AblationParams, ComponentKernel, WeightEditor
from abliterate.errors import AbliterateError
from abliterate.export import export_files, save_export
from abliterate.models import post_norm_gains, residual_writers

peft = pytest.importorskip("peft")

N_LAYERS, D_MODEL, VOCAB = 3, 32, 64
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=D_MODEL,
    intermediate_size=64,
    num_hidden_layers=N_LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
)
FAMILIES = {
    "llama_biased": lambda: LlamaForCausalLM(LlamaConfig(**COMMON, attention_bias=True, mlp_bias=True)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**COMMON)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**COMMON)),
    "gemma2": lambda: Gemma2ForCausalLM(Gemma2Config(**COMMON)),
    "gpt2": lambda: GPT2LMHeadModel(
        GPT2Config(vocab_size=VOCAB, n_embd=D_MODEL, n_layer=N_LAYERS, n_head=4, n_positions=64)
    ),
    "qwen2_moe": lambda: Qwen2MoeForCausalLM(
        Qwen2MoeConfig(
            **COMMON, moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=4, num_experts_per_tok=2
        )
    ),
}
# attn: layers 0-1 only (layer 2 is 2 > 1.5 layers from the peak), so layer 2's o_proj is no target.
PARAMS = AblationParams(
    components={"attn": ComponentKernel(1.0, 0.0, 0.5, 1.5), "mlp": ComponentKernel(1.2, 1.6, 0.2, 2.0)},
    direction_decay=0.6,
)
INTERPOLATED = AblationParams(components=PARAMS.components, direction_index=1.3, direction_decay=0.0)


def tiny(family: str):
    torch.manual_seed(0)
    model = FAMILIES[family]()
    with torch.no_grad():  # HF initialises biases to 0 and norm gains to 1: make both matter
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.normal_(0, 0.5)
    return model.eval().requires_grad_(False)


def directions(k: int = 2, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(N_LAYERS, D_MODEL, k, generator=gen, dtype=torch.float64)).Q
    return q.transpose(1, 2).float().contiguous()


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0")


def input_ids():
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(7))


def ablated_writers(model, params: AblationParams, dirs) -> set[str]:
    """Module (or fused expert parameter) names the plan edits, found independently of the adapter code."""
    from abliterate.ablation import edit_plan

    names = {id(m): n for n, m in model.named_modules()}
    found = set()
    for layer, component, _, _ in edit_plan(params, dirs, residual_writers(model), post_norm_gains(model)):
        for ref in residual_writers(model)[layer][component]:
            name = names[id(ref.module)]
            found.add(name if ref.name == "weight" else f"{name}.{ref.name}")
    return found


@pytest.mark.parametrize("params", [PARAMS, INTERPOLATED], ids=["kernels_decay", "interpolated_k1"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_base_plus_adapter_is_the_edit_and_the_merged_export(family, params, tmp_path):
    from peft import PeftModel

    model = tiny(family)
    base = copy.deepcopy(model)
    dirs = directions()
    editor = WeightEditor(residual_writers(model), gains=post_norm_gains(model))
    ids = input_ids()
    with torch.no_grad():
        plain = model(ids).logits
        with editor.applied(params, dirs):
            edited = model(ids).logits
    assert (edited - plain).abs().max() > 1e-3, "the ablation must change the logits"

    out = tmp_path / "export"
    save_export(model, tokenizer(), editor, params, dirs, out, False, {"base_model": family}, fmt="both")
    assert torch.equal(model(ids).logits, plain), "the export left the model edited"
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    expected_rank = 2 if params.direction_decay > 0 else 1  # directions with weight 0 are dropped
    assert config["r"] == config["lora_alpha"] == expected_rank
    targets = set(config["target_modules"]) | set(config["target_parameters"] or [])
    assert targets == ablated_writers(model, params, dirs)
    assert "model.layers.2.self_attn.o_proj" not in targets  # weight 0 there: no target
    assert config["lora_bias"] == (family in ("llama_biased", "gpt2"))
    assert config["fan_in_fan_out"] == (family == "gpt2")  # Conv1D writers: weight [in, out]
    assert "adapter/adapter_model.safetensors" in export_files(out)

    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    adapted = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    with torch.no_grad():
        merged_logits = merged(ids).logits
        adapted_logits = adapted(ids).logits
    torch.testing.assert_close(merged_logits, edited, rtol=0, atol=1e-4)
    torch.testing.assert_close(adapted_logits, edited, rtol=0, atol=1e-4)
    torch.testing.assert_close(adapted_logits, merged_logits, rtol=0, atol=1e-4)

    unloaded = adapted.merge_and_unload().state_dict()
    expected = merged.state_dict()
    assert set(unloaded) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(unloaded[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    adapter_bytes = (out / "adapter" / "adapter_model.safetensors").stat().st_size
    merged_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    print(f"{family}: adapter {adapter_bytes} bytes, merged {merged_bytes} bytes")


def test_the_organism_exports_an_adapter_through_the_pipeline(organism_dir, tmp_path):
    from peft import PeftModel
    from test_pipeline import full_ablation, make_parts

    from abliterate.options import DirectionOptions
    from abliterate.pipeline import Pipeline
    from abliterate.plans import TrialPlan

    module, data, trainer = make_parts(organism_dir)
    pipe = Pipeline(trainer, module, data, tmp_path / "run")
    pipe.residuals()
    plan = TrialPlan(DirectionOptions(), full_ablation(module.n_layers))
    card = {"base_model": str(organism_dir), "trial": 0}
    pipe.export(plan, card, tmp_path / "merged", False)
    pipe.export(plan, card, tmp_path / "adapter", False, "adapter")
    adapter_files = export_files(tmp_path / "adapter")
    assert adapter_files == {"adapter_config.json", "adapter_model.safetensors", "README.md", "abliterate.json"}
    assert json.loads((tmp_path / "adapter" / "abliterate.json").read_text())["format"] == "adapter"
    assert "PeftModel.from_pretrained" in (tmp_path / "adapter" / "README.md").read_text()

    ids = module.tokenizer(["hello there", "how do I"], return_tensors="pt", padding=True)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(organism_dir, dtype=torch.float32).eval()
    adapted = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(adapted(**ids).logits, merged(**ids).logits, rtol=0, atol=1e-4)
    adapter_bytes = (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    merged_bytes = sum(p.stat().st_size for p in (tmp_path / "merged").glob("*.safetensors"))
    assert adapter_bytes < merged_bytes
    print(f"organism: adapter {adapter_bytes} bytes, merged {merged_bytes} bytes")


def one_line_refusal(model, params, tmp_path, fmt="adapter") -> str:
    editor = WeightEditor(residual_writers(model), gains=post_norm_gains(model))
    target = tmp_path / "export"
    with pytest.raises(AbliterateError) as info:
        save_export(model, tokenizer(), editor, params, directions(), target, False, {"base_model": "x"}, fmt=fmt)
    assert not target.exists(), "a refused export must write nothing"
    message = str(info.value)
    assert len(message.splitlines()) == 1
    return message


def test_norm_preserving_is_refused_not_approximated(tmp_path):
    params = AblationParams(components=PARAMS.components, norm_preserving=True)
    message = one_line_refusal(tiny("qwen2"), params, tmp_path, fmt="both")
    assert "norm_preserving" in message and "DoRA" in message and "--export_format merged" in message


def test_biased_and_unbiased_writers_mixed_are_refused(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**COMMON, attention_bias=True, mlp_bias=False)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
    message = one_line_refusal(model, PARAMS, tmp_path)
    assert "lora_bias is all or none" in message and "--export_format merged" in message


def test_an_unknown_format_is_refused(tmp_path):
    message = one_line_refusal(tiny("qwen2"), PARAMS, tmp_path, fmt="gguf")
    assert "--export_format gguf" in message and "merged, adapter, both" in message


def test_cli_run_then_export_as_adapter(organism_dir, organism_config, tmp_path):
    """`run --export_format both`, then `export --export_format adapter` elsewhere: both load with PEFT."""
    from peft import PeftModel

    from abliterate.cli import main

    out = tmp_path / "run"
    base_args = ["--model", str(organism_dir), "--config", str(organism_config), "--output_dir", str(out)]
    main(["run", *base_args, "--study.n_trials", "3", "--study.seed", "0", "--export_format", "both"])
    record = json.loads((out / "model" / "abliterate.json").read_text())
    assert record["format"] == "both" and "adapter/adapter_config.json" in record["export_files"]
    main(
        [
            "export",
            *base_args,
            "--trial",
            str(record["trial"]),
            "--export_dir",
            str(tmp_path / "shared"),
            "--export_format",
            "adapter",
        ]
    )
    assert json.loads((tmp_path / "shared" / "abliterate.json").read_text())["format"] == "adapter"

    base = AutoModelForCausalLM.from_pretrained(organism_dir, dtype=torch.float32).eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32).eval()
    ids = torch.randint(3, 40, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = merged(ids).logits
        for adapter in (out / "model" / "adapter", tmp_path / "shared"):
            adapted = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter)).eval()
            torch.testing.assert_close(adapted(ids).logits, expected, rtol=0, atol=1e-4)
