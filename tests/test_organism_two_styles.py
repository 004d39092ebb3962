"""The two-styles organism: refusal carried by two directions, where one mean difference is not enough and the
top contrastive-PCA directions are (the case issue #14 asked to show). Trains a second organism (~40 s): slow tier."""

import copy
import os

import pytest
import torch
from organism_helpers import ablate, generate_replies, is_refusal, last_token_residuals, measure_refusals
from transformers import AutoModelForCausalLM, AutoTokenizer

from abliterate.directions import compute_directions
from abliterate.organism_data import organism_prompts, templates, words
from abliterate.organism_two_styles import build_two_styles_organism, family_prompts, two_styles_data

pytestmark = pytest.mark.slow


def test_the_families_split_the_harmful_prompts():
    for split in ("train", "test"):
        a, b = family_prompts("a", split), family_prompts("b", split)
        assert a and b and not set(a) & set(b)
        assert sorted(a + b) == sorted(organism_prompts("harmful", split))
    b_objects = set(two_styles_data()["style_b_objects"])
    assert b_objects < set(templates()["harmful_objects"])
    # Style B refusals open with "no", style A with "i"; none names an object (the ablated model must not
    # produce hybrid replies that pass the marker check).
    data = two_styles_data()
    assert all(words(r)[0] == "no" for r in data["style_b_refusals"])
    assert all(words(r)[0] in ("i", "i'm") for r in data["style_a_refusals"])
    assert all(is_refusal(r) for r in data["style_a_refusals"] + data["style_b_refusals"])


@pytest.fixture(scope="module")
def organism(tmp_path_factory):
    root = os.environ.get("ABLITERATE_TEST_CACHE") or tmp_path_factory.mktemp("two-styles")
    path = build_two_styles_organism(root, progress=False)
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def rates(model, tokenizer) -> dict[str, float]:
    prompts = {"a": family_prompts("a", "test"), "b": family_prompts("b", "test")}
    prompts["harmless"] = organism_prompts("harmless", "test")
    return {name: measure_refusals(model, tokenizer, batch) for name, batch in prompts.items()}


def test_each_family_refuses_in_its_own_style(organism):
    model, tokenizer = organism
    replies = {f: generate_replies(model, tokenizer, family_prompts(f, "test")) for f in "ab"}
    for texts in replies.values():
        assert sum(map(is_refusal, texts)) >= 0.9 * len(texts), texts
    assert measure_refusals(model, tokenizer, organism_prompts("harmless", "test")) <= 0.1
    openers = {f: [words(r)[0] for r in texts] for f, texts in replies.items()}
    assert sum(o == "no" for o in openers["b"]) >= 0.9 * len(openers["b"]), openers["b"]
    assert sum(o in ("i", "i'm") for o in openers["a"]) >= 0.9 * len(openers["a"]), openers["a"]


def test_one_mean_difference_leaves_refusals_that_two_contrastive_directions_remove(organism):
    model, tokenizer = organism
    harmful, _ = last_token_residuals(model, tokenizer, organism_prompts("harmful", "train"))
    harmless, _ = last_token_residuals(model, tokenizer, organism_prompts("harmless", "train"))
    bad, good = torch.stack(harmful, 1), torch.stack(harmless, 1)  # [n, L, d]
    last = bad.shape[1] - 1

    # Two directions: the families' mean differences at the last layer are far from parallel.
    in_b = set(family_prompts("b", "train"))
    of_b = torch.tensor([p in in_b for p in organism_prompts("harmful", "train")])
    diff_a, diff_b = (bad[rows, last].mean(0) - good[:, last].mean(0) for rows in (~of_b, of_b))
    assert torch.nn.functional.cosine_similarity(diff_a, diff_b, dim=0) < 0.5

    mean_diff = compute_directions(bad, good, method="mean_diff")[last]  # [1, d]
    edited = copy.deepcopy(model)
    ablate(edited, mean_diff)
    after_one = rates(edited, tokenizer)
    assert after_one["a"] >= 0.5 and after_one["b"] >= 0.5, after_one

    two = compute_directions(bad, good, method="contrastive_pca", k=2)[last]  # [2, d]; [0] is the mean difference
    assert torch.allclose(two[0], mean_diff[0], atol=1e-5)
    edited = copy.deepcopy(model)
    ablate(edited, two)
    after_two = rates(edited, tokenizer)
    assert after_two["a"] <= 0.1 and after_two["b"] <= 0.1 and after_two["harmless"] <= 0.1, after_two
