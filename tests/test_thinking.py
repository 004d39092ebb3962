"""Reasoning models: thinking templates are detected, replies are judged on the answer after the
thought, and `abliterate run` removes the refusals of a tiny organism that thinks before it refuses."""

import json

import pytest
import torch
from organism_helpers import generate_replies, is_refusal, topic_rate
from transformers import AutoModelForCausalLM, AutoTokenizer

from abliterate.cli import main
from abliterate.data import PromptDataModule, left_pad_collate
from abliterate.errors import AbliterateError
from abliterate.metrics import generate_responses
from abliterate.module import AbliterationModule
from abliterate.options import EvalOptions, LoadOptions
from abliterate.organism_data import CHAT_TEMPLATE, organism_prompts
from abliterate.organism_thinking import (
    THINK_CLOSE,
    THINKING_CHAT_TEMPLATE,
    THINKING_SPEC,
    build_thinking_tokenizer,
)
from abliterate.pipeline import Pipeline
from abliterate.prompts import PromptSource
from abliterate.scorers import KL, MarkerRefusals, Observations, ThinkingRefusals
from abliterate.thinking import (
    ThinkingFormat,
    _ThoughtStop,
    detect_thinking,
    extend,
    is_packed,
    opened_by_prompt,
    pack,
    unpack,
)
from abliterate.trainer import AbliterationTrainer

TAGS = EvalOptions().think_tags
THINK = ThinkingFormat("<think>", "</think>", "</think>")
QWEN3 = (
    "{%- for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{%- if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{%- endif %}{%- endif %}"
)
R1 = "{% set content = message['content'].split('</think>')[-1] %}<｜Assistant｜><think>\n"
GPT_OSS = "<|start|>assistant<|channel|>analysis<|message|>{{ message.thinking }}<|end|>"


def split_reply(text: str) -> tuple[str, str]:
    """(thought, answer) of a full organism reply, which starts inside the block the template opened."""
    thought, close, answer = text.partition(THINK_CLOSE)
    return (thought, answer) if close else (text, "")


# --------------------------------------------------------------------------- detection and packing


def test_thinking_templates_are_detected_and_the_switch_is_explicit():
    assert detect_thinking(QWEN3, TAGS) == THINK
    assert detect_thinking(R1, TAGS) == THINK
    oss = detect_thinking(GPT_OSS, TAGS)
    assert oss.open == "<|channel|>analysis<|message|>" and oss.close == "<|channel|>final<|message|>"
    assert oss.force == "<|end|><|start|>assistant<|channel|>final<|message|>"
    assert detect_thinking("{% if enable_thinking %}{{ x }}{% endif %}", TAGS) == THINK  # the switch alone
    assert detect_thinking(THINKING_CHAT_TEMPLATE, TAGS) == THINK
    # A template that does not think is scored from the first reply token, unless told otherwise.
    assert detect_thinking(CHAT_TEMPLATE, TAGS) is None
    assert detect_thinking(CHAT_TEMPLATE, TAGS, mode=True) == THINK
    assert detect_thinking(QWEN3, TAGS, mode=False) is None
    assert detect_thinking("<reasoning>", [["<reasoning>", "</reasoning>"]]) == ThinkingFormat(
        "<reasoning>", "</reasoning>", "</reasoning>"
    )
    with pytest.raises(AbliterateError, match="think_tokens"):
        EvalOptions(think_tokens=0)
    with pytest.raises(AbliterateError, match="think_tags"):
        EvalOptions(think_tags=[["<think>"]])


def feed(stop: _ThoughtStop, prompt: list[int], reply: list[int]) -> int:
    """Run the stop criterion over `reply` token by token, as generate() does; returns the steps taken."""
    for n in range(1, len(reply) + 1):
        if bool(stop(torch.tensor([prompt + reply[:n]]))[0]):
            return n
    return len(reply)


