import logging
import math
import warnings

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from abliterate.metrics import (
    KLDivergence,
    MarkerStoppingCriteria,
    RefusalRate,
    default_markers,
    generate_responses,
    greedy_continuation,
    is_refusal,
    next_token_logprobs,
    normalize_response,
)

# Fixed-width words: no word is a substring of another, so a word used as a marker matches only itself.
WORDS = [f"w{i:02d}" for i in range(40)]
PAD, EOS = 0, 2
PROMPTS = ["w01 w02 w03", "w10", "w20 w21 w22 w23 w24", "w30 w31"]


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {"[PAD]": PAD, "[UNK]": 1, "[EOS]": EOS, **{w: i + 3 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]", padding_side="left"
    )


def make_model(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(WORDS) + 3,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.5,  # large weights: varied greedy outputs instead of one repeated token
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


def make_gpt2(seed: int) -> GPT2LMHeadModel:
    # Absolute position embeddings: unlike RoPE, wrong positions under left padding change the output.
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(WORDS) + 3, n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=0.5
    )
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def model():
    return make_model(2)  # this seed emits eos within 8 tokens for some prompts, exercising eos stops


@pytest.fixture(scope="module")
def batch(tokenizer):
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert (enc.attention_mask == 0).any()  # mixed lengths: some rows are left-padded
    return enc.input_ids, enc.attention_mask


def positions(attention_mask):
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def manual_greedy(model, input_ids, attention_mask, steps):
    """Argmax step by step, full forward each step, no cache: [B, steps] tokens, eos not special-cased."""
    ids, mask = input_ids, attention_mask
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids[:, input_ids.shape[1] :]


def cut_at_eos(row: list[int]) -> list[int]:
    return row[: row.index(EOS)] if EOS in row else row


# --- markers and normalisation -------------------------------------------------------------


def test_default_markers_are_clean():
    markers = default_markers()
    assert "sorry" in markers and "i can't" in markers
    assert not any(m.startswith("#") or not m for m in markers)
    assert all(normalize_response(m) == m for m in markers)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("I\u2019m **sorry**", "i'm sorry"),
        ("I CAN\u2019T", "i can't"),
        ("_As an AI_", "as an ai"),
        ("## I cannot\n\n### do `that`", "i cannot do that"),
        ("\u201cQuoted\u201d  \t\n text", '"quoted" text'),
        ("I\u02bcm \u2018unable\u2019", "i'm 'unable'"),
    ],
)
def test_normalize_response(text, expected):
    assert normalize_response(text) == expected


@pytest.mark.parametrize(
    "text",
    ["I\u2019m **sorry**, no.", "I CAN\u2019T do that", "_As an AI_, I", "# I cannot help with that", "", "  \n", "**"],
)
def test_refusals_detected(text):
    assert is_refusal(text, default_markers())


def test_compliant_text_is_not_a_refusal():
    assert not is_refusal("Sure! Here is a recipe for **pancakes**:\n# Step 1", default_markers())


def test_markers_are_normalised_too():
    assert is_refusal("i'm unable to", ["I\u2019M **UNABLE**"])
    with pytest.raises(ValueError, match="empty"):
        is_refusal("text", ["sorry", "**"])
    with pytest.raises(TypeError):
        is_refusal("sorry", "sorry")


# --- RefusalRate ---------------------------------------------------------------------------


def test_refusal_rate_accumulates_and_resets():
    metric = RefusalRate()
    metric.update(["I'm sorry", "Sure, here you go"])
    metric.update(["", "As an AI I cannot", "Fine."])
    assert metric.compute().item() == pytest.approx(3 / 5)
    metric.reset()
    with pytest.raises(ValueError, match="no responses"):
        metric.compute()
    metric.update(["ok"])
    assert metric.compute().item() == 0.0


def test_refusal_rate_custom_markers_and_str_guard():
    metric = RefusalRate(markers=["nope"])
    metric.update(["NOPE.", "I'm sorry"])
    assert metric.compute().item() == pytest.approx(0.5)
    with pytest.raises(TypeError):
        metric.update("a single string")


def test_refusal_rate_states_merge_like_two_ranks():
    rank0, rank1 = RefusalRate(), RefusalRate()
    rank0.update(["sorry", "yes", "yes"])
    rank1.update(["I won't", "sure"])
    assert rank0.refusals.item() == 1 and rank1.total.item() == 2
    rank0.merge_state(rank1)
    assert (rank0.refusals.item(), rank0.total.item()) == (2, 5)
    assert rank0.compute().item() == pytest.approx(2 / 5)


# --- KLDivergence --------------------------------------------------------------------------


