"""Benchmark the two ways to apply one trial's ablation: WeightEditor (edit weights in place, then
restore them) against ablation_hooks (project every writer's output with forward hooks).

A trial is modelled as: set up the ablation, run --forwards forward passes, tear it down.
    edit:  WeightEditor.apply + forwards with the edited weights + WeightEditor.reset
    hooks: register the hooks + forwards with the hooks + remove them

The model is a LlamaForCausalLM built from a config (random weights, nothing downloaded); every
writer of every layer is ablated (attn and mlp kernels cover all layers, k directions, no norm
preservation so that the two mechanisms compute the same thing). Edit and hook trials alternate
within each repeat so that noise from other processes hits both alike. Reported times are medians:
setup/teardown over --repeats, forward passes over all timed passes (repeats x forwards);
per-trial totals are setup + teardown + forwards x the median pass.

Prints one JSON line:
    layers, hidden, intermediate, vocab, k, dtype, device, threads, batch, seq, forwards, repeats,
    plain_forward_s, edit_apply_s, edit_reset_s, edit_forward_s, hooks_register_remove_s,
    hooks_forward_s, edit_trial_s, hooks_trial_s, ratio_hooks_over_edit, hook_forward_overhead,
    break_even_forwards, max_abs_logit_diff, max_abs_logit

break_even_forwards: the number of passes per trial above which the edit is cheaper (null when
one mechanism is cheaper at any count). max_abs_logit_diff compares the logits of the two
mechanisms on the same batch (max_abs_logit gives the scale).

    OMP_NUM_THREADS=1 python scripts/bench_ablation.py                  # 8 x 512, batch 4 x 32, cpu
    OMP_NUM_THREADS=1 python scripts/bench_ablation.py --forwards 8 --repeats 3
    python scripts/bench_ablation.py --device cuda --layers 32 --hidden 4096 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM

from abliterate.ablation import AblationParams, ComponentKernel, WeightEditor, edit_plan
from abliterate.directions import compute_dtype
from abliterate.models import residual_writers
from abliterate.writers import LayerWriters


def _projection_hook(r: Tensor, coef: Tensor):
    """A forward hook returning y - sum_j w_j r_j (r_j^T y), computed in r's dtype."""

    def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        dirs, weights = r, coef
        if output.device != dirs.device:
            dirs, weights = dirs.to(output.device), weights.to(output.device)
        y = output.to(dirs.dtype)
        return (y - ((y @ dirs.T) * weights) @ dirs).to(output.dtype)

    return hook


