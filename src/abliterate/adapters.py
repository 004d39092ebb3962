"""The ablation as a PEFT LoRA adapter, exactly, and the base weights it is computed from.

A writer's edit is W' - W = -R C R^T W (R = [r_1 .. r_k] the plan's directions for its layer and
component, post-norm gains and interpolation included; C = diag of the kernel weight times
decay**j): rank <= k. As LoRA with scaling 1 (lora_alpha = r): B = -R C [d_model, k] and
A = R^T W [k, d_in], so W + B A is the edit, and base + adapter computes (I - P) W x. A bias in the
residual space changes by -R C R^T b: that is lora_B's bias (PEFT's `lora_bias`). Fused expert
tensors [E, ., .] are LoRA `target_parameters` (PEFT >= 0.17): expert e gets B_e = -R C and
A_e = R^T W_e. Directions with weight 0 are dropped, so the rank is the count of non-zero ones.

Refused, each with one line, where PEFT has no exact form: norm_preserving (it rescales W's columns,
one factor per input feature; DoRA's magnitude rescales rows, one per output feature), a changed
bias on fused experts, biased and unbiased targets mixed (`lora_bias` is all or none, and merging it
into a layer without a bias fails), and Conv1D writers mixed with others (`fan_in_fan_out` is global).

`BaseWeights` reads the full-precision weights: in memory where they are plain tensors, else from
accelerate's offload map, else from the base checkpoint's safetensors (4-bit loads: an adapter
computed from the packed weights would not be exact for the base people load it on).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from abliterate.ablation import AblationParams, Gains, edit_plan, orthogonalize_bias, orthogonalize_weight
from abliterate.directions import compute_dtype
from abliterate.editing import offloaded_tensor
from abliterate.errors import AbliterateError, first_line
from abliterate.writers import LayerWriters, WriterRef

log = logging.getLogger("abliterate.adapters")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's key prefix for a model wrapped by PeftModelForCausalLM


# ---- the base weights ----------------------------------------------------------------------------


class Checkpoint:
    """A base model's safetensors files (a local dir or a hub snapshot), read one tensor at a time."""

    def __init__(self, source: str, revision: str | None = None):
        from safetensors import safe_open

        self.source = source
        path = Path(source).expanduser()
        if not path.is_dir():
            try:
                from huggingface_hub import snapshot_download

                path = Path(snapshot_download(source, revision=revision, allow_patterns=["*.safetensors", "*.json"]))
            except Exception as err:  # offline and not cached, or not a hub id
                raise AbliterateError(
                    f"cannot read the base weights of {source} ({first_line(err)}); they are needed to export "
                    "from a 4-bit or disk-offloaded load: make them available (HF_HUB_OFFLINE=0) or pass a local dir"
                ) from err
        self.dir = path
        self.files = sorted(path.glob("*.safetensors"))
        if not self.files:
            raise AbliterateError(
                f"{source} has no safetensors weights to read the full-precision base from; convert it to "
                "safetensors, or export from a full-precision load without disk offload"
            )
        self.where: dict[str, Path] = {}
        for file in self.files:
            with safe_open(str(file), framework="pt") as f:
                self.where.update(dict.fromkeys(f.keys(), file))

    def info(self, key: str) -> tuple[str, tuple[int, ...]]:
        """(safetensors dtype name, e.g. "BF16", shape) of a tensor, without reading it."""
        from safetensors import safe_open

        with safe_open(str(self.where[key]), framework="pt") as f:
            piece = f.get_slice(key)
            return piece.get_dtype(), tuple(piece.get_shape())

    def get(self, key: str) -> Tensor | None:
        from safetensors import safe_open

        file = self.where.get(key)
        if file is None:
            return None
        with safe_open(str(file), framework="pt") as f:
            return f.get_tensor(key)


