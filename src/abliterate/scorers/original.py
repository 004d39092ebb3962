"""Reading replies with the original model, also during a trial: the judges that are fit on its behaviour."""

from contextlib import nullcontext

import torch

from abliterate.ablation import Editor
from abliterate.decode import cut_at_eos, eos_token_ids, left_padded
from abliterate.errors import AbliterateError
from abliterate.metrics import greedy_reply_tokens


def original_weights(editor: Editor | None):
    """The unedited model for the block, the trial's edit back afterwards: a judge that read the edited
    model could be blinded by the very edit it judges."""
    return nullcontext() if editor is None else editor.suspended()


def fitting_prompts(module, n_harmful: int, n_harmless: int) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of the first prompts of the direction roles (data.harmful, data.harmless)."""
    datamodule = getattr(getattr(module, "_trainer", None), "datamodule", None)
    if datamodule is None:
        raise AbliterateError("this judge is fit on data.harmful and data.harmless: run it in a pipeline")
    datamodule.attach_tokenizer(module.tokenizer)
    harmful = list(datamodule.dataset("harmful").input_ids[:n_harmful])
    return harmful, list(datamodule.dataset("harmless").input_ids[:n_harmless])


def fitting_replies(module, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 16) -> list[list[int]]:
    """The model's greedy reply tokens to prompt token ids."""
    model, tokenizer = module.model, module.tokenizer
    replies: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = left_padded(prompts[start : start + batch_size], tokenizer.pad_token_id, model.device)
        replies += greedy_reply_tokens(model, tokenizer, ids, mask, max_new_tokens)
    return replies


@torch.no_grad()
def sampled_replies(
    model, tokenizer, prompts: list[list[int]], max_new_tokens: int, samples: int, seed: int = 0, batch_size: int = 16
) -> list[list[int]]:
    """`samples` replies to each prompt token ids (prompt-major), drawn at temperature 1 with no top-k or
    top-p cut, each cut before its first eos. Seeded, and the caller's random state is left as it was:
    the many ways a model refuses, which its one greedy reply hides."""
    eos = eos_token_ids(model, tokenizer)
    cuda = range(torch.cuda.device_count()) if model.device.type == "cuda" else []
    replies: list[list[int]] = []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            ids, mask = left_padded(prompts[start : start + batch_size], tokenizer.pad_token_id, model.device)
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                num_return_sequences=samples,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=eos or None,
            )
            replies += cut_at_eos(out[:, ids.shape[1] :].tolist(), set(eos), max_new_tokens)
    return replies
