"""The layering of docs/architecture.md, checked on the source: each module imports only from its own
floor or below, and no module grows past 400 lines (trainer.py, the verbs, past 200)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "abliterate"

FLOORS = {
    "maths": {
        "directions",
        "ablation",
        "hooks",
        "editing",
        "models",
        "metrics",
        "decode",
        "pareto",
        "plans",
        "scorers",
        "prompts",
        "prompt_files",
        "prompt_splits",
        "cache",
        "export",
        "adapters",
        "options",
        "errors",
        "writers",
        "rundir",
        "organism",
        "organism_data",
        "organism_training",
        "classifier",
        "chat",
        "demo",
        "hub",
        "reproduce",
        "thinking",
        "organism_thinking",
        "organism_two_styles",
        "inspect_views",
        "benchmark",
    },
    "lightning": {"module", "data", "callbacks", "passes"},
    "orchestration": {"pipeline", "study", "reports", "workers", "runconfig", "verbs", "verbs_inspect", "validation"},
    "verbs": {"trainer"},
    "cli": {"cli", "cli_errors", "__main__", "__init__"},
}
ORDER = list(FLOORS)


def floor(module: str) -> str:
    for name, members in FLOORS.items():
        if module in members:
            return name
    raise AssertionError(f"abliterate.{module} is on no floor of docs/architecture.md: add it there and here")


def imports(path: Path) -> set[str]:
    """abliterate modules a source file imports (at any depth: lazy imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("abliterate"):
            parts = node.module.split(".")
            if len(parts) > 1:
                found.add(parts[1])
            else:  # from abliterate import verbs
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("abliterate."):
                    found.add(alias.name.split(".")[1])
    return found


def sources():
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        yield (relative.parts[0] if len(relative.parts) > 1 else path.stem), path


@pytest.mark.parametrize("module, path", list(sources()), ids=lambda v: str(v) if isinstance(v, str) else v.name)
def test_imports_only_from_its_floor_or_below(module, path):
    own = ORDER.index(floor(module))
    for other in imports(path):
        assert ORDER.index(floor(other)) <= own, f"{path.name} ({floor(module)}) imports {other} ({floor(other)})"


def test_maths_never_imports_lightning():
    for module, path in sources():
        if floor(module) == "maths":
            text = path.read_text()
            assert "import lightning" not in text and "from lightning" not in text, path.name


def test_module_sizes():
    for _, path in sources():
        limit = 200 if path.name == "trainer.py" else 400
        assert len(path.read_text().splitlines()) < limit, f"{path.name} has more than {limit} lines"