class BaseWeights:
    """A writer's full-precision weight or bias, from the model, accelerate's offload map or the checkpoint."""

    def __init__(self, model: nn.Module, source: str | None = None, revision: str | None = None):
        self.names = {id(module): name for name, module in model.named_modules()}
        self.source, self.revision = source, revision
        self._checkpoint: Checkpoint | None = None

    @property
    def checkpoint(self) -> Checkpoint:
        if self._checkpoint is None:
            if not self.source:
                raise AbliterateError("the model's weights are not plain tensors and no base model dir is known")
            self._checkpoint = Checkpoint(self.source, self.revision)
        return self._checkpoint

    def name(self, ref: WriterRef) -> str:
        return self.names[id(ref.module)]

    def __call__(self, ref: WriterRef, attr: str | None = None) -> Tensor:
        """`ref`'s weight (attr None) or `attr` (its bias name), as a float tensor of the writer's full shape."""
        attr = attr or ref.name
        tensor = getattr(ref.module, attr)
        if tensor.is_floating_point() and tensor.device.type != "meta":
            return tensor.detach()
        offloaded = offloaded_tensor(ref.module, attr) if tensor.device.type == "meta" else None
        if offloaded is not None:
            return offloaded
        return self.from_checkpoint(ref, attr)

    def checkpoint_keys(self, ref: WriterRef, attr: str) -> list[str]:
        """The checkpoint keys holding `attr` of `ref`: its own name, or one per expert for fused experts."""
        key = f"{self.name(ref)}.{attr}"
        if key in self.checkpoint.where:
            return [key]
        param = getattr(ref.module, attr)
        if attr == ref.name and param.dim() == 3 and ref.out_dim == -2:  # per-expert nn.Linear [d_model, d_in]
            keys = [f"{self.name(ref)}.{e}.{attr}.weight" for e in range(param.shape[0])]
            if all(k in self.checkpoint.where for k in keys):
                return keys
        raise AbliterateError(
            f"{key} is not in the base checkpoint {self.checkpoint.source} (its tensors are named differently); "
            "export from a full-precision load without disk offload"
        )

    def from_checkpoint(self, ref: WriterRef, attr: str, check_only: bool = False) -> Tensor | None:
        """The tensor from the checkpoint (per-expert tensors stacked), checked to be float and of the full shape."""
        keys = self.checkpoint_keys(ref, attr)
        dtype, shape = self.checkpoint.info(keys[0])
        shape = shape if len(keys) == 1 else (len(keys), *shape)
        expected = full_shape(ref, attr)
        if dtype not in ("F16", "BF16", "F32", "F64") or shape != expected:
            raise AbliterateError(
                f"{keys[0]} in {self.checkpoint.source} is {dtype} {shape}, not a full-precision {expected}; the "
                "base checkpoint must hold unquantized weights to export this model"
            )
        if check_only:
            return None
        parts = [self.checkpoint.get(k) for k in keys]
        return parts[0] if len(parts) == 1 else torch.stack(parts)


def full_shape(ref: WriterRef, attr: str) -> tuple[int, ...]:
    """The unpacked shape of a writer's tensor (a 4-bit Linear's packed weight has another)."""
    tensor = getattr(ref.module, attr)
    if attr == ref.name and not tensor.is_floating_point() and hasattr(ref.module, "out_features"):
        shape = (ref.module.out_features, ref.module.in_features)
        return shape if ref.out_dim == -2 else shape[::-1]
    return tuple(tensor.shape)


# ---- the adapter ---------------------------------------------------------------------------------


@dataclass
class LoraTarget:
    """One LoRA target: a module (nn.Linear / Conv1D) or, for fused experts, a parameter of one."""

    module: str
    parameter: str | None
    lora_A: Tensor  # [r * E, d_in]
    lora_B: Tensor  # [d_model, r * E]
    bias: Tensor | None  # [d_model], lora_B's bias
    conv1d: bool = False


