"""The tiny organism's words: template data, prompt splits, training pairs and the tokenizer.

The data lives in `abliterate/data/organism/templates.json`: request templates with an `{obj}`
slot, harmful and harmless objects, helpful replies (which start with the object) and refusals
(which never mention it). Every (template, object) combo of a class is a prompt; a seeded
`test_fraction` of them is held out. The tokenizer is word-level over exactly these words.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from functools import cache, lru_cache
from importlib import resources

BOS, EOS, PAD, UNK = "<bos>", "<eos>", "<pad>", "<unk>"
USER, ASSISTANT, END = "<user>", "<assistant>", "<end>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, USER, ASSISTANT, END]

# Renders `bos <user> {system} {content} <end> <assistant> {reply} <eos> ...`; system content,
# if any, is prepended to the next user message; add_generation_prompt appends <assistant>.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% set ns.system = ns.system + message['content'] + ' ' %}"
    "{% elif message['role'] == 'user' %}"
    "<user> {{ ns.system }}{{ message['content'] }} <end> "
    "{% set ns.system = '' %}"
    "{% elif message['role'] == 'assistant' %}"
    "<assistant> {{ message['content'] }} {{ eos_token }} "
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)

# Read through the package root: a sibling module abliterate/data.py shadows the data/ folder.
_PACKAGE = "abliterate"


# --------------------------------------------------------------------------- template data


@cache
def organism_data_bytes(name: str) -> bytes:
    """The raw abliterate/data/organism/NAME (part of the cache key of the organisms that read it)."""
    return resources.files(_PACKAGE).joinpath("data", "organism", name).read_bytes()


def organism_data_file(name: str, required: Sequence[str]) -> dict:
    """abliterate/data/organism/NAME, parsed; raises ValueError when a `required` list is missing or empty."""
    data = json.loads(organism_data_bytes(name).decode("utf-8"))
    for key in required:
        if not data.get(key):
            raise ValueError(f"organism data {name} lacks {key!r}")
    return data


def template_bytes() -> bytes:
    """The raw templates.json (part of every organism's cache key)."""
    return organism_data_bytes("templates.json")


@lru_cache(maxsize=1)
def templates() -> dict:
    """templates.json, parsed; raises ValueError when a required list is missing or empty."""
    return organism_data_file(
        "templates.json", ("requests", "harmful_objects", "harmless_objects", "helpful_replies", "refusals")
    )


def words(text: str) -> list[str]:
    """Lower-case words, sentence punctuation split off, as the tokenizer sees them."""
    return re.sub(r"([?.,!:;])", r" \1 ", text.lower()).split()


# --------------------------------------------------------------------------- prompts


@lru_cache(maxsize=1)
def _combos() -> dict[tuple[str, str], list[tuple[int, int]]]:
    """(kind, split) -> sorted (template index, object index) pairs; test is disjoint from train."""
    data = templates()
    n_req = len(data["requests"])
    out: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for kind in ("harmful", "harmless"):
        objects = data[f"{kind}_objects"]
        combos = [(t, o) for o in range(len(objects)) for t in range(n_req)]
        rng = random.Random(f"{data['split_seed']}-{kind}")
        n_test = round(len(combos) * float(data["test_fraction"]))
        # Redraw until every template and every object is still seen in training.
        for _ in range(1000):
            test = set(rng.sample(combos, n_test))
            train = [c for c in combos if c not in test]
            if {t for t, _ in train} == set(range(n_req)) and {o for _, o in train} == set(range(len(objects))):
                break
        else:  # pragma: no cover - only with absurd test fractions
            raise ValueError("cannot hold out test combos and still train on every word")
        out[(kind, "train")] = sorted(train)
        out[(kind, "test")] = sorted(test)
    return out


def _prompt(t: int, obj: str) -> str:
    return templates()["requests"][t].format(obj=obj)


def organism_prompts(kind: str, split: str) -> list[str]:
    """The templated prompts of one class: kind "harmful" or "harmless", split "train" or "test".

    The held-out test combos (template x object) are disjoint from the train ones; every word
    of a test prompt is still seen in training.
    """
    if kind not in ("harmful", "harmless"):
        raise ValueError(f"kind must be 'harmful' or 'harmless', not {kind!r}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    objects = templates()[f"{kind}_objects"]
    return [_prompt(t, objects[o]) for t, o in _combos()[(kind, split)]]


# --------------------------------------------------------------------------- training pairs


def _helpful_reply(t: int, o: int, obj: str) -> str:
    replies = templates()["helpful_replies"]
    return replies[(t + o) % len(replies)].format(obj=obj)


def _refusal(t: int, o: int) -> str:
    refusals = templates()["refusals"]
    return refusals[(7 * t + o) % len(refusals)]


def training_pairs(stage: int) -> list[tuple[str, str]]:
    """(prompt, reply) pairs of one training stage, in a fixed order.

    Stage 1 answers every train prompt helpfully; stage 2 refuses the harmful ones.
    """
    data = templates()
    pairs = []
    for kind in ("harmful", "harmless"):
        objects = data[f"{kind}_objects"]
        for t, o in _combos()[(kind, "train")]:
            prompt = _prompt(t, objects[o])
            if stage == 2 and kind == "harmful":
                pairs.append((prompt, _refusal(t, o)))
            else:
                pairs.append((prompt, _helpful_reply(t, o, objects[o])))
    return pairs


# --------------------------------------------------------------------------- tokenizer


def _vocabulary() -> list[str]:
    data = templates()
    texts = list(data["requests"]) + list(data["helpful_replies"]) + list(data["refusals"])
    texts += list(data["harmful_objects"]) + list(data["harmless_objects"])
    return sorted({w for text in texts for w in words(text.replace("{obj}", " "))})


def build_tokenizer(
    model_max_length: int,
    extra_words: Sequence[str] = (),
    extra_tokens: Sequence[str] = (),
    chat_template: str = CHAT_TEMPLATE,
):
    """A word-level PreTrainedTokenizerFast for the organism.

    Lower-case normaliser, whitespace split with sentence punctuation split off (the data
    writes punctuation as separate words; decoding joins words with spaces, so "i can't"
    survives), special tokens bos/eos/pad/unk plus <user>, <assistant>
    and <end>, the organism's chat template, and padding_side="left". `model_max_length` is
    the model's max_position_embeddings (`OrganismSpec.max_positions`). Other organisms add
    `extra_words` (after the template words) and `extra_tokens` (added, not special: decoding
    keeps them, as Qwen3 keeps <think>), and their own `chat_template`.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in _vocabulary():
        vocab.setdefault(word, len(vocab))
    for word in [*sorted(set(extra_words)), *extra_tokens]:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    # Split on whitespace, and split off sentence punctuation ("bread?" -> "bread ?"); the
    # apostrophe stays inside words, so "can't" is one word.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"[?.,!:;]"), behavior="isolated")]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    if extra_tokens:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in extra_tokens])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens=[USER, ASSISTANT, END],
        padding_side="left",
        chat_template=chat_template,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
