"""Model loading and architecture discovery: decoder layers and their residual writers."""

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from abliterate.errors import AbliterateError
from abliterate.writers import LayerWriters, WriterRef

log = logging.getLogger("abliterate.models")

DTYPE_FALLBACK = ("auto", "bfloat16", "float16", "float32")

LAYER_PATHS = (
    "model.layers",
    "model.language_model.layers",
    "language_model.model.layers",
    "model.decoder.layers",
    "transformer.h",
    "transformer.layers",
    "gpt_neox.layers",
)
ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
ATTENTION_OUT_NAMES = ("o_proj", "out_proj", "dense", "wo")
MLP_NAMES = ("mlp", "feed_forward", "block_sparse_moe", "moe")
MLP_DOWN_NAMES = ("down_proj", "fc2", "w2", "dense_4h_to_h", "wo")
SHARED_EXPERT_NAMES = ("shared_expert", "shared_experts", "shared_mlp")


def _looks_like_path(model_id: str) -> bool:
    return model_id.startswith((".", "/", "~")) or Path(model_id).suffix in (".gguf", ".safetensors")


def _load_error(model_id: str, err: Exception) -> AbliterateError:
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return AbliterateError(
        f"cannot load {model_id!r} ({first_line}); check the hub id or pass a local model dir "
        "(offline, HF_HUB_OFFLINE=1 needs the model in the HF cache)"
    )


def load_tokenizer(
    model_id: str, *, revision: str | None = None, trust_remote_code: bool = False, gguf_file: str | None = None
):
    """The model's tokenizer with left padding (generation) and a pad token."""
    from transformers import AutoTokenizer

    if _looks_like_path(model_id) and not Path(model_id).expanduser().exists():
        raise AbliterateError(f"model path {model_id} does not exist; pass an existing dir or a hub id")
    kwargs = {"revision": revision, "gguf_file": gguf_file}
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id, **{k: v for k, v in kwargs.items() if v is not None})
    except (OSError, ValueError) as err:
        raise _load_error(model_id, err) from err
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise AbliterateError(f"tokenizer of {model_id} has neither a pad nor an eos token; it cannot batch prompts")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    model_id: str,
    *,
    dtypes: Sequence[str] = DTYPE_FALLBACK,
    device_map: str | dict | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    gguf_file: str | None = None,
    load_in_4bit: bool = False,
):
    """Load a causal LM in eval mode, trying `dtypes` in order; each failure is logged."""
    from transformers import AutoModelForCausalLM

    if _looks_like_path(model_id) and not Path(model_id).expanduser().exists():
        raise AbliterateError(f"model path {model_id} does not exist; pass an existing dir or a hub id")
    kwargs: dict = {}
    if revision is not None:
        kwargs["revision"] = revision
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    if device_map is not None:
        kwargs["device_map"] = device_map
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    if load_in_4bit:
        if not torch.cuda.is_available():
            raise AbliterateError("4-bit loading needs a CUDA GPU; drop --module.load.load_in_4bit")
        try:
            from transformers import BitsAndBytesConfig

            import bitsandbytes  # noqa: F401
        except ImportError as err:
            raise AbliterateError("4-bit loading needs bitsandbytes; pip install 'abliterate[quant]'") from err
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
    if not dtypes:
        raise AbliterateError("module.load.dtypes is empty; list at least one dtype, e.g. [auto]")

    failures = []
    for name in dtypes:
        dtype = name if name == "auto" else getattr(torch, name, None)
        if not isinstance(dtype, (str, torch.dtype)):
            raise AbliterateError(f"unknown dtype {name!r} in module.load.dtypes; use auto, bfloat16, float16 or float32")
        try:
            model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype, **kwargs)
        except OSError as err:  # not found / not downloadable: no dtype will fix it
            raise _load_error(model_id, err) from err
        except (RuntimeError, TypeError, ValueError) as err:
            log.warning("loading %s as %s failed (%s); trying the next dtype", model_id, name, err)
            failures.append(f"{name}: {err}")
            continue
        model.eval()
        model.requires_grad_(False)
        return model
    raise AbliterateError(f"cannot load {model_id} with any dtype in {list(dtypes)}: {failures[-1]}")


