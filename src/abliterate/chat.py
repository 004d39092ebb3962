"""A streaming chat REPL."""

import torch
from transformers import TextStreamer

from abliterate.prompts import format_chat


def chat_loop(model, tokenizer, datamodule, max_new_tokens: int = 256, read=input) -> None:
    """Chat turn by turn; each reply streams to stdout. An empty line or EOF ends it."""
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    print("chat: an empty line or Ctrl-D quits; Ctrl-C stops a reply")
    while True:
        try:
            line = read("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            break
        if not line:
            break
        text = format_chat(
            tokenizer,
            [line],
            system_prompt=datamodule.system_prompt,
            chat_template=datamodule.chat_template,
            enable_thinking=datamodule.enable_thinking,
        )[0]
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(model.device)
        try:
            with torch.no_grad():
                model.generate(
                    **inputs,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    streamer=streamer,
                    pad_token_id=tokenizer.pad_token_id,
                )
        except KeyboardInterrupt:  # stops this reply, not the chat
            streamer.on_finalized_text("", stream_end=True)
            print("[stopped]")