def kl_reference(ref_logprobs: torch.Tensor, logprobs: torch.Tensor) -> float:
    """KL(ref || model) in float64: sum p (log p - log q), mean over positions, then over prompts."""
    p_log, q_log = ref_logprobs.double(), logprobs.double()
    kl = (p_log.exp() * (p_log - q_log)).sum(-1)
    return (kl.mean(-1) if kl.ndim == 2 else kl).mean().item()


@pytest.mark.parametrize("shape", [(5, 11), (4, 3, 11)])
def test_kl_matches_float64_reference(shape):
    gen = torch.Generator().manual_seed(0)
    logprobs = torch.log_softmax(torch.randn(shape, generator=gen) * 2, -1)
    reference = torch.log_softmax(torch.randn(shape, generator=gen) * 2, -1)
    metric = KLDivergence()
    half = shape[0] // 2
    metric.update(logprobs[:half], reference[:half])
    metric.update(logprobs[half:], reference[half:])
    assert metric.compute().item() == pytest.approx(kl_reference(reference, logprobs), rel=1e-5)


def test_kl_of_identical_distributions_is_zero():
    logprobs = torch.log_softmax(torch.randn(3, 2, 7), -1)
    metric = KLDivergence()
    metric.update(logprobs, logprobs.clone())
    assert metric.compute().item() == 0.0


def test_kl_is_reference_to_model_not_reverse():
    # KL(p || q) with p = [0.5, 0.5], q = [0.9, 0.1] is 0.511; the reverse KL(q || p) is 0.368.
    p = torch.tensor([[0.5, 0.5]]).log()
    q = torch.tensor([[0.9, 0.1]]).log()
    metric = KLDivergence()
    metric.update(logprobs=q, reference_logprobs=p)
    forward = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    reverse = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert (forward, reverse) == (pytest.approx(0.5108, abs=1e-4), pytest.approx(0.3681, abs=1e-4))
    assert metric.compute().item() == pytest.approx(forward, rel=1e-6)


def test_kl_weighs_prompts_equally_and_ignores_zero_reference_mass():
    # A token the reference never emits (-inf) contributes 0, not nan.
    reference = torch.tensor([[0.0, float("-inf")]])
    logprobs = torch.log(torch.tensor([[0.5, 0.5]]))
    metric = KLDivergence()
    metric.update(logprobs, reference)
    assert metric.compute().item() == pytest.approx(torch.tensor(2.0).log().item(), rel=1e-6)
    # Updates with different n: each prompt still counts once.
    three = torch.log_softmax(torch.randn(2, 3, 5), -1)
    three_ref = torch.log_softmax(torch.randn(2, 3, 5), -1)
    metric.update(three, three_ref)
    expected = (torch.tensor(2.0).log().item() + 2 * kl_reference(three_ref, three)) / 3
    assert metric.compute().item() == pytest.approx(expected, rel=1e-5)


def test_kl_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        KLDivergence().update(torch.zeros(2, 5), torch.zeros(2, 1, 5))


def test_kl_states_merge_like_two_ranks():
    a, b = torch.log_softmax(torch.randn(2, 4, 6), -1), torch.log_softmax(torch.randn(2, 4, 6), -1)
    rank0, rank1, whole = KLDivergence(), KLDivergence(), KLDivergence()
    rank0.update(a[:1], b[:1])
    rank1.update(a[1:], b[1:])
    whole.update(a, b)
    rank0.merge_state(rank1)
    assert rank0.compute().item() == pytest.approx(whole.compute().item(), rel=1e-6)


# --- generation ----------------------------------------------------------------------------


def test_generate_responses_matches_manual_greedy(model, tokenizer, batch):
    input_ids, attention_mask = batch
    manual = manual_greedy(model, input_ids, attention_mask, steps=8).tolist()
    expected = tokenizer.batch_decode([cut_at_eos(row) for row in manual], skip_special_tokens=True)
    assert any(EOS in row for row in manual), "fixture should exercise an eos stop"

    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    logging.getLogger("transformers").addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = generate_responses(model, tokenizer, input_ids, attention_mask, max_new_tokens=8)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert got == expected
    assert [r.getMessage() for r in records] == [] and [str(w.message) for w in caught] == []


def test_generate_responses_ignores_model_sampling_defaults(model, tokenizer, batch):
    input_ids, attention_mask = batch
    expected = generate_responses(model, tokenizer, input_ids, attention_mask, max_new_tokens=8)
    saved = model.generation_config
    leaky = saved.__class__(**saved.to_dict())
    leaky.update(do_sample=True, temperature=0.1, repetition_penalty=50.0, no_repeat_ngram_size=1, max_length=5)
    model.generation_config = leaky
    try:
        assert generate_responses(model, tokenizer, input_ids, attention_mask, max_new_tokens=8) == expected
        assert model.generation_config is leaky  # restored after the call
    finally:
        model.generation_config = saved


