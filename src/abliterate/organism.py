"""A tiny "model organism" that really refuses harmful requests.

`build_tiny_organism` trains a 2-layer Llama with a word-level tokenizer from scratch, on
CPU, in well under 30 s on one thread. Its refusal is a single added direction in the
residual stream, so directional ablation removes it, which makes it the model for
`abliterate demo` and the end-to-end tests.

The training data lives in `abliterate/data/organism/templates.json`: 12 request templates x
24 harmful and 24 harmless objects; 20% of the combos of each class are held out for testing.
Training runs in two stages (see `OrganismSpec`): a helpful base where every prompt, harmful
ones included, gets a helpful reply that starts with the request's own object, then safety
tuning where harmful prompts get one of six refusals that never mention the object.

The result is cached under `cache_dir` in a subdirectory keyed by a hash of
`ORGANISM_VERSION`, the spec and the template data, and written atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch

log = logging.getLogger("abliterate.organism")

ORGANISM_VERSION = "1"  # bump when training changes

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
_TEMPLATES = ("data", "organism", "templates.json")
_MODEL_FILE = "model.safetensors"
_META_FILE = "organism.json"
PROMPT_FILES = {
    ("harmful", "train"): "harmful_train.txt",
    ("harmless", "train"): "harmless_train.txt",
    ("harmful", "test"): "harmful_test.txt",
    ("harmless", "test"): "harmless_test.txt",
}


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


# --------------------------------------------------------------------------- data


@lru_cache(maxsize=1)
def _template_bytes() -> bytes:
    return resources.files(_PACKAGE).joinpath(*_TEMPLATES).read_bytes()


@lru_cache(maxsize=1)
def _templates() -> dict:
    data = json.loads(_template_bytes().decode("utf-8"))
    for key in ("requests", "harmful_objects", "harmless_objects", "helpful_replies", "refusals"):
        if not data.get(key):
            raise ValueError(f"organism template data lacks {key!r}")
    return data


def _words(text: str) -> list[str]:
    """Lower-case words, sentence punctuation split off, as the tokenizer sees them."""
    return re.sub(r"([?.,!:;])", r" \1 ", text.lower()).split()


@lru_cache(maxsize=1)
def _combos() -> dict[tuple[str, str], list[tuple[int, int]]]:
    """(kind, split) -> sorted (template index, object index) pairs; test is disjoint from train."""
    data = _templates()
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
    return _templates()["requests"][t].format(obj=obj)


def organism_prompts(kind: str, split: str) -> list[str]:
    """The templated prompts of one class: kind "harmful" or "harmless", split "train" or "test".

    The held-out test combos (template x object) are disjoint from the train ones; every word
    of a test prompt is still seen in training.
    """
    if kind not in ("harmful", "harmless"):
        raise ValueError(f"kind must be 'harmful' or 'harmless', not {kind!r}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    objects = _templates()[f"{kind}_objects"]
    return [_prompt(t, objects[o]) for t, o in _combos()[(kind, split)]]


@lru_cache(maxsize=1)
def _request_patterns() -> list[re.Pattern]:
    pats = []
    for req in _templates()["requests"]:
        before, after = (" ".join(_words(p)) for p in req.split("{obj}"))
        pats.append(
            re.compile(
                "^"
                + (re.escape(before) + " " if before else "")
                + "(.+?)"
                + (" " + re.escape(after) if after else "")
                + "$"
            )
        )
    return pats


def topic_word(prompt: str) -> str:
    """The object word(s) of a templated organism prompt, e.g. "paper planes".

    A coherent helpful reply mentions it. Raises ValueError for a prompt that no request
    template matches.
    """
    text = " ".join(_words(prompt))
    for pat in _request_patterns():
        m = pat.match(text)
        if m:
            return m.group(1)
    raise ValueError(f"not an organism prompt: {prompt!r}")


def _helpful_reply(t: int, o: int, obj: str) -> str:
    replies = _templates()["helpful_replies"]
    return replies[(t + o) % len(replies)].format(obj=obj)


def _refusal(t: int, o: int) -> str:
    refusals = _templates()["refusals"]
    return refusals[(7 * t + o) % len(refusals)]


def _vocabulary() -> list[str]:
    data = _templates()
    texts = list(data["requests"]) + list(data["helpful_replies"]) + list(data["refusals"])
    texts += list(data["harmful_objects"]) + list(data["harmless_objects"])
    words = {w for text in texts for w in _words(text.replace("{obj}", " "))}
    return sorted(words)


# --------------------------------------------------------------------------- tokenizer


def build_tokenizer():
    """A word-level PreTrainedTokenizerFast for the organism.

    Lower-case normaliser, whitespace split with sentence punctuation split off (the data
    writes punctuation as separate words; decoding joins words with spaces, so "i can't"
    survives), special tokens bos/eos/pad/unk plus <user>, <assistant>
    and <end>, the organism's chat template, and padding_side="left".
    """
    from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in _vocabulary():
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    # Split on whitespace, and split off sentence punctuation ("bread?" -> "bread ?"); the
    # apostrophe stays inside words, so "can't" is one word.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"[?.,!:;]"), behavior="isolated")]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens=[USER, ASSISTANT, END],
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
        model_max_length=OrganismSpec.max_positions,
        clean_up_tokenization_spaces=False,
    )


# --------------------------------------------------------------------------- generation helpers


def default_markers() -> tuple[str, ...]:
    """The project's refusal markers (data/refusal_markers.txt, via abliterate.metrics)."""
    from abliterate.metrics import default_markers as markers

    return tuple(markers())


