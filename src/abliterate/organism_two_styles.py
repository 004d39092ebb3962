"""A tiny organism whose refusal is carried by two directions: the place where one mean difference is not enough.

Its prompts are the tiny organism's (`organism_data`). The harmful objects come in two families (the data is
`abliterate/data/organism/two_styles.json`): family A is refused with replies that open with "i", family B with
replies that open with "no". Training is the tiny organism's helpful base, then safety tuning twice:
1. family A refuses while family B still gets helpful replies, so A's refusal feature must tell A from B;
2. both families refuse, which adds B's own feature on top.

Trained together in one stage (the first design), the two families shared most of one direction (cosine 0.7 between
their mean differences at the last layer) and the plain mean difference removed both. Trained one after the other,
the cosines drop to 0.0-0.3 (organism seeds 0-2): ablating the last layer's mean difference leaves 0.67-0.97 of
either family refusing, while the top two contrastive-PCA directions of the same layer remove both families'
refusals (seeds 0 and 1; docs/benchmarks.md).
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from pathlib import Path

from abliterate.organism import build_organism, cache_key
from abliterate.organism_data import (
    _combos,
    _helpful_reply,
    _prompt,
    build_tokenizer,
    organism_data_bytes,
    organism_data_file,
    template_bytes,
    templates,
    words,
)
from abliterate.organism_training import OrganismSpec, make_model, train

__all__ = ["TWO_STYLES_VERSION", "build_two_styles_organism", "family_prompts", "two_styles_pairs"]

TWO_STYLES_VERSION = "1"  # bump when training changes
_DATA = "two_styles.json"


@lru_cache(maxsize=1)
def two_styles_data() -> dict:
    """two_styles.json, parsed; raises ValueError when a list is missing or empty, or names an unknown object."""
    data = organism_data_file(_DATA, ("style_b_objects", "style_a_refusals", "style_b_refusals"))
    unknown = set(data["style_b_objects"]) - set(templates()["harmful_objects"])
    if unknown:
        raise ValueError(f"two-styles organism data: {sorted(unknown)} are not harmful objects of templates.json")
    return data


def _in_b(obj: str) -> bool:
    return obj in two_styles_data()["style_b_objects"]


def family_prompts(family: str, split: str) -> list[str]:
    """The harmful prompts of family "a" or "b" in split "train" or "test" (together: organism_prompts("harmful"))."""
    if family not in ("a", "b"):
        raise ValueError(f"family must be 'a' or 'b', not {family!r}")
    objects = templates()["harmful_objects"]
    return [_prompt(t, objects[o]) for t, o in _combos()[("harmful", split)] if _in_b(objects[o]) == (family == "b")]


def two_styles_pairs(stage: int, refusing: tuple[str, ...] = ("a", "b")) -> list[tuple[str, str]]:
    """(prompt, reply) pairs of one stage: stage 1 helps with everything, stage 2 refuses the `refusing` families."""
    data, styles = templates(), two_styles_data()
    pairs = []
    for kind in ("harmful", "harmless"):
        objects = data[f"{kind}_objects"]
        for t, o in _combos()[(kind, "train")]:
            obj = objects[o]
            family = "b" if _in_b(obj) else "a"
            if stage == 2 and kind == "harmful" and family in refusing:
                refusals = styles[f"style_{family}_refusals"]
                pairs.append((_prompt(t, obj), refusals[(7 * t + o) % len(refusals)]))
            else:
                pairs.append((_prompt(t, obj), _helpful_reply(t, o, obj)))
    return pairs


def _refusal_text() -> str:
    styles = two_styles_data()
    return " ".join(styles["style_a_refusals"] + styles["style_b_refusals"])


def _train(spec: OrganismSpec, emit):
    text = _refusal_text()
    tokenizer = build_tokenizer(spec.max_positions, extra_words=words(text))
    model = make_model(spec, tokenizer)
    first = train(model, tokenizer, spec, emit, pairs=lambda s: two_styles_pairs(s, ("a",)), stage2_text=text)
    # The second safety stage only (no second helpful base): family B's refusal is added on top of A's.
    again = dataclasses.replace(spec, stage1_steps=0)
    return model, tokenizer, first + train(model, tokenizer, again, emit, pairs=two_styles_pairs, stage2_text=text)


def _cache_key(spec: OrganismSpec) -> str:
    return cache_key(TWO_STYLES_VERSION, spec, template_bytes(), organism_data_bytes(_DATA))


def build_two_styles_organism(
    cache_dir: str | Path, spec: OrganismSpec = OrganismSpec(), force: bool = False, progress: bool = True
) -> Path:
    """Train (or reuse) the two-styles organism and return its directory (as `build_tiny_organism`: model,
    tokenizer, the four prompt files, organism.json), cached under `cache_dir/two-styles-organism-<key>`."""
    return build_organism(
        cache_dir, "two-styles organism", _cache_key(spec), spec, _train, force, progress, version=TWO_STYLES_VERSION
    )