@dataclass
class LoraAdapter:
    targets: list[LoraTarget]
    rank: int
    base_model: str | None

    def config(self):
        try:
            from peft import LoraConfig
        except ImportError as err:
            raise AbliterateError("--export_format adapter needs peft: pip install 'abliterate[adapter]'") from err
        modules = sorted(t.module for t in self.targets if t.parameter is None)
        parameters = sorted(f"{t.module}.{t.parameter}" for t in self.targets if t.parameter is not None)
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.rank,  # scaling = lora_alpha / r = 1
            target_modules=modules,
            target_parameters=parameters or None,
            lora_dropout=0.0,
            bias="none",
            lora_bias=any(t.bias is not None for t in self.targets),
            fan_in_fan_out=any(t.conv1d for t in self.targets),
            init_lora_weights=True,
            task_type="CAUSAL_LM",
            base_model_name_or_path=self.base_model,
            inference_mode=True,
        )

    def state_dict(self) -> dict[str, Tensor]:
        state = {}
        for t in self.targets:
            state[f"{PREFIX}{t.module}.lora_A.weight"] = t.lora_A.contiguous()
            state[f"{PREFIX}{t.module}.lora_B.weight"] = t.lora_B.contiguous()
            if t.bias is not None:
                state[f"{PREFIX}{t.module}.lora_B.bias"] = t.bias.contiguous()
        return state

    def save(self, path: Path) -> None:
        """adapter_config.json and adapter_model.safetensors, as PeftModel.save_pretrained writes them."""
        from safetensors.torch import save_file

        config = self.config()
        path.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(str(path))
        save_file(
            {k: v.cpu() for k, v in self.state_dict().items()}, str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"}
        )


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def build_adapter(
    writers: list[LayerWriters],
    params: AblationParams,
    directions: Tensor,
    weights: BaseWeights,
    gains: Gains | None = None,
    base_model: str | None = None,
) -> LoraAdapter:
    """The LoRA adapter whose W + B A is every edit of `edit_plan`; refuses (one line) what LoRA cannot express."""
    if params.norm_preserving:
        raise AbliterateError(
            "--export_format adapter cannot express norm_preserving: it rescales each weight column (one factor per "
            "input feature), which no PEFT adapter does exactly (DoRA rescales per output feature); use --export_format merged"
        )
    plan = edit_plan(params, directions, writers, gains)
    if not plan:
        raise AbliterateError("the chosen trial ablates no writer: there is no adapter to export")
    raw: list[tuple[WriterRef, str, Tensor, Tensor, Tensor | None]] = []  # ref, where, A [(E,) k, d_in], B, bias
    for layer, component, dirs, coef in plan:
        keep = coef != 0
        for ref in writers[layer][component]:
            weight = weights(ref)
            dtype = compute_dtype(weight)
            r, c = dirs[keep].to(device=weight.device, dtype=dtype), coef[keep].to(device=weight.device, dtype=dtype)
            w = weight.to(dtype).movedim(ref.out_dim, -1)  # [..., d_in, d_model]
            lora_b = -(r.T * c)  # [d_model, k]
            lora_a = (w @ r.T).transpose(-1, -2)  # [..., k, d_in]
            bias = None
            if ref.bias_name is not None:
                b = weights(ref, ref.bias_name).to(device=weight.device, dtype=dtype)
                delta = (b @ r.T * c) @ r
                if bool((delta != 0).any()):
                    bias = -delta
            raw.append(
                (ref, f"layer {layer} {component}", lora_a.cpu(), lora_b.cpu(), None if bias is None else bias.cpu())
            )
    rank = max(a.shape[-2] for _, _, a, _, _ in raw)
    return LoraAdapter(_targets(raw, rank, weights), rank, base_model)


