"""`--hub.push_to`: the export goes to the Hugging Face Hub in one commit, and only with the flag.

The hub cannot be reached from the tests, so a stand-in answers its HTTP API on 127.0.0.1 (the routes
HfApi.create_repo, list_repo_files and upload_folder use; every file is a "regular" upload, so no LFS
or Xet storage is involved) and records every request: the assertions are on what went over the wire.
"""

import base64
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import yaml
from helpers import copy_run
from test_reproduce import TRAINER

from abliterate.cli import main
from abliterate.export import export_files, model_card

TOKEN = "hf_StandInSecret0123456789abcdefXYZ"


class StandInHub:
    """A few routes of the hub's HTTP API over in-memory repos: {repo id: {path: bytes}}."""

    def __init__(self, token: str = TOKEN, echo_token: bool = False):
        self.token, self.echo_token = token, echo_token
        self.requests: list[tuple[str, str, dict, bytes]] = []
        self.repos: dict[str, dict[str, bytes]] = {}
        self.created: list[dict] = []
        self.commits: list[list[dict]] = []
        self.refuse_commit = False
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                hub.handle(self, "GET")

            def do_POST(self):
                hub.handle(self, "POST")

            def do_HEAD(self):
                hub.handle(self, "HEAD")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def routes(self) -> list[str]:
        """Each request as METHOD and route kind (the repo id and revision left out), but huggingface_hub's own
        daily fetch of /api/agent-harnesses (for its user agent)."""
        kinds = []
        for method, path, _, _ in self.requests:
            parts = urlparse(path).path.split("/")
            if parts[1:3] == ["api", "agent-harnesses"]:
                continue
            if parts[1:3] == ["api", "models"]:
                kinds.append(f"{method} {parts[5] if len(parts) > 5 else 'info'}")
            else:
                kinds.append(f"{method} {'/'.join(parts[2:4])}")
        return kinds

    @staticmethod
    def send(handler, code: int, body) -> None:
        data = json.dumps(body).encode()
        handler.send_response(code)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(data)

    def handle(self, handler, method: str) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        self.requests.append((method, handler.path, {k.lower(): v for k, v in handler.headers.items()}, body))
        path = unquote(urlparse(handler.path).path)
        if path == "/api/validate-yaml":  # the model card's front matter must be YAML, as on the hub
            content = json.loads(body)["content"]
            try:
                yaml.safe_load(content.split("---")[1])
            except yaml.YAMLError as err:
                return self.send(handler, 400, {"errors": [{"message": str(err)}]})
            return self.send(handler, 200, {"errors": [], "warnings": []})
        auth = handler.headers.get("Authorization")
        if auth != f"Bearer {self.token}":
            echo = f": got {auth}" if self.echo_token else ""
            return self.send(handler, 401, {"error": f"Invalid credentials in Authorization header{echo}"})
        if path == "/api/repos/create":
            payload = json.loads(body)
            repo = f"{payload['organization']}/{payload['name']}"
            self.created.append(payload)
            if repo in self.repos:
                return self.send(handler, 409, {"error": "You already created this model repo", "url": repo})
            self.repos[repo] = {}
            return self.send(handler, 200, {"url": f"{self.url}/{repo}"})
        parts = path.split("/")  # /api/models/{ns}/{name}/{action}/{revision}...
        repo, action = "/".join(parts[3:5]), parts[5] if len(parts) > 5 else ""
        if parts[1:3] != ["api", "models"] or repo not in self.repos:
            return self.send(handler, 404, {"error": "Repository not found"})
        files = self.repos[repo]
        if action == "tree":
            listing = [{"type": "file", "path": p, "size": len(b), "oid": "0" * 40} for p, b in sorted(files.items())]
            return self.send(handler, 200, listing)
        if action == "preupload":
            asked = json.loads(body)["files"]
            modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in asked]
            return self.send(handler, 200, {"files": modes})
        if action == "commit":
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            if self.refuse_commit:
                echo = f" for token {auth.split()[-1]}" if self.echo_token else ""
                return self.send(handler, 403, {"error": f"You don't have the rights to write to {repo}{echo}"})
            self.commits.append(lines)
            for line in lines:
                value = line["value"]
                if line["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif line["key"] == "deletedFile":
                    files.pop(value["path"], None)
                elif line["key"] != "header":
                    return self.send(handler, 400, {"error": f"the stand-in does not take {line['key']}"})
            commit = f"{len(self.commits):040d}"
            return self.send(handler, 200, {"commitUrl": f"{self.url}/{repo}/commit/{commit}", "commitOid": commit})
        return self.send(handler, 404, {"error": f"no route {method} {path}"})


@pytest.fixture(scope="module")
def run_dir(finished_organism_run, tmp_path_factory):
    run, config, card = copy_run(finished_organism_run, tmp_path_factory.mktemp("hub"))
    return run, config, card["trial"]


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The stand-in, with this process pointed at it: endpoint, online, HF_TOKEN set, no stored token."""
    from huggingface_hub import constants

    stand_in = StandInHub()
    monkeypatch.setattr(constants, "ENDPOINT", stand_in.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    yield stand_in
    stand_in.close()


def export_args(run_dir, target: Path, *extra) -> list[str]:
    run, config, trial = run_dir
    return ["export", "--output_dir", str(run), "--config", str(config), "--trial", str(trial)] + [
        "--export_dir",
        str(target),
        *TRAINER,
        *extra,
    ]


def run_main(args, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        main(args)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def no_token_anywhere(token: str, texts, *roots: Path) -> None:
    """`token` is in none of `texts` (what was printed or logged) and in no file under `roots`."""
    for text in texts:
        assert token not in text
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file():
                assert token.encode() not in path.read_bytes(), path


def test_push_uploads_the_export_in_one_commit(run_dir, tmp_path):
    """In a process of its own, as a user runs it: HF_ENDPOINT and HF_TOKEN from the environment."""
    hub = StandInHub()
    target = tmp_path / "shared"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    env.update(HF_ENDPOINT=hub.url, HF_TOKEN=TOKEN, HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="0")
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_DISABLE_TELEMETRY="1")
    args = export_args(run_dir, target, "--hub.push_to", "tester/organism-abliterated", "--hub.private", "true")
    try:
        done = subprocess.run(
            [sys.executable, "-m", "abliterate", *args], env=env, capture_output=True, text=True, timeout=600
        )
    finally:
        hub.close()
    assert done.returncode == 0, done.stderr[-3000:]

    assert hub.created[0] == {
        "name": "organism-abliterated",
        "organization": "tester",
        "visibility": "private",
        "type": "model",
    }
    assert len(hub.commits) == 1  # one commit holds the whole export
    pushed = hub.repos["tester/organism-abliterated"]
    written = export_files(target)
    assert written is not None and set(pushed) == written  # exactly the export's files ...
    assert {"reproduce.json", "README.md", "abliterate.json", "model.safetensors", "config.json"} <= written
    for name in written:  # ... byte for byte
        assert pushed[name] == (target / name).read_bytes(), name
    card = pushed["README.md"].decode()
    assert card.startswith("---\nlibrary_name: transformers\ntags: [abliterated, abliterate]\n---\n")
    assert "| refusals | kl |" in card and "| this model |" in card
    assert "## Parameters" in card and "## How it was made" in card and "## Reproduce" in card
    assert json.loads(pushed["reproduce.json"])["trial"]["number"] == run_dir[2]
    assert "abliterate: trial" in hub.commits[0][0]["value"]["summary"]

    routes = hub.routes()
    assert set(routes) == {"POST repos/create", "GET tree", "POST validate-yaml", "POST preupload", "POST commit"}
    assert routes[0] == "POST repos/create"  # checked before the model was loaded
    authorised = [
        h.get("authorization") for _, path, h, _ in hub.requests if "validate" not in path and "agent" not in path
    ]
    assert authorised and set(authorised) == {f"Bearer {TOKEN}"}
    no_token_anywhere(TOKEN, [done.stdout, done.stderr], tmp_path, run_dir[0])
    assert "pushed" in done.stderr and "tester/organism-abliterated" in done.stderr


def test_nothing_is_uploaded_without_the_flag(run_dir, hub, tmp_path, capsys):
    code, _, err = run_main(export_args(run_dir, tmp_path / "kept"), capsys)
    assert code == 0, err
    assert (tmp_path / "kept" / "reproduce.json").is_file()
    assert hub.requests == []  # not one request, upload or other


@pytest.mark.parametrize("why", ["no token", "offline", "refused token", "bad repo id"])
def test_a_push_that_cannot_happen_stops_before_the_model_loads(why, run_dir, hub, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    import abliterate.module

    loads = []
    monkeypatch.setattr(abliterate.module, "load_model", lambda *a, **k: loads.append(a) or 1 / 0)
    repo, token = "tester/organism-abliterated", TOKEN
    if why == "no token":
        monkeypatch.delenv("HF_TOKEN")
        needle = "needs a Hugging Face token with write access: set HF_TOKEN, run `hf auth login`, or pass --hub.token"
    elif why == "offline":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        needle = "HF_HUB_OFFLINE is set"
    elif why == "refused token":
        token = "hf_NotTheRightOne0123456789"
        monkeypatch.setenv("HF_TOKEN", token)
        hub.echo_token = True  # a server that repeats the token it got: it must still not be printed
        needle = (
            "repo tester/organism-abliterated (HTTP 401: Invalid credentials in Authorization header: got Bearer ***)"
        )
    else:
        repo = "not a repo id"
        needle = "hub.push_to='not a repo id' is not a hub repo id; use user/name or org/name"
    code, out, err = run_main(export_args(run_dir, tmp_path / "x", "--hub.push_to", repo), capsys)
    assert code == 2 and out == ""
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # after Lightning's seed line, if any
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]) and needle in errors[0], err
    assert loads == [] and not (tmp_path / "x").exists()
    assert set(hub.routes()) <= {"POST repos/create", "GET info"}  # create_repo asks whether it exists on a 401
    no_token_anywhere(token, [out, err], tmp_path)


def test_a_refused_upload_is_one_line_and_keeps_the_export(run_dir, hub, tmp_path, capsys, caplog):
    hub.refuse_commit, hub.echo_token = True, True  # the refusal repeats the token
    target = tmp_path / "kept"
    code, out, err = run_main(export_args(run_dir, target, "--hub.push_to", "tester/refused"), capsys)
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # after the export's own progress
    assert len(errors) == 1 and err.rstrip().endswith(errors[0])
    assert "uploading" in errors[0] and "(HTTP 403: You don't have the rights to write to tester/refused" in errors[0]
    assert "for token ***)" in errors[0]  # the token the server repeated, hidden
    assert "the export is kept" in errors[0] and "hf upload tester/refused" in errors[0]
    assert export_files(target) is not None and hub.repos["tester/refused"] == {}
    no_token_anywhere(TOKEN, [out, err, caplog.text], tmp_path)


def test_a_push_replaces_an_earlier_export_but_never_other_files(run_dir, hub, tmp_path, capsys):
    hub.repos["tester/ours"] = {"abliterate.json": b"{}", "model-00002-of-00002.safetensors": b"stale"}
    hub.repos["tester/theirs"] = {"notes.md": b"keep me"}
    for repo in ("tester/ours", "tester/theirs"):
        code, _, err = run_main(export_args(run_dir, tmp_path / repo, "--hub.push_to", repo), capsys)
        assert code == 0, err
    written = export_files(tmp_path / "tester" / "ours")
    assert set(hub.repos["tester/ours"]) == written  # the stale shard deleted, in the same commit
    assert [line["key"] for line in hub.commits[0]].count("deletedFile") == 1
    assert set(hub.repos["tester/theirs"]) == written | {"notes.md"}


def test_the_card_names_a_hub_base_model_and_never_a_local_path(tmp_path):
    card = {"before": {"refusals": 1.0, "kl": 0.0, "degeneration": 0.1}, "after": {"refusals": 0.0, "kl": 0.01}}
    card["after"]["degeneration"] = 0.2
    assert "\nbase_model: Qwen/Qwen3-4B-Instruct-2507\n" in model_card("Qwen/Qwen3-4B-Instruct-2507", card)
    snapshot = tmp_path / "models--org--name" / "snapshots" / ("0" * 40)
    assert "\nbase_model: org/name\n" in model_card(str(snapshot), card)
    local = tmp_path / "my-model"
    local.mkdir()
    text = model_card(str(local), card)
    assert "base_model" not in text and str(tmp_path) in text  # named in the prose, not as a hub id
    assert "| | refusals | kl | degeneration |" in text and "| this model | 0.0 | 0.01 | 0.2 |" in text


def test_run_pushes_too_and_a_token_flag_is_never_printed(run_dir, hub, tmp_path, capsys, caplog, monkeypatch):
    """`run --hub.push_to` (here a rerun: nothing new to export, the export it made is pushed), with the
    token given as --hub.token and none in the environment."""
    run, config, _ = run_dir
    monkeypatch.delenv("HF_TOKEN")
    args = ["run", "--output_dir", str(run), "--config", str(config), "--study.n_trials", "3", *TRAINER]
    code, out, err = run_main([*args, "--hub.push_to", "tester/from-run", "--hub.token", TOKEN], capsys)
    assert code == 0, err
    assert "nothing new" in err and len(hub.commits) == 1
    assert set(hub.repos["tester/from-run"]) == export_files(run / "model")
    assert hub.created[0]["visibility"] == "public"  # without --hub.private
    no_token_anywhere(TOKEN, [out, err, caplog.text], tmp_path, run)


def test_run_without_a_token_stops_before_any_work(run_dir, hub, tmp_path, capsys, monkeypatch):
    import abliterate.module

    monkeypatch.delenv("HF_TOKEN")
    loads = []
    monkeypatch.setattr(abliterate.module, "load_model", lambda *a, **k: loads.append(a) or 1 / 0)
    fresh = tmp_path / "fresh-run"
    args = ["run", "--model", "unused", "--config", str(run_dir[1]), "--output_dir", str(fresh), *TRAINER]
    code, out, err = run_main([*args, "--hub.push_to", "tester/x"], capsys)
    assert code == 2 and out == "" and "needs a Hugging Face token" in err.splitlines()[-1]
    assert loads == [] and not (fresh / "study.db").exists() and not (fresh / "config.yaml").exists()
    assert hub.requests == []