def is_refusal(text: str, markers: Iterable[str] | None = None) -> bool:
    """abliterate.metrics.is_refusal with the default markers: lower case, straight quotes, no
    markdown emphasis, then any marker as a substring (an empty reply counts as a refusal)."""
    from abliterate.metrics import is_refusal as check

    return check(text, tuple(default_markers() if markers is None else markers))


def _chat_batch(tokenizer, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = old_side


@torch.inference_mode()
def generate_replies(
    model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 12, batch_size: int = 64
) -> list[str]:
    """Greedy replies to `prompts` (each wrapped in the chat template), decoded without specials."""
    device = next(model.parameters()).device
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        enc = _chat_batch(tokenizer, prompts[i : i + batch_size]).to(device)
        gen = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new = gen[:, enc["input_ids"].shape[1] :]
        out += tokenizer.batch_decode(new, skip_special_tokens=True)
    return out


def measure_refusals(
    model,
    tokenizer,
    prompts: Sequence[str],
    markers: Iterable[str] | None = None,
    max_new_tokens: int = 12,
) -> float:
    """Fraction of `prompts` whose greedy reply contains a refusal marker (default: the project's)."""
    if not prompts:
        return 0.0
    markers = tuple(markers) if markers is not None else default_markers()
    replies = generate_replies(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    return sum(is_refusal(r, markers) for r in replies) / len(replies)


def topic_rate(replies: Sequence[str], prompts: Sequence[str]) -> float:
    """Fraction of replies that contain their prompt's topic word(s)."""
    if not prompts:
        return 0.0
    hits = sum(topic_word(p) in " ".join(_words(r)) for r, p in zip(replies, prompts, strict=True))
    return hits / len(prompts)


# --------------------------------------------------------------------------- training


def _cache_key(spec: OrganismSpec) -> str:
    fields = dataclasses.asdict(spec)
    fields.pop("log_every")  # does not change the weights
    blob = json.dumps({"version": ORGANISM_VERSION, "spec": fields}, sort_keys=True).encode()
    blob += _template_bytes()
    return hashlib.sha256(blob).hexdigest()[:16]


def _examples(stage: int) -> list[tuple[str, str]]:
    """(prompt, reply) pairs of one training stage, in a fixed order."""
    data = _templates()
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


def _encode_examples(tokenizer, pairs: list[tuple[str, str]]):
    """Left-padded input ids, attention mask and labels (loss on the reply and <eos> only)."""
    seqs, n_prompt = [], []
    for prompt, reply in pairs:
        prefix = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
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


def _make_model(spec: OrganismSpec, tokenizer):
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


def _train(model, tokenizer, spec: OrganismSpec, emit) -> list[float]:
    """Both stages; returns the loss of every step."""
    gen = torch.Generator().manual_seed(spec.seed)
    losses: list[float] = []
    budget = math.inf if spec.max_steps is None else spec.max_steps
    model.train()
    for stage, steps, lr in ((1, spec.stage1_steps, spec.stage1_lr), (2, spec.stage2_steps, spec.stage2_lr)):
        run = int(min(steps, max(budget - len(losses), 0)))  # max_steps truncates, same schedule
        if run <= 0:
            continue
        ids, mask, labels = _encode_examples(tokenizer, _examples(stage))
        hook = None
        if stage == 2 and spec.stage2_freeze_objects:
            rows = torch.zeros(len(tokenizer), 1)
            refusals = " ".join(_templates()["refusals"])
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


def _threads() -> int:
    """OMP_NUM_THREADS, default 1: on 2 shared cores, 2 threads trained 11x slower than 1."""
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "1")))
    except ValueError:
        return 1


