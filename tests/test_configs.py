"""Every shipped YAML preset parses with the CLI (and so has no unknown key)."""

from pathlib import Path

import pytest

from abliterate.cli import main

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_parses(path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--config", str(path), "--model", "some/model", "--print_config"])
    assert exit_.value.code in (0, None)
    out = capsys.readouterr().out
    assert "model: some/model" in out


def test_presets_exist():
    names = {p.name for p in CONFIGS}
    assert {"cpu.yaml", "gpu.yaml", "ddp.yaml", "ddp_cpu.yaml", "big_model.yaml"} <= names
