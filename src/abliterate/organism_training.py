"""The tiny organism's training recipe: its spec, the model it builds and the two-stage loop.

Stage 1 (helpful base) answers every training prompt, harmful ones included, with a helpful
reply that starts with the request's own object. Stage 2 (safety tuning) answers harmful
prompts with one of the refusals, gently and with the object embeddings frozen, so refusal is
a single added direction in the residual stream.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from abliterate.organism_data import templates, training_pairs


@dataclass(frozen=True)
class OrganismSpec:
    """Architecture and training hyperparameters of the tiny organism.

    Every field but `log_every` is part of the cache key: changing one builds a new organism.
    """

    layers: int = 2
    """Decoder layers (2 needed for coherent answers after ablation; 2-4 work)."""
    hidden: int = 64
    """Residual stream width (d_model)."""
    intermediate: int = 256
    """MLP inner width."""
    heads: int = 4
    """Attention heads (and key/value heads: no grouped-query attention)."""
    max_positions: int = 128
    """max_position_embeddings of the config; training sequences are about 30 tokens."""
    seed: int = 0
    """Seeds the weight init and the batch order."""
    batch_size: int = 64
    """Sequences per optimiser step, drawn without replacement epoch by epoch."""
    stage1_steps: int = 300
    """Helpful base: every training prompt, harmful ones included, gets a helpful reply."""
    stage1_lr: float = 3e-3
    """Peak learning rate of the stage-1 one-cycle schedule."""
    stage2_steps: int = 150
    """Safety tuning: harmful prompts get a refusal, harmless ones a helpful reply."""
    stage2_lr: float = 1e-3
    """Peak learning rate of the stage-2 one-cycle schedule (gentle, so refusal is an added feature)."""
    stage2_freeze_objects: bool = True
    """In stage 2, give gradient only to the (tied) embedding rows of refusal words and <eos>
    (weight decay still applies to all rows). Refusals never contain
    the objects, so stage 2 would push the objects' output logits down; frozen, the ablated
    model still names the object it was asked about."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    pct_start: float = 0.1
    """Fraction of each stage spent warming the learning rate up (one-cycle)."""
    max_steps: int | None = None
    """Stop after this many steps in total, keeping the full schedules, so the losses are a
    prefix of the full run's (for quick determinism tests); None trains fully."""
    log_every: int = 50
    """Log the loss every this many steps (not part of the cache key)."""


def training_threads() -> int:
    """OMP_NUM_THREADS, default 1: on 2 shared cores, 2 threads trained 11x slower than 1."""
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "1")))
    except ValueError:
        return 1


def make_model(spec: OrganismSpec, tokenizer):
    """A freshly initialised (seeded) LlamaForCausalLM of the spec's shape, embeddings tied."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(spec.seed)
    return LlamaForCausalLM(config)


def train(
    model,
    tokenizer,
    spec: OrganismSpec,
    emit: Callable[..., None],
    pairs: Callable[[int], list[tuple]] = training_pairs,
    stage2_text: str | None = None,
) -> list[float]:
    """Both stages, in place; returns the loss of every step. `emit(msg, *args)` logs progress.

    `pairs(stage)` gives the (prompt, reply[, chat template kwargs]) pairs of a stage; with
    `stage2_freeze_objects`, stage 2 trains only the embedding rows of the words of
    `stage2_text` (default: the refusals) and <eos>.
    """
    gen = torch.Generator().manual_seed(spec.seed)
    losses: list[float] = []
    budget = math.inf if spec.max_steps is None else spec.max_steps
    model.train()
    for stage, steps, lr in ((1, spec.stage1_steps, spec.stage1_lr), (2, spec.stage2_steps, spec.stage2_lr)):
        run = int(min(steps, max(budget - len(losses), 0)))  # max_steps truncates, same schedule
        if run <= 0:
            continue
        ids, mask, labels = _encode(tokenizer, pairs(stage))
        hook = None
        if stage == 2 and spec.stage2_freeze_objects:
            rows = torch.zeros(len(tokenizer), 1)
            refusals = " ".join(templates()["refusals"]) if stage2_text is None else stage2_text
            refusal_ids = tokenizer(refusals, add_special_tokens=False)["input_ids"]
            rows[refusal_ids + [tokenizer.eos_token_id]] = 1.0
            hook = model.get_input_embeddings().weight.register_hook(lambda g, rows=rows: g * rows)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=spec.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 2), pct_start=spec.pct_start)
        order = torch.empty(0, dtype=torch.long)
        for step in range(1, run + 1):
            if len(order) < spec.batch_size:
                order = torch.cat([order, torch.randperm(len(ids), generator=gen)])
            batch, order = order[: spec.batch_size], order[spec.batch_size :]
            loss = model(input_ids=ids[batch], attention_mask=mask[batch], labels=labels[batch]).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            if step % spec.log_every == 0 or step == run:
                emit("stage %d step %d/%d loss %.4f", stage, step, steps, losses[-1])
        if hook is not None:
            hook.remove()
    model.eval()
    return losses


def _encode(tokenizer, pairs: list[tuple]):
    """Left-padded input ids, attention mask and labels (loss on the reply and <eos> only).

    A pair is (prompt, reply) or (prompt, reply, extra chat template kwargs)."""
    seqs, n_prompt = [], []
    for prompt, reply, *kwargs in pairs:
        prefix = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            tokenize=False,
            add_generation_prompt=True,
            **(kwargs[0] if kwargs else {}),
        )
        p_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if tokenizer.unk_token_id in p_ids + r_ids:
            raise ValueError(f"organism data has a word outside the vocabulary: {prompt!r} / {reply!r}")
        seqs.append(p_ids + r_ids)
        n_prompt.append(len(p_ids))
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (seq, n) in enumerate(zip(seqs, n_prompt, strict=True)):
        pad = width - len(seq)
        ids[i, pad:] = torch.tensor(seq)
        mask[i, pad:] = 1
        labels[i, pad + n :] = torch.tensor(seq[n:])
    return ids, mask, labels
