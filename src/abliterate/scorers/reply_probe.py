"""A linear probe that tells refusals from answers by a model's own hidden states over a reply.

The probe is fit on one model's behaviour, never on wording: its replies to prompts it refuses
(positives) against its replies to prompts it answers (negatives). Each reply is read alone (no
prompt before it), so the probe sees how the reply is written, not what it was asked: a harmful
prompt's answer reads as an answer. Plain tensors; `reply_states` runs a model, the rest is maths.
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from abliterate.models import decoder_layers


@dataclass
class Probe:
    """refusal iff features @ weight + bias > 0 (features: `reply_states` at `layer`)."""

    layer: int
    weight: Tensor
    bias: float


@contextmanager
def capture_outputs(blocks: Sequence[nn.Module]) -> Iterator[list[Tensor]]:
    """Each block's output hidden states of the next forward, in order; removes only its own hooks."""
    captured: list[Tensor] = [torch.empty(0)] * len(blocks)

    def hook_for(i: int):
        def hook(module, args, output):
            captured[i] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [block.register_forward_hook(hook_for(i)) for i, block in enumerate(blocks)]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def reply_states(
    model: nn.Module,
    replies: Sequence[Sequence[int]],
    layers: Sequence[int],
    pad_id: int,
    *,
    prefixes: Sequence[Sequence[int]] | None = None,
    batch_size: int = 16,
) -> Tensor:
    """[n, len(layers), d] fp32: each decoder layer's output averaged over a reply's tokens.

    Each reply is read after its prefix (None: alone); an empty reply is read as one pad token, so
    every reply has a state.
    """
    blocks = decoder_layers(model)
    device = next(model.parameters()).device
    rows: list[Tensor] = []
    for start in range(0, len(replies), batch_size):
        heads = [list(prefixes[i]) if prefixes else [] for i in range(start, min(start + batch_size, len(replies)))]
        tails = [list(r) or [pad_id] for r in replies[start : start + batch_size]]
        width = max(len(h) + len(t) for h, t in zip(heads, tails, strict=True))
        ids = torch.full((len(tails), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(tails), width), dtype=torch.long)
        reply = torch.zeros((len(tails), width), dtype=torch.long)
        for i, (head, tail) in enumerate(zip(heads, tails, strict=True)):  # right-padded
            ids[i, : len(head) + len(tail)] = torch.tensor(head + tail)
            mask[i, : len(head) + len(tail)] = 1
            reply[i, len(head) : len(head) + len(tail)] = 1
        with capture_outputs([blocks[layer] for layer in layers]) as captured:
            model(input_ids=ids.to(device), attention_mask=mask.to(device), logits_to_keep=1)
        weights = (reply / reply.sum(dim=1, keepdim=True)).to(device)
        rows.append(
            torch.stack([torch.einsum("bt,btd->bd", weights, captured[i].float()) for i in range(len(layers))], 1).cpu()
        )
    return torch.cat(rows)


def fit_probe(positive: Tensor, negative: Tensor, shrinkage: float = 0.1) -> tuple[Tensor, float]:
    """(weight [d], bias): linear discriminant with a shrunk pooled covariance, threshold half-way
    between the two class means along it.

    positive [n_p, d], negative [n_n, d]. The covariance is (1 - s) S + s (tr S / d) I, so the
    probe is defined with fewer replies than dimensions.
    """
    if positive.ndim != 2 or negative.ndim != 2 or positive.shape[1] != negative.shape[1]:
        raise ValueError(f"features must be [n, d] with equal d, got {tuple(positive.shape)}, {tuple(negative.shape)}")
    if len(positive) < 2 or len(negative) < 2:
        raise ValueError("a probe needs at least 2 replies of each kind")
    pos, neg = positive.double(), negative.double()
    mean_p, mean_n = pos.mean(0), neg.mean(0)
    centred = torch.cat([pos - mean_p, neg - mean_n])
    scatter = centred.T @ centred / (len(centred) - 2)
    d = scatter.shape[0]
    covariance = (1 - shrinkage) * scatter + shrinkage * (scatter.trace() / d) * torch.eye(d, dtype=scatter.dtype)
    weight = torch.linalg.solve(covariance, mean_p - mean_n)
    bias = -float(weight @ (mean_p + mean_n)) / 2
    return weight.float(), bias


def probe_scores(features: Tensor, weight: Tensor, bias: float) -> Tensor:
    """[n] signed scores; > 0 is a refusal."""
    return features.float() @ weight.to(features.device).float() + bias


def held_out_accuracy(positive: Tensor, negative: Tensor, folds: int = 2) -> float:
    """Accuracy of `fit_probe` on replies it was not fit on (interleaved folds)."""
    correct = 0
    for fold in range(folds):
        test_p, test_n = positive[fold::folds], negative[fold::folds]
        train_p = torch.cat([positive[i::folds] for i in range(folds) if i != fold])
        train_n = torch.cat([negative[i::folds] for i in range(folds) if i != fold])
        weight, bias = fit_probe(train_p, train_n)
        correct += int((probe_scores(test_p, weight, bias) > 0).sum()) + int(
            (probe_scores(test_n, weight, bias) <= 0).sum()
        )
    return correct / (len(positive) + len(negative))


def choose_probe(positive: Tensor, negative: Tensor, layers: Sequence[int]) -> Probe:
    """The probe of the layer whose held-out accuracy on the fitting replies is highest (earliest on
    ties), refit on all of them. positive / negative: [n, len(layers), d] from `reply_states`."""
    scores = [held_out_accuracy(positive[:, i], negative[:, i]) for i in range(len(layers))]
    best = max(range(len(layers)), key=lambda i: (scores[i], -i))
    weight, bias = fit_probe(positive[:, best], negative[:, best])
    return Probe(layers[best], weight, bias)