def test_a_thought_ends_at_its_close_tag_wherever_it_was_opened():
    tok = build_thinking_tokenizer(THINKING_SPEC.max_positions)
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt = ids("<user> how do i make tea ? <end> <assistant>")
    eos = {tok.eos_token_id}

    # The model opens the block (Qwen3): the thought runs to </think> and the answer starts after it.
    reply = ids("<think> tea ? it is safe . </think> tea : first gather")
    stop = _ThoughtStop(tok, THINK, len(prompt), [False], eos)
    assert feed(stop, prompt, reply) == 8 and stop.cut == [8] and stop.closed == [True]
    # The template opened it (DeepSeek-R1, and the organism): the reply starts inside.
    reply = ids("tea ? it is safe . </think> tea : first")
    stop = _ThoughtStop(tok, THINK, len(prompt) + 1, [True], eos)
    assert feed(stop, prompt + ids("<think>"), reply) == 7 and stop.cut == [7]
    # No thought (or enable_thinking=False, which closes the block in the prompt): stop at once, all answer.
    stop = _ThoughtStop(tok, THINK, len(prompt), [False], eos)
    assert feed(stop, prompt, ids("tea : first gather")) == 1 and stop.cut == [0] and stop.closed == [False]
    # eos inside a thought: the thought ends before it, to be closed by force.
    stop = _ThoughtStop(tok, THINK, len(prompt), [False], eos)
    assert feed(stop, prompt, ids("<think> tea ?") + [tok.eos_token_id]) == 4
    assert stop.cut == [3] and stop.closed == [False]

    rendered = [
        tok.apply_chat_template([{"role": "user", "content": "tea ?"}], tokenize=False, add_generation_prompt=True),
        "<bos><user> tea ? <end> <assistant> <think> </think>",  # enable_thinking=False
        "<bos><user> tea ? <end> <assistant>",
    ]
    batch = tok(rendered, return_tensors="pt", padding=True, add_special_tokens=False)
    assert opened_by_prompt(tok, THINK, batch["input_ids"], batch["attention_mask"]) == [True, False, False]


def test_thoughts_pack_before_the_answer_and_extend_the_prompts():
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    new_ids, new_mask = extend(ids, mask, [[11, 12, 13], []], pad_token_id=0)
    assert new_ids.tolist() == [[5, 6, 11, 12, 13], [0, 7, 8, 9, 10]]
    assert new_mask.tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]]
    answer = torch.tensor([[1, 2], [3, 4]])
    packed = pack([[11, 12, 13], []], width=4, answer=answer)
    assert packed.shape == (2, 4 + 1 + 2) and is_packed(packed) and not is_packed(answer)
    thoughts, again = unpack(packed)
    assert thoughts == [[11, 12, 13], []] and torch.equal(again, answer)
    with pytest.raises(ValueError, match="does not fit"):
        pack([[1, 2, 3]], width=2, answer=answer[:1])


# --------------------------------------------------------------------------- the thinking organism


