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
