"""Write an ablated model as a normal HF checkpoint, atomically."""

import json
import logging
import os
import shutil
import time
from pathlib import Path

from abliterate.errors import AbliterateError

log = logging.getLogger("abliterate.export")


def check_writable(target: Path, overwrite: bool) -> None:
    """Fail before any work when the export could not be written."""
    if target.exists() and not overwrite:
        raise AbliterateError(f"{target} already exists; pass --overwrite true or choose another --export_dir")
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise AbliterateError(f"cannot create {parent}: {err.strerror}; choose a writable --output_dir") from err
    if not os.access(parent, os.W_OK):
        raise AbliterateError(f"{parent} is not writable; choose a writable --output_dir")


def model_card(base_model: str, card: dict) -> str:
    lines = [
        "---",
        f"base_model: {base_model}",
        "tags: [abliterated, abliterate]",
        "---",
        f"# {base_model} (abliterated)",
        "",
        f"Refusal directions were ablated from `{base_model}` with "
        "[abliterate](https://pypi.org/project/abliterate/): directional ablation of the "
        "residual-stream writers (attention out-projections and MLP down-projections), with "
        "parameters chosen by an Optuna search that co-minimises refusals and KL divergence.",
        "",
        "## Metrics",
        "",
        "| | refusal rate (harmful eval) | KL divergence (harmless eval) |",
        "|---|---|---|",
        f"| original | {card.get('refusal_before', 'n/a')} | 0 |",
        f"| this model | {card.get('refusal_after', 'n/a')} | {card.get('kl', 'n/a')} |",
        "",
        "## Parameters",
        "",
        "```json",
        json.dumps(card.get("params", {}), indent=2, sort_keys=True),
        "```",
        "",
    ]
    return "\n".join(lines)


def save_checkpoint(model, tokenizer, target: Path, overwrite: bool, card: dict) -> Path:
    """save_pretrained (sharded safetensors) into a temp dir beside `target`, then rename."""
    check_writable(target, overwrite)
    start = time.perf_counter()
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, max_shard_size="4GB")
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(str(card.get("base_model", "model")), card))
        (tmp / "abliterate.json").write_text(json.dumps(card, indent=2, sort_keys=True, default=str))
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported to %s in %.1fs", target, time.perf_counter() - start)
    return target