def _get_path(root: nn.Module, path: str):
    node = root
    for part in path.split("."):
        node = getattr(node, part, None)
        if node is None:
            return None
    return node


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    for path in LAYER_PATHS:
        layers = _get_path(model, path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    raise AbliterateError(
        f"cannot find the decoder layers of {type(model).__name__} (looked at {', '.join(LAYER_PATHS)}); "
        "this architecture is not supported yet"
    )


def hidden_size(model: nn.Module) -> int:
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text_config.hidden_size)


def _linear_writer(module: nn.Module, names: Sequence[str], hidden: int) -> WriterRef | None:
    for name in names:
        child = getattr(module, name, None)
        if isinstance(child, nn.Linear) and child.out_features == hidden:
            bias = "bias" if child.bias is not None else None
            return WriterRef(child, "weight", -2, bias)
    return None


def _fused_expert_writer(experts: nn.Module, hidden: int) -> WriterRef | None:
    """transformers 5 stores MoE experts as one [E, ., .] parameter.

    Most use F.linear(x, W[e]) with W [E, d_model, d_inter]; some (GPT-OSS, `is_transposed=True`
    from `use_experts_implementation`; Llama 4) use x @ W[e] with W [E, d_inter, d_model]. When
    d_inter == d_model the shape alone cannot tell, so the flag decides; without it a square
    tensor is refused rather than guessed.
    """
    weight = getattr(experts, "down_proj", None)
    if not isinstance(weight, nn.Parameter) or weight.dim() != 3:
        return None
    transposed = getattr(experts, "is_transposed", None)
    if isinstance(transposed, bool):
        out_dim = -1 if transposed else -2
    elif weight.shape[-2] == weight.shape[-1]:
        return None
    else:
        out_dim = -2 if weight.shape[-2] == hidden else -1
    if weight.shape[out_dim] != hidden:
        return None
    bias = getattr(experts, "down_proj_bias", None)
    return WriterRef(experts, "down_proj", out_dim, "down_proj_bias" if isinstance(bias, nn.Parameter) else None)


def _mlp_writers(mlp: nn.Module, hidden: int) -> list[WriterRef]:
    direct = _linear_writer(mlp, MLP_DOWN_NAMES, hidden)
    if direct is not None:
        return [direct]
    refs: list[WriterRef] = []
    experts = getattr(mlp, "experts", None)
    if isinstance(experts, nn.ModuleList):
        for expert in experts:
            ref = _linear_writer(expert, MLP_DOWN_NAMES, hidden)
            if ref is None:
                return []
            refs.append(ref)
    elif experts is not None:
        fused = _fused_expert_writer(experts, hidden)
        if fused is None:
            return []
        refs.append(fused)
    for name in SHARED_EXPERT_NAMES:
        shared = getattr(mlp, name, None)
        if shared is not None:
            ref = _linear_writer(shared, MLP_DOWN_NAMES, hidden)
            if ref is None:
                return []
            refs.append(ref)
    return refs


def residual_writers(model: nn.Module) -> list[LayerWriters]:
    """Per decoder layer: {"attn": [attention out-projection], "mlp": [down-projection(s)]}."""
    hidden = hidden_size(model)
    result = []
    for index, layer in enumerate(decoder_layers(model)):
        attn = next((getattr(layer, n) for n in ATTENTION_NAMES if hasattr(layer, n)), None)
        mlp = next((getattr(layer, n) for n in MLP_NAMES if hasattr(layer, n)), None)
        attn_ref = _linear_writer(attn, ATTENTION_OUT_NAMES, hidden) if attn is not None else None
        mlp_refs = _mlp_writers(mlp, hidden) if mlp is not None else []
        if attn_ref is None or not mlp_refs:
            children = ", ".join(name for name, _ in layer.named_children())
            missing = "attention out-projection" if attn_ref is None else "MLP down-projection"
            raise AbliterateError(
                f"layer {index} ({type(layer).__name__}, children: {children}) has no recognisable {missing}; "
                "this architecture is not supported yet"
            )
        result.append({"attn": [attn_ref], "mlp": mlp_refs})
    return result


def describe_architecture(model: nn.Module) -> str:
    writers = residual_writers(model)
    n_mlp = sum(len(w["mlp"]) for w in writers)
    return (
        f"{type(model).__name__}: {len(writers)} layers, hidden {hidden_size(model)}, "
        f"{len(writers)} attention and {n_mlp} MLP writers"
    )