def _targets(raw, rank: int, weights: BaseWeights) -> list[LoraTarget]:
    biased = [where for ref, where, *_, bias in raw if bias is not None]
    fused = [where for ref, where, a, *_ in raw if a.dim() == 3]
    conv = [where for ref, where, *_ in raw if _is_conv1d(ref.module)]
    if biased:
        if any(bias is not None and a.dim() == 3 for _, _, a, _, bias in raw):
            raise AbliterateError(
                f"{biased[0]} fused experts have a bias the ablation changes; PEFT has no LoRA bias for fused experts: "
                "use --export_format merged"
            )
        if fused:
            raise AbliterateError(
                f"{biased[0]} writers have a bias the ablation changes and {fused[0]} writers are fused experts; PEFT "
                "cannot combine lora_bias with target_parameters: use --export_format merged"
            )
        unbiased = [where for ref, where, *_ in raw if ref.bias_name is None]
        if unbiased:
            raise AbliterateError(
                f"{biased[0]} writers have a bias the ablation changes but {unbiased[0]} writers have none; PEFT's "
                "lora_bias is all or none: use --export_format merged"
            )
    if conv and len(conv) != len(raw):
        raise AbliterateError(
            f"{conv[0]} writers are Conv1D and others are not; PEFT's fan_in_fan_out is all or none: use --export_format merged"
        )
    targets = []
    for ref, _, a, b, bias in raw:
        k = a.shape[-2]
        a = torch.cat([a, a.new_zeros((*a.shape[:-2], rank - k, a.shape[-1]))], dim=-2)  # zero rows up to the rank
        b = torch.cat([b, b.new_zeros((b.shape[0], rank - k))], dim=-1)
        name = weights.name(ref)
        if a.dim() == 3:  # fused experts: PEFT's lora_A rows are expert-major, lora_B columns rank-major
            experts = a.shape[0]
            lora_a = a.reshape(experts * rank, a.shape[-1])
            lora_b = b[:, :, None].expand(b.shape[0], rank, experts).reshape(b.shape[0], rank * experts)
            targets.append(LoraTarget(name, ref.name, lora_a, lora_b, None))
        else:
            if ref.name != "weight":
                raise AbliterateError(f"{name}.{ref.name} is not a module's weight; PEFT cannot target it")
            targets.append(LoraTarget(name, None, a, b, bias, conv1d=_is_conv1d(ref.module)))
    return targets


def adapter_size(path: Path) -> int:
    """Bytes of an adapter's weights file."""
    return (path / ADAPTER_WEIGHTS).stat().st_size


# ---- the merged checkpoint from the base files ---------------------------------------------------


def merge_checkpoint(
    writers: list[LayerWriters],
    params: AblationParams,
    directions: Tensor,
    weights: BaseWeights,
    out: Path,
    gains: Gains | None = None,
) -> None:
    """Write the base checkpoint with every planned edit merged, shard by shard (one shard in memory).

    For models whose weights are not in memory as plain tensors (4-bit, disk-offloaded): the edit is
    the weight editor's (`orthogonalize_weight`, `orthogonalize_bias`) on the full-precision base
    tensors, in the checkpoint's own dtype and tensor names; config.json, generation_config.json and
    the shard index are copied, every other tensor is kept bit for bit.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    checkpoint = weights.checkpoint
    config = checkpoint.dir / "config.json"
    if config.is_file() and "quantization_config" in json.loads(config.read_text()):
        raise AbliterateError(
            f"{checkpoint.source} is a quantized checkpoint: nothing to merge into; use --export_format adapter"
        )
    edits: dict[str, tuple[Tensor, Tensor, int | None]] = {}  # key -> directions, weights, out axis (None: a bias)
    for layer, component, dirs, coef in edit_plan(params, directions, writers, gains):
        for ref in writers[layer][component]:
            weights.from_checkpoint(ref, ref.name, check_only=True)
            edits.update(dict.fromkeys(weights.checkpoint_keys(ref, ref.name), (dirs, coef, ref.out_dim)))
            if ref.bias_name is not None:
                weights.from_checkpoint(ref, ref.bias_name, check_only=True)
                edits.update(dict.fromkeys(weights.checkpoint_keys(ref, ref.bias_name), (dirs, coef, None)))
    out.mkdir(parents=True, exist_ok=True)
    for file in checkpoint.files:
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata()
            mine = [k for k in f.keys() if k in edits]
        if not mine:
            shutil.copyfile(file, out / file.name)
            continue
        tensors = load_file(str(file))
        for key in mine:
            dirs, coef, out_dim = edits[key]
            if out_dim is None:
                tensors[key] = orthogonalize_bias(tensors[key], dirs, coef)
            else:
                tensors[key] = orthogonalize_weight(
                    tensors[key], dirs, coef, out_dim=out_dim, norm_preserving=params.norm_preserving
                )
        save_file(tensors, str(out / file.name), metadata=metadata)
        del tensors
    for name in (
        "config.json",
        "generation_config.json",
        *(p.name for p in checkpoint.dir.glob("*.safetensors.index.json")),
    ):
        if (checkpoint.dir / name).is_file():
            shutil.copyfile(checkpoint.dir / name, out / name)
