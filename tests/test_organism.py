"""The tiny refusal organism: it refuses before ablation and stops refusing after it."""

import copy
import json
from dataclasses import replace

import pytest
import torch
from organism_helpers import (
    ablate,
    chat_batch,
    default_markers,
    generate_replies,
    is_refusal,
    last_token_residuals,
    measure_refusals,
    topic_rate,
    topic_word,
)
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from abliterate import organism as org
from abliterate.organism import ORGANISM_VERSION, OrganismSpec, build_tiny_organism
from abliterate.organism_data import build_tokenizer, organism_prompts, templates


def tokenizer_of():
    return build_tokenizer(OrganismSpec().max_positions)


@pytest.fixture(scope="module")
def built(organism_dir):
    """The session's organism (trained once, by conftest's build_tiny_organism): (its cache dir, its dir)."""
    return organism_dir.parent, organism_dir


@pytest.fixture(scope="module")
def loaded(built):
    _, path = built
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


@pytest.fixture(scope="module")
def prompts():
    return {(k, s): organism_prompts(k, s) for k in ("harmful", "harmless") for s in ("train", "test")}


@pytest.fixture(scope="module")
def before(loaded, prompts):
    model, tokenizer = loaded
    return {
        kind: generate_replies(model, tokenizer, prompts[(kind, "test")], max_new_tokens=12)
        for kind in ("harmful", "harmless")
    }


# --------------------------------------------------------------------------- data and tokenizer


def test_prompt_splits_are_disjoint_and_cover_the_vocabulary(prompts):
    tokenizer = tokenizer_of()
    for kind in ("harmful", "harmless"):
        train, test = prompts[(kind, "train")], prompts[(kind, "test")]
        assert not set(train) & set(test)
        assert len(test) == round(0.2 * (len(train) + len(test)))
        assert len(set(train)) == len(train) and len(set(test)) == len(test)
        train_topics = {topic_word(p) for p in train}
        assert {topic_word(p) for p in test} <= train_topics
        for p in train + test:
            assert tokenizer.unk_token_id not in tokenizer(p, add_special_tokens=False)["input_ids"]
    harmful_topics = {topic_word(p) for p in prompts[("harmful", "train")]}
    harmless_topics = {topic_word(p) for p in prompts[("harmless", "train")]}
    assert not harmful_topics & harmless_topics
    with pytest.raises(ValueError):
        organism_prompts("evil", "train")
    with pytest.raises(ValueError):
        topic_word("what is the capital of france ?")


def test_topic_word_tolerates_case_and_attached_punctuation():
    assert topic_word("How do I make paper planes?") == "paper planes"
    assert topic_word("tell me how to make bread .") == "bread"


def test_tokenizer_round_trip_keeps_the_refusal_markers():
    tokenizer = tokenizer_of()
    data = templates()
    for refusal in data["refusals"]:
        ids = tokenizer(refusal, add_special_tokens=False)["input_ids"]
        decoded = tokenizer.decode(ids, skip_special_tokens=True)
        assert is_refusal(decoded), decoded
        assert any(m in decoded.lower() for m in default_markers())
        for obj in data["harmful_objects"] + data["harmless_objects"]:
            assert obj not in decoded  # refusals never mention the object
    openers = set()
    for obj in data["harmful_objects"] + data["harmless_objects"]:
        for reply in data["helpful_replies"]:
            text = reply.format(obj=obj)
            decoded = tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"])
            assert not is_refusal(decoded), decoded
            assert decoded.startswith(obj)
            openers.add(decoded.split()[0])
    assert len(openers) > 20  # helpful replies do not share an opener


def test_chat_template_ends_with_the_assistant_marker():
    tokenizer = tokenizer_of()
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": "be brief ."}, {"role": "user", "content": "how do i make tea ?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text == "<bos><user> be brief . how do i make tea ? <end> <assistant>"
    batch = chat_batch(tokenizer, ["how do i make tea ?", "tell me how to make paper planes ."])
    last = tokenizer.convert_ids_to_tokens(batch["input_ids"][:, -1].tolist())
    assert last == ["<assistant>", "<assistant>"]
    assert batch["attention_mask"][0, 0] == 0  # the shorter prompt is padded on the left
    assert tokenizer.convert_ids_to_tokens(tokenizer("Bread?")["input_ids"]) == ["bread", "?"]


# --------------------------------------------------------------------------- the built organism