@contextmanager
def ablation_hooks(writers: list[LayerWriters], params: AblationParams, directions: Tensor) -> Iterator[None]:
    """The hook alternative to weight edits: project each writer's output, y' = y - sum_j w_j r_j r_j^T y.

    Equal to `WeightEditor` without norm preservation (the bias is inside y). Only `nn.Linear`-style
    writers (out_dim=-2, the module's own `weight`) can be hooked. Removes only its own handles,
    always. tests/test_ablation.py checks it against `WeightEditor`.
    """
    if params.norm_preserving:
        raise NotImplementedError(
            "ablation_hooks cannot preserve norms: that rescales weight columns, not outputs; use WeightEditor"
        )
    plan = edit_plan(params, directions, writers)
    for layer, component, _, _ in plan:
        for ref in writers[layer][component]:
            if ref.out_dim != -2 or ref.name != "weight":
                raise NotImplementedError(
                    f"ablation_hooks needs nn.Linear writers (out_dim=-2, param 'weight'); layer {layer} {component} "
                    f"writer {type(ref.module).__name__}.{ref.name} has out_dim={ref.out_dim}; use WeightEditor"
                )
    handles = []
    try:
        for layer, component, dirs, weights in plan:
            for ref in writers[layer][component]:
                dtype = compute_dtype(ref.weight)
                r = dirs.to(device=ref.weight.device, dtype=dtype)
                coef = weights.to(device=ref.weight.device, dtype=dtype)
                handles.append(ref.module.register_forward_hook(_projection_hook(r, coef)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def build_model(args: argparse.Namespace) -> LlamaForCausalLM:
    heads = max(1, args.hidden // 64)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max(2048, args.seq),
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=args.device, dtype=getattr(torch, args.dtype))
    return model.eval().requires_grad_(False)


def random_directions(layers: int, k: int, hidden: int, device: str) -> torch.Tensor:
    """[layers, k, hidden] float32, orthonormal per layer."""
    gen = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(layers, hidden, k, generator=gen))
    return q.mT.contiguous().to(device)


def timed(fn, device: str) -> tuple[float, object]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--k", type=int, default=1, help="directions per layer")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--forwards", type=int, default=32, help="forward passes per trial")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = build_model(args)
    writers = residual_writers(model)
    directions = random_directions(args.layers, args.k, args.hidden, args.device)
    everywhere = ComponentKernel(
        max_weight=1.0, max_weight_position=(args.layers - 1) / 2, min_weight=0.5, min_weight_distance=args.layers
    )
    params = AblationParams(components={"attn": everywhere, "mlp": everywhere}, direction_decay=0.5)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(2))
    ids = ids.to(args.device)
    editor = WeightEditor(writers)

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return model(ids).logits

    # warm-up, and the equivalence of the two mechanisms on the same batch
    plain = forward()
    with editor.applied(params, directions):
        edited = forward().float()
    with ablation_hooks(writers, params, directions):
        hooked = forward().float()
    max_abs_logit_diff = (edited - hooked).abs().max().item()
    max_abs_logit = edited.abs().max().item()
    assert (edited - plain.float()).abs().max() > 0, "the ablation changed nothing"

    times: dict[str, list[float]] = {k: [] for k in ("plain", "apply", "reset", "edit_fwd", "hooks_setup", "hooks_fwd")}
    for _ in range(args.repeats):
        # edit trial
        t, _ = timed(lambda: editor.apply(params, directions), args.device)
        times["apply"].append(t)
        for _ in range(args.forwards):
            times["edit_fwd"].append(timed(forward, args.device)[0])
        times["reset"].append(timed(editor.reset, args.device)[0])
        # hook trial: entering registers the hooks, leaving removes them
        hooks = ablation_hooks(writers, params, directions)
        setup, _ = timed(hooks.__enter__, args.device)
        for _ in range(args.forwards):
            times["hooks_fwd"].append(timed(forward, args.device)[0])
        teardown, _ = timed(lambda hooks=hooks: hooks.__exit__(None, None, None), args.device)
        times["hooks_setup"].append(setup + teardown)
        # unablated passes, for the hooks' overhead per pass
        for _ in range(max(1, args.forwards // 4)):
            times["plain"].append(timed(forward, args.device)[0])
    for module in model.modules():
        assert not module._forward_hooks, "hooks left behind"

    med = {name: statistics.median(values) for name, values in times.items()}
    edit_setup = med["apply"] + med["reset"]
    edit_trial = edit_setup + args.forwards * med["edit_fwd"]
    hooks_trial = med["hooks_setup"] + args.forwards * med["hooks_fwd"]
    per_pass_gap = med["hooks_fwd"] - med["edit_fwd"]
    break_even = (edit_setup - med["hooks_setup"]) / per_pass_gap if per_pass_gap > 0 else None
    result = {
        "layers": args.layers,
        "hidden": args.hidden,
        "intermediate": args.intermediate,
        "vocab": args.vocab,
        "k": args.k,
        "dtype": args.dtype,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "seq": args.seq,
        "forwards": args.forwards,
        "repeats": args.repeats,
        "plain_forward_s": med["plain"],
        "edit_apply_s": med["apply"],
        "edit_reset_s": med["reset"],
        "edit_forward_s": med["edit_fwd"],
        "hooks_register_remove_s": med["hooks_setup"],
        "hooks_forward_s": med["hooks_fwd"],
        "edit_trial_s": edit_trial,
        "hooks_trial_s": hooks_trial,
        "ratio_hooks_over_edit": hooks_trial / edit_trial,
        "hook_forward_overhead": med["hooks_fwd"] / med["edit_fwd"] - 1,
        "break_even_forwards": None if break_even is None or break_even < 0 else break_even,
        "max_abs_logit_diff": max_abs_logit_diff,
        "max_abs_logit": max_abs_logit,
    }
    print(json.dumps({k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in result.items()}))


if __name__ == "__main__":
    main()