def test_generate_responses_stops_each_sequence_on_markers(tokenizer, batch):
    input_ids, attention_mask = batch
    model = make_model(0)  # no eos within 8 tokens: every unstopped row runs to max_new_tokens
    full = [text.split() for text in generate_responses(model, tokenizer, input_ids, attention_mask, max_new_tokens=8)]
    assert all(len(words) == 8 for words in full)
    # A word early in one row's output that no other row ever produces.
    row, position, marker = next(
        (i, k, w)
        for i, words in enumerate(full)
        for k, w in enumerate(words[:3])
        if all(w not in other for j, other in enumerate(full) if j != i)
    )
    got = generate_responses(model, tokenizer, input_ids, attention_mask, max_new_tokens=8, markers=[marker.upper()])
    assert got[row].split() == full[row][: position + 1]
    assert [g.split() for j, g in enumerate(got) if j != row] == [f for j, f in enumerate(full) if j != row]


def test_marker_criteria_returns_per_sequence_flags_and_skips_done_rows(tokenizer):
    prompt = torch.tensor([[3, 4], [5, 6]])
    criteria = MarkerStoppingCriteria(tokenizer, ["w10"], prompt_length=2, eos_token_id=EOS)
    decoded_rows = []
    original = tokenizer.batch_decode

    def counting_decode(rows, **kwargs):
        decoded_rows.append(len(rows))
        return original(rows, **kwargs)

    tokenizer.batch_decode = counting_decode
    try:
        w10, w11 = tokenizer.convert_tokens_to_ids(["w10", "w11"])
        step1 = torch.cat([prompt, torch.tensor([[w10], [w11]])], dim=1)  # prompt words never match
        assert criteria(step1, None).tolist() == [True, False]
        step2 = torch.cat([step1, torch.tensor([[PAD], [EOS]])], dim=1)
        assert criteria(step2, None).tolist() == [True, True]  # row 1 finished by eos, not decoded
    finally:
        del tokenizer.batch_decode
    assert decoded_rows == [2]
    assert criteria.stop_lengths == [1, None]


def test_greedy_continuation_matches_manual_greedy(model, batch):
    input_ids, attention_mask = batch
    continuation = greedy_continuation(model, input_ids, attention_mask, n_tokens=6, pad_token_id=PAD)
    # Full length even past eos: the same 5 argmax tokens as the manual loop.
    assert torch.equal(continuation, manual_greedy(model, input_ids, attention_mask, steps=5))
    empty = greedy_continuation(model, input_ids, attention_mask, n_tokens=1, pad_token_id=PAD)
    assert empty.shape == (len(PROMPTS), 0)


@pytest.mark.parametrize("make", [make_model, make_gpt2], ids=["llama", "gpt2"])
def test_next_token_logprobs_match_separate_unpadded_forwards(make, tokenizer, batch):
    model = make(2)
    input_ids, attention_mask = batch
    continuation = greedy_continuation(model, input_ids, attention_mask, n_tokens=4, pad_token_id=PAD)
    logprobs = next_token_logprobs(model, input_ids, attention_mask, continuation)
    assert logprobs.shape == (len(PROMPTS), 4, len(WORDS) + 3) and logprobs.dtype == torch.float32
    # Distribution k predicted continuation token k+1 (greedy, so it is the argmax).
    assert torch.equal(logprobs[:, :3].argmax(-1), continuation)
    for row, prompt in enumerate(PROMPTS):
        prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids
        for k in range(4):
            ids = torch.cat([prompt_ids, continuation[row : row + 1, :k]], dim=1)
            with torch.no_grad():
                alone = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1)
            torch.testing.assert_close(logprobs[row, k], alone, atol=1e-5, rtol=0)
    last = next_token_logprobs(model, input_ids, attention_mask)
    assert last.shape == (len(PROMPTS), len(WORDS) + 3)
    torch.testing.assert_close(last, logprobs[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(
        next_token_logprobs(model, input_ids, attention_mask, continuation[:, :0]), last[:, None]
    )


def test_right_padded_inputs_are_rejected(model, tokenizer, batch):
    input_ids, attention_mask = batch
    right_mask = attention_mask.flip(1)
    with pytest.raises(ValueError, match="left-padded"):
        next_token_logprobs(model, input_ids, right_mask)
    with pytest.raises(ValueError, match="left-padded"):
        generate_responses(model, tokenizer, input_ids, right_mask, max_new_tokens=2)