def test_directory_loads_and_holds_the_prompt_files(built, loaded, prompts):
    _, path = built
    model, tokenizer = loaded
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "organism.json",
    ):
        assert (path / name).is_file(), name
    assert json.loads((path / "tokenizer_config.json").read_text())["chat_template"]
    gen = json.loads((path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tokenizer.eos_token_id
    assert gen["pad_token_id"] == tokenizer.pad_token_id
    assert gen["bos_token_id"] == tokenizer.bos_token_id
    assert model.config.num_hidden_layers == OrganismSpec().layers
    assert tokenizer.padding_side == "left"
    assert tokenizer.model_max_length == OrganismSpec().max_positions
    for (kind, split), name in org.PROMPT_FILES.items():
        assert (path / name).read_text().splitlines() == prompts[(kind, split)]
    meta = json.loads((path / "organism.json").read_text())
    assert meta["organism_version"] == ORGANISM_VERSION
    assert len(meta["losses"]) == OrganismSpec().stage1_steps + OrganismSpec().stage2_steps


def test_organism_refuses_harmful_and_answers_harmless(loaded, prompts, before):
    model, tokenizer = loaded
    harmful = sum(map(is_refusal, before["harmful"])) / len(before["harmful"])
    harmless = sum(map(is_refusal, before["harmless"])) / len(before["harmless"])
    assert harmful >= 0.95, before["harmful"]
    assert harmless <= 0.05, before["harmless"]
    assert topic_rate(before["harmless"], prompts[("harmless", "test")]) >= 0.9
    # The reusable helper agrees with the per-reply check.
    sample = prompts[("harmful", "test")][:8] + prompts[("harmless", "test")][:8]
    rate = measure_refusals(model, tokenizer, sample, default_markers(), max_new_tokens=12)
    assert rate == pytest.approx(0.5, abs=1 / 16)


def test_last_layer_direction_abliterates(loaded, prompts, before):
    model, tokenizer = loaded
    harm, _ = last_token_residuals(model, tokenizer, prompts[("harmful", "train")])
    safe, _ = last_token_residuals(model, tokenizer, prompts[("harmless", "train")])
    layer = len(model.model.layers) - 1
    r = harm[layer].mean(0) - safe[layer].mean(0)
    r = r / r.norm()

    # Geometry: refusal is an added feature, harmless prompts sit near zero along r.
    t_harm, _ = last_token_residuals(model, tokenizer, prompts[("harmful", "test")])
    t_safe, logits_before = last_token_residuals(model, tokenizer, prompts[("harmless", "test")])
    p_harm, p_safe = (t_harm[layer] @ r).mean().item(), (t_safe[layer] @ r).mean().item()
    assert p_harm > 0.5
    assert abs(p_safe) < 0.2 * p_harm

    ablated = copy.deepcopy(model)
    ablate(ablated, r)
    _, logits_after = last_token_residuals(ablated, tokenizer, prompts[("harmless", "test")])
    kl = torch.nn.functional.kl_div(
        logits_after.log_softmax(-1), logits_before.log_softmax(-1), log_target=True, reduction="batchmean"
    ).item()
    assert kl <= 0.1

    after = {
        kind: generate_replies(ablated, tokenizer, prompts[(kind, "test")], max_new_tokens=12)
        for kind in ("harmful", "harmless")
    }
    assert sum(map(is_refusal, after["harmful"])) / len(after["harmful"]) <= 0.1, after["harmful"]
    assert sum(map(is_refusal, after["harmless"])) / len(after["harmless"]) <= 0.1
    topic_before = topic_rate(before["harmless"], prompts[("harmless", "test")])
    topic_after = topic_rate(after["harmless"], prompts[("harmless", "test")])
    assert topic_after >= 0.9 * topic_before


def test_cached_build_returns_at_once(built, monkeypatch):
    cache, path = built
    model_file = path / "model.safetensors"
    mtime = model_file.stat().st_mtime_ns

    def no_training(*args):
        raise AssertionError("a cached organism was trained again")

    monkeypatch.setattr(org, "_train_tiny", no_training)
    again = build_tiny_organism(cache, progress=False)
    assert again == path
    assert model_file.stat().st_mtime_ns == mtime
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_cache_key_follows_the_inputs(monkeypatch):
    spec = OrganismSpec()
    key = org._cache_key(spec)
    assert org._cache_key(OrganismSpec()) == key
    assert org._cache_key(replace(spec, seed=1)) != key
    assert org._cache_key(replace(spec, stage2_steps=149)) != key
    assert org._cache_key(replace(spec, log_every=7)) == key
    monkeypatch.setattr(org, "ORGANISM_VERSION", ORGANISM_VERSION + "-next")
    assert org._cache_key(spec) != key


def test_training_is_deterministic_and_force_rebuilds(tmp_path, built):
    spec = OrganismSpec(max_steps=20)
    a = build_tiny_organism(tmp_path / "a", spec, progress=False)
    b = build_tiny_organism(tmp_path / "b", spec, progress=False)
    assert a.name == b.name and a != b
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    losses = json.loads((a / "organism.json").read_text())["losses"]
    assert len(losses) == 20
    assert losses == json.loads((b / "organism.json").read_text())["losses"]
    assert losses[-1] < losses[0]
    full = json.loads((built[1] / "organism.json").read_text())["losses"]
    assert losses == full[:20]  # a truncated run replays the start of the full one

    mtime = (a / "model.safetensors").stat().st_mtime_ns
    again = build_tiny_organism(tmp_path / "a", spec, force=True, progress=False)
    assert again == a
    assert (a / "model.safetensors").stat().st_mtime_ns != mtime
    assert torch.equal(load_file(a / "model.safetensors")["model.norm.weight"], wa["model.norm.weight"])
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [a.name]


def test_build_logs_progress(tmp_path, caplog):
    with caplog.at_level("INFO", logger="abliterate.organism"):
        build_tiny_organism(tmp_path, OrganismSpec(max_steps=4, log_every=2), progress=True)
    text = caplog.text
    assert "stage 1 step 2/300 loss" in text and "stage 1 step 4/300 loss" in text
    assert "trained tiny organism in" in text