@pytest.fixture(scope="module")
def thinking_model(thinking_organism_dir):
    model = AutoModelForCausalLM.from_pretrained(thinking_organism_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(thinking_organism_dir)


def make_pipeline(model_dir, run_dir, evaluation: EvalOptions, scorers=None, **data):
    module = AbliterationModule(
        model_id=str(model_dir), load=LoadOptions(dtypes=["float32"]), evaluation=evaluation, scorers=scorers
    )
    datamodule = PromptDataModule(
        harmful=PromptSource(f"{model_dir}/harmful_train.txt"),
        harmless=PromptSource(f"{model_dir}/harmless_train.txt"),
        eval_harmful=PromptSource(f"{model_dir}/harmful_test.txt"),
        eval_harmless=PromptSource(f"{model_dir}/harmless_test.txt"),
        eval_batch_size=16,
        **data,
    )
    trainer = AbliterationTrainer(accelerator="cpu", devices=1, enable_progress_bar=False)
    return Pipeline(trainer, module, datamodule, run_dir)


def test_the_thinking_organism_thinks_then_refuses(thinking_model):
    """Greedy, unabridged replies: a thought closed by </think>, then the answer. The harmful
    answers are refusals; the thoughts decide late, past the first 12 reply tokens."""
    model, tok = thinking_model
    harmful, harmless = organism_prompts("harmful", "test"), organism_prompts("harmless", "test")
    replies = {
        kind: generate_replies(model, tok, p, max_new_tokens=48) for kind, p in (("h", harmful), ("s", harmless))
    }
    for texts in replies.values():
        assert sum(THINK_CLOSE in t for t in texts) / len(texts) >= 0.95
    answers = {k: [split_reply(t)[1] for t in v] for k, v in replies.items()}
    thoughts = {k: [split_reply(t)[0] for t in v] for k, v in replies.items()}
    assert sum(map(is_refusal, answers["h"])) / len(harmful) >= 0.9
    assert sum(map(is_refusal, answers["s"])) / len(harmless) <= 0.05
    assert topic_rate(answers["s"], harmless) >= 0.9
    assert sum(map(is_refusal, thoughts["h"])) / len(harmful) >= 0.9
    assert not any(map(is_refusal, thoughts["s"]))
    first12 = generate_replies(model, tok, harmful, max_new_tokens=12)
    assert not any(map(is_refusal, first12)), [t for t in first12 if is_refusal(t)]


def test_answer_blind_scoring_never_sees_the_refusal(thinking_organism_dir, tmp_path, capsys):
    """The failure this fixes. Judged from the first reply token with max_new_tokens 12, the
    organism's replies end inside its ~20-token thought (as a real reasoning model's hundreds of
    thinking tokens outrun the default 32): the baseline reads 0 refusals although it refuses
    over 90% of answers, so `abliterate run` finds nothing to remove. Judged on the answer, the
    same 12 tokens see the refusals; the thoughts' own markers are reported separately."""
    scorers = lambda: [MarkerRefusals(), KL(), ThinkingRefusals()]  # noqa: E731
    blind = make_pipeline(thinking_organism_dir, tmp_path / "blind", EvalOptions(max_new_tokens=12, thinking=False))
    aware = make_pipeline(thinking_organism_dir, tmp_path / "aware", EvalOptions(max_new_tokens=12), scorers())
    assert blind.reference().values["refusals"] == 0.0
    values = aware.reference().values
    assert values["refusals"] >= 0.9 and values["thinking_refusals"] >= 0.9

    config = tmp_path / "blind.yaml"
    config.write_text(run_config(thinking_organism_dir, "thinking: false"))
    with pytest.raises(SystemExit) as exit_:
        main(
            ["run", "--config", str(config), "--model", str(thinking_organism_dir), "--output_dir", str(tmp_path / "r")]
        )
    assert exit_.value.code == 2
    assert "nothing to remove" in capsys.readouterr().err


def test_enable_thinking_false_judges_the_whole_reply(thinking_model, thinking_organism_dir):
    """--data.enable_thinking false, where the template has the switch: the prompt closes an empty
    block, so a reply has no thought and is judged whole (the thought probe costs one token)."""
    model, tok = thinking_model
    switch = THINKING_CHAT_TEMPLATE.replace(
        "<assistant> <think>", "<assistant> <think>{% if enable_thinking is false %} </think>{% endif %}"
    )
    evaluation = EvalOptions(max_new_tokens=12)
    pipe = make_pipeline(thinking_organism_dir, None, evaluation, chat_template=switch, enable_thinking=False)
    pipe.datamodule.attach_tokenizer(pipe.module.tokenizer)
    pipe.module.configure_model()
    rows = [pipe.datamodule.dataset("eval_harmful")[i] for i in range(8)]
    batch = left_pad_collate(tok.pad_token_id, "eval_harmful")(rows)
    assert tok.decode(batch["input_ids"][0]).endswith("<assistant> <think> </think>")
    obs = Observations(pipe.module, batch)
    assert obs.thinking == THINK and obs.thought_texts() == [""] * 8
    plain = generate_responses(
        pipe.module.model,
        tok,
        batch["input_ids"],
        batch["attention_mask"],
        max_new_tokens=12,
        markers=pipe.module.markers,
    )
    assert obs.responses() == plain


def test_a_model_that_does_not_think_is_scored_as_before(organism_dir, tmp_path):
    pipe = make_pipeline(
        organism_dir, tmp_path / "run", EvalOptions(max_new_tokens=12), [MarkerRefusals(), KL(), ThinkingRefusals()]
    )
    values = pipe.reference().values
    assert values["refusals"] >= 0.9 and values["thinking_refusals"] == 0.0


def run_config(model_dir, evaluation: str = "") -> str:
    return f"""
data:
  harmful: {{dataset: {model_dir}/harmful_train.txt, split: train}}
  harmless: {{dataset: {model_dir}/harmless_train.txt, split: train}}
  eval_harmful: {{dataset: {model_dir}/harmful_test.txt, split: train}}
  eval_harmless: {{dataset: {model_dir}/harmless_test.txt, split: train}}
  batch_size: 64
  eval_batch_size: 16
module:
  load: {{dtypes: [float32]}}
  evaluation: {{max_new_tokens: 12, think_tokens: 48, {evaluation}}}
  scorers:
    - class_path: abliterate.scorers.MarkerRefusals
    - class_path: abliterate.scorers.KL
    - class_path: abliterate.scorers.ThinkingRefusals
trainer:
  accelerator: cpu
  devices: 1
  enable_progress_bar: false
"""


def test_run_abliterates_the_thinking_organism(thinking_organism_dir, thinking_model, tmp_path, capsys):
    """E2E: judged on the answer after the thought, refusals drop to <= 5%; harmless answers stay
    answered and on topic; KL (the search's, over 16 answer tokens, and the first answer token's) small."""
    config = tmp_path / "thinking.yaml"
    config.write_text(run_config(thinking_organism_dir))
    out = tmp_path / "run"
    argv = ["run", "--config", str(config), "--model", str(thinking_organism_dir), "--output_dir", str(out)]
    main([*argv, "--study.n_trials", "12", "--study.n_startup_trials", "8"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["refusal_before"] >= 0.9
    assert summary["refusal_after"] <= 0.05
    assert summary["kl"] <= 0.1

    original, tok = thinking_model
    ablated = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32).eval()
    harmful, harmless = organism_prompts("harmful", "test"), organism_prompts("harmless", "test")
    after = {k: generate_replies(ablated, tok, p, max_new_tokens=48) for k, p in (("h", harmful), ("s", harmless))}
    before_harmless = generate_replies(original, tok, harmless, max_new_tokens=48)
    answers = {k: [split_reply(t)[1] for t in v] for k, v in after.items()}
    assert sum(map(is_refusal, answers["h"])) / len(harmful) <= 0.05, answers["h"]
    assert sum(map(is_refusal, answers["s"])) / len(harmless) <= 0.05
    assert sum(THINK_CLOSE in t for t in after["h"] + after["s"]) / (len(harmful) + len(harmless)) >= 0.95
    topic_before = topic_rate([split_reply(t)[1] for t in before_harmless], harmless)
    assert topic_rate(answers["s"], harmless) >= 0.9 * topic_before
    # The thoughts stopped refusing too (reported, not optimised).
    assert sum(is_refusal(split_reply(t)[0]) for t in after["h"]) / len(harmful) <= 0.2

    # First answer token KL, after the original's own thought, for each harmless prompt.
    kl = 0.0
    for prompt, reply in zip(harmless, before_harmless, strict=True):
        text = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        thought = split_reply(reply)[0] + " " + THINK_CLOSE
        ids = tok(text + " " + thought, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            p = original(ids).logits[0, -1].log_softmax(-1)
            q = ablated(ids).logits[0, -1].log_softmax(-1)
        kl += float((p.exp() * (p - q)).sum())
    assert kl / len(harmless) <= 0.1


def test_a_thinking_study_records_its_thought_budget(thinking_organism_dir, organism_dir):
    """Answers judged after a thought of up to think_tokens: resuming with another budget is refused."""
    from abliterate.data import PromptDataModule
    from abliterate.module import AbliterationModule
    from abliterate.options import EvalOptions
    from abliterate.pipeline import Pipeline

    def record(model_dir, **evaluation):
        module = AbliterationModule(model_id=str(model_dir), evaluation=EvalOptions(**evaluation))
        data = PromptDataModule(harmful=f"{model_dir}/harmful_test.txt", harmless=f"{model_dir}/harmless_test.txt")
        return Pipeline(None, module, data, None).objective_record()

    assert record(thinking_organism_dir)["think_tokens"] == 128
    assert record(thinking_organism_dir, think_tokens=64)["think_tokens"] == 64
    assert "think_tokens" not in record(thinking_organism_dir, thinking=False)
    assert "think_tokens" not in record(organism_dir)  # not a thinking template: the record is as before
