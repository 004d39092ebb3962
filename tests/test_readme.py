"""The README's programmatic example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_block(section: str) -> str:
    text = README.read_text()
    start = text.index(section)
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def test_readme_programmatic_example(organism_dir, capsys):
    code = python_block("## Programmatic use")
    namespace = {"MODEL_DIR": str(organism_dir)}
    exec(compile(code, "README.md", "exec"), namespace)
    module = namespace["module"]
    assert module.directions.shape == (module.n_layers, 1, module.model.config.hidden_size)
    assert f"torch.Size({list(module.directions.shape)})" in capsys.readouterr().out


def readme_commands() -> list[list[str]]:
    """Every `abliterate VERB ...` line of the README's bash blocks, as argv (comments dropped)."""
    import shlex

    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.splitlines():
            line = line.split("#")[0].strip()
            if line.startswith("abliterate "):
                commands.append(shlex.split(line)[1:])
    return commands


def test_readme_commands_parse(monkeypatch, tmp_path):
    """Each command the README shows is accepted as written (parsed and instantiated, not run)."""
    from abliterate.cli import AbliterateCLI, main

    ran = []
    monkeypatch.setattr(AbliterateCLI, "_run_subcommand", lambda self, verb: ran.append(verb))
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # configs/ paths are relative to the repo
    commands = [c for c in readme_commands() if c[0] != "demo"]  # the demo runs for real in test_wheel
    assert len(commands) >= 5
    for argv in commands:
        main(argv)
    assert ran == [argv[0] for argv in commands]
