"""Model loading and architecture discovery: decoder layers and their residual writers.

A residual writer is a weight whose output is added to the residual stream: the attention
out-projection and the MLP down-projection(s) of every decoder layer. Ablating a direction r
from all of them removes r from what the layer adds to the residual stream. Gemma 2/3 and OLMo 2
put a post-norm between the writers and the residual add; `post_norm_gains` describes it.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from torch import nn

from abliterate.errors import AbliterateError
from abliterate.writers import LayerWriters, WriterRef

if TYPE_CHECKING:  # transformers is imported lazily: it is slow to import and `--help` needs none of it
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger("abliterate.models")

DTYPE_FALLBACK = ("auto", "bfloat16", "float16", "float32")

# Where the decoder layers live, most common first.
LAYER_PATHS = (
    "model.layers",  # Llama, Qwen, Mistral, Gemma, Phi-3, Mixtral, Qwen-MoE, GPT-OSS ...
    "model.language_model.layers",  # Gemma 3 / Llava-style multimodal wrappers
    "language_model.model.layers",  # older multimodal wrappers
    "model.decoder.layers",  # OPT-style
    "transformer.h",  # GPT-2, Falcon, Bloom, GPT-J
    "transformer.layers",
    "gpt_neox.layers",  # Pythia / GPT-NeoX
    "layers",  # a bare base model (LlamaModel ...)
    "language_model.layers",  # a bare multimodal base model
)
ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention", "linear_attn")
ATTENTION_OUT_NAMES = ("o_proj", "out_proj", "dense", "c_proj", "wo")
MLP_NAMES = ("mlp", "feed_forward", "block_sparse_moe", "moe", "ffn")
MLP_DOWN_NAMES = ("down_proj", "fc2", "w2", "dense_4h_to_h", "fc_out", "c_proj", "wo")
SHARED_EXPERT_NAMES = ("shared_expert", "shared_experts", "shared_mlp")

# A load failure that another dtype may fix (e.g. "BFloat16 is not supported on this device").
_DTYPE_PROBLEM = re.compile(r"b?float16|bf16|fp16|\bhalf\b|dtype|float32|fp32|float8", re.IGNORECASE)


def _check_local_path(model_id: str) -> None:  # a clear path must exist and be a dir: else HF's hub errors confuse
    looks_like_path = model_id.startswith((".", "/", "~")) or Path(model_id).suffix in (".gguf", ".safetensors")
    if looks_like_path and not Path(model_id).expanduser().exists():
        raise AbliterateError(f"model path {model_id} does not exist; pass an existing model dir or a hub id")
    if Path(model_id).expanduser().is_file():
        raise AbliterateError(f"model path {model_id} is a file; pass its dir (a .gguf: and --module.load.gguf_file)")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _hub_kwargs(revision: str | None, gguf_file: str | None, trust_remote_code: bool) -> dict:
    # trust_remote_code is always passed, False included: left unset, transformers asks on stdin whether
    # to run the repo's own code (auto_map) and runs it on "y". A gguf_file is dequantised on load.
    kwargs = {"trust_remote_code": bool(trust_remote_code), "revision": revision, "gguf_file": gguf_file}
    return {key: value for key, value in kwargs.items() if value is not None}


def _load_error(model_id: str, err: Exception, what: str = "") -> AbliterateError | None:
    """The one-line error for a failure no other dtype would fix; None for the rest."""
    if isinstance(err, OSError):  # not found / not downloadable
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false", "no", "off"):
            fix = "HF_HUB_OFFLINE is set, so it must already be in the HF cache: set HF_HUB_OFFLINE=0 to download it"
        else:
            fix = "check the hub id and --module.load.revision (gated models need `hf auth login`)"
        return AbliterateError(f"cannot load {model_id!r} ({_first_line(err)}); {fix}, or pass a local model dir")
    if isinstance(err, ImportError):  # e.g. gguf not installed
        return AbliterateError(f"cannot load {what}{model_id}: {_first_line(err)}")
    if isinstance(err, ValueError) and "trust_remote_code=True" in str(err):  # raised before any of that code runs
        return AbliterateError(
            f"{model_id} needs its own Python code to load (auto_map in its config files); pass "
            "--module.load.trust_remote_code true only if you trust that code"
        )
    return None


def load_tokenizer(
    model_id: str, *, revision: str | None = None, trust_remote_code: bool = False, gguf_file: str | None = None
) -> PreTrainedTokenizerBase:
    """The model's tokenizer, padding on the left (batched generation) and with a pad token."""
    from transformers import AutoTokenizer

    _check_local_path(model_id)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id, **_hub_kwargs(revision, gguf_file, trust_remote_code))
    except (OSError, ImportError, ValueError) as err:
        raise _load_error(model_id, err, "the tokenizer of ") or AbliterateError(
            f"cannot load the tokenizer of {model_id} ({_first_line(err)}); the model dir needs tokenizer files"
        ) from err
    tokenizer.padding_side = "left"  # generation continues from the last position of every row
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise AbliterateError(
                f"tokenizer of {model_id} has neither a pad nor an eos token; set one in its tokenizer_config.json"
            )
        tokenizer.pad_token = tokenizer.eos_token  # padded positions are masked, any token will do
    return tokenizer


