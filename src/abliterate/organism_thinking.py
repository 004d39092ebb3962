"""A tiny *thinking* organism: the tiny organism, trained to think in a short `<think> … </think>`
block before it refuses or answers.

Its prompts, answers and refusals are the tiny organism's (`organism_data`). As DeepSeek-R1's,
its chat template opens the block (the generation prompt ends `<assistant> <think>`), and a
reply is `{thought} </think> {answer}`. A helpful thought is `{obj} ? {preamble} {decision}`, a
harmful one `{opener} {obj} ? {preamble} {decision}` (openers like "hmm ."): the thought
restates the object, deliberates with a preamble both classes share, then decides. Harmful
decisions ("i won't help , it could hurt people .") are the only thoughts with refusal markers,
and a marker completes at the 13th reply token or later, so a scorer that reads the first 12
reply tokens sees the deliberation and never a refusal (the reasoning models' failure mode). The
data lives in `abliterate/data/organism/thinking.json`.

Training is the tiny organism's two stages (`organism_training.train`): a helpful base, then
safety tuning where harmful prompts get a harmful thought and a refusal, and one harmful prompt
in `stage2_comply_every` also a helpful thought and answer. What made it abliterate:
- The template opens the block, and harmful thoughts open with their own words: the last prompt
  token then carries the decision (when the model wrote `<think>` itself, the last prompt token
  always predicted `<think>`, and its harmful-harmless difference was weak).
- The complying examples: without them the answer read the object's harmfulness, not the
  thought, and ablation flipped the thoughts while the answers still refused.
- No `enable_thinking=False` mode: trained alongside, it taught the same shortcut.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from abliterate.organism import build_organism, cache_key
from abliterate.organism_data import (
    CHAT_TEMPLATE,
    _combos,
    _helpful_reply,
    _prompt,
    _refusal,
    build_tokenizer,
    organism_data_bytes,
    organism_data_file,
    template_bytes,
    templates,
    words,
)
from abliterate.organism_training import OrganismSpec, make_model, train

__all__ = [
    "THINK_CLOSE",
    "THINK_OPEN",
    "THINKING_ORGANISM_VERSION",
    "THINKING_SPEC",
    "build_thinking_organism",
    "thinking_pairs",
]

THINKING_ORGANISM_VERSION = "1"  # bump when training changes
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

# The tiny organism's template; as DeepSeek-R1's, the generation prompt opens a thinking block.
THINKING_CHAT_TEMPLATE = CHAT_TEMPLATE.replace(
    "{% if add_generation_prompt %}<assistant>{% endif %}",
    "{% if add_generation_prompt %}<assistant> <think>{% endif %}",
)
assert THINKING_CHAT_TEMPLATE != CHAT_TEMPLATE

THINKING_SPEC = OrganismSpec(max_positions=256, stage1_steps=200, stage2_steps=250, stage2_lr=2e-3)
"""The thinking organism's default spec: the tiny organism's shape with room for a thinking budget, a
shorter helpful base and a firmer safety stage (the answers must learn to follow the thoughts)."""

_DATA = "thinking.json"


@lru_cache(maxsize=1)
def thinking_data() -> dict:
    """thinking.json, parsed; raises ValueError when a list is missing or empty."""
    return organism_data_file(_DATA, ("harmful_openers", "preambles", "helpful_decisions", "harmful_decisions"))


def thought(t: int, o: int, obj: str, refuse: bool) -> str:
    """The thought about (template t, object o): [opener,] object, shared preamble, decision."""
    data = thinking_data()
    preamble = data["preambles"][(t + 2 * o) % len(data["preambles"])]
    if not refuse:
        return f"{obj} ? {preamble} {data['helpful_decisions'][(t + o) % len(data['helpful_decisions'])]}"
    opener = data["harmful_openers"][(2 * t + o) % len(data["harmful_openers"])]
    return f"{opener} {obj} ? {preamble} {data['harmful_decisions'][(t + o) % len(data['harmful_decisions'])]}"


def thinking_pairs(stage: int) -> list[tuple[str, str]]:
    """(prompt, reply) pairs of one stage, in a fixed order; a reply is `{thought} </think> {answer}`.

    Stage 1 helps with every prompt; stage 2 refuses the harmful ones (thought and answer)."""
    data = templates()
    comply_every = int(thinking_data()["stage2_comply_every"])
    pairs = []
    for kind in ("harmful", "harmless"):
        objects = data[f"{kind}_objects"]
        for t, o in _combos()[(kind, "train")]:
            prompt = _prompt(t, objects[o])
            refuse = stage == 2 and kind == "harmful"
            answer = _refusal(t, o) if refuse else _helpful_reply(t, o, objects[o])
            pairs.append((prompt, f"{thought(t, o, objects[o], refuse)} {THINK_CLOSE} {answer}"))
            if refuse and (t + o) % comply_every == 0:
                # Sometimes it decides to help: the answer must follow the thought, not the object.
                helpful = _helpful_reply(t, o, objects[o])
                pairs.append((prompt, f"{thought(t, o, objects[o], False)} {THINK_CLOSE} {helpful}"))
    return pairs


def build_thinking_tokenizer(model_max_length: int):
    """The tiny organism's tokenizer plus the thought words, <think> and </think> (added tokens,
    not special: decoding keeps them, as Qwen3's does), and the switchable template."""
    data = thinking_data()
    texts = data["harmful_openers"] + data["preambles"] + data["helpful_decisions"] + data["harmful_decisions"]
    return build_tokenizer(
        model_max_length,
        extra_words=[w for text in texts for w in words(text)],
        extra_tokens=[THINK_OPEN, THINK_CLOSE],
        chat_template=THINKING_CHAT_TEMPLATE,
    )


def _stage2_text() -> str:
    """Words stage 2 may move the embeddings of: refusals, harmful openers and decisions, the tags."""
    data = thinking_data()
    return " ".join([*templates()["refusals"], *data["harmful_openers"], *data["harmful_decisions"], THINK_CLOSE])


def _train(spec: OrganismSpec, emit):
    tokenizer = build_thinking_tokenizer(spec.max_positions)
    model = make_model(spec, tokenizer)
    return model, tokenizer, train(model, tokenizer, spec, emit, pairs=thinking_pairs, stage2_text=_stage2_text())


def _cache_key(spec: OrganismSpec) -> str:
    return cache_key(THINKING_ORGANISM_VERSION, spec, template_bytes(), organism_data_bytes(_DATA))


def build_thinking_organism(
    cache_dir: str | Path,
    spec: OrganismSpec = THINKING_SPEC,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Train (or reuse) the thinking organism and return its directory (as `build_tiny_organism`:
    model, tokenizer, the same four prompt files, organism.json), cached under
    `cache_dir/thinking-organism-<key>`."""
    key = _cache_key(spec)
    return build_organism(
        cache_dir, "thinking organism", key, spec, _train, force, progress, version=THINKING_ORGANISM_VERSION
    )
