"""Upload an export to the Hugging Face Hub: only with `--hub.push_to`, checked before any work.

`check_push` runs before the model loads: a token is found (`--hub.token`, else HF_TOKEN, else the
one `hf auth login` stored), offline mode is off, and the repo is created (or found) with it, so a
missing token, a refused one or a name the hub rejects ends in one line instead of after the search.
`push` then uploads the export dir with `HfApi.upload_folder`, in one commit. A repo that already
holds an abliterate export (its abliterate.json) is replaced by the new one in that commit (files
the new export lacks are deleted); in any other repo the export's files are only added.

The token is never printed: every message this module raises has it replaced by "***".

`card_sections` writes the model card's "How it was made" and "Reproduce" sections (README.md of
every export, the page people see on the hub) from the export's reproduce record.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from abliterate.errors import AbliterateError, Interrupted, first_line
from abliterate.export import MANIFEST
from abliterate.options import HubOptions

log = logging.getLogger("abliterate.hub")


def card_sections(card: dict) -> list[str]:
    """The model card's sections from an export's reproduce record: how it was made, and how to check it."""
    record = card.get("reproduce")
    if not record:
        return []
    config, model, trial = record.get("config", {}), record.get("model", {}), record.get("trial", {})
    study, prompts = config.get("study") or {}, record.get("prompts", {})
    params = trial.get("params", {})
    positions = int((config.get("module") or {}).get("residual_positions", 1))
    winsorize = params.get("winsorize", ((config.get("space") or {}).get("winsorize") or [1.0])[0])
    counts = {role: p.get("count", "?") for role, p in prompts.items()}
    edited = record.get("edited_tensors")
    names = list(card.get("after", {}))
    at = f" @ `{model['commit']}`" if model.get("commit") else ""
    lines = [
        "## How it was made",
        "",
        f"1. Residuals of {counts.get('harmful', '?')} harmful and {counts.get('harmless', '?')} harmless prompts at "
        f"{f'the last {positions} prompt tokens (averaged)' if positions > 1 else 'the last prompt token'} of every "
        f"layer of `{model.get('id')}` ({model.get('dtype')}).",
        f"2. Refusal directions by {params.get('direction_method', 'mean_diff')}"
        f"{' (orthogonal to the harmless mean)' if params.get('projected', True) else ''}"
        f"{f', residuals clamped at their {winsorize} magnitude quantile' if winsorize != 1.0 else ''}.",
        f"3. An Optuna search of {study.get('n_trials', '?')} trials (seed {trial.get('seed')}) over the ablation "
        f"parameters, scored by {', '.join(names)} on {counts.get('eval_harmful', '?')} harmful and "
        f"{counts.get('eval_harmless', '?')} harmless held-out prompts; trial {trial.get('number')} chosen by "
        f"`{study.get('select', '?')}` (refusal target {study.get('refusal_target', '?')}).",
        "4. Its edit, W' = W - w r r^T W on the attention out-projections and MLP down-projections, "
        f"written into the weights ({len(edited) if edited is not None else 'n/a'} tensors changed).",
        "",
        "## Reproduce",
        "",
        "`reproduce.json` holds every setting, the prompt sets' hashes and the edited tensors' hashes. "
        "`abliterate reproduce --export_dir DIR` re-derives the edit from the base model without a search and "
        "checks it (bit-exact on CPU, within a tolerance on GPU).",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{model.get('id')}`{at} |",
        f"| dtype, device | {model.get('dtype')}, {record.get('device')} |",
        *(f"| {name} | {version} |" for name, version in record.get("versions", {}).items()),
        f"| directions sha256 | `{(record.get('directions') or {}).get('sha256', 'n/a')}` |",
        "",
    ]
    return lines


def _token(options: HubOptions) -> str | None:
    if options.token:
        return options.token
    from huggingface_hub import get_token

    return get_token()


def _hidden(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def _reason(err: Exception) -> str:
    """An HTTP error as its status and the hub's own message, else the exception's first line."""
    response = getattr(err, "response", None)
    if response is None:
        return first_line(err)
    message = getattr(err, "server_message", None) or getattr(response, "reason_phrase", "")
    return f"HTTP {response.status_code}: {' '.join(str(message).split())}"[:300]


def _api(token: str):
    from huggingface_hub import HfApi

    return HfApi(token=token)


def check_push(options: HubOptions) -> None:
    """Before any work: fail in one line when `options.push_to` is set but the upload could not happen."""
    if not options.push_to:
        return
    from huggingface_hub import constants

    repo = options.push_to
    if constants.is_offline_mode():
        raise AbliterateError(
            f"--hub.push_to {repo} needs the hub, but HF_HUB_OFFLINE is set; unset it, or drop --hub.push_to"
        )
    token = _token(options)
    if not token:
        raise AbliterateError(
            f"--hub.push_to {repo} needs a Hugging Face token with write access: set HF_TOKEN, run `hf auth login`, "
            "or pass --hub.token"
        )
    try:
        _api(token).create_repo(repo, private=options.private, exist_ok=True, repo_type="model")
    except Exception as err:  # refused token, no write access to the namespace, an invalid name, unreachable
        raise AbliterateError(
            _hidden(
                f"cannot create or open the hub repo {repo} ({_reason(err)}); check the token's write access to "
                f"its namespace and the name, or drop --hub.push_to",
                token,
            )
        ) from None
    log.info("the export will be pushed to %s", repo)


def push(export_dir: Path, options: HubOptions, trial, rank0: bool = True) -> str | None:
    """Upload `export_dir` to `options.push_to` in one commit (rank 0 only); the commit's URL (None: no upload)."""
    if not options.push_to or not rank0:
        return None
    repo = options.push_to
    token = _token(options)
    if not token:  # check_push found one; it can only have gone since
        raise AbliterateError(f"the token for --hub.push_to {repo} is gone; set HF_TOKEN and rerun the same command")
    api = _api(token)
    message = f"abliterate: trial {trial.number} ({json.dumps(trial.params, sort_keys=True)})"[:300]
    try:
        api.create_repo(repo, private=options.private, exist_ok=True, repo_type="model")
        ours = MANIFEST in api.list_repo_files(repo, repo_type="model")
        info = api.upload_folder(
            repo_id=repo,
            folder_path=str(export_dir),
            repo_type="model",
            commit_message=message,
            delete_patterns="*" if ours else None,  # replace an earlier export; never delete anyone else's files
        )
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted during the upload; the export at {export_dir} is kept and {repo} is unchanged "
            "(one commit: nothing or all of it). Rerun the same command to push it."
        ) from None
    except Exception as err:
        raise AbliterateError(
            _hidden(
                f"uploading {export_dir} to the hub repo {repo} failed ({_reason(err)}); the export is kept: "
                f"rerun the same command, or upload it with `hf upload {repo} {export_dir}`",
                token,
            )
        ) from None
    url = getattr(info, "commit_url", None) or str(info)
    log.info("pushed %s to %s (%s)", export_dir, repo, url)
    return url