def _parse_dtypes(dtypes: Sequence[str]) -> list[str | torch.dtype]:
    if isinstance(dtypes, str) or not dtypes:
        raise AbliterateError("module.load.dtypes is empty or not a list; list at least one dtype, e.g. [auto]")
    parsed: list[str | torch.dtype] = []
    for name in dtypes:
        dtype = name if name == "auto" else getattr(torch, str(name), None)
        if not isinstance(dtype, (str, torch.dtype)):
            raise AbliterateError(
                f"unknown dtype {name!r} in module.load.dtypes; use auto, bfloat16, float16 or float32"
            )
        parsed.append(dtype)
    return parsed


def _four_bit_config(dtype: str | torch.dtype):
    # Checked before any download: bitsandbytes 4-bit kernels are CUDA-only.
    if not torch.cuda.is_available():
        raise AbliterateError("4-bit loading needs a CUDA GPU; drop --module.load.load_in_4bit")
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as err:
        raise AbliterateError("4-bit loading needs bitsandbytes; pip install 'abliterate[quant]'") from err
    if not isinstance(dtype, torch.dtype) or dtype == torch.float32:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype)


def load_model(
    model_id: str,
    *,
    dtypes: Sequence[str] = DTYPE_FALLBACK,
    device_map: str | dict | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    gguf_file: str | None = None,
    load_in_4bit: bool = False,
) -> PreTrainedModel:
    """Load a causal LM in eval mode with gradients off, trying `dtypes` in order.

    Only a dtype problem moves on to the next dtype (logged as a warning); any other failure
    raises at once, since no dtype would fix it.
    """
    from transformers import AutoModelForCausalLM

    _check_local_path(model_id)
    parsed = _parse_dtypes(dtypes)
    if load_in_4bit:
        _four_bit_config("auto")  # fail before loading anything
    kwargs = _hub_kwargs(revision, gguf_file, trust_remote_code)
    if device_map is not None:
        kwargs["device_map"] = device_map
    failures: list[str] = []
    for name, dtype in zip(dtypes, parsed, strict=True):
        if load_in_4bit:
            kwargs["quantization_config"] = _four_bit_config(dtype)
        try:
            model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype, **kwargs)
        except (torch.cuda.OutOfMemoryError, SafetensorError) as err:
            damaged = f"a weights file is damaged ({_first_line(err)}); copy it again"
            oom = f"out of memory as {name}; try --module.load.device_map auto, a smaller dtype or load_in_4bit"
            raise AbliterateError(
                f"cannot load {model_id}: {damaged if isinstance(err, SafetensorError) else oom}"
            ) from err
        except (OSError, ImportError, RuntimeError, TypeError, ValueError) as err:
            fatal = _load_error(model_id, err)
            if fatal is None and not _DTYPE_PROBLEM.search(str(err)):
                fatal = AbliterateError(
                    f"cannot load {model_id} ({_first_line(err)}); check the model files, "
                    "or pass --module.load.trust_remote_code for a custom architecture you trust"
                )
            if fatal is not None:
                raise fatal from err
            log.warning("loading %s as %s failed (%s); trying the next dtype", model_id, name, _first_line(err))
            failures.append(f"{name}: {_first_line(err)}")
            continue
        model.eval()
        model.requires_grad_(False)
        return model
    raise AbliterateError(
        f"cannot load {model_id} with any dtype in {list(dtypes)} (last: {failures[-1]}); "
        "list another dtype in --module.load.dtypes"
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers, in order, for the common layouts (see LAYER_PATHS)."""
    for path in LAYER_PATHS:
        layers = functools.reduce(lambda node, part: getattr(node, part, None), path.split("."), model)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    raise AbliterateError(
        f"cannot find the decoder layers of {type(model).__name__} (looked at {', '.join(LAYER_PATHS)}); "
        "this architecture is not supported yet, use a Llama/Qwen/Mistral/Gemma/Phi-3/MoE family model"
    )


def hidden_size(model: nn.Module) -> int:
    """d_model: the text config's hidden size (multimodal configs nest it)."""
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    size = getattr(text_config, "hidden_size", None)
    return size if isinstance(size, int) else int(model.get_input_embeddings().embedding_dim)


def _unsupported(index: int, layer: nn.Module, what: str) -> AbliterateError:
    children = ", ".join(name for name, _ in layer.named_children())
    return AbliterateError(
        f"layer {index} ({type(layer).__name__}, children: {children}) has no recognisable {what}; "
        "this architecture is not supported yet, use a Llama/Qwen/Mistral/Gemma/Phi-3/MoE family model"
    )


def _checked(ref: WriterRef, hidden: int, where: str) -> WriterRef:
    """The writer, once its out axis (and bias) is shown to live in the residual space."""
    weight = ref.weight
    if not weight.is_floating_point():
        raise AbliterateError(
            f"{where} is quantized ({type(ref.module).__name__}, {weight.dtype}); weight ablation needs "
            "unquantized weights: drop --module.load.load_in_4bit"
        )
    if weight.dim() < 2 or weight.shape[ref.out_dim] != hidden:
        raise AbliterateError(
            f"{where} has weight shape {tuple(weight.shape)}, whose out axis {ref.out_dim} is not the "
            f"hidden size {hidden}; this architecture is not supported yet"
        )
    if ref.bias is not None and ref.bias.shape[-1] != hidden:
        raise AbliterateError(f"{where} has bias shape {tuple(ref.bias.shape)}, not ending in the hidden size {hidden}")
    return ref


def _dense_writer(parent: nn.Module, names: Sequence[str], hidden: int, where: str) -> WriterRef | None:
    """The first child named in `names` that is a linear map; None when there is none."""
    from transformers.pytorch_utils import Conv1D

    for name in names:
        child = getattr(parent, name, None)
        if isinstance(child, nn.Linear):  # weight [out, in]
            out_dim = -2
        elif isinstance(child, Conv1D):  # GPT-2: weight [in, out]
            out_dim = -1
        else:
            continue
        bias = "bias" if getattr(child, "bias", None) is not None else None
        return _checked(WriterRef(child, "weight", out_dim, bias), hidden, f"{where}.{name}")
    return None


def _fused_experts_writer(experts: nn.Module, hidden: int, where: str) -> WriterRef | None:
    """transformers 5 stores the routed experts of an MoE block as one [E, ., .] parameter.

    Classes decorated with `use_experts_implementation` (Mixtral, Qwen2/3-MoE, DeepSeek-V3, OLMoE,
    Phi-MoE, GPT-OSS ...) carry `is_transposed`: False means F.linear(x, W[e]) with W
    [E, d_model, d_inter] (out axis -2), True means x @ W[e] with W [E, d_inter, d_model] (out
    axis -1; GPT-OSS, whose d_inter == d_model, so the shape alone could not tell). Undecorated
    classes (Llama 4: x @ W[e]) are read from the shape, and a square one is refused, not guessed.
    """
    weight = getattr(experts, "down_proj", None)
    if not isinstance(weight, nn.Parameter) or weight.dim() != 3:
        return None
    if getattr(experts, "has_post_expert_norm", False):
        raise AbliterateError(
            f"{where} normalises every expert's output before the residual add; ablating its weights "
            "would not remove a direction, so this architecture is not supported"
        )
    transposed = getattr(experts, "is_transposed", None)
    if isinstance(transposed, bool):
        out_dim = -1 if transposed else -2
    elif weight.shape[-2] == weight.shape[-1]:
        return None
    else:
        out_dim = -2 if weight.shape[-2] == hidden else -1
    bias = "down_proj_bias" if isinstance(getattr(experts, "down_proj_bias", None), nn.Parameter) else None
    return _checked(WriterRef(experts, "down_proj", out_dim, bias), hidden, f"{where}.down_proj")


def _mlp_writers(mlp: nn.Module, hidden: int, where: str) -> list[WriterRef]:
    """The down-projection of a dense MLP, or every routed and shared expert's of an MoE block."""
    dense = _dense_writer(mlp, MLP_DOWN_NAMES, hidden, where)
    if dense is not None:
        return [dense]
    experts = getattr(mlp, "experts", None)
    routed: Iterable[WriterRef | None] = ()
    if isinstance(experts, nn.ModuleList):  # one module per expert
        routed = (_dense_writer(x, MLP_DOWN_NAMES, hidden, f"{where}.experts.{e}") for e, x in enumerate(experts))
    elif isinstance(experts, nn.Module):
        routed = (_fused_experts_writer(experts, hidden, f"{where}.experts"),)
    shared = (  # a scalar gate on the shared expert keeps it a plain writer
        _dense_writer(getattr(mlp, n), MLP_DOWN_NAMES, hidden, f"{where}.{n}")
        for n in SHARED_EXPERT_NAMES
        if getattr(mlp, n, None) is not None
    )
    refs: list[WriterRef] = []
    for ref in itertools.chain(routed, shared):  # lazily: the first expert without a writer ends the search
        if ref is None:
            return []
        refs.append(ref)
    return refs


def _named_child(layer: nn.Module, names: Sequence[str]) -> tuple[str, nn.Module] | None:
    return next(((n, getattr(layer, n)) for n in names if isinstance(getattr(layer, n, None), nn.Module)), None)


def residual_writers(model: nn.Module) -> list[LayerWriters]:
    """Per decoder layer: {"attn": [out-projection], "mlp": [down-projection(s)]}.

    A layer where either is missing raises: skipping it would silently leave its writes in place.
    """
    hidden = hidden_size(model)
    result: list[LayerWriters] = []
    for index, layer in enumerate(decoder_layers(model)):
        attn = _named_child(layer, ATTENTION_NAMES)
        attn_ref = _dense_writer(attn[1], ATTENTION_OUT_NAMES, hidden, f"layer {index} {attn[0]}") if attn else None
        if attn_ref is None:
            raise _unsupported(index, layer, "attention out-projection")
        mlp = _named_child(layer, MLP_NAMES)
        mlp_refs = _mlp_writers(mlp[1], hidden, f"layer {index} {mlp[0]}") if mlp else []
        if not mlp_refs:
            raise _unsupported(index, layer, "MLP down-projection")
        result.append({"attn": [attn_ref], "mlp": mlp_refs})
    return result


# Layers with a norm on each writer's output before the residual add (Gemma 2/3, OLMo 2, EXAONE 4):
# they have post_feedforward_layernorm, and then post_attention_layernorm is a real post-norm too
# (in Llama-style layers post_attention_layernorm is the pre-MLP norm, on the residual's copy).
_POST_NORMS = {"attn": "post_attention_layernorm", "mlp": "post_feedforward_layernorm"}


@torch.no_grad()
def _rms_gain(norm: nn.Module, hidden: int, where: str) -> torch.Tensor:
    """g with norm(y) = g * y / rms(y): norm(ones), checked on a random y. [hidden] float32."""
    param = next(norm.parameters(), None)
    device = param.device if param is not None and param.device.type != "meta" else torch.device("cpu")
    gain = norm(torch.ones(hidden, device=device)).float()
    y = torch.randn(hidden, generator=torch.Generator().manual_seed(0)).to(device)
    out = norm(y).float()
    expected = gain * y
    scale = (out @ expected) / (expected @ expected).clamp_min(1e-30)
    if not torch.isfinite(scale) or (out - scale * expected).norm() > 1e-3 * out.norm():
        raise AbliterateError(
            f"{where} ({type(norm).__name__}) is not an RMS norm with a per-channel gain; directional "
            "ablation cannot pass through it, so this architecture is not supported"
        )
    return gain.cpu()


def post_norm_gains(model: nn.Module) -> list[dict[str, torch.Tensor | None]]:
    """Per decoder layer and component, the gain g of the post-norm between writers and residual.

    None where the writers add to the residual directly. Where g is given, the layer adds
    g * y / rms(y) for a writer output y, so r^T (update) = 0 needs (g * r)^T y = 0: ablate
    normalize(g * r) from the writers instead of r (for k directions with unequal weights, the
    oblique projection W - A (A^T A)^-1 diag(w) A^T W with A = g * R). Projecting r itself
    leaves a component along r unless g is constant.
    """
    hidden = hidden_size(model)
    result: list[dict[str, torch.Tensor | None]] = []
    for index, layer in enumerate(decoder_layers(model)):
        gains: dict[str, torch.Tensor | None] = {"attn": None, "mlp": None}
        if isinstance(getattr(layer, _POST_NORMS["mlp"], None), nn.Module):
            for component, name in _POST_NORMS.items():
                norm = getattr(layer, name, None)
                if isinstance(norm, nn.Module):
                    gains[component] = _rms_gain(norm, hidden, f"layer {index} {name}")
        result.append(gains)
    return result


def describe_architecture(model: nn.Module, writers: list[LayerWriters] | None = None) -> str:
    """One line: family, layers, hidden size and the writers found per component (`writers`: those
    already found, e.g. by `editing.writers_of` for a model with packed 4-bit weights)."""
    writers = residual_writers(model) if writers is None else writers
    n_attn = sum(len(w["attn"]) for w in writers)
    n_mlp = sum(len(w["mlp"]) for w in writers)
    moe = any(ref.weight.dim() == 3 or len(w["mlp"]) > 1 for w in writers for ref in w["mlp"])
    post_norm = isinstance(getattr(decoder_layers(model)[0], _POST_NORMS["mlp"], None), nn.Module)
    return (
        f"{type(model).__name__}: {len(writers)} layers, hidden {hidden_size(model)}, "
        f"{n_attn} attention and {n_mlp} MLP writers{' (MoE)' if moe else ''}"
        f"{', post-norms after the writers' if post_norm else ''}"
    )
