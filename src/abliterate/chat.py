"""A streaming chat REPL: multi-turn history, /reset, /system TEXT, and original vs trial side by side.

The history is the conversation's complete turns (user, then assistant), rendered with the chat
template before every reply, after the system prompt. An assistant turn is the reply as it was shown
(decoded without special tokens): for a thinking model that includes the thought, and templates that
drop past thoughts (Qwen3's) drop it. A reply stopped by Ctrl-C is not kept, nor its question: the
history holds only complete turns, so the user and assistant roles still alternate.

With `compare` (a context manager factory that applies the trial's edit to the one model in memory),
every question is answered by the original, then by the abliterated model, each labelled; each keeps
its own history of the same questions. Ctrl-C during either reply stops both for that question.
"""

import contextlib
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager

import jinja2
import torch
from transformers import TextStreamer

from abliterate.errors import first_line
from abliterate.prompts import _template_text, format_chat

HELP = (
    "chat: /reset clears the history, /system TEXT sets the system prompt (/system alone removes it); "
    "an empty line, Ctrl-D or Ctrl-C quits; Ctrl-C during a reply stops it"
)
ORIGINAL, ABLITERATED = "original", "abliterated"


def render(
    tokenizer,
    turns: list[dict[str, str]],
    *,
    system_prompt: str | None = None,
    chat_template: str | None = None,
    enable_thinking: bool | None = None,
) -> str:
    """`turns` (the history and the new question) with the generation prompt appended.

    The system prompt is a system turn, or folded into the first user turn where the template
    rejects the system role (as `prompts.format_chat` does).
    """
    kwargs: dict = {"tokenize": False, "add_generation_prompt": True}
    template = _template_text(chat_template)
    if template is not None:
        kwargs["chat_template"] = template
    if enable_thinking is not None:
        kwargs["enable_thinking"] = enable_thinking
    if system_prompt is None:
        return tokenizer.apply_chat_template(turns, **kwargs)
    try:
        return tokenizer.apply_chat_template([{"role": "system", "content": system_prompt}, *turns], **kwargs)
    except jinja2.TemplateSyntaxError:
        raise
    except Exception as error:
        if "system" not in str(error).lower():
            raise
    folded = dict(turns[0], content=f"{system_prompt}\n\n{turns[0]['content']}")
    return tokenizer.apply_chat_template([folded, *turns[1:]], **kwargs)


def generate_reply(model, tokenizer, text: str, max_new_tokens: int) -> str:
    """Greedy reply to the rendered `text`, streamed to stdout; returns it decoded without special tokens."""
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(model.device)
    # A fresh streamer per reply: one stopped mid-reply keeps tokens that would leak into the next.
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            streamer=streamer,
            pad_token_id=tokenizer.pad_token_id,
        )
    sequences = getattr(out, "sequences", out)
    return tokenizer.decode(sequences[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def chat_loop(
    model,
    tokenizer,
    datamodule,
    max_new_tokens: int = 256,
    read: Callable[[str], str] = input,
    compare: Callable[[], AbstractContextManager] | None = None,
) -> dict[str, list[dict[str, str]]]:
    """Chat turn by turn, each reply streamed to stdout; returns each side's history when the chat ends.

    `datamodule` gives the first system prompt, the chat template and enable_thinking. `compare`:
    answer each question with the original, then inside `compare()` (the trial applied), each
    labelled; the histories are then "original" and "abliterated", else there is one, "model".
    An empty line, EOF (Ctrl-D) or Ctrl-C at the prompt ends the chat.
    """
    system = datamodule.system_prompt
    options = {"chat_template": datamodule.chat_template, "enable_thinking": datamodule.enable_thinking}
    format_chat(tokenizer, ["hello"], system_prompt=system, **options)  # no or broken template: one-line error now
    sides: dict[str, Callable[[], AbstractContextManager]]
    sides = {ORIGINAL: contextlib.nullcontext, ABLITERATED: compare} if compare else {"model": contextlib.nullcontext}
    histories: dict[str, list[dict[str, str]]] = {side: [] for side in sides}
    print(HELP)
    while True:
        try:
            line = read("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            break
        if not line:
            break
        if line == "/reset":
            for history in histories.values():
                history.clear()
            print("[history cleared]")
            continue
        if line == "/system" or line.startswith("/system "):
            system = line[len("/system") :].strip() or None
            print(f"[system prompt: {system}]" if system else "[system prompt removed]")
            continue
        question = {"role": "user", "content": line}
        replies: dict[str, str] = {}
        try:
            for side, edited in sides.items():
                text = render(tokenizer, [*histories[side], question], system_prompt=system, **options)
                if compare:
                    print(f"[{side}]", flush=True)
                with edited():
                    replies[side] = generate_reply(model, tokenizer, text, max_new_tokens)
        except KeyboardInterrupt:  # stops this question's replies, not the chat
            print("\n[stopped] (this question is not kept in the history)", flush=True)
            continue
        except jinja2.TemplateError as error:  # e.g. a template's raise_exception on this conversation
            print(
                f"error: the chat template refused this conversation ({first_line(error)}); try /reset", file=sys.stderr
            )
            continue
        for side, reply in replies.items():
            histories[side] += [question, {"role": "assistant", "content": reply}]
    return histories