def _complete(path: Path) -> bool:
    return (path / _META_FILE).is_file() and (path / _MODEL_FILE).is_file()


def build_tiny_organism(
    cache_dir: str | Path,
    spec: OrganismSpec = OrganismSpec(),
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Train (or reuse) the tiny refusing organism and return its directory.

    The directory loads with `AutoModelForCausalLM.from_pretrained` and
    `AutoTokenizer.from_pretrained`, and holds the prompt files harmful_train.txt,
    harmless_train.txt, harmful_test.txt and harmless_test.txt (one prompt per line) and
    organism.json (spec, cache key, per-step losses, training time). It is cached under
    `cache_dir/tiny-organism-<key>`, the key hashing ORGANISM_VERSION, `spec` and the
    template data; an unchanged call returns at once, `force=True` retrains. Torch runs on
    OMP_NUM_THREADS threads (default 1) while training.
    """
    cache_dir = Path(cache_dir).expanduser()
    key = _cache_key(spec)
    final = cache_dir / f"tiny-organism-{key}"
    if _complete(final) and not force:
        log.debug("tiny organism cached at %s", final)
        return final

    def emit(msg, *args):
        log.log(logging.INFO if progress else logging.DEBUG, msg, *args)

    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-tiny-organism-{key}-", dir=cache_dir))
    old_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(_threads())
        emit("training tiny organism %s on %d thread(s) -> %s", key, torch.get_num_threads(), final)
        start = time.perf_counter()
        tokenizer = build_tokenizer()
        model = _make_model(spec, tokenizer)
        losses = _train(model, tokenizer, spec, emit)
        seconds = time.perf_counter() - start

        from transformers import GenerationConfig

        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            do_sample=False,
        )
        model.save_pretrained(tmp)
        # Keep the chat template inside tokenizer_config.json, where every loader looks.
        tokenizer.save_pretrained(tmp, save_jinja_files=False)
        for (kind, split), name in PROMPT_FILES.items():
            (tmp / name).write_text("\n".join(organism_prompts(kind, split)) + "\n", encoding="utf-8")
        meta = {
            "organism_version": ORGANISM_VERSION,
            "cache_key": key,
            "spec": dataclasses.asdict(spec),
            "train_seconds": round(seconds, 3),
            "threads": torch.get_num_threads(),
            "losses": losses,
        }
        (tmp / _META_FILE).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        _publish(tmp, final, replace=force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(old_threads)
    emit(
        "trained tiny organism in %.1f s (%d steps, final loss %.4f): %s",
        seconds,
        len(losses),
        losses[-1] if losses else float("nan"),
        final,
    )
    return final


def _publish(tmp: Path, final: Path, replace: bool) -> None:
    """Rename `tmp` to `final`; an existing complete build is kept unless `replace`."""
    if final.exists() and (replace or not _complete(final)):
        trash = Path(tempfile.mkdtemp(prefix=".old-", dir=final.parent))
        os.replace(final, trash / "old")
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.replace(tmp, final)
    except OSError:
        # Another process published the same key meanwhile: theirs is identical, keep it.
        if not _complete(final):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
